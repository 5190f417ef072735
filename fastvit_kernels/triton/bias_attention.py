"""Triton forward kernel for LeViT attention with a relative-position bias, and its launcher.

Scores are ``scale * q . k + table[h, |qy - ky| * R_w + |qx - kx|]``: the keys are the ``R_h x R_w``
grid (key ``j`` at ``(j // R_w, j % R_w)``), the queries that grid subsampled by ``stride`` (query
``i`` at ``((i // nqw) * stride, (i % nqw) * stride)``, ``nqw = ceil(R_w / stride)``). The kernel
computes each score's table index from those coordinates and gathers the entry from the (small,
cache-resident) table, so timm's ``[heads, Nq, Nk]`` bias never exists. Key dim and value dim differ
(LeViT: 16 or 32, and 2x or 4x that), both masked in registers, never padded in memory.

Flash-attention forward: each program owns one block of queries of one (image, head), streams the
head's keys and values through an online softmax with fp32 statistics and accumulator, applies the
activation (Hardswish) in the epilogue, and writes its output rows once.
"""
import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims are padded to one of these in registers (masked loads), never in memory. 16 is the floor
# because tl.dot needs every dimension >= 16. LeViT's key dims are 16, 32 or 64 and its value dims 2x
# or 4x that: 32 to 128 (256 only in the levit_512 downsamples, which the cuda backend serves). Value
# dims under 32 are padded to 32: shapes LeViT does not have, so no compiled variants of their own.
DK_PADS = (16, 32, 64)
DV_PADS = (32, 64, 128)
# Channels per vector load: 8 (16 bytes in fp16/bf16) when the layout allows it, else 1. 8 divides
# every LeViT head dim (16, 32, 64, 128) and the strides of its packed projections.
VECS = (8, 1)
# Two K/V buffers: LeViT's heads have 16-196 keys (1 to 7 key blocks), where a third buffer costs
# shared memory and hides no more latency.
NUM_STAGES = 2
ACT_NONE, ACT_HARDSWISH = 0, 1  # the op's activation codes (ops/bias_attention.py ACTIVATIONS)
_LOG2E = 1.4426950408889634
# Offsets inside one image (and inside the table) are 32-bit in the kernel.
_MAX_IMAGE_SPAN = 2 ** 31 - 1


class Tile(NamedTuple):
    """Queries per program, keys per inner step, warps."""

    block_m: int
    block_n: int
    num_warps: int


def _tile(dtype: torch.dtype, dk_pad: int, dv_pad: int) -> Tile:
    """One tile per (dtype, padded head dims): of those tried, one that compiles without spilling on
    sm_80 and sm_90 for every variant (tests/test_triton_aot.py prints the table).

    32 query rows fit LeViT's sequence lengths: 196 queries are 7 blocks of 32 (12% padding, 23% with
    64), 49 are 2 (23%, as with 64) and 16 are 1 (50%, 75% with 64). 16-bit: one warp per 16 query
    rows (the mma tile is 16 rows tall, so each warp owns whole rows and the row max and sum never
    cross warps); 32-key steps where the heads are narrow, 16 where q, k, v and the accumulator
    would otherwise need more than 255 registers on sm_80 (the bias gather holds one 64-bit address
    per score). fp32: FMA dots ("ieee", see ``_dot_precision``), 4 warps, 16-key steps for 128-wide
    value heads, for the same reason.
    """
    if dtype == torch.float32:
        return Tile(32, 32 if dv_pad <= 64 else 16, 4)
    return Tile(32, 32 if dk_pad + dv_pad <= 96 else 16, 2)


def _dot_precision(dtype: torch.dtype) -> str:
    # As patch_attention: TF32 would keep 10 mantissa bits (an error PyTorch's fp32 matmul does not
    # make) and 3xTF32 spills; "ieee" FMA dots are exact fp32. Only fp32 operands see the flag.
    return "ieee" if dtype == torch.float32 else "tf32"


# Nothing is specialized by the JIT: the launcher states alignment through VEC (one compiled kernel
# per constexpr set, all of which the AOT test compiles). The JIT's guesses would mostly not help
# (LeViT's token strides, heads * (2 dk + dv), are multiples of 16 only for some head counts) and
# each guess would be another compiled kernel.
_RUNTIME_INTS = ["n_heads", "n_q", "n_k", "dk", "dv", "res_w", "q_stride", "n_qw",
                 "sq_b", "sq_h", "sq_n", "sq_c", "sk_b", "sk_h", "sk_n", "sk_c",
                 "sv_b", "sv_h", "sv_n", "sv_c", "st_h", "st_n", "so_b", "so_n", "so_c"]


@triton.jit(do_not_specialize=_RUNTIME_INTS,
            do_not_specialize_on_alignment=["q_ptr", "k_ptr", "v_ptr", "table_ptr", "out_ptr"])
def _bias_attention_fwd_kernel(
    q_ptr,  # q [B, heads, Nq, dk], fp32/fp16/bf16; element strides sq_*
    k_ptr,  # k [B, heads, Nk, dk], q's dtype; element strides sk_*
    v_ptr,  # v [B, heads, Nk, dv], q's dtype; element strides sv_*
    table_ptr,  # bias table [heads, R_h * R_w], fp32 or q's dtype; element strides st_*
    out_ptr,  # out [B, Nq, heads * dv], q's dtype, channel h * dv + e; element strides so_*
    qk_scale,  # fp32: the score scale times log2(e), so the exponentials are exp2
    n_heads, n_q, n_k,  # heads; queries Nq = ceil(R_h / s) * ceil(R_w / s); keys Nk = R_h * R_w
    dk, dv,  # channels per head of q and k, and of v
    res_w,  # key grid width R_w: key j at (j // R_w, j % R_w); the bias index is |dy| * R_w + |dx|
    q_stride,  # query subsampling s of the key grid (1: LeViT Attention, 2: AttentionDownsample)
    n_qw,  # queries per query-grid row, ceil(R_w / s): query i at ((i // n_qw) * s, (i % n_qw) * s)
    sq_b, sq_h, sq_n, sq_c,  # q strides in elements: image, head, token, channel
    sk_b, sk_h, sk_n, sk_c,  # k strides
    sv_b, sv_h, sv_n, sv_c,  # v strides
    st_h, st_n,  # table strides: head, entry
    so_b, so_n, so_c,  # out strides: image, token, channel
    DK_PAD: tl.constexpr,  # dk rounded up to a power of two >= 16 (register tile width of q and k)
    DV_PAD: tl.constexpr,  # dv rounded up likewise, >= DK_PAD (register tile width of v and out)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner-loop step
    VEC: tl.constexpr,  # channels per vector load; > 1 promises unit channel strides of q, k, v and out,
    #                     and that their pointers, dk, dv and all their other strides are multiples of
    #                     VEC (launcher checks)
    HARDSWISH: tl.constexpr,  # apply x * relu6(x + 3) / 6 to the output (timm's proj.act)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 (see _dot_precision)
):
    n_mblocks = tl.cdiv(n_q, BLOCK_M)
    # One flat grid axis (axes 1 and 2 allow only 65535 programs). Query blocks vary fastest, then
    # heads: programs running at the same time read the same head's keys and values, which then come
    # from L2 for all but the first of them.
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    head = (pid // n_mblocks) % n_heads
    b = pid // (n_mblocks * n_heads)

    # The image's base pointers take the 64-bit product (b * s_b passes 2^31 in big batches); offsets
    # inside one image are 32-bit (the launcher checks they fit), which halves the registers of the
    # [tokens, channels] offset tiles.
    ITEM_BYTES: tl.constexpr = q_ptr.dtype.element_ty.primitive_bitwidth // 8
    LOG2E: tl.constexpr = 1.4426950408889634  # the bias, like the scores, in base 2
    b64 = b.to(tl.int64)
    q_head = tl.multiple_of(q_ptr + (b64 * sq_b + head * sq_h), VEC * ITEM_BYTES)
    k_head = tl.multiple_of(k_ptr + (b64 * sk_b + head * sk_h), VEC * ITEM_BYTES)
    v_head = tl.multiple_of(v_ptr + (b64 * sv_b + head * sv_h), VEC * ITEM_BYTES)
    out_head = tl.multiple_of(out_ptr + (b64 * so_b + head * dv * so_c), VEC * ITEM_BYTES)
    t_head = table_ptr + head * st_h

    # Channels: runs of VEC contiguous, VEC-aligned offsets, so each thread loads VEC channels with one
    # instruction. The head-dim masks are constant over each run (dk and dv are multiples of VEC),
    # which the compiler cannot see by itself. Padding columns: zeros in q, k, v, never stored.
    ck = tl.arange(0, DK_PAD)
    ck_in = tl.max_constancy(ck < dk, VEC)
    q_chan = tl.max_contiguous(tl.multiple_of(ck * sq_c, VEC), VEC)
    k_chan = tl.max_contiguous(tl.multiple_of(ck * sk_c, VEC), VEC)
    cv = tl.arange(0, DV_PAD)
    cv_in = tl.max_constancy(cv < dv, VEC)
    v_chan = tl.max_contiguous(tl.multiple_of(cv * sv_c, VEC), VEC)
    o_chan = tl.max_contiguous(tl.multiple_of(cv * so_c, VEC), VEC)

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < n_q
    q_tok = tl.multiple_of(m * sq_n, VEC)
    q = tl.load(q_head + q_tok[:, None] + q_chan[None, :], mask=m_in[:, None] & ck_in[None, :], other=0.0)
    qy = (m // n_qw) * q_stride  # the query's grid position
    qx = (m % n_qw) * q_stride

    # Online softmax in base 2; rows past the last query see zero queries and a zero bias, so no row is
    # ever all -inf (the first key block always holds key 0) and nothing becomes NaN.
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
    for start in range(0, n_k, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_in = n < n_k
        k = tl.load(k_head + tl.multiple_of(n * sk_n, VEC)[:, None] + k_chan[None, :],
                    mask=n_in[:, None] & ck_in[None, :], other=0.0)
        v = tl.load(v_head + tl.multiple_of(n * sv_n, VEC)[:, None] + v_chan[None, :],
                    mask=n_in[:, None] & cv_in[None, :], other=0.0)
        # The bias: table entry |qy - ky| * R_w + |qx - kx| of this head, from the coordinates.
        ky = n // res_w
        kx = n % res_w
        idx = tl.abs(qy[:, None] - ky[None, :]) * res_w + tl.abs(qx[:, None] - kx[None, :])
        bias = tl.load(t_head + idx * st_n, mask=m_in[:, None] & n_in[None, :], other=0.0).to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias * LOG2E
        s = tl.where(n_in[None, :], s, float("-inf"))  # keys past the end get zero weight
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        rescale = tl.exp2(row_max - new_max)  # 0 on the first step (row_max = -inf)
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        # p in the input dtype for the tensor-core dot (as flash-attention does); fp32 stays fp32.
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    o = acc / row_sum[:, None]
    if HARDSWISH:
        o = o * tl.minimum(tl.maximum(o + 3.0, 0.0), 6.0) / 6.0
    o_tok = tl.multiple_of(m * so_n, VEC)
    tl.store(out_head + o_tok[:, None] + o_chan[None, :], o.to(out_ptr.dtype.element_ty),
             mask=m_in[:, None] & cv_in[None, :])


class LaunchConfig(NamedTuple):
    """How one call launches the kernel: compile-time constants, warps, stages, and the grid."""

    constexprs: dict
    num_warps: int
    num_stages: int
    grid: Tuple[int, ...]


class KernelConfig(NamedTuple):
    """One compiled variant the launcher may use: pointer dtype, constexprs, warps and stages."""

    dtype: torch.dtype
    constexprs: dict
    num_warps: int
    num_stages: int


def head_dim_pads(dk: int, dv: int) -> Tuple[int, int]:
    """The register tile widths ``(DK_PAD, DV_PAD)``: the next powers of two in DK_PADS / DV_PADS, with
    ``DV_PAD >= DK_PAD`` (LeViT's value heads are never narrower than its key heads; inputs whose are
    pad their values a little more instead of adding compiled variants)."""
    dk_pad = max(DK_PADS[0], triton.next_power_of_2(dk))
    return dk_pad, max(DV_PADS[0], dk_pad, triton.next_power_of_2(dv))


def _pad_pairs():
    return [(dk_pad, dv_pad) for dk_pad in DK_PADS for dv_pad in DV_PADS if dv_pad >= dk_pad]


def _span(t: torch.Tensor, first_dim: int = 1) -> int:
    """One more than the largest element offset inside one image (dims from ``first_dim`` on)."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[first_dim:], t.stride()[first_dim:]))


def vector_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> int:
    """The widest of VECS that every offset and base pointer the kernel forms (but the table's, which
    it gathers) is a multiple of."""
    dk, dv = q.shape[-1], v.shape[-1]
    for vec in VECS:
        aligned = all(t.stride(-1) == 1 and t.data_ptr() % (vec * t.element_size()) == 0
                      and all(s % vec == 0 for s in t.stride()[:-1]) for t in (q, k, v, out))
        if vec == 1 or (aligned and dk % vec == 0 and dv % vec == 0):
            return vec


def _constexprs(dtype: torch.dtype, dk_pad: int, dv_pad: int, vec: int, act: int, tile: Tile) -> dict:
    return dict(DK_PAD=dk_pad, DV_PAD=dv_pad, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, VEC=vec,
                HARDSWISH=act == ACT_HARDSWISH, DOT_PRECISION=_dot_precision(dtype))


def launch_config(q: torch.Tensor, v: torch.Tensor, act: int, vec: int) -> LaunchConfig:
    """Constexprs, warps, stages and grid for q [B, heads, Nq, dk], v [..., dv], activation code ``act``
    and vector width ``vec`` (see :func:`vector_width`). Only shapes and dtype matter beyond ``vec``."""
    B, heads, n_q, dk = q.shape
    dk_pad, dv_pad = head_dim_pads(dk, v.shape[-1])
    tile = _tile(q.dtype, dk_pad, dv_pad)
    grid = (triton.cdiv(n_q, tile.block_m) * heads * B,)
    return LaunchConfig(_constexprs(q.dtype, dk_pad, dv_pad, vec, act, tile), tile.num_warps, NUM_STAGES, grid)


def all_kernel_configs() -> Tuple[KernelConfig, ...]:
    """Every (dtype, constexprs, num_warps, num_stages) that ``launch_config`` can return, for AOT
    checks. The kernel is never specialized by the JIT, so each is exactly one compiled kernel."""
    return tuple(KernelConfig(dtype, _constexprs(dtype, dk_pad, dv_pad, vec, act, tile), tile.num_warps,
                              NUM_STAGES)
                 for dtype in DTYPES for vec in VECS for act in (ACT_NONE, ACT_HARDSWISH)
                 for dk_pad, dv_pad in _pad_pairs() for tile in (_tile(dtype, dk_pad, dv_pad),))


def kernel_args(q, k, v, table, resolution, stride, scale, out) -> tuple:
    """The kernel's runtime arguments (all but the constexprs), in order; also used by the AOT test."""
    B, heads, n_q, dk = q.shape
    R_h, R_w = resolution
    return (q, k, v, table, out, scale * _LOG2E, heads, n_q, k.shape[2], dk, v.shape[-1], R_w, stride,
            -(-R_w // stride), *q.stride(), *k.stride(), *v.stride(), *table.stride(), *out.stride())


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor) -> Optional[str]:
    """None when the kernel can serve these inputs (given valid op inputs), else why not."""
    if q.dtype not in DTYPES:
        return f"{q.dtype} is not supported by the Triton kernel (supported: float32, float16, bfloat16)"
    for name, d, pads in (("dk", q.shape[-1], DK_PADS), ("dv", v.shape[-1], DV_PADS)):
        if d > pads[-1]:
            return f"{name} {d} is not supported by the Triton kernel (at most {pads[-1]})"
    for name, t, first in (("q", q, 1), ("k", k, 1), ("v", v, 1), ("table", table, 0)):
        if _span(t, first) > _MAX_IMAGE_SPAN:
            return f"one image of {name} spans {_span(t, first)} elements, over the kernel's 32-bit offsets"
    return None


def _check(q, k, v, table, resolution, stride, scale, act, out):
    if q.dim() != 4 or q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: got {q.dim()}-d {q.dtype}, {k.dtype}, {v.dtype}; expected 4-D, one of {DTYPES}")
    B, heads, n_q, dk = q.shape
    R_h, R_w = resolution
    nq_expected = -(-R_h // stride) * -(-R_w // stride)
    if (tuple(k.shape) != (B, heads, R_h * R_w, dk) or tuple(v.shape[:3]) != (B, heads, R_h * R_w)
            or n_q != nq_expected or stride < 1):
        raise ValueError(f"q, k, v: got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, expected "
                         f"[{B}, {heads}, {nq_expected}, dk], [{B}, {heads}, {R_h * R_w}, dk], "
                         f"[{B}, {heads}, {R_h * R_w}, dv] for resolution {R_h}x{R_w} and stride {stride}")
    if tuple(table.shape) != (heads, R_h * R_w) or table.dtype not in (torch.float32, q.dtype):
        raise ValueError(f"table: got {tuple(table.shape)} {table.dtype}, expected [{heads}, {R_h * R_w}] "
                         f"float32 or {q.dtype}")
    reason = unsupported(q, k, v, table) or (
        _span(out) > _MAX_IMAGE_SPAN and "one image of out spans more than 2^31 - 1 elements")
    if reason:
        raise ValueError(f"q, k, v: {reason}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: got {scale}, expected a finite number")
    if act not in (ACT_NONE, ACT_HARDSWISH):
        raise ValueError(f"act: got {act}, expected {ACT_NONE} (none) or {ACT_HARDSWISH} (hardswish)")
    expected = (B, n_q, heads * v.shape[-1])
    if tuple(out.shape) != expected or out.dtype != q.dtype:
        raise ValueError(f"out: got {tuple(out.shape)} {out.dtype}, expected {expected} {q.dtype}")


def bias_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          resolution: Tuple[int, int], stride: int, scale: float, act: int,
                          out: torch.Tensor) -> None:
    """LeViT bias attention forward; writes every element of ``out``.

    ``q`` [B, heads, Nq, dk], ``k`` [B, heads, Nk, dk], ``v`` [B, heads, Nk, dv] (fp32/fp16/bf16, any
    strides, dk <= 64, dv <= 128), ``table`` [heads, Nk] (fp32 or q's dtype), ``out`` [B, Nq, heads * dv]
    (q's dtype, any non-overlapping strides); ``act`` 0 (none) or 1 (hardswish). Scores, softmax and
    accumulation in fp32. Equivalent PyTorch (``bias_index`` from ``fastvit_kernels.ops.bias_attention``)::

        s = scale * q.float() @ k.float().transpose(-1, -2) + table.float()[:, bias_index(resolution, stride)]
        o = torch.softmax(s, -1) @ v.float()
        o = F.hardswish(o) if act else o
        out.copy_(o.transpose(1, 2).reshape(B, Nq, heads * dv))
    """
    _check(q, k, v, table, resolution, stride, scale, act, out)
    if out.numel() == 0:
        return
    cfg = launch_config(q, v, act, vector_width(q, k, v, out))
    # Triton launches on the current device: make it q's (a model on cuda:1 with cuda:0 current).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _bias_attention_fwd_kernel[cfg.grid](*kernel_args(q, k, v, table, resolution, stride, scale, out),
                                             **cfg.constexprs, num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages)
