"""Fused kernels for mobile and hybrid vision transformers.

``import fastvit_kernels`` never fails because Triton, the compiled extension or a GPU is missing: the
affected backend is unavailable and ``python -m fastvit_kernels.info`` says why.
"""

from .backends import BACKENDS, BackendUnavailable, use_backend
from .models import create_model, list_models
from .modules import FusedConvBNAct, FusedConvBNActSequential, FusedMobileViTBlock
from .ops import (attention, bias_attention, dwconv_bn_act, dwconv_layernorm, head_mixing_attention, patch_attention,
                  xca_attention)
from .patch import patch

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "FusedConvBNAct",
    "FusedConvBNActSequential",
    "FusedMobileViTBlock",
    "attention",
    "bias_attention",
    "create_model",
    "dwconv_bn_act",
    "dwconv_layernorm",
    "head_mixing_attention",
    "list_models",
    "patch",
    "patch_attention",
    "use_backend",
    "xca_attention",
]
