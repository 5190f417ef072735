"""Patch-grouped multi-head self-attention (MobileViT), with tokens kept in image order.

Token (y, x) attends only to the tokens at the same offset (y % ph, x % pw) inside their patch. That
is timm's ``MobileVitBlock``: unfold the map into ``ph * pw`` sequences of ``(H / ph) * (W / pw)``
tokens, run the transformer's attention on each, fold back. Here the input is the qkv projection of
the tokens in image order (``[B, H, W, 3*C]``, channels last) and the output is in image order too,
so no unfold or fold copy is made by the fused kernels. Equivalent PyTorch (P = ph * pw sequences per
image, N = H * W / P tokens each, d = C / num_heads)::

    t = qkv.reshape(B, H // ph, ph, W // pw, pw, 3, num_heads, d)
    q, k, v = t.permute(5, 0, 2, 4, 6, 1, 3, 7).reshape(3, B * P, num_heads, N, d)
    o = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v        # [B*P, heads, N, d]
    o = o.reshape(B, ph, pw, num_heads, H // ph, W // pw, d)
    out = o.permute(0, 4, 1, 5, 2, 3, 6).reshape(B, H, W, C)

A ``1 x 1`` patch is plain multi-head attention over all ``H * W`` tokens (the ViT family, with
``H = 1`` or ``W = 1`` for token sequences). Scores, softmax and accumulation run in float32 (float64
for float64 input).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backends, memory

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def patch_attention(qkv: Tensor, num_heads: int, patch_size: Union[int, Sequence[int]] = (2, 2),
                    scale: Optional[float] = None) -> Tensor:
    """Multi-head attention within each patch-offset sequence of an image-ordered qkv.

    Args:
        qkv: ``[B, H, W, 3*C]`` float16/bfloat16/float32/float64, any strides: the qkv Linear applied
            to the tokens in image order; the last dim is laid out ``(3, num_heads, head_dim)`` like
            timm's ``Attention.qkv`` output.
        num_heads: heads; ``head_dim = C // num_heads``.
        patch_size: ``(ph, pw)`` (or one int for both); H and W must be multiples of it. ``(1, 1)``
            is plain attention over all ``H * W`` tokens.
        scale: the score scale, default ``head_dim ** -0.5``.

    Returns ``[B, H, W, C]``, contiguous, last dim ``(num_heads, head_dim)`` (ready for the proj
    Linear). Same as timm's unfold -> ``Attention`` core -> fold: see the module docstring for the
    equivalent PyTorch. Differentiable in ``qkv``.

    Head dims: the triton, cuda and cpu kernels serve ``head_dim <= 128``; larger head dims (T2T-ViT's
    147 and 1323) run on the reference (``HEAD_DIM_LIMITS``, ``python -m fastvit_kernels.info``).
    """
    if isinstance(patch_size, int):
        patch_size = (patch_size, patch_size)
    if backends.direct_call(qkv):  # eager inference: the same work without the dispatcher
        return _forward(qkv, num_heads, list(patch_size), scale)
    return torch.ops.fastvit_kernels.patch_attention(qkv, num_heads, list(patch_size), scale)


# --------------------------------------------------------------------------------------------------
# Input checks: one place, run by the real and the fake implementation alike.
# --------------------------------------------------------------------------------------------------


def check_inputs(qkv: Tensor, num_heads: int, patch_size: Sequence[int], scale: Optional[float]) -> None:
    if qkv.dim() != 4:
        raise ValueError(f"patch_attention: qkv must be a 4-D [B, H, W, 3*C] tensor (tokens in image order, "
                         f"channels last), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in DTYPES:
        raise TypeError(f"patch_attention: qkv.dtype {qkv.dtype} is not supported; supported: "
                        f"float16, bfloat16, float32, float64")
    if num_heads < 1:
        raise ValueError(f"patch_attention: num_heads must be >= 1, got {num_heads}")
    B, H, W, C3 = qkv.shape
    if C3 == 0 or C3 % (3 * num_heads):
        raise ValueError(f"patch_attention: the last dim of qkv must be a positive multiple of "
                         f"3 * num_heads = {3 * num_heads} (laid out (3, num_heads, head_dim)), got {C3}")
    if len(patch_size) != 2 or min(patch_size) < 1:
        raise ValueError(f"patch_attention: patch_size must be two positive ints (ph, pw), "
                         f"got {tuple(patch_size)}")
    ph, pw = patch_size
    if H < ph or W < pw:
        raise ValueError(f"patch_attention: qkv's H x W = {H}x{W} is smaller than patch_size {ph}x{pw}")
    if H % ph or W % pw:
        raise ValueError(f"patch_attention: qkv's H x W = {H}x{W} must be multiples of patch_size {ph}x{pw} "
                         f"(MobileViT resizes the map first)")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"patch_attention: scale must be a finite number or None, got {scale}")


def resolve_scale(qkv: Tensor, num_heads: int, scale: Optional[float]) -> float:
    """``scale``, or ``head_dim ** -0.5`` when it is None."""
    return (qkv.shape[-1] // (3 * num_heads)) ** -0.5 if scale is None else float(scale)


def new_output(qkv: Tensor) -> Tensor:
    """The output tensor every backend writes into: contiguous ``[B, H, W, C]`` in qkv's dtype."""
    B, H, W, C3 = qkv.shape
    return memory.empty((B, H, W, C3 // 3), qkv.dtype, qkv.device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# The gather to attention's layout and back, in plain PyTorch (reference and backward).
# --------------------------------------------------------------------------------------------------


def to_sequences(t: Tensor, patch_size: Sequence[int]) -> Tensor:
    """``[B, H, W, X]`` in image order -> ``[B * ph * pw, N, X]``, sequences and tokens in timm's
    unfold order: sequence ``b * ph * pw + py * pw + px``, token ``(y // ph) * (W // pw) + x // pw``."""
    B, H, W, X = t.shape
    ph, pw = patch_size
    t = t.unflatten(1, (H // ph, ph)).unflatten(3, (W // pw, pw))  # [B, nh, ph, nw, pw, X]
    return t.permute(0, 2, 4, 1, 3, 5).reshape(B * ph * pw, (H // ph) * (W // pw), X)


def from_sequences(s: Tensor, image_shape: Sequence[int], patch_size: Sequence[int]) -> Tensor:
    """The inverse of :func:`to_sequences` (timm's fold): ``[B * ph * pw, N, X]`` -> ``[B, H, W, X]``."""
    B, H, W = image_shape
    ph, pw = patch_size
    s = s.reshape(B, ph, pw, H // ph, W // pw, s.shape[-1]).permute(0, 3, 1, 4, 2, 5)
    return s.reshape(B, H, W, s.shape[-1])


def split_heads(t: Tensor, groups: int, num_heads: int) -> Tensor:
    """``[S, N, groups * heads * d]`` -> ``[groups, S, heads, N, d]`` (3 groups for qkv, 1 for an output)."""
    S, N, X = t.shape
    return t.reshape(S, N, groups, num_heads, X // (groups * num_heads)).permute(2, 0, 3, 1, 4)


def merge_heads(t: Tensor) -> Tensor:
    """``[groups, S, heads, N, d]`` -> ``[S, N, groups * heads * d]``, the inverse of :func:`split_heads`."""
    G, S, heads, N, d = t.shape
    return t.permute(1, 3, 0, 2, 4).reshape(S, N, G * heads * d)


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``softmax(scale q k^T)`` for ``[S, heads, N, d]`` inputs."""
    return torch.softmax(scale * (q @ k.transpose(-1, -2)), dim=-1)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The output ``softmax(scale q k^T) v`` for ``[S, heads, N, d]`` inputs."""
    return attention_probs(q, k, scale) @ v


def attention_backward(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, scale: float
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v (``[S, heads, N, d]``) given the output's gradient, written out:

    S = scale q k^T, P = softmax(S), O = P V; dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(P * dP)), dQ = scale dS K, dK = scale dS^T Q.
    """
    probs = attention_probs(q, k, scale)  # O is not needed: dS uses rowsum(P * dP)
    grad_v = probs.transpose(-1, -2) @ grad_out
    grad_probs = grad_out @ v.transpose(-1, -2)
    # rowsum(P * dP), as eager's softmax backward (see bias_attention.attention_backward).
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))
    grad_q = scale * (grad_scores @ k)
    grad_k = scale * (grad_scores.transpose(-1, -2) @ q)
    return grad_q, grad_k, grad_v


# --------------------------------------------------------------------------------------------------
# Backends. Each takes (qkv, num_heads, (ph, pw), scale, out) and fills `out`. The fused kernels take
# separate q, k, v and out views [B, heads, H, W, d] (the same kernels serve cross attention below).
# --------------------------------------------------------------------------------------------------

# Largest head dim (d and dv) each fused backend serves; larger ones go to the reference (its
# matmuls, float32 for 16-bit inputs). triton: the [queries, head dim] tiles live in registers, padded
# to a power of two; 128 is the widest that compiles without spills (tests/test_triton_aot.py). cuda:
# one thread per query row holds 64 accumulators and recomputes the scores for every further 64
# channels, so beyond 128 (3+ passes) the reference's cuBLAS matmuls are faster. cpu: measured on
# 2 cores (one head, float32): 3-10x faster than the reference up to 128 (784 tokens: 8 vs 92 ms at
# d = 64, 24 vs 80 ms at 128), 2-3x slower beyond (T2T-ViT: 1087 vs 484 ms at 3136 tokens, d = 147;
# 638 vs 196 ms at 784 tokens, d = 1323), where K and V no longer stay in cache across the 8-row tiles.
# The C++ kernels themselves take any head dim (the limit is the dispatch's).
MAX_HEAD_DIM = {"triton": 128, "cuda": 128, "cpu": 128}
HEAD_DIM_LIMITS = {**{b: f"head dims <= {n}" for b, n in MAX_HEAD_DIM.items()},
                   "reference": "any head dim (serves the larger ones: T2T-ViT's 147, 1323)"}


def qkv_views(qkv: Tensor, num_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The kernels' q, k, v: ``[B, heads, H, W, d]`` views of ``qkv`` ``[B, H, W, 3*C]`` (no copy)."""
    return qkv.unflatten(3, (3, num_heads, -1)).permute(3, 0, 4, 1, 2, 5).unbind(0)


def out_view(out: Tensor, num_heads: int) -> Tensor:
    """The kernels' ``[B, heads, H, W, d]`` view of ``out`` ``[B, H, W, C]``."""
    return out.unflatten(3, (num_heads, -1)).permute(0, 3, 1, 2, 4)


def reference(qkv: Tensor, num_heads: int, patch_size: Tuple[int, int], scale: float, out: Tensor) -> None:
    """The specification: gather to ``[B*P, heads, N, d]``, attention in the accumulation dtype, scatter."""
    q, k, v = split_heads(to_sequences(qkv.to(accumulation_dtype(qkv.dtype)), patch_size), 3, num_heads)
    o = attention_forward(q, k, v, scale)
    out.copy_(from_sequences(merge_heads(o[None]), qkv.shape[:3], patch_size))


def _triton_kernel(q: Tensor, k: Tensor, v: Tensor, patch_size: Tuple[int, int], scale: float, out: Tensor) -> None:
    from ..triton.patch_attention import patch_attention_triton

    patch_attention_triton(q, k, v, patch_size, scale, out)


def _extension_kernel(q: Tensor, k: Tensor, v: Tensor, patch_size: Tuple[int, int], scale: float, out: Tensor) -> None:
    torch.ops.fastvit_kernels_C.patch_attention_out(q, k, v, patch_size[0], patch_size[1], scale, out)


def _triton_refuses(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    # Only asked once triton imported (backends.why_not checks the load first).
    from ..triton.patch_attention import unsupported

    reason = unsupported(q, k, v)
    if reason is None:
        return None
    # Head dims past every kernel (T2T-ViT's) have one server; the other refusals, two.
    large = max(q.shape[-1], v.shape[-1]) > max(MAX_HEAD_DIM["cuda"], MAX_HEAD_DIM["cpu"])
    return f"{reason} ({'only the reference serves it' if large else 'the cuda or reference backend serves it'})"


def _extension_refuses(backend: str):
    def refuses(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
        d, dv = q.shape[-1], v.shape[-1]
        if max(d, dv) > MAX_HEAD_DIM[backend]:
            return (f"head dims d={d}, dv={dv}: the {backend} kernel serves head dims <= {MAX_HEAD_DIM[backend]} "
                    f"(the reference serves larger ones)")
        return None

    return refuses


def _packed(backend: str, kernel, refuses=None) -> backends.Implementation:
    """patch_attention's ``backend``: ``kernel`` (and ``refuses``) on the q, k, v and out views of qkv."""
    def run(qkv, num_heads, patch_size, scale, out):
        kernel(*qkv_views(qkv, num_heads), patch_size, scale, out_view(out, num_heads))

    def unsupported(qkv, num_heads, *args):
        return refuses(*qkv_views(qkv, num_heads)) if refuses else None

    return backends.Implementation(backend, run, unsupported)


# cuda and cpu: the C++ extension (csrc/{cuda,cpu}/patch_attention.*, one math header), any dtype and
# strides; cuda is the fallback where Triton is missing or refuses the input. Head-dim limits above.
IMPLEMENTATIONS = (
    _packed("triton", _triton_kernel, _triton_refuses),
    _packed("cuda", _extension_kernel, _extension_refuses("cuda")),
    _packed("cpu", _extension_kernel, _extension_refuses("cpu")),
    backends.Implementation("reference", reference),
)


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), fake impl for tracing,
# autograd through the written-out attention backward in plain PyTorch (traceable by torch.compile).
# --------------------------------------------------------------------------------------------------


def _forward(qkv: Tensor, num_heads: int, patch_size: List[int], scale: Optional[float]) -> Tensor:
    check_inputs(qkv, num_heads, patch_size, scale)
    out = new_output(qkv)
    if out.numel() == 0:
        return out
    backends.run("patch_attention", IMPLEMENTATIONS, qkv.device, qkv, num_heads, tuple(patch_size),
                 resolve_scale(qkv, num_heads, scale), out)
    return out


_patch_attention = torch.library.custom_op("fastvit_kernels::patch_attention", _forward, mutates_args=())


@_patch_attention.register_fake
def _(qkv, num_heads, patch_size, scale):
    check_inputs(qkv, num_heads, patch_size, scale)
    return new_output(qkv)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, patch_size, scale = inputs
    # Only qkv is kept: the backward recomputes P (and O) in the accumulation dtype, which costs one
    # more pass but no [B*P, heads, N, N] buffer between forward and backward.
    ctx.save_for_backward(qkv)
    ctx.num_heads, ctx.patch_size = num_heads, tuple(patch_size)
    ctx.scale = resolve_scale(qkv, num_heads, scale)


def _backward(ctx, grad_out: Tensor):
    (qkv,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    acc = accumulation_dtype(qkv.dtype)
    q, k, v = split_heads(to_sequences(qkv.to(acc), ctx.patch_size), 3, ctx.num_heads)
    (grad_o,) = split_heads(to_sequences(grad_out.to(acc), ctx.patch_size), 1, ctx.num_heads)
    grads = torch.stack(attention_backward(q, k, v, grad_o, ctx.scale))  # [3, B*P, heads, N, d]
    grad_qkv = from_sequences(merge_heads(grads), qkv.shape[:3], ctx.patch_size)
    return grad_qkv.to(qkv.dtype), None, None, None


_patch_attention.register_autograd(_backward, setup_context=_setup_context)


# ==================================================================================================
# Cross attention: the same attention with queries and keys/values from different tensors.
# ==================================================================================================
#
# CaiT's class attention, CrossViT, CvT's strided k/v and DeiT's extra tokens attend from Nq queries
# to Nk keys of another tensor. ``attention`` takes q, k and v as separate ``[B, heads, N, d]`` views
# (as ``rearrange(t, 'b n (h d) -> b h n d')`` makes them), with no patch grouping.


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Multi-head attention of ``Nq`` queries over ``Nk`` keys/values that may come from other tensors.

    Args:
        q: ``[B, heads, Nq, d]`` float16/bfloat16/float32/float64, any strides.
        k: ``[B, heads, Nk, d]``, v: ``[B, heads, Nk, dv]``: q's dtype and device, any strides.
        scale: the score scale, default ``d ** -0.5``.

    Returns ``[B, Nq, heads * dv]``, contiguous, channel ``h * dv + e`` (ready for the output Linear).
    Equivalent PyTorch::

        o = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v     # [B, heads, Nq, dv]
        out = o.transpose(1, 2).reshape(B, Nq, heads * dv)

    Differentiable in ``q``, ``k`` and ``v``.

    Runs on patch_attention's kernels (a 1 x 1 patch over separate q, k, v views, no copies), with their
    limits: triton, cuda and cpu serve head dims ``d, dv <= 128`` (float64 not on triton); larger head
    dims (T2T-ViT's 147 and 1323, one head) run on the reference, plain PyTorch matmuls in float32
    (``HEAD_DIM_LIMITS``, ``python -m fastvit_kernels.info``). ``Nq`` and ``Nk`` are independent (CaiT's class
    attention: ``Nq = 1``), and so are ``d`` and ``dv``.
    """
    if backends.direct_call(q, k, v):  # eager inference: the same work without the dispatcher
        return _cross_forward(q, k, v, scale)
    return torch.ops.fastvit_kernels.attention(q, k, v, scale)


def check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> None:
    """The checks of separate ``[B, heads, N, d]`` q/k/v views and a score scale, for ``attention`` and
    the other ops that take them (``head_mixing_attention``); ``op`` names the op in the errors."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D [B, heads, N, d] tensor, got shape {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"{op}: q.dtype {q.dtype} is not supported; supported: "
                        f"float16, bfloat16, float32, float64")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name}.dtype {t.dtype} must equal q.dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    B, heads, Nq, d = q.shape
    if tuple(k.shape[:2]) != (B, heads) or k.shape[3] != d:
        raise ValueError(f"{op}: k must have shape [B, heads, Nk, d] = [{B}, {heads}, Nk, {d}] "
                         f"(q is {tuple(q.shape)}), got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"{op}: v must have shape [B, heads, Nk, dv] = [{B}, {heads}, {k.shape[2]}, dv] "
                         f"(k is {tuple(k.shape)}), got {tuple(v.shape)}")
    if min(heads, d, v.shape[3]) < 1:
        raise ValueError(f"{op}: heads and head dims must be >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if Nq > 0 and k.shape[2] == 0:
        raise ValueError(f"{op}: {Nq} queries need at least one key, got k {tuple(k.shape)}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale}")


def check_cross_inputs(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> None:
    check_qkv("attention", q, k, v, scale)


def new_cross_output(q: Tensor, v: Tensor) -> Tensor:
    """``[B, Nq, heads * dv]`` contiguous in q's dtype."""
    B, heads, Nq, _ = q.shape
    return memory.empty((B, Nq, heads * v.shape[-1]), q.dtype, q.device)


def cross_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    """The specification: attention in the accumulation dtype on the ``[B, heads, N, d]`` views."""
    acc = accumulation_dtype(q.dtype)
    o = attention_forward(q.to(acc), k.to(acc), v.to(acc), scale)  # [B, heads, Nq, dv]
    out.copy_(o.transpose(1, 2).reshape(out.shape))


def cross_views(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernels' ``[B, heads, 1, N, d]`` views of q, k, v and of ``out`` ``[B, Nq, heads * dv]``:
    one image row of tokens, read with a 1 x 1 patch."""
    heads = q.shape[1]
    return q[:, :, None], k[:, :, None], v[:, :, None], out.unflatten(2, (heads, -1)).transpose(1, 2)[:, :, None]


def _cross(backend: str, kernel, refuses=None) -> backends.Implementation:
    """attention's ``backend``: the patch kernel ``kernel`` (and ``refuses``) with a 1 x 1 patch."""
    def run(q, k, v, scale, out):
        *qkv, o = cross_views(q, k, v, out)
        kernel(*qkv, (1, 1), scale, o)

    def unsupported(q, k, v, *args):
        return refuses(q[:, :, None], k[:, :, None], v[:, :, None]) if refuses else None

    return backends.Implementation(backend, run, unsupported)


# The patch kernels with a 1 x 1 patch on the separate q, k, v views: the same kernels, dtypes and
# head-dim limits as patch_attention (HEAD_DIM_LIMITS); dv != d is served by every backend.
CROSS_IMPLEMENTATIONS = (
    _cross("triton", _triton_kernel, _triton_refuses),
    _cross("cuda", _extension_kernel, _extension_refuses("cuda")),
    _cross("cpu", _extension_kernel, _extension_refuses("cpu")),
    backends.Implementation("reference", cross_reference),
)


def _cross_forward(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    check_cross_inputs(q, k, v, scale)
    out = new_cross_output(q, v)
    if out.numel() == 0:
        return out
    backends.run("attention", CROSS_IMPLEMENTATIONS, q.device, q, k, v,
                 q.shape[-1] ** -0.5 if scale is None else float(scale), out)
    return out


_attention = torch.library.custom_op("fastvit_kernels::attention", _cross_forward, mutates_args=())


@_attention.register_fake
def _(q, k, v, scale):
    check_cross_inputs(q, k, v, scale)
    return new_cross_output(q, v)


def _cross_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)  # P is recomputed: no [B, heads, Nq, Nk] buffer is kept
    ctx.scale = q.shape[-1] ** -0.5 if scale is None else float(scale)


def _cross_backward(ctx, grad_out: Tensor):
    q, k, v = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None
    acc = accumulation_dtype(q.dtype)
    B, heads, Nq, _ = q.shape
    grad_o = grad_out.to(acc).reshape(B, Nq, heads, -1).transpose(1, 2)
    grads = attention_backward(q.to(acc), k.to(acc), v.to(acc), grad_o, ctx.scale)
    return (*[g.to(q.dtype) if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])], None)


_attention.register_autograd(_cross_backward, setup_context=_cross_setup_context)
