"""vit-pytorch's ``T2TViT`` (``vit_pytorch/t2t.py``): tokens-to-token stages, then a ViT backbone.

Same constructor arguments and state_dict keys as ``vit_pytorch.t2t.T2TViT``. Every attention, the
one-head T2T stages included, is self attention on ``patch_attention`` with a 1 x 1 patch.

Head dims: a T2T stage attends with one head of ``layer_dim = channels * prod(kernel ** 2)`` channels
(147 and 1323 with the default ``t2t_layers`` and 3 channels). The op's dispatch serves them: the
C++ ``cpu``/``cuda`` kernels take any head dim; the Triton kernel stops at 128 and, with no backend
asked for, the op passes such calls to the ``cuda`` kernel (``reference`` where the extension is
missing). Asking for ``triton`` by name (``use_backend("triton")``) with such a stage raises
``BackendUnavailable`` naming the head dim.

``transformer``: as in vit-pytorch, a module passed here replaces the backbone Transformer and runs
as it is (its attention on our ops only if it is our :class:`~.vit.Transformer`); ``depth``,
``heads`` and ``mlp_dim`` are then not needed.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .vit import Transformer


def conv_output_size(image_size: int, kernel_size: int, stride: int, padding: int) -> int:
    return (image_size - kernel_size + 2 * padding) // stride + 1


class TokensToImage(nn.Module):
    """``[B, h*h, C]`` -> ``[B, C, h, h]`` (vit-pytorch's ``RearrangeImage``; a view, no copy)."""

    def forward(self, x: Tensor) -> Tensor:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"T2TViT: {x.shape[1]} tokens do not form a square image")
        return x.transpose(1, 2).unflatten(2, (side, side))


class ChannelsLast(nn.Module):
    """``[B, C, N]`` -> ``[B, N, C]`` (einops ``'b c n -> b n c'``, a view)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class T2TViT(nn.Module):
    """vit-pytorch's ``T2TViT``: same keyword-only arguments, same state_dict keys."""

    def __init__(self, *, image_size, num_classes, dim, depth=None, heads=None, mlp_dim=None, pool="cls",
                 channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0, transformer: Optional[nn.Module] = None,
                 t2t_layers: Sequence[Tuple[int, int]] = ((7, 4), (3, 2), (3, 2))):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"T2TViT: pool must be 'cls' or 'mean', got {pool!r}")
        if not isinstance(image_size, int):
            raise ValueError(f"T2TViT: image_size must be an int (square images), got {image_size!r}")
        self.image_size, self.channels = image_size, channels
        layers = []
        layer_dim, size = channels, image_size
        for i, (kernel_size, stride) in enumerate(t2t_layers):
            layer_dim *= kernel_size ** 2
            last = i == len(t2t_layers) - 1
            size = conv_output_size(size, kernel_size, stride, stride // 2)
            # Same indices as vit-pytorch's Sequential: 4 modules a stage, only the Transformer has weights.
            layers += [TokensToImage() if i else nn.Identity(),
                       nn.Unfold(kernel_size=kernel_size, stride=stride, padding=stride // 2),
                       ChannelsLast(),
                       nn.Identity() if last else Transformer(layer_dim, 1, 1, layer_dim, layer_dim, dropout)]
        layers.append(nn.Linear(layer_dim, dim))
        self.to_patch_embedding = nn.Sequential(*layers)
        self.num_tokens = size * size

        self.pos_embedding = nn.Parameter(torch.randn(1, self.num_tokens + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        if transformer is None:
            if depth is None or heads is None or mlp_dim is None:
                raise ValueError("T2TViT: depth, heads and mlp_dim must be given when no transformer is passed")
            transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.transformer = transformer
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes)

    def check_image(self, img: Tensor) -> None:
        if img.dim() != 4 or img.shape[1] != self.channels:
            raise ValueError(f"T2TViT: expected images [B, {self.channels}, H, W], got shape {tuple(img.shape)}")
        H, W = img.shape[-2:]
        if H != W:
            raise ValueError(f"T2TViT: images must be square (the T2T stages fold tokens back into a square "
                             f"image), got {H}x{W}")

    def forward(self, img: Tensor) -> Tensor:
        self.check_image(img)
        x = self.to_patch_embedding(img)
        if x.shape[1] > self.num_tokens:
            raise ValueError(f"T2TViT: image size {img.shape[-2]}x{img.shape[-1]} gives {x.shape[1]} tokens, more "
                             f"than the positional embedding made for {self.image_size}x{self.image_size} "
                             f"({self.num_tokens})")
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.dropout(x + self.pos_embedding[:, : x.shape[1]])
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))
