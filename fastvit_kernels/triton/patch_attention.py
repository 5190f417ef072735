"""Triton forward kernel for patch-grouped multi-head attention (MobileViT), and its launcher.

Token (y, x) of an image attends to the tokens at the same offset (y % PH, x % PW) inside their
patch: one sequence per (image, offset), whose tokens are the patch positions (y // PH, x // PW) in
row-major order. timm gathers those sequences with an unfold copy and scatters the result back with a
fold copy; here the grouping is address arithmetic on the image-ordered ``[B, H, W, 3*C]`` qkv, so
neither copy exists. A ``1 x 1`` patch is plain multi-head attention over all ``H * W`` tokens.

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
        return (Tile(32, 32 if d_pad <= 32 else 16, 4),)
    if vec == 1:
        return ({16: Tile(64, 64, 4), 32: Tile(64, 64, 4), 64: Tile(64, 32, 4), 128: Tile(32, 16, 4)}[d_pad],)
    return (Tile(64, 64 if d_pad <= 64 else 32, 4), Tile(16, 16, 1 if d_pad <= 64 else 2))


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
_RUNTIME_INTS = ["n_heads", "head_dim", "ph", "pw", "n_cols", "n_tokens",
                 "sq_b", "sq_h", "sq_w", "sq_c", "so_b", "so_h", "so_w", "so_c"]


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=["qkv_ptr", "out_ptr"])
def _patch_attention_fwd_kernel(
    qkv_ptr,  # qkv [B, H, W, 3*C], fp32/fp16/bf16; last dim (3, heads, head_dim); element strides sq_*
    out_ptr,  # out [B, H, W, C], same dtype; last dim (heads, head_dim); element strides so_*
    qk_scale,  # fp32: the softmax scale times log2(e), so the exponentials are exp2
    n_heads, head_dim,  # heads, and channels per head (C = n_heads * head_dim)
    ph, pw,  # patch height and width; one sequence per offset inside the patch
    n_cols,  # patches per image row, W // pw
    n_tokens,  # tokens per sequence, (H // ph) * (W // pw)
    sq_b, sq_h, sq_w, sq_c,  # qkv strides in elements: image, row, column, channel
    so_b, so_h, so_w, so_c,  # out strides in elements: image, row, column, channel
    D_PAD: tl.constexpr,  # head_dim rounded up to a power of two >= 16 (register tile width)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner-loop step
    VEC: tl.constexpr,  # channels per vector load; > 1 promises unit channel strides and that both
    #                     pointers, head_dim and all other strides are multiples of VEC (launcher checks)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 (see _dot_precision)
):
    n_mblocks = tl.cdiv(n_tokens, BLOCK_M)
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

    # Token m of the sequence is patch (m // n_cols, m % n_cols), image pixel
    # (i * ph + py, j * pw + px). The image's base pointer takes the 64-bit product (b * sq_b passes
    # 2^31 in big batches); offsets inside one image are 32-bit (the launcher checks they fit), which
    # halves the registers of the [tokens, channels] offset tiles.
    ITEM_BYTES: tl.constexpr = qkv_ptr.dtype.element_ty.primitive_bitwidth // 8
    qkv_img = tl.multiple_of(qkv_ptr + (b.to(tl.int64) * sq_b + py * sq_h + px * sq_w), VEC * ITEM_BYTES)
    out_img = tl.multiple_of(out_ptr + (b.to(tl.int64) * so_b + py * so_h + px * so_w), VEC * ITEM_BYTES)
    k_to_v = tl.multiple_of(n_heads * head_dim * sq_c, VEC)  # k starts C channels after q, v after k

    # Channels of this head: runs of VEC contiguous, VEC-aligned offsets, so each thread loads VEC
    # channels with one instruction. The head-dim mask is constant over each run (head_dim is a
    # multiple of VEC), which the compiler cannot see by itself.
    d = tl.arange(0, D_PAD)
    d_in = tl.max_constancy(d < head_dim, VEC)  # padding columns: zeros in q, k, v, never stored
    q_chan = tl.max_contiguous(tl.multiple_of((head * head_dim + d) * sq_c, VEC), VEC)
    o_chan = tl.max_contiguous(tl.multiple_of((head * head_dim + d) * so_c, VEC), VEC)

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < n_tokens
    q_tok = tl.multiple_of((m // n_cols) * (ph * sq_h) + (m % n_cols) * (pw * sq_w), VEC)
    q = tl.load(qkv_img + q_tok[:, None] + q_chan[None, :], mask=m_in[:, None] & d_in[None, :], other=0.0)
    k_img = qkv_img + k_to_v

    # Online softmax in base 2; rows past the sequence end see zero queries and finite scores, so no
    # row is ever all -inf (the first key block always holds key 0) and nothing becomes NaN.
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for start in range(0, n_tokens, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_in = n < n_tokens
        kv_tok = tl.multiple_of((n // n_cols) * (ph * sq_h) + (n % n_cols) * (pw * sq_w), VEC)
        kv_mask = n_in[:, None] & d_in[None, :]
        k_ptrs = k_img + kv_tok[:, None] + q_chan[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(k_ptrs + k_to_v, mask=kv_mask, other=0.0)

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
    o_tok = tl.multiple_of((m // n_cols) * (ph * so_h) + (m % n_cols) * (pw * so_w), VEC)
    tl.store(out_img + o_tok[:, None] + o_chan[None, :], o.to(out_ptr.dtype.element_ty),
             mask=m_in[:, None] & d_in[None, :])


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
    """One more than the largest element offset inside one image of a [B, H, W, X] tensor."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def vector_width(qkv: torch.Tensor, num_heads: int, out: torch.Tensor) -> int:
    """The widest of VECS that every offset and base pointer the kernel forms is a multiple of."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    for vec in VECS:
        aligned = all(t.stride(-1) == 1 and t.data_ptr() % (vec * t.element_size()) == 0
                      and all(s % vec == 0 for s in t.stride()[:-1]) for t in (qkv, out))
        if vec == 1 or (aligned and head_dim % vec == 0):
            return vec


def _constexprs(dtype: torch.dtype, d_pad: int, vec: int, tile: Tile) -> dict:
    return dict(D_PAD=d_pad, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, VEC=vec,
                DOT_PRECISION=_dot_precision(dtype))


def launch_config(qkv: torch.Tensor, num_heads: int, patch_size: Tuple[int, int], vec: int) -> LaunchConfig:
    """Constexprs, warps, stages and grid for ``qkv`` ([B, H, W, 3*C]) and vector width ``vec``
    (see :func:`vector_width`). Only ``qkv``'s shape and dtype, the head count and the patch size
    matter beyond ``vec``."""
    B, H, W, C3 = qkv.shape
    ph, pw = patch_size
    n_tokens = (H // ph) * (W // pw)
    d_pad = head_dim_pad(C3 // (3 * num_heads))
    tiles = _tiles(qkv.dtype, d_pad, vec)
    tile = tiles[-1] if n_tokens <= SHORT_SEQUENCE else tiles[0]
    grid = (triton.cdiv(n_tokens, tile.block_m) * num_heads * B * ph * pw,)
    return LaunchConfig(_constexprs(qkv.dtype, d_pad, vec, tile), tile.num_warps, NUM_STAGES, grid)


def all_kernel_configs() -> Tuple[KernelConfig, ...]:
    """Every (dtype, constexprs, num_warps, num_stages) that ``launch_config`` can return, for AOT
    checks. The kernel is never specialized by the JIT, so each is exactly one compiled kernel."""
    return tuple(KernelConfig(dtype, _constexprs(dtype, d_pad, vec, tile), tile.num_warps, NUM_STAGES)
                 for dtype in DTYPES for vec in VECS for d_pad in HEAD_DIM_PADS
                 for tile in _tiles(dtype, d_pad, vec))


def kernel_args(qkv, num_heads, patch_size, scale, out) -> tuple:
    """The kernel's runtime arguments (all but the constexprs), in order; also used by the AOT test."""
    B, H, W, C3 = qkv.shape
    ph, pw = patch_size
    return (qkv, out, scale * _LOG2E, num_heads, C3 // (3 * num_heads), ph, pw, W // pw,
            (H // ph) * (W // pw), *qkv.stride(), *out.stride())


def unsupported(qkv: torch.Tensor, num_heads: int) -> Optional[str]:
    """None when the kernel can serve this qkv (given valid op inputs), else why not."""
    if qkv.dtype not in DTYPES:
        return f"{qkv.dtype} is not supported by the Triton kernel (supported: float32, float16, bfloat16)"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not supported by the Triton kernel (at most {MAX_HEAD_DIM})"
    if _image_span(qkv) > _MAX_IMAGE_SPAN:
        return f"one image of qkv spans {_image_span(qkv)} elements, over the kernel's 32-bit offsets"
    return None


def _check(qkv, num_heads, patch_size, scale, out):
    if qkv.dim() != 4 or qkv.dtype not in DTYPES:
        raise TypeError(f"qkv: got {qkv.dim()}-d {qkv.dtype}, expected [B, H, W, 3*C] of {DTYPES}")
    B, H, W, C3 = qkv.shape
    if num_heads < 1 or C3 % (3 * num_heads) or C3 == 0:
        raise ValueError(f"num_heads: got {num_heads} for a last dim of {C3}, expected a divisor of {C3} / 3")
    reason = unsupported(qkv, num_heads) or (
        _image_span(out) > _MAX_IMAGE_SPAN and "one image of out spans more than 2^31 - 1 elements")
    if reason:
        raise ValueError(f"qkv: {reason}")
    ph, pw = patch_size
    if ph < 1 or pw < 1 or H % ph or W % pw:
        raise ValueError(f"patch_size: got {tuple(patch_size)}, expected positive divisors of H={H}, W={W}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: got {scale}, expected a finite number")
    expected = (B, H, W, C3 // 3)
    if tuple(out.shape) != expected or out.dtype != qkv.dtype:
        raise ValueError(f"out: got {tuple(out.shape)} {out.dtype}, expected {expected} {qkv.dtype}")


def patch_attention_triton(qkv: torch.Tensor, num_heads: int, patch_size: Tuple[int, int], scale: float,
                           out: torch.Tensor) -> None:
    """Patch-grouped multi-head attention forward; writes every element of ``out``.

    ``qkv`` [B, H, W, 3*C] (fp32/fp16/bf16, any strides; last dim (3, heads, head_dim), head_dim <= 128)
    and ``out`` [B, H, W, C] (same dtype, any non-overlapping strides); H and W multiples of the patch.
    Scores, softmax and accumulation in fp32. Equivalent PyTorch, with P = ph * pw, N = H*W / P::

        t = qkv.unflatten(1, (H // ph, ph)).unflatten(3, (W // pw, pw))   # [B, nh, ph, nw, pw, 3C]
        t = t.permute(0, 2, 4, 1, 3, 5).reshape(B * P, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = t.float()                                               # [B*P, heads, N, d]
        o = torch.softmax(scale * q @ k.transpose(-1, -2), -1) @ v
        o = o.transpose(1, 2).reshape(B, ph, pw, H // ph, W // pw, C).permute(0, 3, 1, 4, 2, 5)
        out.copy_(o.reshape(B, H, W, C))
    """
    _check(qkv, num_heads, patch_size, scale, out)
    if out.numel() == 0:
        return
    cfg = launch_config(qkv, num_heads, patch_size, vector_width(qkv, num_heads, out))
    # Triton launches on the current device: make it qkv's (a model on cuda:1 with cuda:0 current).
    with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():
        _patch_attention_fwd_kernel[cfg.grid](*kernel_args(qkv, num_heads, patch_size, scale, out),
                                              **cfg.constexprs, num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)
