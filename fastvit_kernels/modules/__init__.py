"""Drop-in nn.Modules over the fused ops (same constructor arguments and state_dict keys)."""

from .conv_bn_act import FusedConvBNAct, FusedConvBNActSequential, Unsupported
from .mobilevit_block import FusedMobileViTBlock
from .patch_transformer import PatchTransformerBlock

__all__ = ["FusedConvBNAct", "FusedConvBNActSequential", "FusedMobileViTBlock", "PatchTransformerBlock",
           "Unsupported"]
