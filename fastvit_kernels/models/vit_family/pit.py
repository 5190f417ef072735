"""vit-pytorch's ``PiT`` (``vit_pytorch/pit.py``): ViT stages with depthwise-conv pooling between them.

Same constructor arguments and state_dict keys as ``vit_pytorch.pit.PiT``. Attention is
:class:`~.vit.Attention` (``patch_attention`` with a 1 x 1 patch). The pooling's grouped conv
(``dim -> 2 * dim`` channels, ``groups=dim``, 3 x 3, stride 2, with a bias, no BatchNorm) runs on
``dwconv_bn_act`` (act ``"none"``, the conv bias as the bias): each input channel is repeated once per
output channel of its group, which makes the grouped conv depthwise. The 1 x 1 conv after it is
PyTorch's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from ...ops.dwconv_bn_act import KERNEL_SIZES, STRIDES, dwconv_bn_act
from .t2t import ChannelsLast, conv_output_size
from .vit import Attention, FeedForward, layer_pairs, run_layer_pairs


def cast_tuple(val, num: int) -> tuple:
    return val if isinstance(val, tuple) else (val,) * num


class Transformer(nn.Module):
    """vit-pytorch's pit ``Transformer``: ViT's blocks without the final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = layer_pairs(depth, lambda i: Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                                  lambda i: FeedForward(dim, mlp_dim, dropout=dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_layer_pairs(self.layers, x, self.training)


def fits_dwconv(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` (one group per input channel) has a kernel, stride and padding ``dwconv_bn_act`` runs."""
    K = conv.kernel_size[0]
    return (conv.groups == conv.in_channels and conv.kernel_size == (K, K) and K in KERNEL_SIZES
            and conv.stride[0] == conv.stride[1] and conv.stride[0] in STRIDES and conv.dilation == (1, 1)
            and conv.padding == (K // 2, K // 2) and conv.padding_mode == "zeros")


def grouped_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` for a conv with ``groups == in_channels`` (any channel multiplier) on ``dwconv_bn_act``
    when it fits the kernel (:func:`fits_dwconv`), PyTorch's conv otherwise."""
    if not fits_dwconv(conv):
        return conv(x)
    multiplier = conv.out_channels // conv.in_channels
    if multiplier > 1:  # output channel j reads input channel j // multiplier
        x = x.repeat_interleave(multiplier, dim=1)
    return dwconv_bn_act(x, conv.weight, conv.bias, conv.stride[0], "none")


class DepthWiseConv2d(nn.Module):
    """vit-pytorch's pit ``DepthWiseConv2d``: grouped ``k x k`` conv then 1 x 1 conv (keys ``net.0``, ``net.1``)."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int, padding: int, stride: int, bias: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim_in, dim_out, kernel_size=kernel_size, padding=padding, groups=dim_in, stride=stride,
                      bias=bias),
            nn.Conv2d(dim_out, dim_out, kernel_size=1, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.net[1](grouped_conv(x, self.net[0]))


class Pool(nn.Module):
    """Halves the token grid (and doubles the width) of the patch tokens; a Linear widens the cls token."""

    def __init__(self, dim: int):
        super().__init__()
        self.downsample = DepthWiseConv2d(dim, dim * 2, kernel_size=3, stride=2, padding=1)
        self.cls_ff = nn.Linear(dim, dim * 2)

    def forward(self, x: Tensor) -> Tensor:
        cls_token, tokens = self.cls_ff(x[:, :1]), x[:, 1:]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"PiT: {tokens.shape[1]} patch tokens do not form a square grid")
        tokens = self.downsample(tokens.transpose(1, 2).unflatten(2, (side, side)))  # [B, C, h, w] view
        return torch.cat((cls_token, tokens.flatten(2).transpose(1, 2)), dim=1)


class PiT(nn.Module):
    """vit-pytorch's ``PiT``: same keyword-only arguments, same state_dict keys."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, dim_head=64, dropout=0.0,
                 emb_dropout=0.0, channels=3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"PiT: image_size {image_size} must be divisible by patch_size {patch_size}")
        if not isinstance(depth, tuple):
            raise ValueError(f"PiT: depth must be a tuple of block counts, one per stage, got {depth!r}")
        heads = cast_tuple(heads, len(depth))
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.to_patch_embedding = nn.Sequential(
            nn.Unfold(kernel_size=patch_size, stride=patch_size // 2),
            ChannelsLast(),
            nn.Linear(channels * patch_size ** 2, dim))
        self.num_patches = conv_output_size(image_size, patch_size, patch_size // 2, 0) ** 2
        self.pos_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        layers = []
        for i, (layer_depth, layer_heads) in enumerate(zip(depth, heads)):
            layers.append(Transformer(dim, layer_depth, layer_heads, dim_head, mlp_dim, dropout))
            if i < len(depth) - 1:
                layers.append(Pool(dim))
                dim *= 2
        self.layers = nn.Sequential(*layers)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def check_image(self, img: Tensor) -> None:
        if img.dim() != 4 or img.shape[1] != self.channels:
            raise ValueError(f"PiT: expected images [B, {self.channels}, H, W], got shape {tuple(img.shape)}")
        H, W = img.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"PiT: image size {H}x{W} is not divisible by the patch size "
                             f"{self.patch_size}x{self.patch_size}")
        if H != W:
            raise ValueError(f"PiT: images must be square (the pooling folds tokens into a square grid), got {H}x{W}")
        if H > self.image_size:
            raise ValueError(f"PiT: image size {H}x{W} has more patches than the positional embedding made for "
                             f"{self.image_size}x{self.image_size}")

    def forward(self, img: Tensor) -> Tensor:
        self.check_image(img)
        x = self.to_patch_embedding(img)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.dropout(x + self.pos_embedding[:, : x.shape[1]])
        return self.mlp_head(self.layers(x)[:, 0])
