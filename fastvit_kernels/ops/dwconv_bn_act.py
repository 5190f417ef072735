"""Depthwise convolution + (folded) BatchNorm + activation, as one op.

The functional form takes the conv weight and bias with BatchNorm already folded in (the modules fold
it, see ``fastvit_kernels.modules.conv_bn_act``). Equivalent PyTorch::

    C, K = x.shape[1], weight.shape[-1]
    y = F.conv2d(x, weight, bias, stride=stride, padding=K // 2, groups=C)
    y = {"silu": F.silu, "relu": F.relu, "none": lambda t: t}[act](y)

The fused kernels read the input once, accumulate in float32 (float64 for float64 input) and apply the
activation before the single write. The output keeps the input's memory format (channels_last in,
channels_last out).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, memory

ACTIVATIONS = {"none": 0, "silu": 1, "relu": 2}
KERNEL_SIZES = (1, 3, 5, 7, 9)
STRIDES = (1, 2)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dwconv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: int = 1,
                  act: str = "silu") -> Tensor:
    """Depthwise ``K x K`` conv (padding ``K // 2``) + per-channel bias + activation.

    Args:
        x: ``[N, C, H, W]`` float16/bfloat16/float32/float64, any memory layout.
        weight: ``[C, 1, K, K]`` depthwise conv weight (BatchNorm folded in), K odd in 1..9.
        bias: ``[C]`` or None.
        stride: 1 or 2.
        act: ``"silu"``, ``"relu"`` or ``"none"``.

    Equivalent to ``act(F.conv2d(x, weight, bias, stride, K // 2, groups=C))``; differentiable in
    ``x``, ``weight`` and ``bias``.
    """
    if backends.direct_call(x, weight, bias):  # eager inference: the same work without the dispatcher
        return _forward(x, weight, bias, stride, act)
    return torch.ops.fastvit_kernels.dwconv_bn_act(x, weight, bias, stride, act)


# --------------------------------------------------------------------------------------------------
# Input checks: one place, run by the real and the fake implementation alike.
# --------------------------------------------------------------------------------------------------


def check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, act: str,
                 op: str = "dwconv_bn_act") -> None:
    """Raise a clear error for inputs the kernels do not take; ``op`` names the caller in it (the
    ``dwconv_layernorm`` op shares these checks)."""
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{op}: x.dtype {x.dtype} is not supported; supported: "
                        f"float16, bfloat16, float32, float64")
    N, C, H, W = x.shape
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{op}: weight must be a depthwise [C, 1, K, K] tensor with C={C} "
                         f"(the channels of x), got shape {tuple(weight.shape)}")
    K = weight.shape[-1]
    if K not in KERNEL_SIZES:
        raise ValueError(f"{op}: kernel size {K} is not supported; supported: {KERNEL_SIZES}")
    if not weight.is_floating_point():
        raise TypeError(f"{op}: weight.dtype {weight.dtype} is not supported; use a floating dtype")
    if bias is not None and (tuple(bias.shape) != (C,) or not bias.is_floating_point()):
        raise ValueError(f"{op}: bias must be a floating [C] tensor with C={C}, "
                         f"got {bias.dtype} of shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if stride not in STRIDES:
        raise ValueError(f"{op}: stride {stride} is not supported; supported: {STRIDES}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act {act!r} is not supported; supported: {tuple(ACTIVATIONS)}")
    if H < 1 or W < 1:
        raise ValueError(f"{op}: x must have H, W >= 1, got {H}x{W}")


def output_size(size: int, kernel_size: int, stride: int) -> int:
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def _channels_last(x: Tensor) -> bool:
    # Channels innermost and not plain NCHW (a 1x1 image is both): the layout eager conv would keep.
    return x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()


def new_output(x: Tensor, kernel_size: int, stride: int) -> Tensor:
    """The output tensor every backend writes into: shape, dtype and memory format decided here."""
    N, C, H, W = x.shape
    shape = (N, C, output_size(H, kernel_size, stride), output_size(W, kernel_size, stride))
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return memory.empty(shape, x.dtype, x.device, fmt)


def kernel_params(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Weight as a contiguous ``[C, K*K]`` and bias as ``[C]`` in the accumulation dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = weight.shape[0]
    w = weight.detach().reshape(C, -1).to(acc).contiguous()
    b = bias.detach().to(acc).contiguous() if bias is not None else torch.zeros(C, dtype=acc, device=x.device)
    return w, b


# --------------------------------------------------------------------------------------------------
# Backends. Each takes (x, weight[C, K*K], bias[C], K, stride, act code, out) and fills `out`.
# --------------------------------------------------------------------------------------------------


def reference(x: Tensor, weight: Tensor, bias: Tensor, kernel_size: int, stride: int, act: int,
              out: Tensor) -> None:
    """The specification: PyTorch conv in the accumulation dtype, then the activation."""
    C = x.shape[1]
    y = F.conv2d(x.to(weight.dtype), weight.view(C, 1, kernel_size, kernel_size), bias, stride,
                 kernel_size // 2, 1, C)
    if act == ACTIVATIONS["silu"]:
        y = F.silu(y)
    elif act == ACTIVATIONS["relu"]:
        y = F.relu(y)
    out.copy_(y)


def _run_triton(*args) -> None:
    from ..triton.dwconv_bn_act import dwconv_bn_act_triton

    dwconv_bn_act_triton(*args)


def _run_extension(*args) -> None:
    torch.ops.fastvit_kernels_C.dwconv_bn_act_out(*args)


def _triton_unsupported(x: Tensor, *args) -> Optional[str]:
    if x.dtype == torch.float64:
        return "float64 is not supported by the Triton kernel (use cuda, cpu or reference)"
    return None


IMPLEMENTATIONS = (
    backends.Implementation("triton", _run_triton, _triton_unsupported),
    backends.Implementation("cuda", _run_extension),
    backends.Implementation("cpu", _run_extension),
    backends.Implementation("reference", reference),
)


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), fake impl for tracing,
# autograd through the recomputed pre-activation and aten's convolution_backward.
# --------------------------------------------------------------------------------------------------


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, act: str) -> Tensor:
    check_inputs(x, weight, bias, stride, act)
    K = weight.shape[-1]
    out = new_output(x, K, stride)
    if out.numel() == 0:
        return out
    w, b = kernel_params(x, weight, bias)
    backends.run("dwconv_bn_act", IMPLEMENTATIONS, x.device, x, w, b, K, stride, ACTIVATIONS[act], out)
    return out


_dwconv_bn_act = torch.library.custom_op("fastvit_kernels::dwconv_bn_act", _forward, mutates_args=())


@_dwconv_bn_act.register_fake
def _(x, weight, bias, stride, act):
    check_inputs(x, weight, bias, stride, act)
    return new_output(x, weight.shape[-1], stride)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, act = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.stride, ctx.act = stride, act


def _activation_grad(z: Tensor, grad: Tensor, act: str) -> Tensor:
    if act == "silu":
        s = torch.sigmoid(z)
        return grad * (s * (1 + z * (1 - s)))
    if act == "relu":
        return grad * (z > 0)
    return grad


def _backward(ctx, grad_out: Tensor):
    x, weight, bias = ctx.saved_tensors
    stride, act = ctx.stride, ctx.act
    grad_z = grad_out
    if act != "none":
        # Recompute the pre-activation instead of saving it: one more forward pass, no N*C*H*W buffer.
        z = torch.ops.fastvit_kernels.dwconv_bn_act(x, weight, bias, stride, "none")
        grad_z = _activation_grad(z.float(), grad_out.float(), act)
    return conv_backward(grad_z, x, weight, bias, stride, ctx.needs_input_grad[:3]) + (None, None)


def conv_backward(grad_z: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
                  needs_grad: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of ``x``, ``weight``, ``bias`` (None where not needed) of the depthwise conv, given
    the gradient of its output ``grad_z``; also the last step of ``dwconv_layernorm``'s backward."""
    C, K = x.shape[1], weight.shape[-1]
    need_x, need_w, need_b = needs_grad
    # Gradients in the accumulation dtype, like the forward; aten needs x and weight in one dtype.
    acc = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_z.to(acc), x.to(acc), weight.to(acc), [C] if bias is not None else None,
        [stride, stride], [K // 2, K // 2], [1, 1], False, [0, 0], C,
        [need_x, need_w, need_b and bias is not None])
    return (gx.to(x.dtype) if need_x else None,
            gw.to(weight.dtype) if need_w else None,
            gb.to(bias.dtype) if need_b and bias is not None else None)


_dwconv_bn_act.register_autograd(_backward, setup_context=_setup_context)
