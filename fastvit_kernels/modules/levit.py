"""Drop-in fused LeViT layers: timm ``levit.py``'s ``LinearNorm``/``ConvNorm``, ``Attention`` and
``AttentionDownsample`` (linear and conv variants), same arguments and state_dict keys.

LeViT (Graham et al., arXiv:2104.01136) puts a BatchNorm after every Linear and adds a learned
relative-position bias ``table[h, |dy| * R_w + |dx|]`` to the attention scores. Here every
Linear/Conv + BatchNorm pair folds into one at eval (cached, refreshed whenever a weight or BN
buffer changes), and attention runs on ``bias_attention``, which computes the bias index from token
coordinates and reads the current table on every call: there is no cached bias to go stale (timm
and the original code cache it per device in eval mode, and a ``load_state_dict`` after ``.eval()``
was silently ignored). Hardswish, LeViT's activation before the output projection, runs in the
attention kernel's epilogue.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import memory
from ..ops.bias_attention import bias_attention
from .conv_bn_act import BatchNormFold, Unsupported, conv_bn_act
from .sharing import take_mode


def _pair(r: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))


class _FoldCache(nn.Module):
    def _apply(self, fn, recurse=True):
        self._fold.invalidate()
        return super()._apply(fn, recurse)


class LinearNorm(_FoldCache):
    """``Linear(bias=False) -> BatchNorm1d`` over the last dim of ``[..., in]`` tokens (timm's
    ``LinearNorm``: keys ``linear``, ``bn``); one folded Linear at eval."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm1d(out_features, device=device, dtype=dtype)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        self._fold = BatchNormFold()

    def forward(self, x: Tensor, activation: str = "none") -> Tensor:
        """``act(bn(linear(x)))``, ``act`` named in ``memory.LINEAR_ACTIVATIONS`` (in the GEMM's
        epilogue at eval)."""
        if self.bn.training or self.bn.running_mean is None:
            y = self.linear(x)
            return memory.LINEAR_ACTIVATIONS[activation][0](self.bn(y.flatten(0, -2)).reshape_as(y))
        weight, bias = self._fold(self.linear, self.bn, x.dtype)
        return memory.linear(x, weight, bias, activation)


class ConvNorm(_FoldCache):
    """``Conv2d(bias=False) -> BatchNorm2d`` (timm's ``ConvNorm``: keys ``linear``, ``bn``); folded at
    eval (``FusedConvBNAct``'s path, no activation)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bn_weight_init: float = 1, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=False,
                                device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_chs, device=device, dtype=dtype)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        self._fold = BatchNormFold()

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(x, self.linear, self.bn, "none", self._fold)


def share_norm_layer(module: nn.Module) -> nn.Module:
    """Our LinearNorm/ConvNorm holding a timm one's ``linear`` and ``bn``."""
    cls = ConvNorm if isinstance(module.linear, nn.Conv2d) else LinearNorm
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    fused.linear, fused.bn, fused._fold = module.linear, module.bn, BatchNormFold()
    return take_mode(fused, module)


def _epilogue(act: nn.Module) -> str:
    """The activation ``bias_attention`` applies itself, or "none" (then ``act`` runs after it)."""
    return "hardswish" if type(act).__name__ in ("Hardswish", "HardSwish") else "none"


def _project(proj: nn.Sequential, out: Tensor, epilogue: str) -> Tensor:
    return proj.ln(out if epilogue != "none" else proj.act(out))


class _BiasAttentionBase(nn.Module):
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, stride: int) -> Tensor:
        epilogue = _epilogue(self.proj.act)
        out = bias_attention(q, k, v, self.attention_biases, self.resolution, stride, self.scale, epilogue)
        return out, epilogue


class FusedLeViTAttention(_BiasAttentionBase):
    """timm LeViT ``Attention`` (keys ``qkv``, ``proj.ln``, ``attention_biases``).

    Equivalent PyTorch (linear variant, x ``[B, N, C]``)::

        q, k, v = qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, val_dim], dim=3)
        attn = q @ k^T * scale + attention_biases[:, idx]       # idx[i, j] = |dy| * R_w + |dx|
        out = proj(attn.softmax(-1) @ v)                        # proj = (act, LinearNorm)
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: Union[int, Tuple[int, int]] = 14, use_conv: bool = False,
                 act_layer: Type[nn.Module] = nn.SiLU, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        ln_layer = ConvNorm if use_conv else LinearNorm
        self.resolution = _pair(resolution)
        self.use_conv, self.num_heads = use_conv, num_heads
        self.scale = key_dim ** -0.5
        self.key_dim, self.key_attn_dim = key_dim, key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = ln_layer(dim, self.val_attn_dim + self.key_attn_dim * 2, **dd)
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()), ("ln", ln_layer(self.val_attn_dim, dim, bn_weight_init=0, **dd))]))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, self.resolution[0] * self.resolution[1], **dd))

    @classmethod
    def from_module(cls, attn: nn.Module) -> "FusedLeViTAttention":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in ("resolution", "use_conv", "num_heads", "scale", "key_dim", "key_attn_dim", "val_dim",
                     "val_attn_dim"):
            setattr(fused, name, getattr(attn, name))
        fused.resolution = _pair(attn.resolution)
        fused.qkv = share_norm_layer(attn.qkv)
        fused.proj = nn.Sequential(OrderedDict([("act", attn.proj.act), ("ln", share_norm_layer(attn.proj.ln))]))
        fused.attention_biases = attn.attention_biases
        return take_mode(fused, attn)

    def forward(self, x: Tensor) -> Tensor:
        split = [self.key_dim, self.key_dim, self.val_dim]
        if self.use_conv:
            B, _, H, W = x.shape
            q, k, v = self.qkv(x).view(B, self.num_heads, -1, H * W).split(split, dim=2)
            q, k, v = (t.transpose(-2, -1) for t in (q, k, v))
        else:
            B, N, _ = x.shape
            q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, N, self.num_heads, -1).split(split, dim=3))
        out, epilogue = self._attend(q, k, v, 1)
        if self.use_conv:
            out = out.transpose(1, 2).view(B, self.val_attn_dim, H, W)
        return _project(self.proj, out, epilogue)


class FusedLeViTAttentionDownsample(_BiasAttentionBase):
    """timm LeViT ``AttentionDownsample`` (keys ``kv``, ``q.ln``, ``proj.ln``, ``attention_biases``):
    queries from the ``stride``-subsampled grid, keys/values from the full one."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 2.0,
                 stride: int = 2, resolution: Union[int, Tuple[int, int]] = 14, use_conv: bool = False,
                 use_pool: bool = False, act_layer: Type[nn.Module] = nn.SiLU, device=None, dtype=None):
        super().__init__()
        if use_pool:
            raise ValueError("FusedLeViTAttentionDownsample: use_pool=True is not supported (queries are the "
                             "subsampled tokens); supported: False, timm's default")
        dd = {"device": device, "dtype": dtype}
        ln_layer = ConvNorm if use_conv else LinearNorm
        self.stride, self.resolution = stride, _pair(resolution)
        self.use_conv, self.num_heads = use_conv, num_heads
        self.key_dim, self.key_attn_dim = key_dim, key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.scale = key_dim ** -0.5
        self.kv = ln_layer(in_dim, self.val_attn_dim + self.key_attn_dim, **dd)
        self.q = nn.Sequential(OrderedDict([("ln", ln_layer(in_dim, self.key_attn_dim, **dd))]))
        self.proj = nn.Sequential(OrderedDict([("act", act_layer()), ("ln", ln_layer(self.val_attn_dim, out_dim, **dd))]))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, self.resolution[0] * self.resolution[1], **dd))

    @classmethod
    def from_module(cls, attn: nn.Module) -> "FusedLeViTAttentionDownsample":
        down = attn.q.down
        if getattr(down, "pool", None) is not None or (
                isinstance(down, nn.AvgPool2d) and down.kernel_size not in (1, (1, 1))):
            raise Unsupported("AttentionDownsample with use_pool=True is not supported")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in ("stride", "use_conv", "num_heads", "key_dim", "key_attn_dim", "val_dim", "val_attn_dim",
                     "scale"):
            setattr(fused, name, getattr(attn, name))
        fused.resolution = _pair(attn.resolution)
        fused.kv = share_norm_layer(attn.kv)
        fused.q = nn.Sequential(OrderedDict([("ln", share_norm_layer(attn.q.ln))]))
        fused.proj = nn.Sequential(OrderedDict([("act", attn.proj.act), ("ln", share_norm_layer(attn.proj.ln))]))
        fused.attention_biases = attn.attention_biases
        return take_mode(fused, attn)

    def forward(self, x: Tensor) -> Tensor:
        s, (R_h, R_w) = self.stride, self.resolution
        split = [self.key_dim, self.val_dim]
        if self.use_conv:
            B, _, H, W = x.shape
            k, v = (t.transpose(-2, -1) for t in self.kv(x).view(B, self.num_heads, -1, H * W).split(split, dim=2))
            q = self.q.ln(x[:, :, ::s, ::s])
            HH, WW = q.shape[-2:]
            q = q.reshape(B, self.num_heads, self.key_dim, -1).transpose(-2, -1)
        else:
            B, N, C = x.shape
            k, v = (t.transpose(1, 2) for t in self.kv(x).view(B, N, self.num_heads, -1).split(split, dim=3))
            sub = x.view(B, R_h, R_w, C)[:, ::s, ::s].reshape(B, -1, C)
            q = self.q.ln(sub).view(B, -1, self.num_heads, self.key_dim).transpose(1, 2)
        out, epilogue = self._attend(q, k, v, s)
        if self.use_conv:
            out = out.transpose(1, 2).reshape(B, self.val_attn_dim, HH, WW)
        return _project(self.proj, out, epilogue)
