"""A pre-norm transformer block over image-ordered tokens, attention grouped by patch offset.

The same parameters and state_dict keys as timm's ``vision_transformer.Block`` (``norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), but the tokens stay in image order
``[B, H, W, C]``: LayerNorm, the Linears and the MLP are per token, so only attention needs to know
which tokens form a sequence, and ``patch_attention`` reads that from the layout. Equivalent PyTorch,
with ``unfold``/``fold`` as in timm's ``MobileVitBlock``::

    x = x + attn.proj(fold(Attention_core(unfold(attn.qkv(norm1(x))))))
    x = x + mlp.fc2(act(mlp.fc1(norm2(x))))
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from torch import Tensor

from .. import memory
from ..memory import run_layer_norm, run_linear
from ..ops.patch_attention import patch_attention
from .sharing import take_mode
from .conv_bn_act import Unsupported


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a sample's residual branch with probability ``p``, rescale the rest.

    Same as timm's ``DropPath`` (one Bernoulli draw per sample, scaled by ``1 / (1 - p)``).
    """
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def can_overwrite(t: Tensor) -> bool:
    """True when ``t``, a fresh intermediate, may be overwritten: no autograd graph will read it."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def add_residual(shortcut: Tensor, branch: Tensor, p: float, training: bool) -> Tensor:
    """``shortcut + drop_path(branch, p)``. In inference the sum goes into ``branch`` (a fresh
    intermediate of the same shape) instead of a new tensor: a fresh large buffer costs page faults on
    first touch, which on the CPU can cost more than the add itself."""
    if training or branch.shape != shortcut.shape or not can_overwrite(branch):
        return shortcut + drop_path(branch, p, training)
    return branch.add_(shortcut)


# Activations that have an in-place form, and how to call it with the module's settings.
_IN_PLACE = {
    nn.GELU: lambda act, t: torch.ops.aten.gelu_(t, approximate=act.approximate),
    nn.SiLU: lambda act, t: torch.nn.functional.silu(t, inplace=True),
    nn.ReLU: lambda act, t: torch.relu_(t),
    nn.Hardswish: lambda act, t: torch.nn.functional.hardswish(t, inplace=True),
}


def activate(act: nn.Module, t: Tensor) -> Tensor:
    """``act(t)`` for a fresh intermediate ``t``: in place when nothing else reads ``t`` (inference),
    which saves a buffer as large as the MLP's hidden layer."""
    in_place = _IN_PLACE.get(type(act))
    return in_place(act, t) if in_place is not None and can_overwrite(t) else act(t)


def _frozen(bn: nn.Module) -> bool:
    """A BatchNorm in eval mode with running statistics and affine parameters."""
    return not bn.training and bn.running_mean is not None and bn.weight is not None and bn.bias is not None


def run_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``. In CPU inference a plain ``nn.Sequential`` of Linear / LayerNorm / Conv2d /
    activations / Dropout / Identity / eval BatchNorm2d (vit-pytorch's FeedForward and ``to_out``) runs
    step by step: Linear, LayerNorm and 1x1 convs of channels_last maps into cached buffers
    (:mod:`fastvit_kernels.memory`), activations and BatchNorm in place on them."""
    if not memory.plain(module, nn.Sequential) or not memory.into_cache(x):
        return module(x)
    fresh = False  # whether x is an intermediate made here (never overwrite the caller's input)
    for step in module:
        kind = type(step)
        if memory.plain(step, nn.Linear):
            x, fresh = memory.run_linear(step, x), True
        elif memory.plain(step, nn.LayerNorm):
            x, fresh = memory.run_layer_norm(step, x), True
        elif memory.plain(step, nn.Conv2d):
            x, fresh = memory.pointwise_conv(step, x), True
        elif kind is nn.BatchNorm2d and fresh and memory.plain(step, kind) and _frozen(step):
            scale = step.weight * torch.rsqrt(step.running_var + step.eps)
            x = x.mul_(scale[:, None, None]).add_((step.bias - step.running_mean * scale)[:, None, None])
        elif kind in _IN_PLACE and fresh and memory.plain(step, kind):
            x = _IN_PLACE[kind](step, x)
        elif kind in (nn.Dropout, nn.Identity) and memory.plain(step, kind) and not (
                step.training and getattr(step, "p", 0.0)):
            continue
        else:
            x, fresh = step(x), False
    return x


def scale_(gamma: Optional[Tensor], t: Tensor) -> Tensor:
    """Layer scale ``gamma * t`` for a fresh intermediate ``t``, in place in inference."""
    if gamma is None:
        return t
    if torch.is_grad_enabled() and (t.requires_grad or gamma.requires_grad):
        return gamma * t
    return t.mul_(gamma)


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PatchAttention(nn.Module):
    """timm ``Attention`` (``qkv``, ``proj`` keys) on ``[B, H, W, C]`` tokens, within patch offsets."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.0,
                 patch_size: Union[int, Sequence[int]] = 1, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PatchAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.patch_size = _pair(patch_size)
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        out = patch_attention(run_linear(self.qkv, x), self.num_heads, self.patch_size, self.scale)
        return self.proj_drop(run_linear(self.proj, out))


class Mlp(nn.Module):
    """timm ``Mlp`` (``fc1``, ``fc2`` keys): Linear -> act -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, act_layer: Type[nn.Module] = nn.GELU, drop: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        name = memory.activation_name(self.act)
        if name is not None:  # in fc1's epilogue (memory.linear)
            hidden = run_linear(self.fc1, x, name)
        else:
            hidden = activate(self.act, run_linear(self.fc1, x))
        return self.drop2(run_linear(self.fc2, self.drop1(hidden)))

    def residual_forward(self, x: Tensor, gamma: Optional[Tensor] = None,
                         residual: Optional[Tensor] = None) -> Optional[Tensor]:
        """``residual + gamma * self(x)`` in one kernel in float32 CPU inference where that pays
        (:func:`fastvit_kernels.memory.fused_mlp`), else None: the caller runs ``self(x)``."""
        if self.training or not all(memory.plain(d, type(d)) and type(d) in (nn.Dropout, nn.Identity)
                                    for d in (self.drop1, self.drop2)):
            return None
        return memory.fused_mlp(x, self.fc1, self.act, self.fc2, gamma, residual)


class PatchTransformerBlock(nn.Module):
    """Pre-norm transformer block on image-ordered tokens (see the module docstring).

    Constructor arguments follow timm's ``Block`` plus ``patch_size``; attention dropout is not
    supported by the fused attention kernels (``attn_drop`` must be 0).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 patch_size: Union[int, Sequence[int]] = 1, device=None, dtype=None):
        super().__init__()
        if attn_drop:
            raise ValueError(f"PatchTransformerBlock: attn_drop={attn_drop} is not supported (the fused "
                             f"attention has no dropout on the attention map); supported: 0")
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = PatchAttention(dim, num_heads, qkv_bias, proj_drop, patch_size, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop, **dd)
        self.drop_path = drop_path

    @classmethod
    def from_module(cls, block: nn.Module, patch_size: Union[int, Sequence[int]]) -> "PatchTransformerBlock":
        """The equivalent of a timm ``vision_transformer.Block``, sharing its parameters.

        Raises :class:`Unsupported` for what the fused path does not compute: layer scale,
        q/k norm, attention dropout, masks of other attention flavours.
        """
        attn, mlp = block.attn, block.mlp
        for name in ("ls1", "ls2"):
            if not isinstance(getattr(block, name, nn.Identity()), nn.Identity):
                raise Unsupported(f"Block.{name} (layer scale) is not supported")
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                raise Unsupported(f"Attention.{name} is not supported")
        if getattr(attn, "attn_drop", nn.Dropout(0.0)).p:
            raise Unsupported(f"attention dropout p={attn.attn_drop.p} is not supported")
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise Unsupported("Mlp.norm is not supported")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.norm1 = block.norm1  # registration order = state_dict order: as timm's
        fused.attn = PatchAttention.__new__(PatchAttention)
        nn.Module.__init__(fused.attn)
        fused.attn.num_heads, fused.attn.patch_size = attn.num_heads, _pair(patch_size)
        fused.attn.scale = float(attn.scale)
        fused.attn.qkv, fused.attn.proj, fused.attn.proj_drop = attn.qkv, attn.proj, attn.proj_drop
        fused.norm2 = block.norm2
        fused.mlp = Mlp.__new__(Mlp)
        nn.Module.__init__(fused.mlp)
        for name in ("fc1", "act", "drop1", "fc2", "drop2"):
            setattr(fused.mlp, name, getattr(mlp, name))
        fused.drop_path = float(getattr(block.drop_path1, "drop_prob", 0.0))
        return take_mode(fused, block)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, H, W, C]`` tokens in image order, H and W multiples of the patch size."""
        x = add_residual(x, self.attn(run_layer_norm(self.norm1, x)), self.drop_path, self.training)
        t = run_layer_norm(self.norm2, x)
        fused = None if self.training else self.mlp.residual_forward(t, residual=x)
        return fused if fused is not None else add_residual(x, self.mlp(t), self.drop_path, self.training)
