"""LeViT-128S / 128 / 192 / 256 / 384 on the fused ops, with timm's state_dict keys.

Architecture from Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for Faster
Inference" (arXiv:2104.01136); sizes and module names as timm's ``levit_*`` (``LevitDistilled``:
``stem.convN``, ``stages.i.downsample.attn_downsample`` / ``.mlp``, ``stages.i.blocks.j.attn`` /
``.mlp``, ``head``, ``head_dist``). The official checkpoints load through
:func:`convert_official_levit`.

Inference folds every Linear/Conv + BatchNorm pair, and the class and distillation heads (whose
logits eval averages) merge into one Linear; all folds are cached and refreshed when any source
tensor changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import memory
from ..modules.levit import ConvNorm, FusedLeViTAttention, FusedLeViTAttentionDownsample, LinearNorm
from ..modules.patch_transformer import add_residual, can_overwrite


@dataclass(frozen=True)
class LevitConfig:
    embed_dim: Tuple[int, int, int]
    key_dim: int
    num_heads: Tuple[int, int, int]
    depth: Tuple[int, int, int]
    attn_ratio: float = 2.0
    mlp_ratio: float = 2.0
    img_size: int = 224


CONFIGS = {
    "levit_128s": LevitConfig((128, 256, 384), 16, (4, 6, 8), (2, 3, 4)),
    "levit_128": LevitConfig((128, 256, 384), 16, (4, 8, 12), (4, 4, 4)),
    "levit_192": LevitConfig((192, 288, 384), 32, (3, 5, 6), (4, 4, 4)),
    "levit_256": LevitConfig((256, 384, 512), 32, (4, 6, 8), (4, 4, 4)),
    "levit_384": LevitConfig((384, 512, 768), 32, (6, 9, 12), (4, 4, 4)),
}


class InferenceInplaceHardswish(nn.Hardswish):
    """``nn.Hardswish`` that overwrites its input when no autograd graph needs it: for activations
    that follow a layer whose fresh output nothing else reads (the stem's convs)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.hardswish(x, inplace=can_overwrite(x))


class LevitMlp(nn.Module):
    """timm ``LevitMlp`` (keys ``ln1``, ``ln2``): LinearNorm -> Hardswish -> LinearNorm."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(0.0)
        self.ln2 = LinearNorm(hidden, dim, bn_weight_init=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln2(self.drop(self.ln1(x, activation="hardswish")))


class LevitBlock(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, mlp_ratio: float, resolution,
                 drop_path_rate: float):
        super().__init__()
        self.attn = FusedLeViTAttention(dim, key_dim, num_heads, attn_ratio, resolution, act_layer=nn.Hardswish)
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        x = add_residual(x, self.attn(x), self.drop_path_rate, self.training)
        return add_residual(x, self.mlp(x), self.drop_path_rate, self.training)


class LevitDownsample(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, key_dim: int, resolution, drop_path_rate: float):
        super().__init__()
        self.attn_downsample = FusedLeViTAttentionDownsample(in_dim, out_dim, key_dim, in_dim // key_dim,
                                                             attn_ratio=4.0, stride=2, resolution=resolution,
                                                             act_layer=nn.Hardswish)
        self.mlp = LevitMlp(out_dim, out_dim * 2)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_downsample(x)
        return add_residual(x, self.mlp(x), self.drop_path_rate, self.training)


class LevitStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, config: LevitConfig, index: int, resolution: int,
                 drop_path_rate: float):
        super().__init__()
        if index > 0:
            self.downsample = LevitDownsample(in_dim, out_dim, config.key_dim, resolution, drop_path_rate)
            resolution = (resolution - 1) // 2 + 1
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            LevitBlock(out_dim, config.key_dim, config.num_heads[index], config.attn_ratio, config.mlp_ratio,
                       resolution, drop_path_rate) for _ in range(config.depth[index])])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class NormLinear(nn.Module):
    """timm ``NormLinear`` (keys ``bn``, ``linear``): BatchNorm1d -> dropout -> Linear."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)

    def folded(self) -> Tuple[Tensor, Tensor]:
        """(W', b') with ``linear(bn(x)) == x @ W'.T + b'`` in eval mode, float32 (float64 for float64)."""
        acc = torch.float64 if self.linear.weight.dtype == torch.float64 else torch.float32
        bn, w = self.bn, self.linear.weight.to(acc)
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps) * bn.weight.to(acc)
        shift = bn.bias.to(acc) - bn.running_mean.to(acc) * scale
        return w * scale[None, :], w @ shift + self.linear.bias.to(acc)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.drop(self.bn(x)))


class Levit(nn.Module):
    """LeViT classifier with a distillation head (timm's ``LevitDistilled``), linear mode.

    ``forward(x [B, 3, 224, 224]) -> logits``: the average of the two heads, or the pair of them in
    training with ``set_distilled_training(True)`` (DeiT-style distillation), as timm.
    """

    def __init__(self, config: LevitConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, img_size: int = None):
        super().__init__()
        self.num_classes, self.config = num_classes, config
        self.img_size = img_size or config.img_size
        dim = config.embed_dim[0]
        self.stem = nn.Sequential()
        chs = [in_chans, dim // 8, dim // 4, dim // 2, dim]
        for i in range(4):
            self.stem.add_module(f"conv{i + 1}", ConvNorm(chs[i], chs[i + 1], 3, stride=2, padding=1))
            if i < 3:
                self.stem.add_module(f"act{i + 1}", InferenceInplaceHardswish())
        resolution = self.img_size // 16
        stages, in_dim = [], dim
        for i, out_dim in enumerate(config.embed_dim):
            stages.append(LevitStage(in_dim, out_dim, config, i, resolution, drop_path_rate))
            resolution = resolution if i == 0 else (resolution - 1) // 2 + 1
            in_dim = out_dim
        self.stages = nn.Sequential(*stages)
        self.head = NormLinear(in_dim, num_classes, drop_rate)
        self.head_dist = NormLinear(in_dim, num_classes, drop_rate)
        self.distilled_training = False
        self._merged_key, self._merged = None, None

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.stem.conv1.linear.in_channels or x.shape[-2:] != (self.img_size,) * 2:
            raise ValueError(f"Levit: x must be [B, {self.stem.conv1.linear.in_channels}, {self.img_size}, "
                             f"{self.img_size}] (the attention biases fix the resolution), got shape {tuple(x.shape)}")
        x = self.stem(memory.channels_last(x))
        return self.stages(x.flatten(2).transpose(1, 2))  # channels_last: a free view as [B, N, C]

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x).mean(dim=1)
        if self.training or self.head.bn.running_mean is None:
            logits, logits_dist = self.head(x), self.head_dist(x)
            return (logits, logits_dist) if self.distilled_training and self.training else (logits + logits_dist) / 2
        weight, bias = self._merged_head()
        return memory.linear(x, weight.to(x.dtype), bias.to(x.dtype))

    def _merged_head(self) -> Tuple[Tensor, Tensor]:
        """(W, b) of ``(head(x) + head_dist(x)) / 2`` at eval, cached like ``BatchNormFold``."""
        sources = [t for m in (self.head, self.head_dist) for t in (*m.bn.parameters(), *m.bn.buffers(),
                                                                     *m.linear.parameters())]
        uncached = torch.compiler.is_compiling() or any(t.is_inference() for t in sources) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in sources))
        key = None if uncached else tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if uncached or key != self._merged_key:
            with torch.set_grad_enabled(uncached and torch.is_grad_enabled()):
                (w1, b1), (w2, b2) = self.head.folded(), self.head_dist.folded()
                merged = ((w1 + w2) / 2, (b1 + b2) / 2)
            if uncached:
                return merged
            self._merged_key, self._merged = key, merged
        return self._merged

    def _apply(self, fn, recurse=True):
        self._merged_key, self._merged = None, None
        return super()._apply(fn, recurse)


def convert_official_levit(state_dict: Mapping[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Official LeViT checkpoint (facebookresearch/LeViT: ``{"model": ...}`` or bare) -> ``model``'s
    (timm's) keys.

    The official module tree (``patch_embed``, a flat ``blocks`` list of residual-wrapped attention
    / MLP / subsample blocks, ``head``/``head_dist`` with ``bn``/``l``) registers its tensors in the
    same order as timm's, so after dropping the non-persistent ``attention_bias_idxs`` the keys map
    one to one in order; every pair must agree in shape (a 2-D Linear weight may stand for a 1x1
    conv and is reshaped), else a ``KeyError`` names the first pair that does not.
    """
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    source = [(k, v) for k, v in state_dict.items() if "attention_bias_idxs" not in k]
    target = model.state_dict()
    if len(source) != len(target):
        raise KeyError(f"convert_official_levit: checkpoint has {len(source)} tensors (attention_bias_idxs "
                       f"dropped), {type(model).__name__} has {len(target)}")
    out = {}
    for (key, value), (ours, expected) in zip(source, target.items()):
        if value.shape != expected.shape:
            if value.numel() != expected.numel():
                raise KeyError(f"convert_official_levit: {key!r} {tuple(value.shape)} does not match {ours!r} "
                               f"{tuple(expected.shape)}")
            value = value.reshape(expected.shape)
        out[ours] = value
    return out
