"""vit-pytorch's ``DeepViT`` (``vit_pytorch/deepvit.py``): re-attention on ``head_mixing_attention``.

Re-attention (Zhou et al., arXiv:2103.11886) mixes each query's attention probabilities across heads
with a learned ``heads x heads`` matrix and LayerNorms them across heads. The fused op does the mix
and the norm on each query row in registers, so the ``[B, heads, N, N]`` map is never written. Same
constructor arguments and state_dict keys as ``vit_pytorch.deepvit.DeepViT``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ...memory import run_layer_norm, run_linear
from ...modules.patch_transformer import run_module
from ...ops.head_mixing_attention import head_mixing_attention
from .vit import FeedForward, PatchEmbedding, check_image, layer_pairs, pair, run_layer_pairs, split_heads


def mixed_attend(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: nn.Dropout,
                 pre_mix: Optional[Tensor] = None, post_mix: Optional[Tensor] = None,
                 norm: Optional[nn.LayerNorm] = None) -> Tensor:
    """Attention with heads mixed before / after the softmax and a LayerNorm over heads, on
    ``[B, heads, N, d]`` views -> ``[B, Nq, heads * d]`` (vit-pytorch's DeepViT and CaiT cores).

    Runs on ``head_mixing_attention``. The op has no dropout on the probabilities: when that dropout
    is active (training with p > 0) the map is written out as vit-pytorch does, dropout between the
    softmax and the post-softmax mix.
    """
    if dropout.training and dropout.p > 0:
        s = scale * (q @ k.transpose(-1, -2))
        if pre_mix is not None:
            s = torch.einsum("bhij,hg->bgij", s, pre_mix)
        p = dropout(s.softmax(dim=-1))
        if post_mix is not None:
            p = torch.einsum("bhij,hg->bgij", p, post_mix)
        if norm is not None:
            p = norm(p.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return (p @ v).transpose(1, 2).flatten(2)
    norm_args = (norm.weight, norm.bias, norm.eps) if norm is not None else (None, None, 1e-5)
    return head_mixing_attention(q, k, v, scale, pre_mix, post_mix, *norm_args)


class ReAttentionNorm(nn.Module):
    """vit-pytorch's ``reattn_norm`` Sequential: only its LayerNorm over heads holds weights (key
    ``1``; ``0`` and ``2`` are the parameter-free Rearranges around it). Applied inside the op."""

    def __init__(self, heads: int):
        super().__init__()
        self.add_module("1", nn.LayerNorm(heads))

    @property
    def norm(self) -> nn.LayerNorm:
        return getattr(self, "1")

    def forward(self, attn: Tensor) -> Tensor:
        """``[B, heads, Nq, Nk]`` -> LayerNorm over heads (the eager path; the fused op does this itself)."""
        return self.norm(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """vit-pytorch's DeepViT ``Attention`` (keys ``reattn_weights``, ``norm``, ``to_qkv``,
    ``reattn_norm.1``, ``to_out.0``)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.reattn_weights = nn.Parameter(torch.randn(heads, heads))
        self.reattn_norm = ReAttentionNorm(heads)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in run_linear(self.to_qkv, run_layer_norm(self.norm, x)).chunk(3, dim=-1))
        out = mixed_attend(q, k, v, self.scale, self.dropout, post_mix=self.reattn_weights,
                           norm=self.reattn_norm.norm)
        return run_module(self.to_out, out)


class Transformer(nn.Module):
    """vit-pytorch's DeepViT ``Transformer``: pre-norm re-attention and MLP blocks, no final norm."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = layer_pairs(depth, lambda i: Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                                  lambda i: FeedForward(dim, mlp_dim, dropout=dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_layer_pairs(self.layers, x, self.training)


class DeepViT(nn.Module):
    """vit-pytorch's ``DeepViT``: same keyword-only arguments, same state_dict keys."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool="cls", channels=3,
                 dim_head=64, dropout=0.0, emb_dropout=0.0):
        super().__init__()
        self.image_size, self.patch_size, self.channels = pair(image_size), pair(patch_size), channels
        (ih, iw), (ph, pw) = self.image_size, self.patch_size
        if ih % ph or iw % pw:
            raise ValueError(f"DeepViT: image_size {ih}x{iw} must be divisible by patch_size {ph}x{pw}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"DeepViT: pool must be 'cls' or 'mean', got {pool!r}")
        num_patches = (ih // ph) * (iw // pw)
        self.to_patch_embedding = PatchEmbedding(self.patch_size, channels * ph * pw, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: Tensor) -> Tensor:
        check_image(img, self.channels, self.image_size, self.patch_size, type(self).__name__)
        x = self.to_patch_embedding(img)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.dropout(x + self.pos_embedding[:, : x.shape[1]])
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))
