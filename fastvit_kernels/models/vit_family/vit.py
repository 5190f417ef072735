"""vit-pytorch's ``ViT`` (``vit_pytorch/vit.py``) and its Transformer pieces, attention fused.

Same constructor arguments and state_dict keys as ``vit_pytorch.ViT``; the other models of the family
build on :class:`Attention`, :class:`FeedForward` and :class:`Transformer` here.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ... import memory
from ...memory import run_layer_norm, run_linear
from ...modules.patch_transformer import can_overwrite, run_module
from ...ops.patch_attention import attention, patch_attention


def pair(t: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return t if isinstance(t, tuple) else (t, t)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """``[B, N, heads * d]`` -> ``[B, heads, N, d]`` (a view: vit-pytorch's ``'b n (h d) -> b h n d'``)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: nn.Dropout) -> Tensor:
    """``softmax(scale q k^T) v`` on ``[B, heads, N, d]`` views -> ``[B, Nq, heads * d]``.

    The fused op has no dropout on the attention probabilities: when that dropout is active (training
    with p > 0) the probabilities are written out as vit-pytorch does.
    """
    if dropout.training and dropout.p > 0:
        probs = dropout(torch.softmax(scale * (q @ k.transpose(-1, -2)), dim=-1))
        return (probs @ v).transpose(1, 2).flatten(2)
    return attention(q, k, v, scale)


def self_attend(qkv: Tensor, heads: int, scale: float, dropout: nn.Dropout) -> Tensor:
    """Self attention on vit-pytorch's packed ``to_qkv`` output ``[B, N, 3 * heads * d]`` (chunked as
    ``(3, heads, d)``) -> ``[B, N, heads * d]``. Runs on ``patch_attention`` with a 1 x 1 patch."""
    if dropout.training and dropout.p > 0:
        q, k, v = (split_heads(t, heads) for t in qkv.chunk(3, dim=-1))
        return attend(q, k, v, scale, dropout)
    return patch_attention(qkv.unsqueeze(1), heads, (1, 1), scale).squeeze(1)


class FeedForward(nn.Module):
    """vit-pytorch's ``FeedForward`` (keys ``net.0`` LayerNorm, ``net.1`` and ``net.4`` Linear)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_module(self.net, x)

    def residual_forward(self, x: Tensor) -> Optional[Tensor]:
        """``self(x) + x`` as one LayerNorm and one fused-MLP kernel in float32 CPU inference where that
        pays (:func:`fastvit_kernels.memory.fused_mlp`), else None: the caller runs ``self(x) + x``."""
        if self.training or not memory.plain(self.net, nn.Sequential) or len(self.net) != 6:
            return None
        norm, fc1, act, drop1, fc2, drop2 = self.net
        if not all(memory.plain(d, type(d)) and type(d) in (nn.Dropout, nn.Identity) for d in (drop1, drop2)):
            return None
        return memory.fused_mlp(x, fc1, act, fc2, residual=x, norm=norm)


class Attention(nn.Module):
    """vit-pytorch's ``Attention`` (keys ``norm``, ``to_qkv``, ``to_out.0``) on ``patch_attention``."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self_attend(run_linear(self.to_qkv, run_layer_norm(self.norm, x)), self.heads, self.scale, self.dropout)
        return run_module(self.to_out, out)


def layer_pairs(depth: int, attention: Callable[[int], nn.Module], feed_forward: Callable[[int], nn.Module]
                ) -> nn.ModuleList:
    """The ``layers`` of every vit-pytorch Transformer: ``depth`` [attention, feed-forward] pairs
    (keys ``layers.<i>.0``, ``layers.<i>.1``); the factories get the layer index."""
    return nn.ModuleList([nn.ModuleList([attention(i), feed_forward(i)]) for i in range(depth)])


def run_layer_pairs(layers, x: Tensor, training: bool, attn_residual: bool = True, **attn_kwargs) -> Tensor:
    """``x = attn(x) + x; x = ff(x) + x`` per pair (the attention's residual optional, for LeViT's
    downsampling layers). In inference each sum goes into the branch's fresh output, not a new buffer."""
    for attn, ff in layers:
        branch = attn(x, **attn_kwargs)
        x = _add_to_branch(branch, x, training) if attn_residual else branch
        fused = None if training or not hasattr(ff, "residual_forward") else ff.residual_forward(x)
        x = fused if fused is not None else _add_to_branch(ff(x), x, training)
    return x


def _add_to_branch(branch: Tensor, x: Tensor, training: bool) -> Tensor:
    """vit-pytorch's ``branch + x``, kept in that operand order (autograd sums x's two gradients in
    it); in inference written into the branch's fresh output."""
    return branch.add_(x) if not training and can_overwrite(branch) else branch + x


class Transformer(nn.Module):
    """vit-pytorch's ``Transformer``: pre-norm attention and MLP blocks, a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = layer_pairs(depth, lambda i: Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                                  lambda i: FeedForward(dim, mlp_dim, dropout=dropout))

    def forward(self, x: Tensor) -> Tensor:
        return run_layer_norm(self.norm, run_layer_pairs(self.layers, x, self.training))


def check_image(img: Tensor, channels: int, image_size: Tuple[int, int], patch_size: Tuple[int, int],
                model: str) -> None:
    """Clear errors for images the model cannot take (vit-pytorch fails inside einops)."""
    if img.dim() != 4 or img.shape[1] != channels:
        raise ValueError(f"{model}: expected images [B, {channels}, H, W], got shape {tuple(img.shape)}")
    H, W = img.shape[-2:]
    if H % patch_size[0] or W % patch_size[1]:
        raise ValueError(f"{model}: image size {H}x{W} is not divisible by the patch size "
                         f"{patch_size[0]}x{patch_size[1]}")
    if (H // patch_size[0]) * (W // patch_size[1]) > (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1]):
        raise ValueError(f"{model}: image size {H}x{W} has more patches than the positional embedding "
                         f"made for {image_size[0]}x{image_size[1]}")


def to_patches(img: Tensor, patch_size: Tuple[int, int]) -> Tensor:
    """einops ``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'``."""
    B, C, H, W = img.shape
    p1, p2 = patch_size
    x = img.reshape(B, C, H // p1, p1, W // p2, p2).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p1) * (W // p2), p1 * p2 * C)


class PatchEmbedding(nn.Module):
    """vit-pytorch's ``to_patch_embedding`` Sequential (keys ``1`` LayerNorm, ``2`` Linear, ``3``
    LayerNorm; ``0`` is the parameter-free Rearrange)."""

    def __init__(self, patch_size: Tuple[int, int], patch_dim: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.add_module("1", nn.LayerNorm(patch_dim))
        self.add_module("2", nn.Linear(patch_dim, dim))
        self.add_module("3", nn.LayerNorm(dim))

    def forward(self, img: Tensor) -> Tensor:
        x = to_patches(img, self.patch_size)
        return getattr(self, "3")(getattr(self, "2")(getattr(self, "1")(x)))


class ViT(nn.Module):
    """vit-pytorch's ``ViT``: same keyword-only arguments, same state_dict keys."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool="cls", channels=3,
                 dim_head=64, dropout=0.0, emb_dropout=0.0):
        super().__init__()
        self.image_size, self.patch_size, self.channels = pair(image_size), pair(patch_size), channels
        (ih, iw), (ph, pw) = self.image_size, self.patch_size
        if ih % ph or iw % pw:
            raise ValueError(f"ViT: image_size {ih}x{iw} must be divisible by patch_size {ph}x{pw}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"ViT: pool must be 'cls' or 'mean', got {pool!r}")
        num_patches = (ih // ph) * (iw // pw)
        num_cls_tokens = 1 if pool == "cls" else 0
        self.to_patch_embedding = PatchEmbedding(self.patch_size, channels * ph * pw, dim)
        self.cls_token = nn.Parameter(torch.randn(num_cls_tokens, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls_tokens, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes) if num_classes > 0 else None

    def forward(self, img: Tensor) -> Tensor:
        check_image(img, self.channels, self.image_size, self.patch_size, type(self).__name__)
        x = self.to_patch_embedding(img)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.dropout(x + self.pos_embedding[: x.shape[1]])
        x = self.transformer(x)
        if self.mlp_head is None:
            return x
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))
