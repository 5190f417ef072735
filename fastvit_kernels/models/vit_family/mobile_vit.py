"""vit-pytorch's ``MobileViT`` (``vit_pytorch/mobile_vit.py``): patch-grouped attention on
``patch_attention``, Conv + BatchNorm + SiLU with the BatchNorm folded.

vit-pytorch unfolds each feature map with ``'b d (h ph) (w pw) -> b (ph pw) (h w) d'``, runs the
transformer on the ``ph * pw`` sequences and folds back. Only attention cares about that grouping, and
it is exactly ``patch_attention``'s: here the tokens stay in image order (a ``[B, H, W, dim]``
channels-last view of the map), so neither the unfold nor the fold is copied. The convs run through
``conv_bn_act`` (eval: BatchNorm folded into the conv; depthwise convs on ``dwconv_bn_act``). Same
constructor arguments and state_dict keys as ``vit_pytorch.mobile_vit.MobileViT``.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ...modules.conv_bn_act import BatchNormFold, FusedConvBNActSequential, activation_name, conv_bn_act
from ...memory import run_layer_norm, run_linear
from ...modules.patch_transformer import run_module
from ...ops.patch_attention import patch_attention
from .vit import layer_pairs, run_layer_pairs


def conv_1x1_bn(inp: int, oup: int) -> FusedConvBNActSequential:
    """vit-pytorch's ``conv_1x1_bn`` (keys ``0.weight``, ``1.*``), fused."""
    return FusedConvBNActSequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.SiLU())


def conv_nxn_bn(inp: int, oup: int, kernel_size: int = 3, stride: int = 1) -> FusedConvBNActSequential:
    """vit-pytorch's ``conv_nxn_bn`` (padding 1 whatever the kernel size, as there), fused."""
    return FusedConvBNActSequential(nn.Conv2d(inp, oup, kernel_size, stride, 1, bias=False), nn.BatchNorm2d(oup),
                                    nn.SiLU())


class ConvBNActChain(nn.Sequential):
    """An ``nn.Sequential`` of Conv2d, BatchNorm2d[, SiLU] groups (MobileNetV2's ``conv``), each group
    run through ``conv_bn_act``. Holds the same children under the same indices: keys unchanged."""

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self._steps: List[Tuple[int, int, str]] = []
        i = 0
        while i < len(modules):
            conv, bn = modules[i], modules[i + 1]
            has_act = i + 2 < len(modules) and not isinstance(modules[i + 2], nn.Conv2d)
            self._steps.append((i, i + 1, activation_name(modules[i + 2] if has_act else None)))
            i += 3 if has_act else 2
        self._folds = [BatchNormFold() for _ in self._steps]

    def _apply(self, fn, recurse=True):
        for fold in self._folds:
            fold.invalidate()
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        for (conv, bn, act), fold in zip(self._steps, self._folds):
            x = conv_bn_act(x, self[conv], self[bn], act, fold)
        return x


class FeedForward(nn.Module):
    """vit-pytorch's MobileViT ``FeedForward`` (SiLU; keys ``net.0`` LayerNorm, ``net.1``/``net.4`` Linear)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_module(self.net, x)


class Attention(nn.Module):
    """vit-pytorch's MobileViT ``Attention`` (keys ``norm``, ``to_qkv``, ``to_out.0``) on tokens in image
    order ``[B, H, W, dim]``: token (y, x) attends to the tokens at the same offset in their patch."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 patch_size: Tuple[int, int] = (2, 2)):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        qkv = run_linear(self.to_qkv, run_layer_norm(self.norm, x))
        if self.dropout.training and self.dropout.p > 0:
            out = self._attend_with_dropout(qkv)
        else:
            out = patch_attention(qkv, self.heads, self.patch_size, self.scale)
        return run_module(self.to_out, out)

    def _attend_with_dropout(self, qkv: Tensor) -> Tensor:
        """The fused op has no dropout on the probabilities: vit-pytorch's unfold and map, written out
        (same ``[B, P, heads, N, N]`` layout, so the same dropout draws)."""
        B, H, W, C3 = qkv.shape
        (ph, pw), heads = self.patch_size, self.heads
        t = qkv.reshape(B, H // ph, ph, W // pw, pw, C3).permute(0, 2, 4, 1, 3, 5).reshape(B, ph * pw, -1, C3)
        q, k, v = (c.unflatten(-1, (heads, -1)).transpose(2, 3) for c in t.chunk(3, dim=-1))
        probs = self.dropout(torch.softmax(self.scale * (q @ k.transpose(-1, -2)), dim=-1))
        o = (probs @ v).transpose(2, 3).flatten(3)  # [B, P, N, heads * d]
        return o.reshape(B, ph, pw, H // ph, W // pw, -1).permute(0, 3, 1, 4, 2, 5).reshape(B, H, W, -1)


class Transformer(nn.Module):
    """vit-pytorch's MobileViT ``Transformer`` (no final norm) on tokens in image order."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0,
                 patch_size: Tuple[int, int] = (2, 2)):
        super().__init__()
        self.layers = layer_pairs(depth, lambda i: Attention(dim, heads, dim_head, dropout, patch_size),
                                  lambda i: FeedForward(dim, mlp_dim, dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_layer_pairs(self.layers, x, self.training)


class MV2Block(nn.Module):
    """vit-pytorch's ``MV2Block`` (MobileNetV2 inverted residual; key ``conv.<i>``)."""

    def __init__(self, inp: int, oup: int, stride: int = 1, expansion: int = 4):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MV2Block: stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(inp * expansion)
        self.use_res_connect = stride == 1 and inp == oup
        dw = [nn.Conv2d(hidden_dim, hidden_dim, 3, stride, 1, groups=hidden_dim, bias=False),
              nn.BatchNorm2d(hidden_dim), nn.SiLU()]
        pw_linear = [nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        pw = [] if expansion == 1 else [nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden_dim),
                                        nn.SiLU()]
        self.conv = ConvBNActChain(*pw, *dw, *pw_linear)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return out + x if self.use_res_connect else out


class MobileViTBlock(nn.Module):
    """vit-pytorch's ``MobileViTBlock``: local kxk and 1x1 convs, the transformer over patch-offset
    sequences (4 heads of 8), 1x1 back, and a kxk fusion conv over ``cat(output, input)``."""

    def __init__(self, dim: int, depth: int, channel: int, kernel_size: int, patch_size: Tuple[int, int],
                 mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.ph, self.pw = patch_size
        self.conv1 = conv_nxn_bn(channel, channel, kernel_size)
        self.conv2 = conv_1x1_bn(channel, dim)
        self.transformer = Transformer(dim, depth, 4, 8, mlp_dim, dropout, (self.ph, self.pw))
        self.conv3 = conv_1x1_bn(dim, channel)
        self.conv4 = conv_nxn_bn(2 * channel, channel, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        H, W = y.shape[-2:]
        if H % self.ph or W % self.pw:
            raise ValueError(f"MobileViTBlock: feature map {H}x{W} is not divisible by the patch size "
                             f"{self.ph}x{self.pw}")
        # Tokens in image order: a [B, H, W, dim] view, no unfold copy.
        y = self.transformer(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv4(torch.cat((self.conv3(y), x), dim=1))


class GlobalAvgPool(nn.Module):
    """einops ``Reduce('b c h w -> b c', 'mean')`` (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def _pair(t) -> Tuple[int, int]:
    return tuple(t) if isinstance(t, (tuple, list)) else (t, t)


class MobileViT(nn.Module):
    """vit-pytorch's ``MobileViT`` (Mehta & Rastegari, arXiv:2110.02178): same arguments (``channels``
    is the list of 11 stage widths), same state_dict keys. Takes 3-channel images; the three
    MobileViT blocks see the image downsampled 8, 16 and 32 times, and each of those maps must be
    divisible by ``patch_size``."""

    def __init__(self, image_size, dims: Sequence[int], channels: Sequence[int], num_classes: int, expansion: int = 4,
                 kernel_size: int = 3, patch_size=(2, 2), depths: Sequence[int] = (2, 4, 3)):
        super().__init__()
        if len(dims) != 3:
            raise ValueError(f"MobileViT: dims must have 3 entries, got {len(dims)}")
        if len(depths) != 3:
            raise ValueError(f"MobileViT: depths must have 3 entries, got {len(depths)}")
        (ih, iw), (ph, pw) = _pair(image_size), _pair(patch_size)
        if ih % ph or iw % pw:
            raise ValueError(f"MobileViT: image_size {ih}x{iw} must be divisible by patch_size {ph}x{pw}")
        self.patch_size = (ph, pw)
        init_dim, *_, last_dim = channels
        self.conv1 = conv_nxn_bn(3, init_dim, stride=2)
        self.stem = nn.ModuleList([
            MV2Block(channels[0], channels[1], 1, expansion),
            MV2Block(channels[1], channels[2], 2, expansion),
            MV2Block(channels[2], channels[3], 1, expansion),
            MV2Block(channels[2], channels[3], 1, expansion),
        ])
        self.trunk = nn.ModuleList([
            nn.ModuleList([MV2Block(channels[3 + 2 * i], channels[4 + 2 * i], 2, expansion),
                           MobileViTBlock(dims[i], depths[i], channels[5 + 2 * i], kernel_size, (ph, pw),
                                          int(dims[i] * (2 if i == 0 else 4)))])
            for i in range(3)])
        self.to_logits = nn.Sequential(conv_1x1_bn(channels[-2], last_dim), GlobalAvgPool(),
                                       nn.Linear(channels[-1], num_classes, bias=False))

    def check_image(self, img: Tensor) -> None:
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"MobileViT: expected images [B, 3, H, W], got shape {tuple(img.shape)}")
        (H, W), (ph, pw) = img.shape[-2:], self.patch_size
        # Each stride-2 conv (kernel 3, padding 1) maps a side s to ceil(s / 2).
        maps = [(math.ceil(H / f), math.ceil(W / f)) for f in (8, 16, 32)]
        if any(h % ph or w % pw for h, w in maps):
            raise ValueError(f"MobileViT: image size {H}x{W} gives feature maps "
                             f"{', '.join(f'{h}x{w}' for h, w in maps)} at the MobileViT blocks, not all "
                             f"divisible by the patch size {ph}x{pw} (image sides that are multiples of "
                             f"{32 * ph}x{32 * pw} always work)")

    def forward(self, x: Tensor) -> Tensor:
        self.check_image(x)
        x = self.conv1(x)
        for conv in self.stem:
            x = conv(x)
        for conv, attn in self.trunk:
            x = attn(conv(x))
        return self.to_logits(x)
