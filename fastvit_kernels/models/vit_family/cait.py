"""vit-pytorch's ``CaiT`` (``vit_pytorch/cait.py``): talking heads on ``head_mixing_attention``.

CaiT (Touvron et al., arXiv:2103.17239): LayerScale on every residual branch, talking-heads attention
(scores mixed across heads before the softmax, probabilities after it) among the patches, then class
attention: the class token attends to ``[class token, patches]``, with the same talking heads. Both
run on ``head_mixing_attention``, which never writes the ``[B, heads, N, N]`` map. Layer dropout
skips whole layers at random in training. Same constructor arguments and state_dict keys as
``vit_pytorch.cait.CaiT``.
"""

from __future__ import annotations

from random import randrange
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ...memory import run_layer_norm, run_linear
from ...modules.patch_transformer import run_module
from .deepvit import mixed_attend
from .vit import FeedForward, PatchEmbedding, check_image, layer_pairs, pair, run_layer_pairs, split_heads


def dropout_layers(layers: nn.ModuleList, dropout: float) -> list:
    """The layers kept by layer dropout: each dropped with probability ``dropout``, at least one kept.

    Draws as vit-pytorch does (one ``uniform_`` of ``len(layers)`` on torch's generator, then
    ``random.randrange`` when every layer was dropped), so the same seeds drop the same layers.
    """
    if dropout == 0:
        return list(layers)
    to_drop = torch.zeros(len(layers)).uniform_(0.0, 1.0) < dropout
    if all(to_drop):
        to_drop[randrange(len(layers))] = False
    return [layer for layer, drop in zip(layers, to_drop) if not drop]


def layer_scale_init(depth: int) -> float:
    """CaiT's LayerScale init by depth (section 2 of the paper)."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


class LayerScale(nn.Module):
    """``fn(x) * scale`` with a learned per-channel ``scale`` (keys ``scale``, ``fn.*``)."""

    def __init__(self, dim: int, fn: nn.Module, depth: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, 1, dim), layer_scale_init(depth)))
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(x, **kwargs) * self.scale


class Attention(nn.Module):
    """vit-pytorch's CaiT ``Attention`` (keys ``mix_heads_pre_attn``, ``mix_heads_post_attn``, ``norm``,
    ``to_q``, ``to_kv``, ``to_out.0``): talking heads; with ``context``, the normed queries attend to
    ``[normed x, context]`` (class attention; the context is not normed, as in vit-pytorch)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.mix_heads_pre_attn = nn.Parameter(torch.randn(heads, heads))
        self.mix_heads_post_attn = nn.Parameter(torch.randn(heads, heads))
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        x = run_layer_norm(self.norm, x)
        context = x if context is None else torch.cat((x, context), dim=1)
        q = split_heads(run_linear(self.to_q, x), self.heads)
        k, v = (split_heads(t, self.heads) for t in run_linear(self.to_kv, context).chunk(2, dim=-1))
        out = mixed_attend(q, k, v, self.scale, self.dropout, pre_mix=self.mix_heads_pre_attn,
                           post_mix=self.mix_heads_post_attn)
        return run_module(self.to_out, out)


class Transformer(nn.Module):
    """vit-pytorch's CaiT ``Transformer``: LayerScaled attention and MLP blocks, layer dropout."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0,
                 layer_dropout: float = 0.0):
        super().__init__()
        self.layer_dropout = layer_dropout
        self.layers = layer_pairs(
            depth, lambda i: LayerScale(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout), depth=i + 1),
            lambda i: LayerScale(dim, FeedForward(dim, mlp_dim, dropout=dropout), depth=i + 1))

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        # Layer dropout only in training (vit-pytorch drops layers in eval too).
        layers = dropout_layers(self.layers, self.layer_dropout if self.training else 0.0)
        return run_layer_pairs(layers, x, self.training, context=context)


class CaiT(nn.Module):
    """vit-pytorch's ``CaiT``: same keyword-only arguments, same state_dict keys. Images have 3
    channels (vit-pytorch's patch embedding is built for 3)."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, cls_depth, heads, mlp_dim, dim_head=64,
                 dropout=0.0, emb_dropout=0.0, layer_dropout=0.0):
        super().__init__()
        self.image_size, self.patch_size, self.channels = pair(image_size), pair(patch_size), 3
        (ih, iw), (ph, pw) = self.image_size, self.patch_size
        if ih % ph or iw % pw:
            raise ValueError(f"CaiT: image_size {ih}x{iw} must be divisible by patch_size {ph}x{pw}")
        num_patches = (ih // ph) * (iw // pw)
        self.to_patch_embedding = PatchEmbedding(self.patch_size, 3 * ph * pw, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.patch_transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, layer_dropout)
        self.cls_transformer = Transformer(dim, cls_depth, heads, dim_head, mlp_dim, dropout, layer_dropout)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: Tensor) -> Tensor:
        check_image(img, self.channels, self.image_size, self.patch_size, type(self).__name__)
        x = self.to_patch_embedding(img)
        x = self.dropout(x + self.pos_embedding[:, : x.shape[1]])
        x = self.patch_transformer(x)
        x = self.cls_transformer(self.cls_token.expand(x.shape[0], -1, -1), context=x)
        return self.mlp_head(x[:, 0])
