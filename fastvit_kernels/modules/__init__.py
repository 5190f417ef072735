"""Drop-in nn.Modules over the fused ops (same constructor arguments and state_dict keys)."""

from .conv_bn_act import FusedConvBNAct, FusedConvBNActSequential, Unsupported

__all__ = ["FusedConvBNAct", "FusedConvBNActSequential", "Unsupported"]
