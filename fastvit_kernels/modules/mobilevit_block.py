"""Drop-in fused MobileViT block (timm ``MobileVitBlock``: same arguments, same state_dict keys).

timm unfolds the feature map into ``ph * pw`` sequences, runs the transformer, and folds back: two
full copies of the activations per block plus the NCHW <-> token transposes. Here the tokens stay in
image order ``[B, H, W, C]`` (a channels_last feature map viewed as rows) from ``conv_1x1`` to
``conv_proj``; the per-token ops do not care about order and ``patch_attention`` picks each
sequence out by strides. Convs fold their BatchNorm at eval (``FusedConvBNAct``). Equivalent
PyTorch (timm's forward)::

    y = conv_1x1(conv_kxk(x))                       # then bilinear resize to multiples of the patch
    y = fold(norm(transformer(unfold(y))))          # then resize back
    out = conv_fusion(torch.cat((x, conv_proj(y)), dim=1))
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import memory
from .conv_bn_act import FusedConvBNAct
from .patch_transformer import PatchTransformerBlock, _pair
from .sharing import take_mode


def _make_divisible(v: float, divisor: int = 8) -> int:
    # timm.layers.make_divisible with its defaults (min_value = divisor, round_limit = 0.9).
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class FusedMobileViTBlock(nn.Module):
    """MobileViT block: local kxk conv, 1x1 to ``transformer_dim``, transformer over patch-offset
    sequences, 1x1 back, fusion kxk conv over ``cat(input, output)``.

    Arguments as timm's ``MobileVitBlock``. Activations come from ``layers`` as in timm (a
    ``LayerFn``: the convs use ``layers.conv_norm_act``'s ``act_layer``, ReLU by default, and the MLP
    ``layers.act``), or ``act_layer`` sets both. ``group_size`` and
    ``dilation`` are accepted for the kxk conv as timm does. ``attn_drop`` must be 0.
    """

    def __init__(self, in_chs: int, out_chs: Optional[int] = None, kernel_size: int = 3, stride: int = 1,
                 bottle_ratio: float = 1.0, group_size: Optional[int] = None, dilation: Tuple[int, int] = (1, 1),
                 mlp_ratio: float = 2.0, transformer_dim: Optional[int] = None, transformer_depth: int = 2,
                 patch_size: Union[int, Sequence[int]] = 8, num_heads: int = 4, attn_drop: float = 0.0,
                 drop: float = 0.0, no_fusion: bool = False, drop_path_rate: float = 0.0, layers=None,
                 transformer_norm_layer: Type[nn.Module] = nn.LayerNorm, act_layer: Optional[Type[nn.Module]] = None,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        conv_act, mlp_act = (act_layer, act_layer) if act_layer else _layer_acts(layers)
        groups = 1 if not group_size else in_chs // group_size
        out_chs = out_chs or in_chs
        transformer_dim = transformer_dim or _make_divisible(bottle_ratio * in_chs)
        self.patch_size = _pair(patch_size)
        self.patch_area = self.patch_size[0] * self.patch_size[1]

        self.conv_kxk = FusedConvBNAct(in_chs, in_chs, kernel_size, stride, groups=groups, dilation=dilation[0],
                                       act_layer=conv_act, **dd)
        self.conv_1x1 = nn.Conv2d(in_chs, transformer_dim, kernel_size=1, bias=False, **dd)
        self.transformer = nn.Sequential(*[
            PatchTransformerBlock(transformer_dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=drop,
                                  attn_drop=attn_drop, drop_path=drop_path_rate, act_layer=mlp_act,
                                  norm_layer=transformer_norm_layer, patch_size=self.patch_size, **dd)
            for _ in range(transformer_depth)])
        self.norm = transformer_norm_layer(transformer_dim, **dd)
        self.conv_proj = FusedConvBNAct(transformer_dim, out_chs, 1, act_layer=conv_act, **dd)
        self.conv_fusion = None if no_fusion else FusedConvBNAct(in_chs + out_chs, out_chs, kernel_size,
                                                                 act_layer=conv_act, **dd)

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedMobileViTBlock":
        """The fused equivalent of a timm ``MobileVitBlock``, sharing its parameters and buffers.

        Raises ``Unsupported`` (a ``ValueError``) naming the part with no fused path.
        """
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.patch_size = _pair(block.patch_size)
        fused.patch_area = fused.patch_size[0] * fused.patch_size[1]
        fused.conv_kxk = FusedConvBNAct.from_module(block.conv_kxk)
        fused.conv_1x1 = block.conv_1x1
        fused.transformer = nn.Sequential(*[PatchTransformerBlock.from_module(b, fused.patch_size)
                                            for b in block.transformer])
        fused.norm = block.norm
        fused.conv_proj = FusedConvBNAct.from_module(block.conv_proj)
        fused.conv_fusion = None if block.conv_fusion is None else FusedConvBNAct.from_module(block.conv_fusion)
        return take_mode(fused, block)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"FusedMobileViTBlock: x.dtype {x.dtype} is not supported; supported: floating "
                            f"point (float16, bfloat16, float32, float64)")
        if x.dim() != 4 or x.shape[1] != self.conv_kxk.conv.in_channels:
            raise ValueError(f"FusedMobileViTBlock: x must be [B, {self.conv_kxk.conv.in_channels}, H, W], "
                             f"got shape {tuple(x.shape)}")
        shortcut = x
        y = self.conv_kxk(memory.channels_last(x))
        # A channels_last map is already [B, H, W, C] rows: the 1x1 conv is a Linear on them.
        tokens = memory.linear(y.permute(0, 2, 3, 1), self.conv_1x1.weight.flatten(1))
        B, H, W, _ = tokens.shape
        ph, pw = self.patch_size
        new_h, new_w = math.ceil(H / ph) * ph, math.ceil(W / pw) * pw
        resize = (new_h, new_w) != (H, W)
        if resize:  # timm resizes instead of padding; match it
            tokens = _resize_tokens(tokens, (new_h, new_w))
        tokens = self.norm(self.transformer(tokens))
        if resize:
            tokens = _resize_tokens(tokens, (H, W))
        y = self.conv_proj(tokens.permute(0, 3, 1, 2))
        if self.conv_fusion is not None:
            y = self.conv_fusion(torch.cat((memory.channels_last(shortcut), y), dim=1))
        return y


def _layer_acts(layers) -> Tuple[Type[nn.Module], Type[nn.Module]]:
    """(conv activation, MLP activation) the way timm's MobileVitBlock takes them from a LayerFn."""
    if layers is None:
        return nn.ReLU, nn.ReLU
    conv_norm_act = getattr(layers, "conv_norm_act", None)
    conv_act = getattr(conv_norm_act, "keywords", {}).get("act_layer", nn.ReLU)  # functools.partial
    return conv_act, getattr(layers, "act", nn.ReLU)


def _resize_tokens(tokens: Tensor, size: Tuple[int, int]) -> Tensor:
    resized = F.interpolate(tokens.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)
