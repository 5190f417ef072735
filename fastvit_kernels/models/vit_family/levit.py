"""vit-pytorch's ``LeViT`` (``vit_pytorch/levit.py``): convolutional stages with a learned positional bias.

Same constructor arguments and state_dict keys as ``vit_pytorch.levit.LeViT``. Attention runs on
``bias_attention``: vit-pytorch's bias is ``pos_bias.weight[|dy| * fmap_size + |dx|, h]`` (its
``pos_indices``, with queries on every second grid point in the downsampling blocks), exactly the op's
in-kernel index ``table[h, |dy| * R_w + |dx|]`` with ``table = pos_bias.weight.t()``, resolution
``(fmap_size, fmap_size)`` and stride 2 for downsampling. vit-pytorch adds ``bias / scale`` to the
already scaled scores, so the table passed is ``pos_bias.weight.t() / scale``. The op's activation is
"none": vit-pytorch's GELU is the first module of ``to_out``. The q/k/v projections (1 x 1 conv +
BatchNorm) run with the BatchNorm folded into the conv at eval (``FusedConvBNActSequential``, same
keys). With attention dropout active (training, p > 0), the scores are written out as vit-pytorch does.
"""

from __future__ import annotations

from math import ceil

import torch
import torch.nn as nn
from torch import Tensor

from ... import memory
from ...modules.conv_bn_act import FusedConvBNActSequential
from ...modules.patch_transformer import run_module
from ...ops.bias_attention import bias_attention
from .vit import layer_pairs, run_layer_pairs


def cast_tuple(val, length: int = 3) -> tuple:
    val = val if isinstance(val, tuple) else (val,)
    return (*val, *((val[-1],) * max(length - len(val), 0)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim * mult, 1), nn.Hardswish(), nn.Dropout(dropout),
                                 nn.Conv2d(dim * mult, dim, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_module(self.net, x)


def conv_bn(dim_in: int, dim_out: int, stride: int = 1) -> nn.Module:
    return FusedConvBNActSequential(nn.Conv2d(dim_in, dim_out, 1, stride=stride, bias=False), nn.BatchNorm2d(dim_out))


def heads_view(t: Tensor, heads: int) -> Tensor:
    """``[B, heads * d, H, W]`` -> ``[B, heads, H * W, d]`` (a view)."""
    return t.flatten(2).unflatten(1, (heads, -1)).transpose(-1, -2)


class Attention(nn.Module):
    """vit-pytorch's levit ``Attention`` on ``bias_attention`` (keys ``to_q``, ``to_k``, ``to_v``, ``to_out``,
    ``pos_bias``, buffer ``pos_indices``)."""

    def __init__(self, dim, fmap_size, heads=8, dim_key=32, dim_value=64, dropout=0.0, dim_out=None,
                 downsample=False):
        super().__init__()
        inner_dim_key, inner_dim_value = dim_key * heads, dim_value * heads
        dim_out = dim if dim_out is None else dim_out
        self.heads, self.fmap_size = heads, fmap_size
        self.stride = 2 if downsample else 1
        self.scale = dim_key ** -0.5
        self.to_q = conv_bn(dim, inner_dim_key, self.stride)
        self.to_k = conv_bn(dim, inner_dim_key)
        self.to_v = conv_bn(dim, inner_dim_value)
        self.dropout = nn.Dropout(dropout)
        out_batch_norm = nn.BatchNorm2d(dim_out)
        nn.init.zeros_(out_batch_norm.weight)
        self.to_out = nn.Sequential(nn.GELU(), nn.Conv2d(inner_dim_value, dim_out, 1), out_batch_norm,
                                    nn.Dropout(dropout))
        self.pos_bias = nn.Embedding(fmap_size * fmap_size, heads)
        # vit-pytorch's buffer (a state_dict key); the kernels compute the same index from coordinates.
        q_range, k_range = torch.arange(0, fmap_size, self.stride), torch.arange(fmap_size)
        q_pos = torch.stack(torch.meshgrid(q_range, q_range, indexing="ij"), dim=-1).reshape(-1, 2)
        k_pos = torch.stack(torch.meshgrid(k_range, k_range, indexing="ij"), dim=-1).reshape(-1, 2)
        rel = (q_pos[:, None] - k_pos[None, :]).abs()
        self.register_buffer("pos_indices", rel[..., 0] * fmap_size + rel[..., 1])

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.fmap_size, self.fmap_size):
            raise ValueError(f"LeViT: feature map {x.shape[-2]}x{x.shape[-1]} does not match the positional "
                             f"bias made for {self.fmap_size}x{self.fmap_size}")
        q = self.to_q(x)
        side = q.shape[2]
        q, k, v = (heads_view(t, self.heads) for t in (q, self.to_k(x), self.to_v(x)))
        if self.dropout.training and self.dropout.p > 0:  # dropout on the probabilities: written out
            bias = self.pos_bias(self.pos_indices).permute(2, 0, 1) / self.scale
            probs = self.dropout(torch.softmax(q @ k.transpose(-1, -2) * self.scale + bias, dim=-1))
            out = (probs @ v).transpose(1, 2).flatten(2)
        else:
            table = self.pos_bias.weight.t() / self.scale
            out = bias_attention(q, k, v, table, self.fmap_size, self.stride, self.scale)  # [B, Nq, heads * dv]
        return run_module(self.to_out, out.transpose(1, 2).unflatten(2, (side, -1)))


class Transformer(nn.Module):
    def __init__(self, dim, fmap_size, depth, heads, dim_key, dim_value, mlp_mult=2, dropout=0.0, dim_out=None,
                 downsample=False):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        self.attn_residual = (not downsample) and dim == dim_out
        self.layers = layer_pairs(depth, lambda i: Attention(dim, fmap_size=fmap_size, heads=heads, dim_key=dim_key,
                                                             dim_value=dim_value, dropout=dropout,
                                                             downsample=downsample, dim_out=dim_out),
                                  lambda i: FeedForward(dim_out, mlp_mult, dropout=dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_layer_pairs(self.layers, x, self.training, attn_residual=self.attn_residual)


class LeViT(nn.Module):
    """vit-pytorch's ``LeViT``: same keyword-only arguments, same state_dict keys; returns ``(logits,
    distill_logits)`` when ``num_distill_classes`` is given, as vit-pytorch does."""

    def __init__(self, *, image_size, num_classes, dim, depth, heads, mlp_mult, stages=3, dim_key=32, dim_value=64,
                 dropout=0.0, num_distill_classes=None):
        super().__init__()
        dims, depths, layer_heads = cast_tuple(dim, stages), cast_tuple(depth, stages), cast_tuple(heads, stages)
        if not all(len(t) == stages for t in (dims, depths, layer_heads)):
            raise ValueError(f"LeViT: dim, depth and heads must have at most stages={stages} entries, got "
                             f"{dim!r}, {depth!r}, {heads!r}")
        self.conv_embedding = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.Conv2d(128, dims[0], 3, stride=2, padding=1))
        self.image_size = image_size
        self.fmap_size = fmap_size = image_size // 16
        layers = []
        for i, (stage_dim, stage_depth, stage_heads) in enumerate(zip(dims, depths, layer_heads)):
            layers.append(Transformer(stage_dim, fmap_size, stage_depth, stage_heads, dim_key, dim_value, mlp_mult,
                                      dropout))
            if i < stages - 1:
                layers.append(Transformer(stage_dim, fmap_size, 1, stage_heads * 2, dim_key, dim_value,
                                          dim_out=dims[i + 1], downsample=True))
                fmap_size = ceil(fmap_size / 2)
        self.backbone = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        # vit-pytorch builds both heads from the loop's last `dim` (the last stage's width).
        self.distill_head = nn.Linear(stage_dim, num_distill_classes) if num_distill_classes is not None else None
        self.mlp_head = nn.Linear(stage_dim, num_classes)

    def check_image(self, img: Tensor) -> None:
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"LeViT: expected images [B, 3, H, W], got shape {tuple(img.shape)}")
        size = list(img.shape[-2:])
        for _ in range(4):  # the four stride-2 convs of conv_embedding
            size = [(s - 1) // 2 + 1 for s in size]
        if size != [self.fmap_size] * 2:
            raise ValueError(f"LeViT: image size {img.shape[-2]}x{img.shape[-1]} gives a {size[0]}x{size[1]} "
                             f"feature map; the positional bias is made for {self.fmap_size}x{self.fmap_size} "
                             f"(image_size {self.image_size}, a multiple of 16)")

    def forward(self, img: Tensor):
        self.check_image(img)
        # channels_last maps (the convs keep the layout): the heads_view of a q/k/v projection then has
        # unit-stride head dims, the layout the attention kernels tile; NCHW would give them stride H*W.
        x = self.pool(self.backbone(self.conv_embedding(memory.channels_last(img))))
        out = self.mlp_head(x)
        if self.distill_head is None:
            return out
        return out, self.distill_head(x)
