"""Triton forward kernel for attention with heads mixed across the softmax, and its launcher.

CaiT's talking heads mix the scores of all heads before the softmax and the probabilities after it;
DeepViT's re-attention mixes the probabilities and LayerNorms them across heads. Every step needs all
heads of a (query, key) pair at once, so one program owns a block of query rows of one image with all
heads and all keys in registers: a ``[HEADS_P2, BLOCK_M, BLOCK_N]`` fp32 tile, the key axis covering
every key in one tile. That bounds the keys (``BLOCK_N <= 512``) and heads (``<= 16``): larger inputs are
refused (:func:`unsupported`) and the cuda backend serves them. The ``[B, heads, Nq, Nk]`` map is never
written to memory; each output element is stored once.

The products are rank-1 updates in fp32 FMA, one channel per step (``s += q[:, :, e] k[:, :, e]^T``
for all heads at once; ``out[:, :, e] = sum_n a v[:, n, e]``), not ``tl.dot``: a dot needs 16 query rows
per head, which with 8 heads and 256 keys is 32K fp32 scores per program, more than the registers hold
twice (a mix reads one tile and writes another). With 1-16 rows per program the tile stays at 8K scores.
Head dims are runtime values (any size, masked loads, no padding).

The optional steps are runtime flags (uniform branches per program) rather than constexprs: 8
combinations x the tile shapes x 3 dtypes would be ~700 compiled variants to check for spills; as
flags, 45.
"""
import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEADS_P2S = (4, 8, 16)  # heads padded to one of these in registers (masked)
BLOCK_NS = (32, 64, 128, 256, 512)  # keys padded to one of these (masked)
# HEADS_P2 * BLOCK_M * BLOCK_N <= MAX_TILE: 32 fp32 registers per thread per tile at 8 warps, two tiles
# live across a mix. One query row per program (the largest tiles) spilled at 4 warps; at 8 none of the
# tiles spills on sm_80 or sm_90 (tests/test_triton_aot.py prints registers per config).
MAX_TILE = 8192
MAX_BLOCK_M = 16
NUM_WARPS = 8
_LOG2E = 1.4426950408889634
_MAX_IMAGE_SPAN = 2 ** 31 - 1  # offsets inside one image are 32-bit in the kernel


@triton.jit
def _mix_heads(x, mix_ptr, sm_h, sm_g, n_heads, hidx, h_in):
    """``out[g] = sum_h x[h] * mix[h, g]`` over the head axis (0) of a [HEADS_P2, M, N] tile."""
    out = tl.zeros_like(x)
    for g in range(0, n_heads):
        col = tl.load(mix_ptr + hidx * sm_h + g * sm_g, mask=h_in, other=0.0).to(tl.float32)
        xg = tl.sum(x * col[:, None, None], axis=0)
        out = tl.where((hidx == g)[:, None, None], xg[None, :, :], out)
    return out


_RUNTIME_INTS = ["n_heads", "n_q", "n_k", "d", "dv", "has_pre", "has_post", "has_norm", "has_bias",
                 "sq_b", "sq_h", "sq_n", "sq_c", "sk_b", "sk_h", "sk_n", "sk_c", "sv_b", "sv_h", "sv_n", "sv_c",
                 "so_b", "so_n", "so_c", "spre_h", "spre_g", "spost_h", "spost_g", "sw", "sb"]


@triton.jit(do_not_specialize=_RUNTIME_INTS,
            do_not_specialize_on_alignment=["q_ptr", "k_ptr", "v_ptr", "out_ptr", "pre_ptr", "post_ptr", "w_ptr",
                                            "b_ptr"])
def _head_mixing_attention_fwd_kernel(
    q_ptr,  # q [B, heads, Nq, d], fp32/fp16/bf16; element strides sq_*
    k_ptr,  # k [B, heads, Nk, d], q's dtype; element strides sk_*
    v_ptr,  # v [B, heads, Nk, dv], q's dtype; element strides sv_*
    out_ptr,  # out [B, Nq, heads * dv], q's dtype, channel g * dv + e; element strides so_*
    pre_ptr,  # pre_mix [heads, heads] (any float dtype; q when unused, never read); strides spre_*
    post_ptr,  # post_mix [heads, heads]; strides spost_*
    w_ptr,  # norm_weight [heads]; stride sw
    b_ptr,  # norm_bias [heads]; stride sb
    qk_scale,  # fp32: the score scale times log2(e) (the mixes are linear: exp2 of mixed scores is right)
    norm_eps,  # fp32
    n_heads, n_q, n_k, d, dv,
    has_pre, has_post, has_norm, has_bias,  # 0/1: which optional steps run
    sq_b, sq_h, sq_n, sq_c,  # q strides in elements: image, head, token, channel
    sk_b, sk_h, sk_n, sk_c,  # k strides
    sv_b, sv_h, sv_n, sv_c,  # v strides
    so_b, so_n, so_c,  # out strides: image, token, channel
    spre_h, spre_g, spost_h, spost_g, sw, sb,  # parameter strides
    HEADS_P2: tl.constexpr,  # heads rounded up (register tile height)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # every key of the image, rounded up
):
    n_mblocks = tl.cdiv(n_q, BLOCK_M)
    pid = tl.program_id(0)
    b = pid // n_mblocks
    pid_m = pid % n_mblocks
    b64 = b.to(tl.int64)
    q_img = q_ptr + b64 * sq_b
    k_img = k_ptr + b64 * sk_b
    v_img = v_ptr + b64 * sv_b
    o_img = out_ptr + b64 * so_b

    hidx = tl.arange(0, HEADS_P2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    h_in = hidx < n_heads
    hm_in = h_in[:, None] & (m < n_q)[None, :]  # [HEADS_P2, BLOCK_M]
    hn_in = h_in[:, None] & (n < n_k)[None, :]  # [HEADS_P2, BLOCK_N]
    q_off = hidx[:, None] * sq_h + m[None, :] * sq_n
    k_off = hidx[:, None] * sk_h + n[None, :] * sk_n
    v_off = hidx[:, None] * sv_h + n[None, :] * sv_n

    # Scores of all heads, one channel per step (rank-1 updates; padded heads, rows, keys see zeros).
    s = tl.zeros((HEADS_P2, BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e in range(0, d):
        qe = tl.load(q_img + q_off + e * sq_c, mask=hm_in, other=0.0).to(tl.float32)
        ke = tl.load(k_img + k_off + e * sk_c, mask=hn_in, other=0.0).to(tl.float32)
        s += qe[:, :, None] * ke[:, None, :]
    s = s * qk_scale
    if has_pre != 0:
        s = _mix_heads(s, pre_ptr, spre_h, spre_g, n_heads, hidx, h_in)

    # Softmax over the keys in base 2; keys past the end get weight 0 (key 0 is always real: no NaN).
    s = tl.where((n < n_k)[None, None, :], s, float("-inf"))
    row_max = tl.max(s, axis=2)
    p = tl.exp2(s - row_max[:, :, None])
    p = p / tl.sum(p, axis=2)[:, :, None]

    if has_post != 0:
        p = _mix_heads(p, post_ptr, spost_h, spost_g, n_heads, hidx, h_in)
    if has_norm != 0:  # LayerNorm across the real heads of each (query, key)
        h3 = h_in[:, None, None]
        mean = tl.sum(tl.where(h3, p, 0.0), axis=0) / n_heads
        diff = tl.where(h3, p - mean[None, :, :], 0.0)
        var = tl.sum(diff * diff, axis=0) / n_heads
        rstd = 1.0 / tl.sqrt(var + norm_eps)
        w = tl.load(w_ptr + hidx * sw, mask=h_in, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + hidx * sb, mask=h_in & (has_bias != 0), other=0.0).to(tl.float32)
        # Padded keys now hold the bias: the value loads below are zero there.
        p = diff * rstd[None, :, :] * w[:, None, None] + bias[:, None, None]

    # out[b, m, g * dv + e] = sum_n a[g, m, n] v[g, n, e], one value channel per step.
    o_off = m[None, :] * so_n + hidx[:, None] * dv * so_c
    for e in range(0, dv):
        ve = tl.load(v_img + v_off + e * sv_c, mask=hn_in, other=0.0).to(tl.float32)
        o = tl.sum(p * ve[:, None, :], axis=2)
        tl.store(o_img + o_off + e * so_c, o.to(out_ptr.dtype.element_ty), mask=hm_in)


class LaunchConfig(NamedTuple):
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: Tuple[int, ...]


class KernelConfig(NamedTuple):
    dtype: torch.dtype
    constexprs: dict
    num_warps: int
    num_stages: int


# (HEADS_P2, BLOCK_N) -> BLOCK_M where the full 8K tile spilled 8 bytes of stack (ptxas held (8, 256)
# to 128 registers; (4, 256) spilled even at 4 rows): fewer query rows per program, no spills.
_BLOCK_M_OVERRIDE = {(4, 256): 2, (8, 256): 2}


def _constexprs(heads_p2: int, block_n: int) -> dict:
    block_m = _BLOCK_M_OVERRIDE.get((heads_p2, block_n), min(MAX_BLOCK_M, MAX_TILE // (heads_p2 * block_n)))
    return dict(HEADS_P2=heads_p2, BLOCK_M=block_m, BLOCK_N=block_n)


def _pads(heads: int, n_k: int) -> Optional[Tuple[int, int]]:
    heads_p2 = next((h for h in HEADS_P2S if h >= heads), None)
    block_n = next((n for n in BLOCK_NS if n >= n_k), None)
    if heads_p2 is None or block_n is None or heads_p2 * block_n > MAX_TILE:
        return None
    return heads_p2, block_n


def max_keys(heads: int) -> int:
    """The most keys the kernel takes for ``heads`` heads (0: none)."""
    return max((n for n in BLOCK_NS if _pads(heads, n)), default=0)


def launch_config(q: torch.Tensor, k: torch.Tensor) -> LaunchConfig:
    B, heads, n_q, _ = q.shape
    heads_p2, block_n = _pads(heads, k.shape[2])
    cx = _constexprs(heads_p2, block_n)
    return LaunchConfig(cx, NUM_WARPS, 1, (B * triton.cdiv(n_q, cx["BLOCK_M"]),))


def all_kernel_configs() -> Tuple[KernelConfig, ...]:
    """Every (dtype, constexprs, warps, stages) :func:`launch_config` can return, for the AOT checks."""
    return tuple(KernelConfig(dtype, _constexprs(h, n), NUM_WARPS, 1)
                 for dtype in DTYPES for h in HEADS_P2S for n in BLOCK_NS if h * n <= MAX_TILE)


def _span(t: torch.Tensor) -> int:
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when the kernel can serve these (valid) inputs, else why not."""
    if q.dtype not in DTYPES:
        return f"{q.dtype} is not supported by the Triton kernel (supported: float32, float16, bfloat16)"
    heads, n_k = q.shape[1], k.shape[2]
    if _pads(heads, n_k) is None:
        limit = max_keys(heads)
        return (f"heads {heads} x Nk {n_k} is not supported by the Triton kernel (all keys of all heads in "
                f"registers: at most {limit} keys for {heads} heads, at most {HEADS_P2S[-1]} heads)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _span(t) > _MAX_IMAGE_SPAN:
            return f"one image of {name} spans more than 2^31 - 1 elements"
    return None


def kernel_args(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps, out) -> tuple:
    """The kernel's runtime arguments (all but the constexprs), in order; also used by the AOT test."""
    B, heads, n_q, d = q.shape
    # An absent parameter passes q (never read: its flag is 0) and zero strides.
    pre, post, w, bias = (q if t is None else t for t in (pre_mix, post_mix, norm_weight, norm_bias))
    mix_strides = tuple((0, 0) if t is None else t.stride() for t in (pre_mix, post_mix))
    vec_strides = tuple(0 if t is None else t.stride(0) for t in (norm_weight, norm_bias))
    return (q, k, v, out, pre, post, w, bias, scale * _LOG2E, norm_eps, heads, n_q, k.shape[2], d, v.shape[-1],
            int(pre_mix is not None), int(post_mix is not None), int(norm_weight is not None),
            int(norm_bias is not None), *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mix_strides[0],
            *mix_strides[1], *vec_strides)


def head_mixing_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                 pre_mix: Optional[torch.Tensor], post_mix: Optional[torch.Tensor],
                                 norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                                 norm_eps: float, out: torch.Tensor) -> None:
    """Head-mixing attention forward; writes every element of ``out``.

    ``q`` [B, heads, Nq, d], ``k`` [B, heads, Nk, d], ``v`` [B, heads, Nk, dv] (fp32/fp16/bf16, any
    strides, heads <= 16, Nk <= :func:`max_keys`), mixing parameters [heads, heads] / [heads] or None
    (any float dtype), ``out`` [B, Nq, heads * dv] (q's dtype). Equivalent PyTorch: the docstring of
    ``fastvit_kernels.ops.head_mixing_attention``, in fp32.
    """
    reason = unsupported(q, k, v) or (_span(out) > _MAX_IMAGE_SPAN and "one image of out is too large")
    if reason:
        raise ValueError(f"q, k, v: {reason}")
    if not (math.isfinite(scale) and math.isfinite(norm_eps)):
        raise ValueError(f"scale, norm_eps: got {scale}, {norm_eps}, expected finite numbers")
    expected = (q.shape[0], q.shape[2], q.shape[1] * v.shape[-1])
    if tuple(out.shape) != expected or out.dtype != q.dtype:
        raise ValueError(f"out: got {tuple(out.shape)} {out.dtype}, expected {expected} {q.dtype}")
    if out.numel() == 0:
        return
    cfg = launch_config(q, k)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _head_mixing_attention_fwd_kernel[cfg.grid](
            *kernel_args(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps, out),
            **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
