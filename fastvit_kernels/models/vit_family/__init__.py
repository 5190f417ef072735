"""The ViT family of lucidrains' ``vit-pytorch`` on the fused ops.

Each class takes the constructor arguments of the ``vit_pytorch`` class of the same name and has the
same state_dict keys, so weights trained with ``vit-pytorch`` load unchanged; attention runs on
``patch_attention`` / ``attention`` / ``head_mixing_attention``. Modules mirror vit-pytorch's files:
``vit.py`` (ViT and the shared Transformer pieces), ...
"""

from .vit import ViT

__all__ = ["ViT"]

from .cross_vit import CrossViT  # noqa: E402
from .cvt import CvT  # noqa: E402
from .pit import PiT  # noqa: E402
from .t2t import T2TViT  # noqa: E402

__all__ += ["CrossViT", "CvT", "PiT", "T2TViT"]
from .levit import LeViT  # noqa: E402

__all__ += ["LeViT"]
