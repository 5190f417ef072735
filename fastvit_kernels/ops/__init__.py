"""Functional ops: each a torch.library custom op with fake impl, autograd and backend dispatch."""

import importlib

from .bias_attention import bias_attention
from .dwconv_bn_act import dwconv_bn_act
from .dwconv_layernorm import dwconv_layernorm
from .head_mixing_attention import head_mixing_attention
from .patch_attention import attention, patch_attention
from .xca_attention import xca_attention

__all__ = ["attention", "bias_attention", "dwconv_bn_act", "dwconv_layernorm", "head_mixing_attention", "patch_attention",
           "xca_attention", "implementations"]


def implementations() -> dict:
    """``{op name: backend names it implements}``, from each op module's ``IMPLEMENTATIONS`` table."""
    tables = {name: importlib.import_module(f"{__name__}.{name}").IMPLEMENTATIONS
              for name in ("dwconv_bn_act", "dwconv_layernorm", "patch_attention", "xca_attention", "bias_attention",
                           "head_mixing_attention")}
    tables["attention"] = importlib.import_module(f"{__name__}.patch_attention").CROSS_IMPLEMENTATIONS
    return {name: tuple(impl.backend for impl in table) for name, table in tables.items()}
