"""vit-pytorch's ``CvT`` (``vit_pytorch/cvt.py``): convolutional token embedding and projections.

Same constructor arguments and state_dict keys as ``vit_pytorch.cvt.CvT``. The q/k/v projections are
depthwise conv + BatchNorm + 1 x 1 conv: the depthwise conv and its BatchNorm run as one
``dwconv_bn_act`` kernel with the BatchNorm folded in at eval (cached fold, see
``fastvit_kernels.modules.conv_bn_act``); in training the conv runs on ``dwconv_bn_act`` and BatchNorm
uses batch statistics, exactly as ``nn.BatchNorm2d``. Keys and values are projected with a stride
(fewer tokens than queries), so attention runs on the ``attention`` op.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ... import memory
from ...modules.conv_bn_act import BatchNormFold, _FoldCacheMixin, conv_bn_act
from ...modules.patch_transformer import run_module
from .vit import attend, layer_pairs, run_layer_pairs


class LayerNorm(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` (vit-pytorch's keys ``g``, ``b`` of shape [1, C, 1, 1])."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        C = x.shape[1]
        y = F.layer_norm(x.permute(0, 2, 3, 1), (C,), self.g.view(C), self.b.view(C), self.eps)
        return y.permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(LayerNorm(dim), nn.Conv2d(dim, dim * mult, 1), nn.GELU(), nn.Dropout(dropout),
                                 nn.Conv2d(dim * mult, dim, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_module(self.net, x)


class DepthWiseConv2d(_FoldCacheMixin, nn.Module):
    """Depthwise conv + BatchNorm (one ``dwconv_bn_act``) + 1 x 1 conv; keys ``net.0``, ``net.1``, ``net.2``."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int, padding: int, stride: int, bias: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim_in, dim_in, kernel_size=kernel_size, padding=padding, groups=dim_in, stride=stride,
                      bias=bias),
            nn.BatchNorm2d(dim_in),
            nn.Conv2d(dim_in, dim_out, kernel_size=1, bias=bias))
        self._fold = BatchNormFold()

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](conv_bn_act(x, self.net[0], self.net[1], "none", self._fold))


class Attention(nn.Module):
    """vit-pytorch's cvt ``Attention``: conv projections, keys/values on a strided grid."""

    def __init__(self, dim: int, proj_kernel: int, kv_proj_stride: int, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        padding = proj_kernel // 2
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.to_q = DepthWiseConv2d(dim, inner_dim, proj_kernel, padding=padding, stride=1, bias=False)
        self.to_kv = DepthWiseConv2d(dim, inner_dim * 2, proj_kernel, padding=padding, stride=kv_proj_stride,
                                     bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner_dim, dim, 1), nn.Dropout(dropout))

    def heads_view(self, t: Tensor) -> Tensor:
        """``[B, heads * d, H, W]`` -> ``[B, heads, H * W, d]`` (a view)."""
        return t.flatten(2).unflatten(1, (self.heads, -1)).transpose(-1, -2)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        x = self.norm(x)
        q = self.heads_view(self.to_q(x))
        k, v = (self.heads_view(t) for t in self.to_kv(x).chunk(2, dim=1))
        out = attend(q, k, v, self.scale, self.dropout)  # [B, H * W, heads * d]
        return run_module(self.to_out, out.transpose(1, 2).unflatten(2, (H, W)))


class Transformer(nn.Module):
    def __init__(self, dim: int, proj_kernel: int, kv_proj_stride: int, depth: int, heads: int, dim_head: int = 64,
                 mlp_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.layers = layer_pairs(depth, lambda i: Attention(dim, proj_kernel=proj_kernel, kv_proj_stride=kv_proj_stride,
                                                             heads=heads, dim_head=dim_head, dropout=dropout),
                                  lambda i: FeedForward(dim, mlp_mult, dropout=dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_layer_pairs(self.layers, x, self.training)


class CvT(nn.Module):
    """vit-pytorch's ``CvT``: same keyword-only arguments and defaults, same state_dict keys."""

    def __init__(self, *, num_classes, s1_emb_dim=64, s1_emb_kernel=7, s1_emb_stride=4, s1_proj_kernel=3,
                 s1_kv_proj_stride=2, s1_heads=1, s1_depth=1, s1_mlp_mult=4, s2_emb_dim=192, s2_emb_kernel=3,
                 s2_emb_stride=2, s2_proj_kernel=3, s2_kv_proj_stride=2, s2_heads=3, s2_depth=2, s2_mlp_mult=4,
                 s3_emb_dim=384, s3_emb_kernel=3, s3_emb_stride=2, s3_proj_kernel=3, s3_kv_proj_stride=2,
                 s3_heads=6, s3_depth=10, s3_mlp_mult=4, dropout=0.0, channels=3):
        super().__init__()
        stages = ((s1_emb_dim, s1_emb_kernel, s1_emb_stride, s1_proj_kernel, s1_kv_proj_stride, s1_heads, s1_depth,
                   s1_mlp_mult),
                  (s2_emb_dim, s2_emb_kernel, s2_emb_stride, s2_proj_kernel, s2_kv_proj_stride, s2_heads, s2_depth,
                   s2_mlp_mult),
                  (s3_emb_dim, s3_emb_kernel, s3_emb_stride, s3_proj_kernel, s3_kv_proj_stride, s3_heads, s3_depth,
                   s3_mlp_mult))
        self.channels = channels
        dim, layers = channels, []
        for emb_dim, emb_kernel, emb_stride, proj_kernel, kv_proj_stride, heads, depth, mlp_mult in stages:
            layers.append(nn.Sequential(
                nn.Conv2d(dim, emb_dim, kernel_size=emb_kernel, padding=emb_kernel // 2, stride=emb_stride),
                LayerNorm(emb_dim),
                Transformer(dim=emb_dim, proj_kernel=proj_kernel, kv_proj_stride=kv_proj_stride, depth=depth,
                            heads=heads, mlp_mult=mlp_mult, dropout=dropout)))
            dim = emb_dim
        self.layers = nn.Sequential(*layers)
        self.to_logits = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"CvT: expected images [B, {self.channels}, H, W], got shape {tuple(x.shape)}")
        # channels_last maps (the convs keep the layout): q, k, v heads then have unit-stride head dims,
        # the layout the attention kernels tile.
        return self.to_logits(self.layers(memory.channels_last(x)))
