"""Triton forward kernel for patch-grouped multi-head attention (MobileViT) and cross attention, and its
launcher.

Token (y, x) of an image attends to the tokens at the same offset (y % PH, x % PW) inside their
patch: one sequence per (image, offset), whose tokens are the patch positions (y // PH, x // PW) in
row-major order. timm gathers those sequences with an unfold copy and scatters the result back with a
fold copy; here the grouping is address arithmetic on views of the image-ordered ``[B, H, W, 3*C]`` qkv,
so neither copy exists. A ``1 x 1`` patch is plain multi-head attention over all ``H * W`` tokens. q, k
and v are separate ``[B, heads, H, W, d]`` views with their own strides, and the keys' grid may differ
from the queries' (cross attention: ``Nq`` queries over ``Nk`` keys, as ``[B, heads, 1, N, d]`` views),
and the value head dim ``dv`` from ``d`` (the tile is padded to the larger).

Flash-attention forward: each program owns one block of queries of one (sequence, head), streams the
sequence's keys and values through an online softmax with fp32 statistics and accumulator, and writes
its output rows once.
"""
import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
# Head dims are padded to one of these in registers (masked loads), never in memory. 16 is the
# floor because tl.dot needs every dimension >= 16.
HEAD_DIM_PADS = (16, 32, 64, 128)
# Channels per vector load: 4 (8 bytes in fp16/bf16, 16 in fp32) when the layout allows it, else 1.
# 4 divides MobileViT's head dims (16, 20, 24, 36, 48, 60, 64 and ViT's 64); 8 would give fp16 16-byte
# loads only for the few that 8 divides, at the cost of a third set of compiled variants.
VECS = (4, 1)
# Two K/V buffers: MobileViT's sequences are 16-256 tokens (1 to 4 key blocks), where a third buffer
# costs shared memory and registers and hides no more latency.
NUM_STAGES = 2
# Sequences of at most this many tokens use the short tile (MobileViT's last stage: 8x8 maps in 2x2
# patches, 16 tokens), where a 64-row block would compute 75% padding.
SHORT_SEQUENCE = 32
_LOG2E = 1.4426950408889634
# Offsets inside one image are 32-bit in the kernel.
_MAX_IMAGE_SPAN = 2 ** 31 - 1


class Tile(NamedTuple):
    """Queries per program, keys per inner step, warps."""

    block_m: int
    block_n: int
    num_warps: int


def _tiles(dtype: torch.dtype, d_pad: int, vec: int) -> Tuple[Tile, ...]:
    """The tiles for one (dtype, padded head dim, vector width): the long-sequence tile first, then
    the short-sequence tile if there is one. Each is the widest of those tried that compiles without
    spilling on sm_80 and sm_90 (tests/test_triton_aot.py prints the table).

    16-bit: one warp per 16 query rows (the mma tile is 16 rows tall, so each warp owns whole rows
    and the row max and sum never cross warps); 64 x 64 is the usual flash-attention tile, with
    narrower key blocks where the head is wide. Scalar loads (vec 1) hold one 64-bit address per
    element, so their tiles are smaller for wide heads, and they get no short tile (rare layouts).
    fp32: FMA dots ("ieee"), 32-row tiles; see ``_dot_precision``.
    """
    if dtype == torch.float32:
        # Scalar loads of the widest head: 8 warps (4 spilled on sm_90 once q, k and v had their own
        # strides).
        return (Tile(32, 32 if d_pad <= 32 else 16, 8 if (vec, d_pad) == (1, 128) else 4),)
    if vec == 1:
        return ({16: Tile(64, 64, 4), 32: Tile(64, 64, 4), 64: Tile(64, 32, 4), 128: Tile(32, 16, 4)}[d_pad],)
    # d_pad 16 takes 32-key blocks: 64 x 64 spilled one register across the key loop on sm_80 once
    # q, k and v had their own strides (ptxas held the tile at 80 registers).
    return (Tile(64, 64 if 16 < d_pad <= 64 else 32, 4), Tile(16, 16, 1 if d_pad <= 64 else 2))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32: plain TF32 (Triton's default) keeps 10 mantissa bits, an error PyTorch's fp32 matmul does
    # not make; 3xTF32 splits every operand in two and spilled registers at every tile from 32 x 32 up
    # for head dims >= 64. "ieee" FMA dots are exact fp32 and fit. The flag only affects fp32
    # operands: 16-bit variants keep the default.
    return "ieee" if dtype == torch.float32 else "tf32"


# Nothing is specialized by the JIT: the launcher states what it knows through VEC instead (one
# compiled kernel per constexpr set, all of which the AOT test compiles). The JIT's own guesses would
# not help: it only marks integers divisible by 16, and MobileViT's head dims (20, 24, 36, 60) and
# row strides (3 * C) mostly are not; and each guess is another compiled kernel.
_STRIDES = [f"s{t}_{a}" for t in "qkvo" for a in ("b", "n", "h", "w", "c")]
_RUNTIME_INTS = ["n_heads", "head_dim", "v_dim", "ph", "pw", "q_cols", "n_queries", "k_cols", "n_keys", *_STRIDES]


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=["q_ptr", "k_ptr", "v_ptr", "out_ptr"])
def _patch_attention_fwd_kernel(
    q_ptr,  # queries [B, heads, Hq, Wq, d], fp32/fp16/bf16; element strides sq_*
    k_ptr,  # keys [B, heads, Hk, Wk, d], same dtype; strides sk_*
    v_ptr,  # values [B, heads, Hk, Wk, dv], same dtype; strides sv_*
    out_ptr,  # out [B, heads, Hq, Wq, dv], same dtype; strides so_*
    qk_scale,  # fp32: the softmax scale times log2(e), so the exponentials are exp2
    n_heads, head_dim, v_dim,  # heads, q/k channels per head (d), v/out channels per head (dv)
    ph, pw,  # patch height and width; one sequence per offset inside the patch
    q_cols, n_queries,  # queries per sequence row (Wq // pw), per sequence ((Hq // ph) * q_cols)
    k_cols, n_keys,  # the same for keys and values on k's grid
    sq_b, sq_n, sq_h, sq_w, sq_c,  # q strides in elements: image, head, row, column, channel
    sk_b, sk_n, sk_h, sk_w, sk_c,  # k strides
    sv_b, sv_n, sv_h, sv_w, sv_c,  # v strides
    so_b, so_n, so_h, so_w, so_c,  # out strides
    D_PAD: tl.constexpr,  # max(d, dv) rounded up to a power of two >= 16 (register tile width)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner-loop step
    VEC: tl.constexpr,  # channels per vector load; > 1 promises unit channel strides and that all four
    #                     pointers, d, dv and all other strides are multiples of VEC (launcher checks)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 (see _dot_precision)
):
    n_mblocks = tl.cdiv(n_queries, BLOCK_M)
    # One flat grid axis (axes 1 and 2 allow only 65535 programs). Query blocks vary fastest, then
    # heads: programs running at the same time read the same sequence's keys and values, which then
    # come from L2 for all but the first of them.
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    head = (pid // n_mblocks) % n_heads
    seq = pid // (n_mblocks * n_heads)  # b * ph * pw + py * pw + px, timm's unfold order
    b = seq // (ph * pw)
    py = (seq // pw) % ph
    px = seq % pw

    # Token m of a sequence is patch (m // cols, m % cols), pixel (i * ph + py, j * pw + px) of its
    # grid. Each image's base pointer takes the 64-bit product (b * s_b passes 2^31 in big batches);
    # offsets inside one image are 32-bit (the launcher checks they fit), which halves the registers
    # of the [tokens, channels] offset tiles.
    ITEM_BYTES: tl.constexpr = q_ptr.dtype.element_ty.primitive_bitwidth // 8
    b64 = b.to(tl.int64)
    q_seq = tl.multiple_of(q_ptr + (b64 * sq_b + head * sq_n + py * sq_h + px * sq_w), VEC * ITEM_BYTES)
    k_seq = tl.multiple_of(k_ptr + (b64 * sk_b + head * sk_n + py * sk_h + px * sk_w), VEC * ITEM_BYTES)
    v_seq = tl.multiple_of(v_ptr + (b64 * sv_b + head * sv_n + py * sv_h + px * sv_w), VEC * ITEM_BYTES)

    # Channels: runs of VEC contiguous, VEC-aligned offsets, so each thread loads VEC channels with
    # one instruction. The head-dim masks are constant over each run (d and dv are multiples of VEC),
    # which the compiler cannot see by itself.
    e = tl.arange(0, D_PAD)
    d_in = tl.max_constancy(e < head_dim, VEC)  # padding columns: zeros in q and k
    dv_in = tl.max_constancy(e < v_dim, VEC)  # padding columns: zeros in v, never stored
    if VEC > 1:
        # Unit channel strides (the launcher checks): one offset vector for all four tensors instead
        # of four products, which kept a 64 x 64 fp16 tile from spilling on sm_80.
        q_chan = tl.max_contiguous(tl.multiple_of(e, VEC), VEC)
        k_chan = q_chan
        v_chan = q_chan
        o_chan = q_chan
    else:
        q_chan = e * sq_c
        k_chan = e * sk_c
        v_chan = e * sv_c
        o_chan = e * so_c

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < n_queries
    q_tok = tl.multiple_of((m // q_cols) * (ph * sq_h) + (m % q_cols) * (pw * sq_w), VEC)
    q = tl.load(q_seq + q_tok[:, None] + q_chan[None, :], mask=m_in[:, None] & d_in[None, :], other=0.0)

    # Online softmax in base 2; rows past the sequence end see zero queries and finite scores, so no
    # row is ever all -inf (the first key block always holds key 0) and nothing becomes NaN.
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_in = n < n_keys
        row = n // k_cols
        col = n % k_cols
        k_tok = tl.multiple_of(row * (ph * sk_h) + col * (pw * sk_w), VEC)
        v_tok = tl.multiple_of(row * (ph * sv_h) + col * (pw * sv_w), VEC)
        k = tl.load(k_seq + k_tok[:, None] + k_chan[None, :], mask=n_in[:, None] & d_in[None, :], other=0.0)
        v = tl.load(v_seq + v_tok[:, None] + v_chan[None, :], mask=n_in[:, None] & dv_in[None, :], other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_in[None, :], s, float("-inf"))  # keys past the end get zero weight
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        rescale = tl.exp2(row_max - new_max)  # 0 on the first step (row_max = -inf)
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        # p in the input dtype for the tensor-core dot (as flash-attention does); fp32 stays fp32.
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    o = acc / row_sum[:, None]
    # The output's base is formed here, not with the others: held across the key loop, it cost a
    # spilled register in the 64 x 64 fp16 tiles on sm_80.
    o_seq = tl.multiple_of(out_ptr + (b64 * so_b + head * so_n + py * so_h + px * so_w), VEC * ITEM_BYTES)
    o_tok = tl.multiple_of((m // q_cols) * (ph * so_h) + (m % q_cols) * (pw * so_w), VEC)
    tl.store(o_seq + o_tok[:, None] + o_chan[None, :], o.to(out_ptr.dtype.element_ty),
             mask=m_in[:, None] & dv_in[None, :])


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


def head_dim_pad(head_dim: int) -> int:
    """The register tile width for a head dim: the next power of two, at least 16."""
    return max(HEAD_DIM_PADS[0], triton.next_power_of_2(head_dim))


def _image_span(t: torch.Tensor) -> int:
    """One more than the largest element offset inside one image of a [B, ...] tensor."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def vector_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> int:
    """The widest of VECS that every offset and base pointer the kernel forms is a multiple of."""
    for vec in VECS:
        aligned = all(t.stride(-1) == 1 and t.data_ptr() % (vec * t.element_size()) == 0
                      and all(s % vec == 0 for s in t.stride()[:-1]) for t in (q, k, v, out))
        if vec == 1 or (aligned and q.shape[-1] % vec == 0 and v.shape[-1] % vec == 0):
            return vec


def _constexprs(dtype: torch.dtype, d_pad: int, vec: int, tile: Tile) -> dict:
    return dict(D_PAD=d_pad, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, VEC=vec,
                DOT_PRECISION=_dot_precision(dtype))


def launch_config(q: torch.Tensor, v: torch.Tensor, patch_size: Tuple[int, int], vec: int) -> LaunchConfig:
    """Constexprs, warps, stages and grid for queries ``q`` ([B, heads, Hq, Wq, d]), values ``v``
    ([B, heads, Hk, Wk, dv]) and vector width ``vec`` (see :func:`vector_width`). Only the shapes, the
    dtype and the patch size matter beyond ``vec``."""
    B, heads, Hq, Wq, d = q.shape
    ph, pw = patch_size
    n_queries = (Hq // ph) * (Wq // pw)
    d_pad = head_dim_pad(max(d, v.shape[-1]))
    tiles = _tiles(q.dtype, d_pad, vec)
    tile = tiles[-1] if n_queries <= SHORT_SEQUENCE else tiles[0]
    grid = (triton.cdiv(n_queries, tile.block_m) * heads * B * ph * pw,)
    return LaunchConfig(_constexprs(q.dtype, d_pad, vec, tile), tile.num_warps, NUM_STAGES, grid)


def all_kernel_configs() -> Tuple[KernelConfig, ...]:
    """Every (dtype, constexprs, num_warps, num_stages) that ``launch_config`` can return, for AOT
    checks. The kernel is never specialized by the JIT, so each is exactly one compiled kernel."""
    return tuple(KernelConfig(dtype, _constexprs(dtype, d_pad, vec, tile), tile.num_warps, NUM_STAGES)
                 for dtype in DTYPES for vec in VECS for d_pad in HEAD_DIM_PADS
                 for tile in _tiles(dtype, d_pad, vec))


def kernel_args(q, k, v, patch_size, scale, out) -> tuple:
    """The kernel's runtime arguments (all but the constexprs), in order; also used by the AOT test."""
    B, heads, Hq, Wq, d = q.shape
    Hk, Wk = k.shape[2:4]
    ph, pw = patch_size
    return (q, k, v, out, scale * _LOG2E, heads, d, v.shape[-1], ph, pw, Wq // pw, (Hq // ph) * (Wq // pw),
            Wk // pw, (Hk // ph) * (Wk // pw), *q.stride(), *k.stride(), *v.stride(), *out.stride())


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when the kernel can serve these [B, heads, H, W, d] views (given valid op inputs), else why not."""
    if q.dtype not in DTYPES:
        return f"{q.dtype} is not supported by the Triton kernel (supported: float32, float16, bfloat16)"
    for name, t in (("head_dim", q), ("value head_dim", v)):
        if t.shape[-1] > MAX_HEAD_DIM:
            return f"{name} {t.shape[-1]} is not supported by the Triton kernel (at most {MAX_HEAD_DIM})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _image_span(t) > _MAX_IMAGE_SPAN:
            return f"one image of {name} spans {_image_span(t)} elements, over the kernel's 32-bit offsets"
    return None


def _check(q, k, v, patch_size, scale, out):
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.dim() != 5 or t.dtype != q.dtype or t.dtype not in DTYPES:
            raise TypeError(f"{name}: got {t.dim()}-d {t.dtype}, expected [B, heads, H, W, d] of one of {DTYPES}")
    B, heads, Hq, Wq, d = q.shape
    if tuple(k.shape[:2]) != (B, heads) or k.shape[4] != d or tuple(v.shape[:4]) != tuple(k.shape[:4]):
        raise ValueError(f"k, v: got {tuple(k.shape)}, {tuple(v.shape)} for q {tuple(q.shape)}, expected "
                         f"[{B}, {heads}, Hk, Wk, {d}] and [{B}, {heads}, Hk, Wk, dv]")
    reason = unsupported(q, k, v) or (
        _image_span(out) > _MAX_IMAGE_SPAN and "one image of out spans more than 2^31 - 1 elements")
    if reason:
        raise ValueError(reason)
    ph, pw = patch_size
    Hk, Wk = k.shape[2:4]
    if ph < 1 or pw < 1 or Hq % ph or Wq % pw or Hk % ph or Wk % pw:
        raise ValueError(f"patch_size: got {tuple(patch_size)}, expected positive divisors of q's and k's "
                         f"H x W ({Hq}x{Wq}, {Hk}x{Wk})")
    if Hq * Wq and not Hk * Wk:
        raise ValueError(f"k: {Hq * Wq} queries need at least one key, got k {tuple(k.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: got {scale}, expected a finite number")
    expected = (B, heads, Hq, Wq, v.shape[-1])
    if tuple(out.shape) != expected:
        raise ValueError(f"out: got {tuple(out.shape)}, expected {expected}")


def patch_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patch_size: Tuple[int, int],
                           scale: float, out: torch.Tensor) -> None:
    """Patch-grouped multi-head attention forward on separate views; writes every element of ``out``.

    ``q`` [B, heads, Hq, Wq, d], ``k`` [B, heads, Hk, Wk, d], ``v`` [B, heads, Hk, Wk, dv] (fp32/fp16/bf16,
    any strides, d and dv <= 128) and ``out`` [B, heads, Hq, Wq, dv] (same dtype, any non-overlapping
    strides); the H and W of q and k multiples of the patch. MobileViT's image-ordered qkv is three views
    of one tensor; cross attention is ``[B, heads, 1, N, d]`` views with a 1 x 1 patch. Scores, softmax and
    accumulation in fp32. Equivalent PyTorch, with P = ph * pw::

        def seqs(t):  # [B, heads, H, W, c] -> [B * P, heads, (H // ph) * (W // pw), c]
            B, n, H, W, c = t.shape
            t = t.reshape(B, n, H // ph, ph, W // pw, pw, c).permute(0, 3, 5, 1, 2, 4, 6)
            return t.reshape(B * P, n, -1, c)
        o = torch.softmax(scale * seqs(q) @ seqs(k).transpose(-1, -2), -1) @ seqs(v)
        o = o.reshape(B, ph, pw, heads, Hq // ph, Wq // pw, dv).permute(0, 3, 4, 1, 5, 2, 6)
        out.copy_(o.reshape(B, heads, Hq, Wq, dv))
    """
    _check(q, k, v, patch_size, scale, out)
    if out.numel() == 0:
        return
    cfg = launch_config(q, v, patch_size, vector_width(q, k, v, out))
    # Triton launches on the current device: make it q's (a model on cuda:1 with cuda:0 current).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _patch_attention_fwd_kernel[cfg.grid](*kernel_args(q, k, v, patch_size, scale, out),
                                              **cfg.constexprs, num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)
