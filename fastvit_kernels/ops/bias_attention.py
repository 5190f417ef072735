"""LeViT attention with a learned relative-position bias, the bias indexed in the kernel.

timm's LeViT ``Attention`` (and ``AttentionDownsample``, whose queries are the key grid subsampled by a
stride) adds to each score a learned bias that depends only on the head and on the distance between
the query's and the key's grid positions: ``table[h, |dy| * R_w + |dx|]``, ``table`` being the
module's ``attention_biases`` parameter ``[heads, R_h * R_w]``. timm gathers a ``[heads, Nq, Nk]`` bias
from it (and caches it in eval mode, where it goes stale once the parameter changes); the fused
kernels compute the index from the two tokens' coordinates and read the current table instead.
Equivalent PyTorch (``idx`` is timm's ``attention_bias_idxs``, see :func:`bias_index`)::

    attn = (q @ k.transpose(-1, -2)) * scale + table[:, idx]       # [B, heads, Nq, Nk]
    o = act(attn.softmax(dim=-1) @ v)                                # [B, heads, Nq, dv]
    out = o.transpose(1, 2).reshape(B, Nq, heads * dv)

Scores, softmax and accumulation run in float32 (float64 for float64 input).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backends, memory

ACTIVATIONS = {"none": 0, "hardswish": 1}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def bias_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, resolution: Union[int, Sequence[int]],
                   stride: int = 1, scale: Optional[float] = None, activation: str = "none") -> Tensor:
    """LeViT multi-head attention with the relative-position bias ``table`` and an output activation.

    Args:
        q: ``[B, heads, Nq, dk]`` float16/bfloat16/float32/float64, any strides (e.g. a view of the
            qkv projection: ``qkv.view(B, N, heads, -1).split([dk, dk, dv], dim=3)``, permuted).
        k: ``[B, heads, Nk, dk]``, v: ``[B, heads, Nk, dv]``, q's dtype, any strides; ``dv`` may differ
            from ``dk``.
        table: ``[heads, R_h * R_w]`` bias table (timm's ``attention_biases``), float32 or q's dtype.
        resolution: ``(R_h, R_w)`` (or one int for both), the key grid: ``Nk = R_h * R_w``, key ``j`` at
            ``(j // R_w, j % R_w)``.
        stride: query subsampling of the key grid, as timm's ``AttentionDownsample``:
            ``Nq = ceil(R_h / stride) * ceil(R_w / stride)``, query ``i`` at
            ``((i // ceil(R_w / stride)) * stride, (i % ceil(R_w / stride)) * stride)``. 1 is LeViT's
            ``Attention`` (``Nq = Nk``).
        scale: the score scale, default ``dk ** -0.5``.
        activation: ``"none"`` or ``"hardswish"``, applied to the attention output (timm's
            ``proj.act``, which runs before ``proj.ln``).

    Returns ``[B, Nq, heads * dv]`` in q's dtype, contiguous, channel ``h * dv + e``. Equivalent to::

        attn = (q @ k.transpose(-1, -2)) * scale + table[:, bias_index(resolution, stride)]
        out = act(attn.softmax(-1) @ v).transpose(1, 2).reshape(B, Nq, heads * dv)

    Differentiable in ``q``, ``k``, ``v`` and ``table``.
    """
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    args = (q, k, v, table, [int(r) for r in resolution], stride, scale, activation)
    if backends.direct_call(q, k, v, table):  # eager inference: the same work without the dispatcher
        return _forward(*args)
    return torch.ops.fastvit_kernels.bias_attention(*args)


def query_grid(resolution: Sequence[int], stride: int) -> Tuple[int, int]:
    """The query grid ``(ceil(R_h / stride), ceil(R_w / stride))``."""
    return -(-resolution[0] // stride), -(-resolution[1] // stride)


def bias_index(resolution: Sequence[int], stride: int = 1, device=None) -> Tensor:
    """``[Nq, Nk]`` int64: the table entry of the bias between query ``i`` and key ``j``,
    ``|qy - ky| * R_w + |qx - kx|``; timm's ``_compute_attention_bias_idxs`` of ``Attention``
    (stride 1) and ``AttentionDownsample``."""
    R_h, R_w = resolution
    ky, kx = torch.meshgrid(torch.arange(R_h, device=device), torch.arange(R_w, device=device), indexing="ij")
    qy, qx = torch.meshgrid(torch.arange(0, R_h, stride, device=device),
                            torch.arange(0, R_w, stride, device=device), indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * R_w + dx


# --------------------------------------------------------------------------------------------------
# Input checks: one place, run by the real and the fake implementation alike.
# --------------------------------------------------------------------------------------------------


def check_inputs(q: Tensor, k: Tensor, v: Tensor, table: Tensor, resolution: Sequence[int], stride: int,
                 scale: Optional[float], activation: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"bias_attention: {name} must be a 4-D [B, heads, N, d] tensor, "
                             f"got shape {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"bias_attention: q.dtype {q.dtype} is not supported; supported: "
                        f"float16, bfloat16, float32, float64")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"bias_attention: {name}.dtype {t.dtype} must equal q.dtype {q.dtype}")
    if table.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"bias_attention: table.dtype {table.dtype} is not supported for q.dtype {q.dtype}; "
                        f"supported: float32 or q's dtype")
    for name, t in (("k", k), ("v", v), ("table", table)):
        if t.device != q.device:
            raise ValueError(f"bias_attention: {name} is on {t.device} but q is on {q.device}")
    B, heads, Nq, dk = q.shape
    if tuple(k.shape[:2]) != (B, heads) or k.shape[3] != dk:
        raise ValueError(f"bias_attention: k must have shape [B, heads, Nk, dk] = [{B}, {heads}, Nk, {dk}] "
                         f"(q is {tuple(q.shape)}), got {tuple(k.shape)}")
    Nk = k.shape[2]
    if tuple(v.shape[:3]) != (B, heads, Nk):
        raise ValueError(f"bias_attention: v must have shape [B, heads, Nk, dv] = [{B}, {heads}, {Nk}, dv] "
                         f"(k is {tuple(k.shape)}), got {tuple(v.shape)}")
    if dk < 1 or v.shape[3] < 1:
        raise ValueError(f"bias_attention: head dims must be >= 1, got dk={dk}, dv={v.shape[3]}")
    if len(resolution) != 2 or min(resolution) < 1:
        raise ValueError(f"bias_attention: resolution must be two positive ints (R_h, R_w), "
                         f"got {tuple(resolution)}")
    if stride < 1:
        raise ValueError(f"bias_attention: stride must be >= 1, got {stride}")
    R_h, R_w = resolution
    if Nk != R_h * R_w:
        raise ValueError(f"bias_attention: k and v have Nk={Nk} tokens, but resolution {R_h}x{R_w} "
                         f"has {R_h * R_w} keys")
    nq_h, nq_w = query_grid(resolution, stride)
    if Nq != nq_h * nq_w:
        raise ValueError(f"bias_attention: q has Nq={Nq} tokens, but resolution {R_h}x{R_w} with stride "
                         f"{stride} has {nq_h}x{nq_w} = {nq_h * nq_w} queries")
    if tuple(table.shape) != (heads, Nk):
        raise ValueError(f"bias_attention: table must have shape [heads, R_h * R_w] = [{heads}, {Nk}], "
                         f"got {tuple(table.shape)}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"bias_attention: scale must be a finite number or None, got {scale}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"bias_attention: activation {activation!r} is not supported; "
                         f"supported: {tuple(ACTIVATIONS)}")


def resolve_scale(q: Tensor, scale: Optional[float]) -> float:
    """``scale``, or ``dk ** -0.5`` when it is None."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def new_output(q: Tensor, v: Tensor) -> Tensor:
    """The output tensor every backend writes into: contiguous ``[B, Nq, heads * dv]`` in q's dtype."""
    B, heads, Nq, _ = q.shape
    return memory.empty((B, Nq, heads * v.shape[-1]), q.dtype, q.device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# The math in plain PyTorch (reference and backward), on [B, heads, N, d] tensors.
# --------------------------------------------------------------------------------------------------


def hardswish(x: Tensor) -> Tensor:
    """``x * relu6(x + 3) / 6``, the formula of ``F.hardswish``, divided by 6 rather than multiplied by
    a rounded 1/6: PyTorch's CUDA kernel multiplies by float32(1/6) in every dtype, float64 included
    (a relative error of 3e-8, seen against the CPU on an H200), which a float64 reference must not."""
    return x * (x + 3).clamp(0, 6) / 6


def attention_probs(q: Tensor, k: Tensor, bias: Tensor, scale: float) -> Tensor:
    """``softmax(scale q k^T + bias)``."""
    return torch.softmax((q @ k.transpose(-1, -2)) * scale + bias, dim=-1)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """The output ``softmax(scale q k^T + bias) v`` (before the activation)."""
    return attention_probs(q, k, bias, scale) @ v


def attention_backward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, grad_y: Tensor, scale: float,
                       activation: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v and of the scores given the gradient of ``y = act(O)``, written out:

    S = scale q k^T + bias, P = softmax(S), O = P V, y = act(O); dO = act'(O) dy, dV = P^T dO,
    dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = scale dS K, dK = scale dS^T Q.
    The bias table's gradient is dS summed into the table entry each score read (see _backward).
    """
    probs = attention_probs(q, k, bias, scale)
    grad_o = grad_y
    if activation == "hardswish":  # the only use of O: dS uses rowsum(P * dP)
        out = probs @ v
        # aten.hardswish_backward's values, written pointwise: its fake (meta) kernel returns other
        # strides than its CPU kernel, which breaks the views torch.compile plans after it.
        grad_o = grad_y * torch.where(out < -3, 0.0, torch.where(out <= 3, out / 3 + 0.5, 1.0))
    grad_v = probs.transpose(-1, -2) @ grad_o
    grad_probs = grad_o @ v.transpose(-1, -2)
    # rowsum(P * dP), not the equal rowsum(dO * O), as eager's softmax backward: where a row has one
    # key (P = 1) the sum is dP itself and dS is exactly 0; rowsum(dO * O) sums dO . v in another
    # order than the matmul that made dP, and the bias-table gradient came out 2e-6 off.
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))
    grad_q = scale * (grad_scores @ k)
    grad_k = scale * (grad_scores.transpose(-1, -2) @ q)
    return grad_q, grad_k, grad_v, grad_scores


def merge_heads(o: Tensor) -> Tensor:
    """``[B, heads, Nq, dv]`` -> ``[B, Nq, heads * dv]``, channel ``h * dv + e``."""
    B, heads, Nq, dv = o.shape
    return o.transpose(1, 2).reshape(B, Nq, heads * dv)


def split_heads(y: Tensor, heads: int) -> Tensor:
    """``[B, Nq, heads * dv]`` -> ``[B, heads, Nq, dv]``, the inverse of :func:`merge_heads`."""
    B, Nq, C = y.shape
    return y.reshape(B, Nq, heads, C // heads).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Backends. Each takes (q, k, v, table, (R_h, R_w), stride, scale, activation code, out) and fills `out`.
# --------------------------------------------------------------------------------------------------


def reference(q: Tensor, k: Tensor, v: Tensor, table: Tensor, resolution: Tuple[int, int], stride: int,
              scale: float, act: int, out: Tensor) -> None:
    """The specification: the bias materialised by index, attention in the accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    bias = table.to(acc)[:, bias_index(resolution, stride, q.device)]  # [heads, Nq, Nk]
    o = attention_forward(q.to(acc), k.to(acc), v.to(acc), bias, scale)
    if act == ACTIVATIONS["hardswish"]:
        o = hardswish(o)
    out.copy_(merge_heads(o))


def _run_triton(*args) -> None:
    from ..triton.bias_attention import bias_attention_triton

    bias_attention_triton(*args)


def _run_extension(q: Tensor, k: Tensor, v: Tensor, table: Tensor, resolution: Tuple[int, int], stride: int,
                   scale: float, act: int, out: Tensor) -> None:
    torch.ops.fastvit_kernels_C.bias_attention_out(q, k, v, table, resolution[0], resolution[1], stride, scale,
                                                   act, out)


def _triton_unsupported(q: Tensor, k: Tensor, v: Tensor, table: Tensor, *args) -> Optional[str]:
    # Only asked once triton imported (backends.why_not checks the load first).
    from ..triton.bias_attention import unsupported

    reason = unsupported(q, k, v, table)
    return f"{reason} (the cuda or reference backend serves it)" if reason else None


# cuda and cpu: the C++ extension (csrc/{cuda,cpu}/bias_attention.*, one math header), any head dims,
# dtype and strides; cuda is the fallback where Triton is missing or refuses the input.
IMPLEMENTATIONS = (
    backends.Implementation("triton", _run_triton, _triton_unsupported),
    backends.Implementation("cuda", _run_extension),
    backends.Implementation("cpu", _run_extension),
    backends.Implementation("reference", reference),
)


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), fake impl for tracing,
# autograd through the written-out attention backward in plain PyTorch (traceable by torch.compile).
# --------------------------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, table: Tensor, resolution: List[int], stride: int,
             scale: Optional[float], activation: str) -> Tensor:
    check_inputs(q, k, v, table, resolution, stride, scale, activation)
    out = new_output(q, v)
    if out.numel() == 0:
        return out
    backends.run("bias_attention", IMPLEMENTATIONS, q.device, q, k, v, table, tuple(resolution), stride,
                 resolve_scale(q, scale), ACTIVATIONS[activation], out)
    return out


_bias_attention = torch.library.custom_op("fastvit_kernels::bias_attention", _forward, mutates_args=())


@_bias_attention.register_fake
def _(q, k, v, table, resolution, stride, scale, activation):
    check_inputs(q, k, v, table, resolution, stride, scale, activation)
    return new_output(q, v)


def _setup_context(ctx, inputs, output):
    q, k, v, table, resolution, stride, scale, activation = inputs
    # Only the inputs are kept: the backward recomputes P and O in the accumulation dtype, which costs
    # one more pass but no [B, heads, Nq, Nk] buffer between forward and backward.
    ctx.save_for_backward(q, k, v, table)
    ctx.resolution, ctx.stride, ctx.activation = tuple(resolution), stride, activation
    ctx.scale = resolve_scale(q, scale)


def _backward(ctx, grad_out: Tensor):
    q, k, v, table = ctx.saved_tensors
    nones = (None,) * 4  # resolution, stride, scale, activation
    if not any(ctx.needs_input_grad[:4]):
        return (None,) * 4 + nones
    acc = accumulation_dtype(q.dtype)
    heads, Nk = table.shape
    idx = bias_index(ctx.resolution, ctx.stride, q.device)  # [Nq, Nk]
    bias = table.to(acc)[:, idx]  # materialised here only: the backward is plain PyTorch
    grad_q, grad_k, grad_v, grad_s = attention_backward(
        q.to(acc), k.to(acc), v.to(acc), bias, split_heads(grad_out.to(acc), heads), ctx.scale, ctx.activation)
    grad_table = None
    if ctx.needs_input_grad[3]:
        # Each score read table[h, idx[i, j]]: sum dS over the images, then into the table by index.
        per_head = grad_s.sum(dim=0).reshape(heads, -1)  # [heads, Nq * Nk]
        grad_table = torch.zeros((heads, Nk), dtype=acc, device=q.device).index_add(1, idx.reshape(-1), per_head)
        grad_table = grad_table.to(table.dtype)
    grads = [g.to(q.dtype) if need else None
             for g, need in zip((grad_q, grad_k, grad_v), ctx.needs_input_grad[:3])]
    return (*grads, grad_table) + nones


_bias_attention.register_autograd(_backward, setup_context=_setup_context)
