"""vit-pytorch's ``CrossViT`` (``vit_pytorch/cross_vit.py``): small- and large-patch branches that
exchange information through their cls tokens.

Same constructor arguments and state_dict keys as ``vit_pytorch.cross_vit.CrossViT``. This file's
attention has separate ``to_q`` / ``to_kv`` projections (vit-pytorch's keys). The encoders' self
attention packs them into one q|k|v projection and runs on ``patch_attention`` (1 x 1 patch); the
cls-token cross attention (queries: one cls token; keys/values: that token and the other branch's
patch tokens, ``kv_include_self``) runs on the ``attention`` op.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ... import memory
from ...memory import run_layer_norm, run_linear
from ...modules.conv_bn_act import DerivedCache
from ...modules.patch_transformer import run_module
from .vit import (FeedForward, PatchEmbedding, attend, check_image, layer_pairs, pair, run_layer_pairs, self_attend,
                  split_heads)


class Attention(nn.Module):
    """vit-pytorch's cross_vit ``Attention`` (keys ``norm``, ``to_q``, ``to_kv``, ``to_out.0``)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self._packed_qkv = DerivedCache()  # not a buffer: outside the state_dict
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Optional[Tensor] = None, kv_include_self: bool = False) -> Tensor:
        x = run_layer_norm(self.norm, x)
        if context is None and not kv_include_self:
            # Self attention: one packed q|k|v projection feeds the fused self-attention kernel.
            qkv = memory.linear(x, self._packed_qkv_weight())
            return run_module(self.to_out, self_attend(qkv, self.heads, self.scale, self.dropout))
        context = x if context is None else context
        if kv_include_self:  # the cls token attends to itself as well as to the other branch
            context = torch.cat((x, context), dim=1)
        q = split_heads(run_linear(self.to_q, x), self.heads)
        k, v = (split_heads(t, self.heads) for t in run_linear(self.to_kv, context).chunk(2, dim=-1))
        return run_module(self.to_out, attend(q, k, v, self.scale, self.dropout))

    def _packed_qkv_weight(self) -> Tensor:
        """``cat(to_q.weight, to_kv.weight)``; kept between inference calls (a fresh concatenation per
        call cost more than the attention at CrossViT's small scale), rebuilt when either changes."""
        w_q, w_kv = self.to_q.weight, self.to_kv.weight
        return self._packed_qkv.get((w_q, w_kv), lambda: torch.cat((w_q, w_kv)))


class Transformer(nn.Module):
    """vit-pytorch's cross_vit ``Transformer`` (ViT's, with this file's ``to_q``/``to_kv`` attention)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = layer_pairs(depth, lambda i: Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                                  lambda i: FeedForward(dim, mlp_dim, dropout=dropout))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return run_layer_norm(self.norm, run_layer_pairs(self.layers, x, self.training))


class ProjectInOut(nn.Module):
    """Runs ``fn`` in another width: Linear in, ``fn``, Linear out (identities when the widths agree)."""

    def __init__(self, dim_in: int, dim_out: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        project = dim_in != dim_out
        self.project_in = nn.Linear(dim_in, dim_out) if project else nn.Identity()
        self.project_out = nn.Linear(dim_out, dim_in) if project else nn.Identity()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.project_out(self.fn(self.project_in(x), *args, **kwargs))


class CrossTransformer(nn.Module):
    """Each branch's cls token attends to the other branch's patch tokens (and itself)."""

    def __init__(self, sm_dim: int, lg_dim: int, depth: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                ProjectInOut(sm_dim, lg_dim, Attention(lg_dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                ProjectInOut(lg_dim, sm_dim, Attention(sm_dim, heads=heads, dim_head=dim_head, dropout=dropout))])
            for _ in range(depth)])

    def forward(self, sm_tokens: Tensor, lg_tokens: Tensor):
        sm_cls, sm_patches = sm_tokens[:, :1], sm_tokens[:, 1:]
        lg_cls, lg_patches = lg_tokens[:, :1], lg_tokens[:, 1:]
        for sm_attend_lg, lg_attend_sm in self.layers:
            sm_cls = sm_attend_lg(sm_cls, context=lg_patches, kv_include_self=True) + sm_cls
            lg_cls = lg_attend_sm(lg_cls, context=sm_patches, kv_include_self=True) + lg_cls
        return torch.cat((sm_cls, sm_patches), dim=1), torch.cat((lg_cls, lg_patches), dim=1)


class MultiScaleEncoder(nn.Module):
    def __init__(self, *, depth, sm_dim, lg_dim, sm_enc_params, lg_enc_params, cross_attn_heads, cross_attn_depth,
                 cross_attn_dim_head=64, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                Transformer(dim=sm_dim, dropout=dropout, **sm_enc_params),
                Transformer(dim=lg_dim, dropout=dropout, **lg_enc_params),
                CrossTransformer(sm_dim=sm_dim, lg_dim=lg_dim, depth=cross_attn_depth, heads=cross_attn_heads,
                                 dim_head=cross_attn_dim_head, dropout=dropout)])
            for _ in range(depth)])

    def forward(self, sm_tokens: Tensor, lg_tokens: Tensor):
        for sm_enc, lg_enc, cross_attend in self.layers:
            sm_tokens, lg_tokens = cross_attend(sm_enc(sm_tokens), lg_enc(lg_tokens))
        return sm_tokens, lg_tokens


class ImageEmbedder(nn.Module):
    """Patch embedding + cls token + positional embedding of one branch (vit-pytorch's keys)."""

    def __init__(self, *, dim: int, image_size: int, patch_size: int, dropout: float = 0.0, channels: int = 3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"CrossViT: image_size {image_size} must be divisible by patch_size {patch_size}")
        self.image_size, self.patch_size, self.channels = pair(image_size), pair(patch_size), channels
        num_patches = (image_size // patch_size) ** 2
        self.to_patch_embedding = PatchEmbedding(self.patch_size, channels * patch_size ** 2, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, img: Tensor) -> Tensor:
        check_image(img, self.channels, self.image_size, self.patch_size, "CrossViT")
        x = self.to_patch_embedding(img)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.dropout(x + self.pos_embedding[:, : x.shape[1]])


class CrossViT(nn.Module):
    """vit-pytorch's ``CrossViT``: same keyword-only arguments and defaults, same state_dict keys."""

    def __init__(self, *, image_size, num_classes, sm_dim, lg_dim, sm_patch_size=12, sm_enc_depth=1, sm_enc_heads=8,
                 sm_enc_mlp_dim=2048, sm_enc_dim_head=64, lg_patch_size=16, lg_enc_depth=4, lg_enc_heads=8,
                 lg_enc_mlp_dim=2048, lg_enc_dim_head=64, cross_attn_depth=2, cross_attn_heads=8,
                 cross_attn_dim_head=64, depth=3, dropout=0.1, emb_dropout=0.1, channels=3):
        super().__init__()
        self.sm_image_embedder = ImageEmbedder(dim=sm_dim, channels=channels, image_size=image_size,
                                               patch_size=sm_patch_size, dropout=emb_dropout)
        self.lg_image_embedder = ImageEmbedder(dim=lg_dim, channels=channels, image_size=image_size,
                                               patch_size=lg_patch_size, dropout=emb_dropout)
        self.multi_scale_encoder = MultiScaleEncoder(
            depth=depth, sm_dim=sm_dim, lg_dim=lg_dim, cross_attn_heads=cross_attn_heads,
            cross_attn_dim_head=cross_attn_dim_head, cross_attn_depth=cross_attn_depth,
            sm_enc_params=dict(depth=sm_enc_depth, heads=sm_enc_heads, mlp_dim=sm_enc_mlp_dim,
                               dim_head=sm_enc_dim_head),
            lg_enc_params=dict(depth=lg_enc_depth, heads=lg_enc_heads, mlp_dim=lg_enc_mlp_dim,
                               dim_head=lg_enc_dim_head),
            dropout=dropout)
        self.sm_mlp_head = nn.Sequential(nn.LayerNorm(sm_dim), nn.Linear(sm_dim, num_classes))
        self.lg_mlp_head = nn.Sequential(nn.LayerNorm(lg_dim), nn.Linear(lg_dim, num_classes))

    def forward(self, img: Tensor) -> Tensor:
        sm_tokens, lg_tokens = self.multi_scale_encoder(self.sm_image_embedder(img), self.lg_image_embedder(img))
        return self.sm_mlp_head(sm_tokens[:, 0]) + self.lg_mlp_head(lg_tokens[:, 0])
