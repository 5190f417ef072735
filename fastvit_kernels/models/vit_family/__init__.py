"""The ViT family of lucidrains' ``vit-pytorch`` on the fused ops.

Each class takes the constructor arguments of the ``vit_pytorch`` class of the same name and has the
same state_dict keys, so weights trained with ``vit-pytorch`` load unchanged. Modules mirror
vit-pytorch's files; the op each model's attention runs on:

| module | classes | attention |
|---|---|---|
| ``vit.py`` | ``ViT`` (and the shared Transformer pieces) | ``patch_attention`` (1 x 1 patch) |
| ``deepvit.py`` | ``DeepViT`` | ``head_mixing_attention`` (re-attention) |
| ``cait.py`` | ``CaiT`` | ``head_mixing_attention`` (talking heads, self and class attention) |
| ``distill.py`` | ``DistillableViT``, ``DistillWrapper`` | ``patch_attention`` |
| ``t2t.py`` | ``T2TViT`` | ``patch_attention``; head dims 147/1323 on the C++ kernels |
| ``cross_vit.py`` | ``CrossViT`` | ``patch_attention``; cls cross attention on ``attention`` |
| ``pit.py`` | ``PiT`` | ``patch_attention``; pooling conv on ``dwconv_bn_act`` |
| ``cvt.py`` | ``CvT`` | ``attention`` (strided k/v); q/k/v depthwise conv + BN on ``dwconv_bn_act`` |
| ``levit.py`` | ``LeViT`` | ``bias_attention`` |
| ``mobile_vit.py`` | ``MobileViT`` | ``patch_attention`` (patch grouping in the kernel) |
"""

from .cait import CaiT
from .cross_vit import CrossViT
from .cvt import CvT
from .deepvit import DeepViT
from .distill import DistillableViT, DistillWrapper
from .levit import LeViT
from .mobile_vit import MobileViT
from .pit import PiT
from .t2t import T2TViT
from .vit import ViT

__all__ = ["CaiT", "CrossViT", "CvT", "DeepViT", "DistillWrapper", "DistillableViT", "LeViT", "MobileViT", "PiT",
           "T2TViT", "ViT"]
