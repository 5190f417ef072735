"""Drop-in fused Conv2d -> BatchNorm2d -> SiLU/ReLU/Identity.

Eval: BatchNorm is folded into the conv weight and bias (cached, refreshed whenever any weight or
buffer changes). A depthwise conv then runs as one ``dwconv_bn_act`` kernel (conv + bias +
activation); any other conv (pointwise, full, grouped, dilated) runs as the eager conv with the
folded weight and the activation in place, which drops the BatchNorm pass. Training, or a BatchNorm
without running statistics: the conv, then BatchNorm with batch statistics exactly as
``nn.BatchNorm2d`` (running-stat updates included), then the activation.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .. import memory
from ..ops.dwconv_bn_act import ACTIVATIONS, KERNEL_SIZES, STRIDES, dwconv_bn_act
from .sharing import take_mode

_ACT_NAMES = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "none", type(None): "none"}


class Unsupported(ValueError):
    """This Conv/BN/activation configuration has no fused path (the message says why)."""


def activation_name(act) -> str:
    """``"silu"``/``"relu"``/``"none"`` for an activation module, class, name or None."""
    if isinstance(act, str):
        name = {"swish": "silu", "identity": "none", "": "none"}.get(act.lower(), act.lower())
        if name in ACTIVATIONS:
            return name
        raise Unsupported(f"act_layer {act!r} is not supported; supported: SiLU, ReLU, Identity/None")
    cls = act if isinstance(act, type) else type(act)
    if cls not in _ACT_NAMES:
        raise Unsupported(f"activation {cls.__name__} is not supported; supported: SiLU, ReLU, Identity/None")
    return _ACT_NAMES[cls]


def check_fusable(conv: nn.Module, bn: nn.Module) -> None:
    """Raise :class:`Unsupported` naming why this conv + norm pair cannot be fused at all."""
    # A subclass that overrides forward (timm's Conv2dSame, weight-standardised convs) computes
    # something else than the plain conv both paths implement.
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        raise Unsupported(f"conv {type(conv).__name__} is not a plain nn.Conv2d")
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).__name__ not in ("BatchNorm2d", "BatchNormAct2d"):
        raise Unsupported(f"norm {type(bn).__name__} is not nn.BatchNorm2d or timm's BatchNormAct2d")
    if bn.num_features != conv.out_channels:
        raise Unsupported(f"BatchNorm2d has {bn.num_features} features for a conv of {conv.out_channels} "
                          f"output channels")
    if not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
        raise Unsupported(f"BatchNormAct2d.drop {type(bn.drop).__name__} is not supported")


def dwconv_kernel_mismatch(conv: nn.Conv2d) -> Optional[str]:
    """Why ``conv`` cannot run on the ``dwconv_bn_act`` kernel, or None when it can.

    Such convs still fuse, on the folded-conv path: eager conv with BatchNorm folded into it.
    """
    C, K = conv.in_channels, conv.kernel_size[0]
    if not conv.groups == C == conv.out_channels:
        return (f"conv is not depthwise: in_channels={C}, out_channels={conv.out_channels}, "
                f"groups={conv.groups}; supported: groups == in_channels == out_channels")
    if conv.kernel_size != (K, K) or K not in KERNEL_SIZES:
        return f"conv kernel_size={conv.kernel_size}; supported: square, one of {KERNEL_SIZES}"
    if conv.stride[0] != conv.stride[1] or conv.stride[0] not in STRIDES:
        return f"conv stride={conv.stride}; supported: {STRIDES}, equal in H and W"
    if conv.dilation != (1, 1):
        return f"conv dilation={conv.dilation}; supported: 1"
    if conv.padding != (K // 2, K // 2) or conv.padding_mode != "zeros":
        return (f"conv padding={conv.padding!r} ({conv.padding_mode}); supported: "
                f"zero padding kernel_size // 2 = {K // 2}")
    return None


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Conv weight and bias with eval-mode BatchNorm folded in, in float32 (float64 for float64 params).

    ``bn(conv(x)) == conv(x, w, b)`` with ``s = bn.weight / sqrt(bn.running_var + bn.eps)``,
    ``w = conv.weight * s``, ``b = (conv.bias - bn.running_mean) * s + bn.bias``.
    """
    acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc)
    if conv.bias is not None:
        shift = shift + conv.bias.to(acc)
    bias = shift * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(acc)
    # [out, ...] weights of any rank: conv [out, in, kh, kw] or Linear [out, in]
    return conv.weight.to(acc) * scale.view(-1, *([1] * (conv.weight.dim() - 1))), bias


class DerivedCache:
    """A value computed from source tensors, recomputed when any source changes.

    A change is a new tensor (``.to()``, ``.half()``, assigning ``.data``: another data pointer) or an
    in-place write (``load_state_dict``, an optimizer step: the version counter moves). Owners also
    call ``invalidate()`` in ``_apply``. No cache while compiling (the computation is traced into the
    graph) or when the value must carry gradients, or for sources created under
    ``torch.inference_mode()`` (they have no version counter).
    """

    def __init__(self):
        self.invalidate()

    def invalidate(self) -> None:
        self._key, self._value = None, None

    def get(self, sources: Sequence[Optional[Tensor]], compute: Callable[[], object], extra: tuple = ()):
        if torch.compiler.is_compiling():
            return compute()
        grad = torch.is_grad_enabled()
        key = list(extra)  # one pass over the sources: this runs for every layer of every call
        for t in sources:
            if t is None:
                key.append(None)
                continue
            if t.is_inference() or (grad and t.requires_grad):
                return compute()
            key.append((t.data_ptr(), t._version, t.dtype, t.device))
        key = tuple(key)
        if key != self._key:
            with torch.no_grad():
                self._value = compute()
            self._key = key
        return self._value


def member(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter or buffer, from the module's dicts: nn.Module's
    ``__getattr__`` costs about a microsecond a lookup, and the folds look up six tensors per layer
    per call."""
    parameters = module._parameters
    if name in parameters:
        return parameters[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


class BatchNormFold(DerivedCache):
    """The folded weight and bias of one conv + BN pair, recomputed when any source tensor changes.
    With ``dtype``, the fold cast to it and cached so (a 16-bit model's layers: the fold is computed in
    float32, and casting it on every call cost ~1 ms a LeViT-128S forward in bfloat16)."""

    def __call__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: Optional[torch.dtype] = None
                 ) -> Tuple[Tensor, Tensor]:
        sources = (member(conv, "weight"), member(conv, "bias"), member(bn, "weight"), member(bn, "bias"),
                   member(bn, "running_mean"), member(bn, "running_var"))
        if dtype is None:
            return self.get(sources, lambda: fold_batchnorm(conv, bn), (bn.eps,))
        return self.get(sources, lambda: tuple(t.to(dtype) for t in fold_batchnorm(conv, bn)), (bn.eps, dtype))


def conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str, fold: BatchNormFold) -> Tensor:
    """``act(bn(conv(x)))``; ``conv``/``bn`` already passed :func:`check_fusable`.

    Depthwise convs the kernel supports run on ``dwconv_bn_act``; any other conv runs as an eager
    conv with the BatchNorm folded into its weight and bias (eval), the activation applied in place.
    """
    depthwise = dwconv_kernel_mismatch(conv) is None
    if bn.training or bn.running_mean is None:
        if depthwise:
            y = dwconv_bn_act(x, conv.weight, conv.bias, conv.stride[0], "none")
        else:
            y = conv(x)
        # _BatchNorm.forward, not bn(): timm's BatchNormAct2d would apply its activation too.
        return memory.LINEAR_ACTIVATIONS[act][0](_BatchNorm.forward(bn, y))
    weight, bias = fold(conv, bn, None if depthwise else x.dtype)  # the depthwise kernel takes float32
    if depthwise:
        return dwconv_bn_act(x, weight, bias, conv.stride[0], act)
    if x.dim() == 4 and x.shape[1] != conv.in_channels:
        raise ValueError(f"conv_bn_act: x has C={x.shape[1]} channels, the conv expects {conv.in_channels}")
    # The activation in the GEMM's epilogue, or in place unless autograd needs the pre-activation.
    return memory.pointwise_conv(conv, x, weight, bias, act)


class _FoldCacheMixin:
    def _apply(self, fn, recurse=True):
        self._fold.invalidate()
        return super()._apply(fn, recurse)


class FusedConvBNAct(_FoldCacheMixin, nn.Module):
    """Fused drop-in for timm's ``ConvNormAct`` (same arguments, same keys: ``conv.weight``, ``bn.*``).

    Equivalent PyTorch::

        conv = nn.Conv2d(in_channels, out_channels, k, stride, padding, dilation, groups, bias=bias)
        y = act_layer()(nn.BatchNorm2d(out_channels)(conv(x)))

    Depthwise convs (``groups == in_channels == out_channels``) with an odd kernel 1..9, stride 1/2
    and padding ``k // 2`` run on the ``dwconv_bn_act`` kernel; every other conv on the folded-conv
    path (see the module docstring). Activations: SiLU, ReLU or none; others raise ``Unsupported``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding="", dilation: int = 1, groups: int = 1, bias: bool = False,
                 apply_act: bool = True, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU,
                 norm_kwargs: Optional[dict] = None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if padding in ("", None):  # timm's symmetric default padding
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias, **dd)
        self.bn = norm_layer(out_channels, **(norm_kwargs or {}), **dd)
        self.act = activation_name(act_layer if apply_act else None)
        check_fusable(self.conv, self.bn)
        self._fold = BatchNormFold()

    @classmethod
    def from_module(cls, module: nn.Module) -> nn.Module:
        """The fused equivalent of a timm ``ConvNormAct`` or an ``nn.Sequential(conv, bn[, act])``,
        sharing its parameters and buffers. Raises :class:`Unsupported` saying why when it has none."""
        if isinstance(module, nn.Sequential):
            if len(module) not in (2, 3):
                raise Unsupported(f"nn.Sequential of {len(module)} modules; supported: (conv, bn[, act])")
            return take_mode(FusedConvBNActSequential(*module), module)
        aa = getattr(module, "aa", None)
        if aa is not None and not isinstance(aa, nn.Identity):
            raise Unsupported(f"anti-aliasing layer {type(aa).__name__} is not supported")
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        check_fusable(conv, bn)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.conv, fused.bn = conv, bn
        fused.act = activation_name(getattr(bn, "act", None))
        fused._fold = BatchNormFold()
        return take_mode(fused, module)

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(x, self.conv, self.bn, self.act, self._fold)

    def extra_repr(self) -> str:
        return f"act={self.act}"


class FusedConvBNActSequential(_FoldCacheMixin, nn.Sequential):
    """Fused drop-in for ``nn.Sequential(Conv2d(C, C, k, groups=C), BatchNorm2d(C)[, SiLU|ReLU|Identity])``.

    Holds the same children under the same indices, so the state_dict keys (``0.weight``, ``1.*``)
    are unchanged.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[nn.Module] = None):
        # Checks first: fail before any child is registered.
        check_fusable(conv, bn)
        bn_act = getattr(bn, "act", None)  # timm's BatchNormAct2d carries its own activation
        if act is not None and activation_name(bn_act) != "none":
            raise Unsupported("two activations (BatchNormAct2d.act and a third module) are not supported")
        act_name = activation_name(act if act is not None else bn_act)
        super().__init__(*(m for m in (conv, bn, act) if m is not None))
        self.act = act_name
        self._fold = BatchNormFold()

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(x, self[0], self[1], self.act, self._fold)

    def extra_repr(self) -> str:
        return f"act={self.act}"
