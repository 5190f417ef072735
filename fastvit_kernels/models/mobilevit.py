"""MobileViT (v1) XXS / XS / S on the fused ops, with timm's state_dict keys.

Architecture from Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly
Vision Transformer" (arXiv:2110.02178), Table 4; module names follow timm's ``ByobNet`` build of it
(``stem``, ``stages.i.j``, ``final_conv``, ``head.fc``) so ``load_state_dict(timm_model.state_dict())``
works unchanged. Official ml-cvnets checkpoints load through
:func:`fastvit_kernels.models.cvnets.convert_cvnets_mobilevit`.

The whole network runs channels_last: the pointwise convs are then plain GEMMs over pixel rows,
``FusedMobileViTBlock`` takes its tokens straight from that layout, the depthwise convs run on
``dwconv_bn_act``, and every BatchNorm folds into its conv at eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import memory
from ..modules.conv_bn_act import FusedConvBNAct
from ..modules.mobilevit_block import FusedMobileViTBlock, _make_divisible
from ..modules.patch_transformer import drop_path


@dataclass(frozen=True)
class MobileViTConfig:
    # Per stage: (inverted-residual blocks, channels, stride, expansion); then the transformer
    # (dim, depth) of the MobileViT block ending stages 3-5 (None for stages 1-2).
    stages: Tuple[Tuple[int, int, int, float, Tuple[int, int] | None], ...]
    stem_chs: int = 16
    num_features: int = 640
    patch_size: int = 2


CONFIGS = {
    "mobilevit_xxs": MobileViTConfig(stages=(
        (1, 16, 1, 2.0, None), (3, 24, 2, 2.0, None),
        (1, 48, 2, 2.0, (64, 2)), (1, 64, 2, 2.0, (80, 4)), (1, 80, 2, 2.0, (96, 3))), num_features=320),
    "mobilevit_xs": MobileViTConfig(stages=(
        (1, 32, 1, 4.0, None), (3, 48, 2, 4.0, None),
        (1, 64, 2, 4.0, (96, 2)), (1, 80, 2, 4.0, (120, 4)), (1, 96, 2, 4.0, (144, 3))), num_features=384),
    "mobilevit_s": MobileViTConfig(stages=(
        (1, 32, 1, 4.0, None), (3, 64, 2, 4.0, None),
        (1, 96, 2, 4.0, (144, 2)), (1, 128, 2, 4.0, (192, 4)), (1, 160, 2, 4.0, (240, 3))), num_features=640),
}


class InvertedResidual(nn.Module):
    """MobileNetV2 block as timm's ``BottleneckBlock(bottle_in=True, linear_out=True)``: 1x1 expand
    + SiLU, depthwise 3x3 + SiLU (``dwconv_bn_act``), 1x1 project, residual when shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: float, drop_path_rate: float = 0.0,
                 act_layer=nn.SiLU):
        super().__init__()
        mid_chs = _make_divisible(in_chs * expansion)
        # timm keeps an Identity shortcut only when shapes match (no keys either way).
        self.shortcut = nn.Identity() if in_chs == out_chs and stride == 1 else None
        self.conv1_1x1 = FusedConvBNAct(in_chs, mid_chs, 1, act_layer=act_layer)
        self.conv2_kxk = FusedConvBNAct(mid_chs, mid_chs, 3, stride, groups=mid_chs, act_layer=act_layer)
        self.conv3_1x1 = FusedConvBNAct(mid_chs, out_chs, 1, apply_act=False)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        y = drop_path(y, self.drop_path_rate, self.training)
        return y if self.shortcut is None else y + x


class MobileViT(nn.Module):
    """MobileViT v1 classifier. ``forward(x [B, 3, H, W]) -> logits [B, num_classes]``."""

    def __init__(self, config: MobileViTConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, act_layer=nn.SiLU):
        super().__init__()
        self.num_classes = num_classes
        self.stem = FusedConvBNAct(in_chans, config.stem_chs, 3, stride=2, act_layer=act_layer)
        depths = [blocks + (transformer is not None) for blocks, _, _, _, transformer in config.stages]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).split(depths)  # timm's schedule
        stages: List[nn.Module] = []
        chs = config.stem_chs
        for (blocks, out_chs, stride, expansion, transformer), stage_rates in zip(config.stages, rates):
            stage: List[nn.Module] = []
            for i in range(blocks):
                stage.append(InvertedResidual(chs, out_chs, stride if i == 0 else 1, expansion,
                                              stage_rates[i].item(), act_layer))
                chs = out_chs
            if transformer is not None:
                dim, depth = transformer
                stage.append(FusedMobileViTBlock(chs, chs, transformer_dim=dim, transformer_depth=depth,
                                                 patch_size=config.patch_size, drop_path_rate=stage_rates[-1].item(),
                                                 act_layer=act_layer))
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.final_conv = FusedConvBNAct(chs, config.num_features, 1, act_layer=act_layer)
        self.head = _ClassifierHead(config.num_features, num_classes, drop_rate)

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.stem.conv.in_channels:
            raise ValueError(f"MobileViT: x must be [B, {self.stem.conv.in_channels}, H, W], got shape "
                             f"{tuple(x.shape)}")
        x = self.stem(memory.channels_last(x))
        return self.final_conv(self.stages(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class _ClassifierHead(nn.Module):
    """timm ``ClassifierHead`` (key ``fc``): global average pool, dropout, Linear."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x.mean((2, 3))))
