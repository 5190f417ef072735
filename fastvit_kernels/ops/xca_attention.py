"""Cross-covariance attention (XCiT's ``XCA``, EdgeNeXt's ``CrossCovarianceAttn``): attention across
the channels of each head instead of across tokens.

Per image and head, q, k and v are seen channel-first (``[d, N]``), q and k are L2-normalised over the
tokens, and the ``d x d`` attention matrix mixes v's channels. Equivalent PyTorch (timm's
``CrossCovarianceAttn.forward`` between its qkv and proj Linears)::

    q, k, v = qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 4, 1)   # each [B, heads, d, N]
    attn = F.normalize(q, dim=-1, eps=eps) @ F.normalize(k, dim=-1, eps=eps).transpose(-2, -1)
    attn = (attn * temperature.reshape(num_heads, 1, 1)).softmax(dim=-1)  # [B, heads, d, d]
    out = (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)

The fused kernels read q and k once to accumulate ``q k^T`` together with the squared norms (the
normalisation is folded into the ``d x d`` matrix), take the softmax of that tiny matrix, and read v
once to write the output. Scores, softmax and accumulation run in float32 (float64 for float64 input).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, memory

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def xca_attention(qkv: Tensor, num_heads: int, temperature: Tensor, eps: float = 1e-12) -> Tensor:
    """Cross-covariance attention of a packed qkv projection.

    Args:
        qkv: ``[B, N, 3*C]`` float16/bfloat16/float32/float64, any strides: the qkv Linear applied to N
            tokens; the last dim is laid out ``(3, num_heads, head_dim)`` like timm's
            ``self.qkv(x).reshape(B, N, 3, num_heads, -1)``.
        num_heads: heads; ``head_dim = C // num_heads``.
        temperature: the per-head logit scale, ``num_heads`` elements (timm's ``[heads, 1, 1]``
            parameter is accepted as is), float32 or qkv's dtype. Differentiable.
        eps: the floor of the L2 norms, as in ``F.normalize``.

    Returns ``[B, N, C]``, contiguous, last dim ``(num_heads, head_dim)`` (ready for the proj Linear).
    Same as timm's core of ``CrossCovarianceAttn`` / ``XCA``: see the module docstring for the
    equivalent PyTorch. Differentiable in ``qkv`` and ``temperature``.
    """
    if backends.direct_call(qkv, temperature):  # eager inference: the same work without the dispatcher
        return _forward(qkv, num_heads, temperature, eps)
    return torch.ops.fastvit_kernels.xca_attention(qkv, num_heads, temperature, eps)


# --------------------------------------------------------------------------------------------------
# Input checks: one place, run by the real and the fake implementation alike.
# --------------------------------------------------------------------------------------------------


def check_inputs(qkv: Tensor, num_heads: int, temperature: Tensor, eps: float) -> None:
    if qkv.dim() != 3:
        raise ValueError(f"xca_attention: qkv must be a 3-D [B, N, 3*C] tensor, got shape {tuple(qkv.shape)}")
    if qkv.dtype not in DTYPES:
        raise TypeError(f"xca_attention: qkv.dtype {qkv.dtype} is not supported; supported: "
                        f"float16, bfloat16, float32, float64")
    if num_heads < 1:
        raise ValueError(f"xca_attention: num_heads must be >= 1, got {num_heads}")
    C3 = qkv.shape[-1]
    if C3 == 0 or C3 % (3 * num_heads):
        raise ValueError(f"xca_attention: the last dim of qkv must be a positive multiple of "
                         f"3 * num_heads = {3 * num_heads} (laid out (3, num_heads, head_dim)), got {C3}")
    if temperature.numel() != num_heads:
        raise ValueError(f"xca_attention: temperature must have num_heads = {num_heads} elements "
                         f"(shape [heads] or [heads, 1, 1]), got shape {tuple(temperature.shape)}")
    if temperature.dtype not in (torch.float32, qkv.dtype):
        raise TypeError(f"xca_attention: temperature.dtype {temperature.dtype} is not supported for qkv of "
                        f"dtype {qkv.dtype}; supported: float32 or qkv's dtype")
    if temperature.device != qkv.device:
        raise ValueError(f"xca_attention: temperature must be on qkv's device {qkv.device}, "
                         f"got {temperature.device}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"xca_attention: eps must be a finite number >= 0, got {eps}")


def new_output(qkv: Tensor) -> Tensor:
    """The output tensor every backend writes into: contiguous ``[B, N, C]`` in qkv's dtype."""
    B, N, C3 = qkv.shape
    return memory.empty((B, N, C3 // 3), qkv.dtype, qkv.device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_temperature(temperature: Tensor, dtype: torch.dtype) -> Tensor:
    """``temperature`` as the kernels take it: contiguous ``[heads]`` in the accumulation dtype of
    ``dtype`` (a view, no copy, for a float32 ``[heads, 1, 1]`` parameter and 16/32-bit qkv)."""
    return temperature.reshape(-1).to(accumulation_dtype(dtype)).contiguous()


# --------------------------------------------------------------------------------------------------
# The math in plain PyTorch (reference and backward), on channel-first [B, heads, d, N] views.
# --------------------------------------------------------------------------------------------------


def split_heads(t: Tensor, groups: int, num_heads: int) -> Tensor:
    """``[B, N, groups * heads * d]`` -> ``[groups, B, heads, d, N]`` (a view; 3 groups for qkv, 1 for
    an output or its gradient)."""
    B, N, X = t.shape
    return t.reshape(B, N, groups, num_heads, X // (groups * num_heads)).permute(2, 0, 3, 4, 1)


def merge_heads(t: Tensor) -> Tensor:
    """``[groups, B, heads, d, N]`` -> ``[B, N, groups * heads * d]``, the inverse of :func:`split_heads`."""
    G, B, heads, d, N = t.shape
    return t.permute(1, 4, 0, 2, 3).reshape(B, N, G * heads * d)


def xca_forward(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor, eps: float) -> Tensor:
    """``softmax(t * normalize(q) normalize(k)^T) v`` for ``[B, heads, d, N]`` inputs, ``t`` [heads]."""
    attn = F.normalize(q, dim=-1, eps=eps) @ F.normalize(k, dim=-1, eps=eps).transpose(-2, -1)
    return (attn * temperature.reshape(-1, 1, 1)).softmax(dim=-1) @ v


def xca_backward(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor, eps: float, grad_out: Tensor
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v (``[B, heads, d, N]``) and temperature (``[heads]``), written out.

    With n = ||q|| over tokens, m = max(n, eps), Q = q / m (same for k), R = Q K^T, S = t R,
    A = softmax(S), O = A v:  dA = dO v^T, dv = A^T dO, dS = A * (dA - rowsum(dA * A)),
    dt = sum(dS * R), dQ = t dS K, dK = t dS^T Q, and through the normalisation
    dq = (dQ - Q rowsum(Q * dQ) [n >= eps]) / m  (F.normalize's gradient: clamp_min passes n >= eps).
    The d x d matrices are recomputed from q and k (cheap) rather than saved by the forward.
    """
    t = temperature.reshape(-1, 1, 1)
    nq, nk = q.norm(dim=-1, keepdim=True), k.norm(dim=-1, keepdim=True)
    mq, mk = nq.clamp_min(eps), nk.clamp_min(eps)
    qh, kh = q / mq, k / mk
    r = qh @ kh.transpose(-2, -1)
    attn = (t * r).softmax(dim=-1)
    grad_attn = grad_out @ v.transpose(-2, -1)
    grad_v = attn.transpose(-2, -1) @ grad_out
    grad_s = attn * (grad_attn - (grad_attn * attn).sum(dim=-1, keepdim=True))
    grad_t = (grad_s * r).sum(dim=(0, 2, 3))
    grad_s = grad_s * t
    grad_qh, grad_kh = grad_s @ kh, grad_s.transpose(-2, -1) @ qh
    grad_q = (grad_qh - qh * (qh * grad_qh).sum(dim=-1, keepdim=True) * (nq >= eps)) / mq
    grad_k = (grad_kh - kh * (kh * grad_kh).sum(dim=-1, keepdim=True) * (nk >= eps)) / mk
    return grad_q, grad_k, grad_v, grad_t


# --------------------------------------------------------------------------------------------------
# Backends. Each takes (qkv, num_heads, temperature [heads] in the accumulation dtype, eps, out) and
# fills `out`.
# --------------------------------------------------------------------------------------------------


def reference(qkv: Tensor, num_heads: int, temperature: Tensor, eps: float, out: Tensor) -> None:
    """The specification: timm's formula in the accumulation dtype."""
    q, k, v = split_heads(qkv.to(accumulation_dtype(qkv.dtype)), 3, num_heads)
    out.copy_(merge_heads(xca_forward(q, k, v, temperature, eps)[None]))


def _run_triton(*args) -> None:
    from ..triton.xca_attention import xca_attention_triton

    xca_attention_triton(*args)


def _run_extension(qkv: Tensor, num_heads: int, temperature: Tensor, eps: float, out: Tensor) -> None:
    torch.ops.fastvit_kernels_C.xca_attention_out(qkv, num_heads, temperature, eps, out)


def _triton_unsupported(qkv: Tensor, num_heads: int, *args) -> Optional[str]:
    # Only asked once triton imported (backends.why_not checks the load first).
    from ..triton.xca_attention import unsupported

    reason = unsupported(qkv, num_heads)
    return f"{reason} (the cuda or reference backend serves it)" if reason else None


# cuda and cpu: the C++ extension (csrc/{cuda,cpu}/xca_attention.*, one math header), any head dim,
# dtype and strides; cuda is the fallback where Triton is missing or refuses the input.
IMPLEMENTATIONS = (
    backends.Implementation("triton", _run_triton, _triton_unsupported),
    backends.Implementation("cuda", _run_extension),
    backends.Implementation("cpu", _run_extension),
    backends.Implementation("reference", reference),
)


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), fake impl for tracing,
# autograd through the written-out backward in plain PyTorch (traceable by torch.compile).
# --------------------------------------------------------------------------------------------------


def _forward(qkv: Tensor, num_heads: int, temperature: Tensor, eps: float) -> Tensor:
    check_inputs(qkv, num_heads, temperature, eps)
    out = new_output(qkv)
    if out.numel() == 0:
        return out
    backends.run("xca_attention", IMPLEMENTATIONS, qkv.device, qkv, num_heads,
                 kernel_temperature(temperature, qkv.dtype), float(eps), out)
    return out


_xca_attention = torch.library.custom_op("fastvit_kernels::xca_attention", _forward, mutates_args=())


@_xca_attention.register_fake
def _(qkv, num_heads, temperature, eps):
    check_inputs(qkv, num_heads, temperature, eps)
    return new_output(qkv)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, temperature, eps = inputs
    # Only the inputs are kept: the backward recomputes the d x d matrices from q and k.
    ctx.save_for_backward(qkv, temperature)
    ctx.num_heads, ctx.eps = num_heads, eps


def _backward(ctx, grad_out: Tensor):
    qkv, temperature = ctx.saved_tensors
    need_qkv, _, need_t, _ = ctx.needs_input_grad
    if not (need_qkv or need_t):
        return None, None, None, None
    acc = accumulation_dtype(qkv.dtype)
    q, k, v = split_heads(qkv.to(acc), 3, ctx.num_heads)
    (grad_o,) = split_heads(grad_out.to(acc), 1, ctx.num_heads)
    grad_q, grad_k, grad_v, grad_t = xca_backward(q, k, v, temperature.reshape(-1).to(acc), ctx.eps, grad_o)
    grad_qkv = merge_heads(torch.stack((grad_q, grad_k, grad_v))).to(qkv.dtype) if need_qkv else None
    grad_temperature = grad_t.reshape(temperature.shape).to(temperature.dtype) if need_t else None
    return grad_qkv, None, grad_temperature, None


_xca_attention.register_autograd(_backward, setup_context=_setup_context)
