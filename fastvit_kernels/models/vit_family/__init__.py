"""The ViT family of lucidrains' ``vit-pytorch`` on the fused ops.

Each class takes the constructor arguments of the ``vit_pytorch`` class of the same name and has the
same state_dict keys, so weights trained with ``vit-pytorch`` load unchanged; attention runs on
``patch_attention`` / ``attention`` / ``head_mixing_attention``. Modules mirror vit-pytorch's files:
``vit.py`` (ViT and the shared Transformer pieces), ...
"""

from .vit import ViT
from .deepvit import DeepViT
from .cait import CaiT
from .distill import DistillableViT, DistillWrapper
from .mobile_vit import MobileViT

__all__ = ["ViT"]
__all__ += ["DeepViT"]
__all__ += ["CaiT"]
__all__ += ["DistillableViT", "DistillWrapper"]
__all__ += ["MobileViT"]
