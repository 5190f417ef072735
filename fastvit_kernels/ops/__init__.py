"""Functional ops: each a torch.library custom op with fake impl, autograd and backend dispatch."""

from .dwconv_bn_act import dwconv_bn_act
from .patch_attention import patch_attention

__all__ = ["dwconv_bn_act", "patch_attention"]
