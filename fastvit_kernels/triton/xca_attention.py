"""Triton kernel for cross-covariance attention (XCiT / EdgeNeXt), and its launcher.

Per (image, head) with q, k, v the head's ``[N, d]`` slices of qkv ``[B, N, 3*C]``:

    G = q^T k (d x d),  nq = sum_n q^2,  nk = sum_n k^2                   (pass 1 over the tokens)
    A = softmax(t * G / (max(sqrt(nq), eps) x max(sqrt(nk), eps)), rows)  (d x d, in registers)
    out = v A^T                                                            (pass 2 over the tokens)

One kernel, three modes (``STATS`` / ``APPLY`` flags):

* fused (both): one program per (image, head) runs pass 1 over all tokens, the softmax, and pass 2.
  q, k, v are read once and out written once; used when ``B * heads`` fills the GPU.
* stats (``STATS`` only) + apply (``APPLY`` only): when ``B * heads`` is small (XCiT or EdgeNeXt at
  batch 1-8), the tokens are split into ``n_splits`` ranges. A stats program writes its range's
  partial ``G, nq, nk`` to an fp32 workspace; an apply program sums its head's partials (a fixed
  order: deterministic), builds ``A`` and runs pass 2 over its range. The launcher bounds the split
  count so that the partials each apply program re-reads cost no more bytes than its own tokens.
  fp32 heads wider than 64 channels always take this path (their fused kernel spilled registers).

Head dims are padded to a power of two (>= 16, ``tl.dot``'s minimum) in registers with masked loads,
never in memory; the workspace (internal scratch) holds padded ``D_PAD x D_PAD`` tiles, whose padding
entries are zeros.
"""
import contextlib
import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
# Head dims are padded to one of these in registers (masked loads). 16 is tl.dot's minimum.
HEAD_DIM_PADS = (16, 32, 64, 128)
# Channels per vector load: 4 when the layout allows it (XCiT's 32/48/64 and EdgeNeXt's 12/20/24
# head dims), else 1, as in patch_attention.
VECS = (4, 1)
# (STATS, APPLY): fused, stats-only, apply-only.
MODES = ((True, True), (True, False), (False, True))
NUM_STAGES = 2
# Programs wanted per SM before tokens are split, and the most splits of one head.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64
# SMs assumed when the device has none to ask (the interpreter): an H100's, so CPU tests take the
# split path for small B * heads as a GPU would.
DEFAULT_SMS = 132
# Offsets inside one image are 32-bit in the kernel.
_MAX_IMAGE_SPAN = 2 ** 31 - 1


class Tile(NamedTuple):
    """Tokens per inner-loop step, warps, and whether the fused (one-launch) mode fits."""

    block_n: int
    num_warps: int
    fused: bool = True


def _tile(dtype: torch.dtype, d_pad: int) -> Tile:
    """The token block and warps for one (dtype, padded head dim): the widest of those tried that
    compiles without spilling on sm_80 and sm_90 (tests/test_triton_aot.py prints the table).

    The d x d fp32 accumulator is the big register tile (D_PAD^2 over the program's threads), so
    wide heads get more warps. fp32 dots are FMA dots ("ieee"), whose operands also live in
    registers: narrower token blocks, 8 warps from D_PAD 64 on, and for D_PAD 128 no fused mode
    (stats + apply launches even with one token range: the fused kernel holds G and A at once and
    spilled).
    """
    if dtype == torch.float32:
        if d_pad <= 32:
            return Tile(64, 4)
        return Tile(16, 8, fused=d_pad <= 64)
    return Tile(64, 4) if d_pad <= 64 else Tile(32, 8)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32: exact FMA dots ("ieee"), not TF32's 10-bit mantissas (an error eager fp32 does not make);
    # the flag only affects fp32 operands.
    return "ieee" if dtype == torch.float32 else "tf32"


# Nothing is specialized by the JIT: VEC states what the launcher knows (one compiled kernel per
# constexpr set, all of which the AOT test compiles), as in patch_attention.
_RUNTIME_INTS = ["n_heads", "head_dim", "n_tokens", "split_tokens", "n_splits",
                 "sq_b", "sq_n", "sq_c", "so_b", "so_n", "so_c"]


@triton.jit
def _load_tile(img_ptr, n, n_end, s_n, chan, c_in, VEC: tl.constexpr):
    """[BLOCK_N, D_PAD] tile of one head's channels (offsets chan) of tokens n (token stride s_n, a
    multiple of VEC); zeros past n_end or head_dim."""
    tok = tl.multiple_of(n * s_n, VEC)
    return tl.load(img_ptr + tok[:, None] + chan[None, :], mask=(n < n_end)[:, None] & c_in[None, :], other=0.0)


@triton.jit(do_not_specialize=_RUNTIME_INTS,
            do_not_specialize_on_alignment=["qkv_ptr", "out_ptr", "temp_ptr", "ws_ptr"])
def _xca_attention_kernel(
    qkv_ptr,  # qkv [B, N, 3*C], fp32/fp16/bf16; last dim (3, heads, head_dim); element strides sq_*
    out_ptr,  # out [B, N, C], same dtype; last dim (heads, head_dim); element strides so_*
    temp_ptr,  # temperature [heads], fp32, contiguous
    ws_ptr,  # fp32 workspace [B*heads, n_splits, D_PAD*D_PAD + 2*D_PAD]: per token range, the partial
    #          G (row-major), nq, nk. Written by STATS-only, read by APPLY-only programs; unused when
    #          fused (any fp32 pointer)
    eps,  # fp32: the floor of the L2 norms (F.normalize's eps)
    n_heads, head_dim,  # heads, and channels per head (C = n_heads * head_dim)
    n_tokens,  # N
    split_tokens,  # tokens per split (a multiple of BLOCK_N; N when fused)
    n_splits,  # token ranges per head (grid axis 1; 1 when fused)
    sq_b, sq_n, sq_c,  # qkv strides in elements: image, token, channel
    so_b, so_n, so_c,  # out strides in elements: image, token, channel
    D_PAD: tl.constexpr,  # head_dim rounded up to a power of two >= 16 (register tile width)
    BLOCK_N: tl.constexpr,  # tokens per inner-loop step
    VEC: tl.constexpr,  # channels per vector load; > 1 promises unit channel strides and that both
    #                     pointers, head_dim and all other strides are multiples of VEC (launcher checks)
    STATS: tl.constexpr,  # pass 1 over this program's tokens (else: sum the head's partials from ws)
    APPLY: tl.constexpr,  # softmax and pass 2 over this program's tokens (else: store partials to ws)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 (see _dot_precision)
):
    # Splits of one head are neighbours on axis 1; heads vary along axis 0.
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_heads
    head = bh % n_heads

    # The image's base pointer takes the 64-bit product (b * sq_b passes 2^31 in big batches);
    # offsets inside one image are 32-bit (the launcher checks they fit).
    ITEM_BYTES: tl.constexpr = qkv_ptr.dtype.element_ty.primitive_bitwidth // 8
    qkv_img = tl.multiple_of(qkv_ptr + b.to(tl.int64) * sq_b, VEC * ITEM_BYTES)
    out_img = tl.multiple_of(out_ptr + b.to(tl.int64) * so_b, VEC * ITEM_BYTES)
    to_k = tl.multiple_of(n_heads * head_dim * sq_c, VEC)  # k starts C channels after q, v after k
    # Channels of this head: runs of VEC contiguous, VEC-aligned offsets (one vector load each); the
    # head-dim mask is constant over each run (head_dim is a multiple of VEC).
    c = tl.arange(0, D_PAD)
    c_in = tl.max_constancy(c < head_dim, VEC)
    q_chan = tl.max_contiguous(tl.multiple_of((head * head_dim + c) * sq_c, VEC), VEC)
    o_chan = tl.max_contiguous(tl.multiple_of((head * head_dim + c) * so_c, VEC), VEC)
    t_begin = split * split_tokens
    t_end = tl.minimum(n_tokens, t_begin + split_tokens)

    WS_SIZE: tl.constexpr = D_PAD * D_PAD + 2 * D_PAD
    g_offs = c[:, None] * D_PAD + c[None, :]
    if STATS:
        # Pass 1: G += q^T k on the tensor cores (fp32 accumulator), squared norms alongside.
        gram = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
        nq = tl.zeros((D_PAD,), dtype=tl.float32)
        nk = tl.zeros((D_PAD,), dtype=tl.float32)
        for start in range(t_begin, t_end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            q = _load_tile(qkv_img, n, t_end, sq_n, q_chan, c_in, VEC)
            k = _load_tile(qkv_img + to_k, n, t_end, sq_n, q_chan, c_in, VEC)
            gram = tl.dot(tl.trans(q), k, gram, input_precision=DOT_PRECISION)
            qf = q.to(tl.float32)
            kf = k.to(tl.float32)
            nq += tl.sum(qf * qf, axis=0)
            nk += tl.sum(kf * kf, axis=0)
    else:
        # The head's partials, summed in split order (deterministic).
        ws = ws_ptr + (bh * n_splits).to(tl.int64) * WS_SIZE
        gram = tl.load(ws + g_offs)
        nq = tl.load(ws + D_PAD * D_PAD + c)
        nk = tl.load(ws + D_PAD * D_PAD + D_PAD + c)
        for r in range(1, n_splits):
            gram += tl.load(ws + r * WS_SIZE + g_offs)
            nq += tl.load(ws + r * WS_SIZE + D_PAD * D_PAD + c)
            nk += tl.load(ws + r * WS_SIZE + D_PAD * D_PAD + D_PAD + c)

    if APPLY:
        # A = softmax over j of t * G[i, j] / (max(|q_i|, eps) * max(|k_j|, eps)); padding columns
        # get -inf (zero weight); padding rows are computed and never stored.
        t = tl.load(temp_ptr + head)
        row_scale = tl.div_rn(t, tl.maximum(tl.sqrt_rn(nq), eps))
        col_scale = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(nk), eps))
        s = gram * row_scale[:, None] * col_scale[None, :]
        s = tl.where(c_in[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        attn = p / tl.sum(p, axis=1)[:, None]
        # Pass 2: out = v A^T; A in the input dtype for the tensor-core dot (as flash-attention does
        # with its probabilities), fp32 stays fp32.
        attn_t = tl.trans(attn).to(qkv_ptr.dtype.element_ty)
        for start in range(t_begin, t_end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            v = _load_tile(qkv_img + 2 * to_k, n, t_end, sq_n, q_chan, c_in, VEC)
            o = tl.dot(v, attn_t, input_precision=DOT_PRECISION)
            o_tok = tl.multiple_of(n * so_n, VEC)
            tl.store(out_img + o_tok[:, None] + o_chan[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=(n < t_end)[:, None] & c_in[None, :])
    else:
        ws = ws_ptr + (bh * n_splits + split).to(tl.int64) * WS_SIZE
        tl.store(ws + g_offs, gram)
        tl.store(ws + D_PAD * D_PAD + c, nq)
        tl.store(ws + D_PAD * D_PAD + D_PAD + c, nk)


class LaunchConfig(NamedTuple):
    """How one call launches the kernel: constexprs per launch (one, or stats then apply), warps,
    stages, the grid and the token split."""

    constexprs: Tuple[dict, ...]
    num_warps: int
    num_stages: int
    grid: Tuple[int, int]
    split_tokens: int


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
    """One more than the largest element offset inside one image of a [B, N, X] tensor."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def vector_width(qkv: torch.Tensor, num_heads: int, out: torch.Tensor) -> int:
    """The widest of VECS that every offset and base pointer the kernel forms is a multiple of."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    for vec in VECS:
        aligned = all(t.stride(-1) == 1 and t.data_ptr() % (vec * t.element_size()) == 0
                      and all(s % vec == 0 for s in t.stride()[:-1]) for t in (qkv, out))
        if vec == 1 or (aligned and head_dim % vec == 0):
            return vec


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of ``device``; DEFAULT_SMS for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_splits(programs: int, n_tokens: int, head_dim: int, itemsize: int, n_sms: int, block_n: int) -> int:
    """Token ranges per head: enough for PROGRAMS_PER_SM programs per SM when ``programs``
    (B * heads) alone is fewer, at least one token block each, and few enough that the partials an
    apply program re-reads (splits * D_PAD^2 * 4 bytes) are at most the bytes it streams itself
    (about 4 * head_dim * itemsize per token of its range): splits^2 <= N d itemsize / D_PAD^2."""
    if programs >= n_sms:
        return 1
    d_pad = head_dim_pad(head_dim)
    want = triton.cdiv(PROGRAMS_PER_SM * n_sms, programs)
    by_blocks = triton.cdiv(n_tokens, block_n)
    by_reread = math.isqrt(n_tokens * head_dim * itemsize // (d_pad * d_pad))
    return max(1, min(want, by_blocks, by_reread, MAX_SPLITS))


def _constexprs(dtype: torch.dtype, d_pad: int, vec: int, mode: Tuple[bool, bool]) -> dict:
    return dict(D_PAD=d_pad, BLOCK_N=_tile(dtype, d_pad).block_n, VEC=vec, STATS=mode[0], APPLY=mode[1],
                DOT_PRECISION=_dot_precision(dtype))


def launch_config(qkv: torch.Tensor, num_heads: int, vec: int, n_sms: int = DEFAULT_SMS,
                  splits: Optional[int] = None) -> LaunchConfig:
    """Constexprs, warps, stages, grid and split for ``qkv`` ([B, N, 3*C]) and vector width ``vec``
    (see :func:`vector_width`) on a device of ``n_sms`` SMs; ``splits`` overrides :func:`num_splits`."""
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    d_pad = head_dim_pad(head_dim)
    tile = _tile(qkv.dtype, d_pad)
    if splits is None:
        splits = num_splits(B * num_heads, N, head_dim, qkv.element_size(), n_sms, tile.block_n)
    # Whole token blocks per split; the split count follows (the last range may be shorter).
    split_tokens = triton.cdiv(triton.cdiv(max(N, 1), max(1, splits)), tile.block_n) * tile.block_n
    splits = triton.cdiv(max(N, 1), split_tokens)
    modes = (MODES[0],) if splits == 1 and tile.fused else MODES[1:]
    return LaunchConfig(tuple(_constexprs(qkv.dtype, d_pad, vec, m) for m in modes), tile.num_warps,
                        NUM_STAGES, (B * num_heads, splits), split_tokens)


def all_kernel_configs() -> Tuple[KernelConfig, ...]:
    """Every (dtype, constexprs, num_warps, num_stages) that ``launch_config`` can return, for AOT
    checks. The kernel is never specialized by the JIT, so each is exactly one compiled kernel."""
    return tuple(KernelConfig(dtype, _constexprs(dtype, d_pad, vec, mode), _tile(dtype, d_pad).num_warps,
                              NUM_STAGES)
                 for dtype in DTYPES for vec in VECS for d_pad in HEAD_DIM_PADS for mode in MODES
                 if mode[0] != mode[1] or _tile(dtype, d_pad).fused)


def kernel_args(qkv, num_heads, temperature, eps, out, ws, split_tokens, n_splits) -> tuple:
    """The kernel's runtime arguments (all but the constexprs), in order; also used by the AOT test."""
    B, N, C3 = qkv.shape
    return (qkv, out, temperature, ws, eps, num_heads, C3 // (3 * num_heads), N, split_tokens, n_splits,
            *qkv.stride(), *out.stride())


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


def _check(qkv, num_heads, temperature, eps, out):
    if qkv.dim() != 3 or qkv.dtype not in DTYPES:
        raise TypeError(f"qkv: got {qkv.dim()}-d {qkv.dtype}, expected [B, N, 3*C] of {DTYPES}")
    B, N, C3 = qkv.shape
    if num_heads < 1 or C3 % (3 * num_heads) or C3 == 0:
        raise ValueError(f"num_heads: got {num_heads} for a last dim of {C3}, expected a divisor of {C3} / 3")
    reason = unsupported(qkv, num_heads) or (
        _image_span(out) > _MAX_IMAGE_SPAN and "one image of out spans more than 2^31 - 1 elements")
    if reason:
        raise ValueError(f"qkv: {reason}")
    if temperature.shape != (num_heads,) or temperature.dtype != torch.float32 or not temperature.is_contiguous():
        raise ValueError(f"temperature: got {tuple(temperature.shape)} {temperature.dtype}, expected a "
                         f"contiguous ({num_heads},) float32 tensor")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: got {eps}, expected a finite number >= 0")
    expected = (B, N, C3 // 3)
    if tuple(out.shape) != expected or out.dtype != qkv.dtype:
        raise ValueError(f"out: got {tuple(out.shape)} {out.dtype}, expected {expected} {qkv.dtype}")


def xca_attention_triton(qkv: torch.Tensor, num_heads: int, temperature: torch.Tensor, eps: float,
                         out: torch.Tensor, splits: Optional[int] = None) -> None:
    """Cross-covariance attention forward; writes every element of ``out``.

    ``qkv`` [B, N, 3*C] (fp32/fp16/bf16, any strides; last dim (3, heads, head_dim), head_dim <= 128),
    ``temperature`` contiguous fp32 [heads], ``out`` [B, N, C] (same dtype, any non-overlapping
    strides). ``splits`` forces the number of token ranges per head (tests). Equivalent PyTorch::

        q, k, v = qkv.float().reshape(B, N, 3, heads, d).permute(2, 0, 3, 4, 1)   # [B, heads, d, N]
        attn = F.normalize(q, dim=-1, eps=eps) @ F.normalize(k, dim=-1, eps=eps).transpose(-2, -1)
        attn = (attn * temperature.reshape(heads, 1, 1)).softmax(-1)
        out.copy_((attn @ v).permute(0, 3, 1, 2).reshape(B, N, C))
    """
    _check(qkv, num_heads, temperature, eps, out)
    if out.numel() == 0:
        return
    cfg = launch_config(qkv, num_heads, vector_width(qkv, num_heads, out), sm_count(qkv.device), splits)
    B, N, C3 = qkv.shape
    n_splits = cfg.grid[1]
    if len(cfg.constexprs) == 1:
        ws = temperature  # unused by the fused kernel: any fp32 pointer
    else:
        d_pad = cfg.constexprs[0]["D_PAD"]
        ws = torch.empty(B * num_heads * n_splits * (d_pad * d_pad + 2 * d_pad), dtype=torch.float32,
                         device=qkv.device)
    args = kernel_args(qkv, num_heads, temperature, eps, out, ws, cfg.split_tokens, n_splits)
    # Triton launches on the current device: make it qkv's (a model on cuda:1 with cuda:0 current).
    with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():
        for constexprs in cfg.constexprs:
            _xca_attention_kernel[cfg.grid](*args, **constexprs, num_warps=cfg.num_warps,
                                            num_stages=cfg.num_stages)
