"""EdgeNeXt XX-Small / X-Small / Small / Base on the fused ops, with timm's state_dict keys.

Architecture from Maaz et al., "EdgeNeXt: Efficiently Amalgamated CNN-Transformer Architecture for
Mobile Vision Applications" (arXiv:2206.10589); sizes as timm's ``edgenext_*`` registrations. Module
names follow timm (``stem.0/1``, ``stages.i.downsample.0/1``, ``stages.i.blocks.j``, ``head.norm``,
``head.fc``). The official checkpoints load through :func:`convert_official_edgenext`.

The network runs channels_last: the blocks' tokens are views of the map, the depthwise convs run on
``dwconv_bn_act`` and the SDTA attention on ``xca_attention``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import memory
from ..modules.edgenext import FusedConvBlock, FusedSDTABlock


@dataclass(frozen=True)
class EdgeNeXtConfig:
    depths: Tuple[int, ...]
    dims: Tuple[int, ...]
    heads: Tuple[int, ...] = (8, 8, 8, 8)
    global_block_counts: Tuple[int, ...] = (0, 1, 1, 1)
    kernel_sizes: Tuple[int, ...] = (3, 5, 7, 9)
    d2_scales: Tuple[int, ...] = (2, 2, 3, 4)
    use_pos_emb: Tuple[bool, ...] = (False, True, False, False)
    expand_ratio: float = 4
    ls_init_value: float = 1e-6


CONFIGS = {
    "edgenext_xx_small": EdgeNeXtConfig(depths=(2, 2, 6, 2), dims=(24, 48, 88, 168), heads=(4, 4, 4, 4)),
    "edgenext_x_small": EdgeNeXtConfig(depths=(3, 3, 9, 3), dims=(32, 64, 100, 192), heads=(4, 4, 4, 4)),
    "edgenext_small": EdgeNeXtConfig(depths=(3, 3, 9, 3), dims=(48, 96, 160, 304)),
    "edgenext_base": EdgeNeXtConfig(depths=(3, 3, 9, 3), dims=(80, 160, 288, 584)),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (timm's ``LayerNorm2d``, same keys)."""

    def forward(self, x: Tensor) -> Tensor:
        t = memory.channels_last(x).permute(0, 2, 3, 1)
        return memory.layer_norm(t, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class EdgeNeXtStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int, config: EdgeNeXtConfig, index: int,
                 drop_path_rates):
        super().__init__()
        if stride == 1:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, eps=1e-6), nn.Conv2d(in_chs, out_chs, 2, 2))
        blocks = []
        for i in range(depth):
            rate = float(drop_path_rates[i])
            if i < depth - config.global_block_counts[index]:
                blocks.append(FusedConvBlock(out_chs, kernel_size=config.kernel_sizes[index],
                                             expand_ratio=config.expand_ratio, ls_init_value=config.ls_init_value,
                                             drop_path=rate))
            else:
                blocks.append(FusedSDTABlock(out_chs, num_scales=config.d2_scales[index],
                                             num_heads=config.heads[index], expand_ratio=config.expand_ratio,
                                             use_pos_emb=config.use_pos_emb[index],
                                             ls_init_value=config.ls_init_value, drop_path=rate))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class EdgeNeXt(nn.Module):
    """EdgeNeXt classifier. ``forward(x [B, 3, H, W]) -> logits [B, num_classes]``."""

    def __init__(self, config: EdgeNeXtConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        dims = config.dims
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        rates = torch.linspace(0, drop_path_rate, sum(config.depths)).split(list(config.depths))  # timm's
        self.stages = nn.Sequential(*[
            EdgeNeXtStage(dims[max(i - 1, 0)], dims[i], 1 if i == 0 else 2, config.depths[i], config, i, rates[i])
            for i in range(4)])
        self.norm_pre = nn.Identity()
        self.head = _NormClassifierHead(dims[-1], num_classes, drop_rate)

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"EdgeNeXt: x must be [B, {self.stem[0].in_channels}, H, W], got shape "
                             f"{tuple(x.shape)}")
        return self.stages(self.stem(memory.channels_last(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class _NormClassifierHead(nn.Module):
    """timm ``NormMlpClassifierHead`` without a hidden layer (keys ``norm``, ``fc``)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(in_features, eps=1e-6)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.norm(x.mean((2, 3)))))


# Official EdgeNeXt (mmaaz60/EdgeNeXt) key names -> timm's, applied in order to each key. The official
# model keeps the stem and downsamplers in one list (downsample_layers.0 is the stem), the blocks in
# stages.i.j, the pointwise MLP as pwconv1/2 and the final norm outside the head (facts from timm's
# edgenext.checkpoint_filter_fn, which performs the same renaming).
_OFFICIAL_RULES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.(\d+)", r"stages.\1.downsample.\2"),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.pwconv(\d)\.", r".mlp.fc\1."),
    (r"^head\.", "head.fc."),
    (r"^norm\.", "head.norm."),
)


def convert_official_edgenext(state_dict: Mapping[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Official EdgeNeXt checkpoint (a train checkpoint: ``model_ema``/``model``/``state_dict`` entry,
    or a bare state_dict) -> ``model``'s (timm's) keys. 2-D weights of layers that are convs in
    ``model`` are reshaped to the conv's shape."""
    for wrapper in ("model_ema", "model", "state_dict"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
            break
    expected = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OFFICIAL_RULES:
            key = re.sub(pattern, replacement, key)
        if key not in expected:
            raise KeyError(f"convert_official_edgenext: no counterpart for key {key!r} in {type(model).__name__}")
        out[key] = value.reshape(expected[key].shape) if value.shape != expected[key].shape else value
    return out
