"""``patch(model)``: swap every supported submodule of an existing model for its fused equivalent.

One table maps "this kind of module" to "the converter that builds its fused replacement"; one walk
applies it. A converter raises ``Unsupported`` for a configuration it cannot fuse, and the module is
left as it was. Later ops add rows to ``REPLACEMENTS``, never a new walk.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch.nn as nn

from .modules.conv_bn_act import FusedConvBNAct, Unsupported
from .modules.edgenext import FusedConvBlock, FusedSDTABlock, FusedXCA
from .modules.levit import FusedLeViTAttention, FusedLeViTAttentionDownsample, share_norm_layer
from .modules.mobilevit_block import FusedMobileViTBlock


def _is_timm(module: nn.Module, class_name: str, timm_module: str = "timm.") -> bool:
    # By name, so timm stays an optional dependency; timm_module narrows common names (ConvBlock).
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__.startswith(timm_module)


def _is_conv_bn_sequential(module: nn.Module) -> bool:
    return (type(module) is nn.Sequential and len(module) in (2, 3)
            and isinstance(module[0], nn.Conv2d) and isinstance(module[1], nn.BatchNorm2d))


# First match wins; a replaced module's children are not visited (the fused module took them over).
REPLACEMENTS: List[Tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = [
    (lambda m: _is_timm(m, "MobileVitBlock"), FusedMobileViTBlock.from_module),
    (lambda m: _is_timm(m, "SplitTransposeBlock", "timm.models.edgenext"), FusedSDTABlock.from_module),
    (lambda m: _is_timm(m, "ConvBlock", "timm.models.edgenext"), FusedConvBlock.from_module),
    (lambda m: _is_timm(m, "CrossCovarianceAttn") or _is_timm(m, "XCA", "timm.models.xcit"),
     FusedXCA.from_module),
    (lambda m: _is_timm(m, "Attention", "timm.models.levit"), FusedLeViTAttention.from_module),
    (lambda m: _is_timm(m, "AttentionDownsample", "timm.models.levit"), FusedLeViTAttentionDownsample.from_module),
    (lambda m: _is_timm(m, "LinearNorm", "timm.models.levit") or _is_timm(m, "ConvNorm", "timm.models.levit"),
     share_norm_layer),
    (lambda m: _is_timm(m, "ConvNormAct"), FusedConvBNAct.from_module),
    (_is_conv_bn_sequential, FusedConvBNAct.from_module),
]


def patch(model: nn.Module) -> Dict[str, nn.Module]:
    """Replace supported submodules of ``model`` in place.

    Returns ``{qualified name: original module}`` for everything replaced (restore one with
    ``model.set_submodule(name, original)``). Parameters and buffers are shared with the originals,
    so state_dict keys, optimizers and loaded weights carry over. What is replaced: timm
    ``MobileVitBlock`` -> ``FusedMobileViTBlock``; EdgeNeXt's ``SplitTransposeBlock`` / ``ConvBlock`` /
    ``CrossCovarianceAttn`` and XCiT's ``XCA`` -> ``FusedSDTABlock`` / ``FusedConvBlock`` / ``FusedXCA``;
    LeViT's ``Attention`` / ``AttentionDownsample`` -> ``FusedLeViTAttention`` /
    ``FusedLeViTAttentionDownsample`` and its ``LinearNorm`` / ``ConvNorm`` -> BatchNorm-folding ones; timm ``ConvNormAct`` and ``nn.Sequential(Conv2d,
    BatchNorm2d[, SiLU|ReLU|Identity])`` -> ``FusedConvBNAct`` (depthwise convs on the fused kernel,
    others with BatchNorm folded at eval). Unsupported configurations (other activations, convs that
    override forward, layer scale or q/k norm in a transformer block) are left alone, and their
    children are still visited.
    """
    replaced: Dict[str, nn.Module] = {}

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qualified = f"{prefix}{name}"
            fused = _convert(child)
            if fused is None:
                walk(child, qualified + ".")
            else:  # in the child's train/eval mode (the builders' take_mode)
                setattr(parent, name, fused)
                replaced[qualified] = child

    walk(model, "")
    return replaced


def _convert(module: nn.Module):
    for matches, convert in REPLACEMENTS:
        if matches(module):
            try:
                return convert(module)
            except Unsupported:
                return None
    return None
