"""Functional ops: each a torch.library custom op with fake impl, autograd and backend dispatch."""

import importlib

from .dwconv_bn_act import dwconv_bn_act
from .patch_attention import patch_attention

__all__ = ["dwconv_bn_act", "patch_attention", "implementations"]


def implementations() -> dict:
    """``{op name: backend names it implements}``, from each op module's ``IMPLEMENTATIONS`` table."""
    return {name: tuple(impl.backend for impl in importlib.import_module(f"{__name__}.{name}").IMPLEMENTATIONS)
            for name in ("dwconv_bn_act", "patch_attention")}
