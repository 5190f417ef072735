"""Depthwise convolution + LayerNorm over the channels of each pixel, as one op (EdgeNeXt's ConvBlock).

Equivalent PyTorch::

    C, K = x.shape[1], weight.shape[-1]
    y = F.conv2d(x, weight, bias, stride=stride, padding=K // 2, groups=C)
    out = F.layer_norm(y.permute(0, 2, 3, 1), (C,), norm_weight, norm_bias, eps).permute(0, 3, 1, 2)

The output is a channels_last ``[N, C, OH, OW]`` tensor whatever x's layout, so that
``out.permute(0, 2, 3, 1)`` is a free contiguous ``[N, OH, OW, C]`` view for the Linear that follows.
The conv never goes through memory: the kernels are ``dwconv_bn_act``'s with a LayerNorm epilogue
(Triton: the same kernel with ``LAYERNORM=True``; C++: the channels_last CPU path with its LayerNorm
flag and a warp-per-pixel CUDA kernel in the same file, the per-pixel math in
``csrc/dwconv_layernorm.h``). Statistics in float32 (float64 for float64 input), two passes.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, memory
from .dwconv_bn_act import check_inputs as check_conv_inputs
from .dwconv_bn_act import conv_backward, output_size
from .dwconv_bn_act import kernel_params as conv_kernel_params

# The CUDA kernel keeps one C-value row per pixel in shared memory (csrc/cuda/dwconv_bn_act.cu).
CUDA_MAX_SHARED_BYTES = 48 * 1024


def dwconv_layernorm(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Tensor, norm_bias: Tensor,
                     eps: float = 1e-6, stride: int = 1) -> Tensor:
    """Depthwise ``K x K`` conv (padding ``K // 2``) + bias, then LayerNorm over the channels.

    Args:
        x: ``[N, C, H, W]`` float16/bfloat16/float32/float64, any memory layout.
        weight: ``[C, 1, K, K]`` depthwise conv weight, K odd in 1..9.
        bias: ``[C]`` conv bias or None.
        norm_weight, norm_bias: ``[C]`` LayerNorm affine parameters.
        eps: LayerNorm epsilon, > 0.
        stride: 1 or 2.

    Returns a channels_last ``[N, C, OH, OW]`` tensor equal to::

        y = F.conv2d(x, weight, bias, stride, K // 2, groups=C)
        F.layer_norm(y.permute(0, 2, 3, 1), (C,), norm_weight, norm_bias, eps).permute(0, 3, 1, 2)

    Differentiable in ``x``, ``weight``, ``bias``, ``norm_weight`` and ``norm_bias``.
    """
    if backends.direct_call(x, weight, bias, norm_weight, norm_bias):  # eager inference: no dispatcher
        return _forward(x, weight, bias, norm_weight, norm_bias, eps, stride)
    return torch.ops.fastvit_kernels.dwconv_layernorm(x, weight, bias, norm_weight, norm_bias, eps, stride)


# --------------------------------------------------------------------------------------------------
# Input checks: dwconv_bn_act's for the conv, then the LayerNorm's.
# --------------------------------------------------------------------------------------------------


def check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Tensor, norm_bias: Tensor,
                 eps: float, stride: int) -> None:
    check_conv_inputs(x, weight, bias, stride, "none", op="dwconv_layernorm")
    C = x.shape[1]
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (C,) or not t.is_floating_point():
            raise ValueError(f"dwconv_layernorm: {name} must be a floating [C] tensor with C={C} (the channels "
                             f"of x), got {t.dtype} of shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"dwconv_layernorm: {name} is on {t.device} but x is on {x.device}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"dwconv_layernorm: eps must be finite and > 0, got {eps}")


def new_output(x: Tensor, kernel_size: int, stride: int) -> Tensor:
    """The channels_last output every backend writes into (a permuted contiguous [N, OH, OW, C])."""
    N, C, H, W = x.shape
    OH, OW = output_size(H, kernel_size, stride), output_size(W, kernel_size, stride)
    return memory.empty((N, OH, OW, C), x.dtype, x.device).permute(0, 3, 1, 2)


def kernel_params(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Tensor,
                  norm_bias: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Conv weight ``[C, K*K]``, conv bias, LayerNorm weight and bias ``[C]``, all contiguous in the
    accumulation dtype."""
    w, b = conv_kernel_params(x, weight, bias)
    nw, nb = (t.detach().to(w.dtype).contiguous() for t in (norm_weight, norm_bias))
    return w, b, nw, nb


# --------------------------------------------------------------------------------------------------
# Backends. Each takes (x, weight[C, K*K], bias, norm_weight, norm_bias, K, stride, eps, out) and
# fills `out`.
# --------------------------------------------------------------------------------------------------


def reference(x: Tensor, weight: Tensor, bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, kernel_size: int,
              stride: int, eps: float, out: Tensor) -> None:
    """The specification: PyTorch conv and layer_norm in the accumulation dtype."""
    C = x.shape[1]
    y = F.conv2d(x.to(weight.dtype), weight.view(C, 1, kernel_size, kernel_size), bias, stride,
                 kernel_size // 2, 1, C)
    out.copy_(F.layer_norm(y.permute(0, 2, 3, 1), (C,), norm_weight, norm_bias, eps).permute(0, 3, 1, 2))


def _run_triton(*args) -> None:
    from ..triton.dwconv_bn_act import dwconv_layernorm_triton

    dwconv_layernorm_triton(*args)


def _run_extension(*args) -> None:
    torch.ops.fastvit_kernels_C.dwconv_layernorm_out(*args)


def _triton_unsupported(x: Tensor, *args) -> Optional[str]:
    from ..triton.dwconv_bn_act import LAYERNORM_MAX_CHANNELS

    if x.dtype == torch.float64:
        return "float64 is not supported by the Triton kernel (use cuda, cpu or reference)"
    if x.shape[1] > LAYERNORM_MAX_CHANNELS:
        return (f"C={x.shape[1]} channels; the Triton LayerNorm epilogue holds a pixel's channels in one "
                f"block and supports C <= {LAYERNORM_MAX_CHANNELS}")
    return None


def _cuda_unsupported(x: Tensor, weight: Tensor, *args) -> Optional[str]:
    row_bytes = x.shape[1] * weight.element_size()
    if row_bytes > CUDA_MAX_SHARED_BYTES:
        return (f"C={x.shape[1]} channels; the CUDA kernel keeps a pixel's channels in shared memory and "
                f"supports C <= {CUDA_MAX_SHARED_BYTES // weight.element_size()} for {x.dtype}")
    return None


IMPLEMENTATIONS = (
    backends.Implementation("triton", _run_triton, _triton_unsupported),
    backends.Implementation("cuda", _run_extension, _cuda_unsupported),
    backends.Implementation("cpu", _run_extension),
    backends.Implementation("reference", reference),
)


# --------------------------------------------------------------------------------------------------
# torch.library registration. Backward: recompute the conv output with dwconv_bn_act (no
# activation), then aten's layer_norm and convolution backward, in the accumulation dtype.
# --------------------------------------------------------------------------------------------------


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Tensor, norm_bias: Tensor, eps: float,
             stride: int) -> Tensor:
    check_inputs(x, weight, bias, norm_weight, norm_bias, eps, stride)
    K = weight.shape[-1]
    out = new_output(x, K, stride)
    if out.numel() == 0:
        return out
    params = kernel_params(x, weight, bias, norm_weight, norm_bias)
    backends.run("dwconv_layernorm", IMPLEMENTATIONS, x.device, x, *params, K, stride, float(eps), out)
    return out


_dwconv_layernorm = torch.library.custom_op("fastvit_kernels::dwconv_layernorm", _forward, mutates_args=())


@_dwconv_layernorm.register_fake
def _(x, weight, bias, norm_weight, norm_bias, eps, stride):
    check_inputs(x, weight, bias, norm_weight, norm_bias, eps, stride)
    return new_output(x, weight.shape[-1], stride)


def _setup_context(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, eps, stride = inputs
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias)
    ctx.eps, ctx.stride = eps, stride


def _backward(ctx, grad_out: Tensor):
    x, weight, bias, norm_weight, norm_bias = ctx.saved_tensors
    need_x, need_w, need_b, need_nw, need_nb = ctx.needs_input_grad[:5]
    C = x.shape[1]
    acc = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    # The conv output is recomputed, not saved (one more conv pass, no N*C*H*W buffer kept for
    # backward), in the accumulation dtype: [N, OH, OW, C] for the LayerNorm over its last dim.
    y = torch.ops.fastvit_kernels.dwconv_bn_act(x.to(acc), weight, bias, ctx.stride, "none").permute(0, 2, 3, 1)
    nw, nb = norm_weight.to(acc), norm_bias.to(acc)
    _, mean, rstd = torch.ops.aten.native_layer_norm(y, [C], nw, nb, ctx.eps)
    grad_y, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
        grad_out.permute(0, 2, 3, 1).to(acc), y, [C], mean, rstd, nw, nb,
        [need_x or need_w or need_b, need_nw, need_nb])
    grads = (None, None, None)
    if grad_y is not None:
        grads = conv_backward(grad_y.permute(0, 3, 1, 2), x, weight, bias, ctx.stride, (need_x, need_w, need_b))
    return (*grads,
            grad_nw.to(norm_weight.dtype) if need_nw else None,
            grad_nb.to(norm_bias.dtype) if need_nb else None,
            None, None)


_dwconv_layernorm.register_autograd(_backward, setup_context=_setup_context)
