"""Triton kernel for depthwise conv + (folded) BatchNorm + activation, and its launchers.

BatchNorm is folded into ``weight`` and ``bias`` by the caller (``ops/dwconv_bn_act.py``), so the kernel
sees a depthwise K x K convolution with a per-channel bias and an activation epilogue. One pass: every
program reads its input tile (plus halo) and writes its output tile once; nothing goes through memory
in between.

The same kernel with ``LAYERNORM=True`` is ``dwconv_layernorm`` (EdgeNeXt's ConvBlock,
``ops/dwconv_layernorm.py``): the epilogue is a LayerNorm over the channels of each output pixel
instead of the activation. A program then holds all channels of its pixels (``BLOCK_C >= C``, one
channel block), in the channels_last tile orientation whatever x's layout: the LayerNorm reduces along
the tile's channel axis, and the op's output is channels_last, so that orientation also stores whole
pixels contiguously.
"""
import contextlib
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

ACT_NONE, ACT_SILU, ACT_RELU = 0, 1, 2
ACTIVATIONS = (ACT_NONE, ACT_SILU, ACT_RELU)
KERNEL_SIZES = (1, 3, 5, 7, 9)
STRIDES = (1, 2)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

NUM_WARPS = 4
# 4 elements per thread per tap load (in channels_last one 16-byte fp32 or 8-byte fp16 vector), so
# 512-element tiles. With 8 per thread ptxas spilled (8-16 B) in 16-bit variants on sm_80; at 4 the
# AOT check shows at most 96 registers, which leaves room for 5+ resident programs per SM. A
# memory-bound kernel gets its bytes in flight from many resident programs, not from wide ones.
_ELEMS_PER_THREAD = 4
# 128 bytes = one L1 line = four 32-byte sectors: the widest channels_last channel block has rows of
# exactly that, so each warp load of a pixel row is one full line.
_ROW_BYTES = 128
# Candidate tile shapes. channels_last: channel-block widths (pixels fill the rest of the tile).
# NCHW: pixel-block lengths (channels fill the rest). The small ones serve narrow layers (few
# channels in channels_last, 7x7 or 14x14 maps in NCHW) where a wide block computes mostly
# masked-off lanes. Each one is a compiled variant per dtype and kernel size, checked by the AOT test.
_CL_BLOCK_C = (64, 32, 16)
_NCHW_BLOCK_P = (256, 64)
# The widest candidate is used once at least this share of its lanes does useful work.
_MIN_LANE_USE = 0.8
# LAYERNORM: channel blocks (C rounded up to a power of two), pixels filling the usual tile of
# NUM_WARPS * 32 * _LN_ELEMS_PER_THREAD elements (at least one pixel: 1024 channels are 8 per thread).
# EdgeNeXt's widths are 24..584; wider layers go to the CUDA kernel.
# Two elements per thread, half the plain tile: at four, ptxas kept 2 registers (8 B of stack) across
# the tap loop in 2 of the 420 variants (the LayerNorm's row statistics live beside the accumulators).
_LN_ELEMS_PER_THREAD = 2
_LN_BLOCK_C = (16, 32, 64, 128, 256, 512, 1024)
LAYERNORM_MAX_CHANNELS = _LN_BLOCK_C[-1]


@triton.jit
def _layernorm_over_channels(z, chan, chan_in, nw_ptr, nb_ptr, C, eps):
    """LayerNorm of each pixel (row) of a [BLOCK_P, BLOCK_C] tile that holds all C channels.

    Channels >= C hold exactly 0 (masked loads, zero bias): they add nothing to the sums, and are
    masked out of the deviations. Two passes, mean then squared deviations, in fp32. tl.rsqrt
    (approximate, ~2 ulp: far inside the tolerance) rather than a division by an IEEE sqrt, whose
    slow path is a subroutine call; the C++ kernels use the IEEE form (csrc/dwconv_layernorm.h).
    """
    mean = tl.sum(z, axis=1) / C
    dev = tl.where(chan_in[None, :], z - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(dev * dev, axis=1) / C + eps)
    w = tl.load(nw_ptr + chan, mask=chan_in, other=0.0)
    b = tl.load(nb_ptr + chan, mask=chan_in, other=0.0)
    return dev * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _along_pixels(v, CHANNELS_LAST: tl.constexpr):
    """[BLOCK_P] vector -> 2-D tile operand (pixels on axis 0 in channels_last, else on axis 1)."""
    if CHANNELS_LAST:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _along_channels(v, CHANNELS_LAST: tl.constexpr):
    """[BLOCK_C] vector -> 2-D tile operand (channels on axis 1 in channels_last, else on axis 0)."""
    if CHANNELS_LAST:
        return v[None, :]
    else:
        return v[:, None]


# The tile is [BLOCK_P, BLOCK_C] in channels_last and [BLOCK_C, BLOCK_P] in NCHW: the axis that is
# contiguous in memory comes last, because Triton lays consecutive lanes along the last axis when it
# cannot prove contiguity (runtime strides), which then still gives coalesced warp accesses.
#
# Not specialized: conv_stride and act (one compiled kernel serves all their values), and OW: when
# OW % 16 == 0 Triton would prove runs of contiguous output pixels and give every thread several
# consecutive pixels for a vector store, and the loads (unaligned, shifted by each tap) would inherit
# that layout: lanes several elements apart, several L1 wavefronts per warp load instead of one.
@triton.jit(do_not_specialize=["OW", "conv_stride", "act"])
def _dwconv_bn_act_kernel(
    x_ptr,  # input  [N, C, H, W], fp32/fp16/bf16, element strides sx_*
    w_ptr,  # weight [C, K*K] fp32, element strides sw_*, BatchNorm scale already folded in
    b_ptr,  # bias   [C] fp32, contiguous, BatchNorm shift already folded in
    nw_ptr,  # LayerNorm weight [C] fp32, contiguous; read only with LAYERNORM
    nb_ptr,  # LayerNorm bias   [C] fp32, contiguous; read only with LAYERNORM
    out_ptr,  # output [N, C, OH, OW], same dtype as x, element strides so_*
    C, H, W,  # channels, input height, input width
    OH, OW,  # output height, width
    conv_stride,  # convolution stride, 1 or 2
    act,  # epilogue without LAYERNORM: 0 none, 1 SiLU, 2 ReLU
    eps,  # LayerNorm epsilon (fp32); used only with LAYERNORM
    sx_n, sx_c, sx_h, sx_w,  # x strides in elements: image, channel, row, column
    so_n, so_c, so_h, so_w,  # out strides in elements: image, channel, row, column
    sw_c, sw_t,  # weight strides in elements: channel, tap (ky * K + kx)
    K: tl.constexpr,  # kernel size (odd)
    CHANNELS_LAST: tl.constexpr,  # tile orientation: True [pixels, channels], False [channels, pixels]
    BLOCK_P: tl.constexpr,  # output pixels per program (flattened oy * OW + ox)
    BLOCK_C: tl.constexpr,  # channels per program
    LAYERNORM: tl.constexpr,  # epilogue: LayerNorm over the C channels (BLOCK_C >= C) instead of act
):
    # The LayerNorm reduces along the tile's channel axis, axis 1 of the channels_last orientation.
    tl.static_assert(CHANNELS_LAST or not LAYERNORM)
    PAD: tl.constexpr = K // 2
    n_pix = OH * OW
    n_pblocks = tl.cdiv(n_pix, BLOCK_P)
    n_cblocks = tl.cdiv(C, BLOCK_C)

    # One flat grid axis (axis 0 allows 2^31 - 1 programs; axes 1 and 2 only 65535, too few for big
    # batches). The block index along the contiguous tile axis varies fastest, so programs that run
    # at the same time read neighbouring memory: channels_last - the other channel blocks of the same
    # pixels; NCHW - the next pixels of the same planes, whose halo rows are then still in L2.
    pid = tl.program_id(0)
    if CHANNELS_LAST:
        pid_c = pid % n_cblocks
        pid_p = (pid // n_cblocks) % n_pblocks
    else:
        pid_p = pid % n_pblocks
        pid_c = (pid // n_pblocks) % n_cblocks
    # 64-bit from here on: n * sx_n overflows int32 once the batch holds more than 2^31 elements.
    n = (pid // (n_pblocks * n_cblocks)).to(tl.int64)

    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    chan = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pix_in = pix < n_pix
    chan_in = chan < C
    chan_in_t = _along_channels(chan_in, CHANNELS_LAST)
    # Tail pixels are clamped onto the last pixel: they read valid memory and compute a value that is
    # never stored, so loads need no pixel-tail mask. Channels are masked instead: a clamp would hide
    # their contiguity from the compiler and cost the vectorized channels_last loads.
    pix = tl.minimum(pix, n_pix - 1)
    oy = pix // OW
    ox = pix % OW
    iy0 = oy * conv_stride - PAD  # input row / column of tap (0, 0); negative in the top/left padding
    ix0 = ox * conv_stride - PAD

    # Pointers of tap (0, 0), one per tile element; 64-bit offsets because a single image (or a view
    # into a larger tensor) may span more than 2^31 elements. Every other tap is these plus a scalar.
    x_pix = iy0.to(tl.int64) * sx_h + ix0.to(tl.int64) * sx_w
    x_chan = n * sx_n + chan.to(tl.int64) * sx_c
    x_tap0 = x_ptr + (_along_pixels(x_pix, CHANNELS_LAST) + _along_channels(x_chan, CHANNELS_LAST))
    w_chan = w_ptr + chan * sw_c
    row_step = tl.cast(sx_h, tl.int64)  # tl.cast, not .to: the JIT may have made a stride constant 1
    col_step = tl.cast(sx_w, tl.int64)

    if CHANNELS_LAST:
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    # Runtime loops over the taps, not tl.static_range: fully unrolled (tried first), the compiler
    # hoists dozens of loads; K=7 and 9 hit 255 registers plus spills and 6-19 s per compile. LLVM still
    # unrolls short kx loops (seen for K = 3 and 5). Each tap re-reads a shifted tile that mostly hits
    # L1; only the first touch of every input line goes to L2/HBM.
    for ky in range(K):
        iy = iy0 + ky
        row_in = (iy >= 0) & (iy < H)
        x_row = x_tap0 + ky * row_step
        for kx in range(K):
            ix = ix0 + kx
            tap_in = row_in & (ix >= 0) & (ix < W)  # outside the image = zero padding, never read
            mask = _along_pixels(tap_in, CHANNELS_LAST) & chan_in_t
            xv = tl.load(x_row + kx * col_step, mask=mask, other=0.0)
            wv = tl.load(w_chan + (ky * K + kx) * sw_t, mask=chan_in, other=0.0)
            acc += xv.to(tl.float32) * _along_channels(wv, CHANNELS_LAST)

    z = acc + _along_channels(tl.load(b_ptr + chan, mask=chan_in, other=0.0), CHANNELS_LAST)
    if LAYERNORM:
        z = _layernorm_over_channels(z, chan, chan_in, nw_ptr, nb_ptr, C, eps)
    else:
        if act == 1:  # SiLU
            z = z * tl.sigmoid(z)
        elif act == 2:  # ReLU
            z = tl.maximum(z, 0.0)

    o_pix = oy.to(tl.int64) * so_h + ox.to(tl.int64) * so_w
    o_chan = n * so_n + chan.to(tl.int64) * so_c
    o_ptr = out_ptr + (_along_pixels(o_pix, CHANNELS_LAST) + _along_channels(o_chan, CHANNELS_LAST))
    o_mask = _along_pixels(pix_in, CHANNELS_LAST) & chan_in_t
    tl.store(o_ptr, z.to(out_ptr.dtype.element_ty), mask=o_mask)


class LaunchConfig(NamedTuple):
    """How one call launches the kernel: compile-time constants, warps, and the grid."""

    constexprs: dict
    num_warps: int
    grid: Tuple[int, ...]


class KernelConfig(NamedTuple):
    """One compiled variant the launcher may use: pointer dtype, constexprs and warps."""

    dtype: torch.dtype
    constexprs: dict
    num_warps: int


def output_size(size: int, kernel_size: int, stride: int) -> int:
    """Output height/width of a K x K convolution with padding K // 2."""
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def _is_channels_last(x: torch.Tensor) -> bool:
    """Orient the tile along channels when channels are closer in memory than columns."""
    return x.stride(1) < x.stride(3)


def _tile_shapes(channels_last: bool, dtype: torch.dtype) -> Tuple[Tuple[int, int], ...]:
    """Candidate (BLOCK_P, BLOCK_C) tile shapes for a layout and dtype, widest contiguous axis first."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    tile = NUM_WARPS * 32 * _ELEMS_PER_THREAD
    if channels_last:
        return tuple((tile // c, c) for c in _CL_BLOCK_C if c * itemsize <= _ROW_BYTES)
    return tuple((p, tile // p) for p in _NCHW_BLOCK_P)


def _pick(extent: int, blocks: Tuple[int, ...]) -> int:
    """The widest block that keeps most lanes busy over ``extent``, else the least wasteful one."""
    def lane_use(b):
        return extent / (triton.cdiv(extent, b) * b)

    for b in blocks:
        if lane_use(b) >= _MIN_LANE_USE:
            return b
    return max(blocks, key=lane_use)


def _layernorm_tile(C: int) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a LAYERNORM launch: every channel in one block."""
    block_c = next(c for c in _LN_BLOCK_C if c >= C)
    return max(1, NUM_WARPS * 32 * _LN_ELEMS_PER_THREAD // block_c), block_c


def launch_config(x: torch.Tensor, kernel_size: int, stride: int, act: int,
                  layernorm: bool = False) -> LaunchConfig:
    """Constexprs, warps and grid the launcher uses for input ``x`` ([N, C, H, W]).

    Only ``x``'s shape, strides and dtype matter. ``stride`` and ``act`` are runtime kernel arguments:
    they change the grid (stride) but never the compiled variant. ``layernorm``: the
    ``dwconv_layernorm`` epilogue (channels_last orientation, all channels in one block).
    """
    N, C, H, W = x.shape
    n_pix = output_size(H, kernel_size, stride) * output_size(W, kernel_size, stride)
    channels_last = layernorm or _is_channels_last(x)
    shapes = _tile_shapes(channels_last, x.dtype)
    if layernorm:
        block_p, block_c = _layernorm_tile(C)
    elif channels_last:
        block_c = _pick(C, tuple(c for _, c in shapes))
        block_p = next(p for p, c in shapes if c == block_c)
    else:
        block_p = _pick(n_pix, tuple(p for p, _ in shapes))
        block_c = next(c for p, c in shapes if p == block_p)
    constexprs = dict(K=kernel_size, CHANNELS_LAST=channels_last, BLOCK_P=block_p, BLOCK_C=block_c,
                      LAYERNORM=layernorm)
    grid = (N * triton.cdiv(n_pix, block_p) * triton.cdiv(C, block_c),)
    return LaunchConfig(constexprs, NUM_WARPS, grid)


def all_kernel_configs() -> Tuple[KernelConfig, ...]:
    """Every (dtype, constexprs, num_warps) that ``launch_config`` can return, for AOT checks."""
    plain = tuple(
        KernelConfig(dtype, dict(K=k, CHANNELS_LAST=channels_last, BLOCK_P=block_p, BLOCK_C=block_c,
                                 LAYERNORM=False), NUM_WARPS)
        for dtype in DTYPES
        for channels_last in (False, True)
        for block_p, block_c in _tile_shapes(channels_last, dtype)
        for k in KERNEL_SIZES)
    layernorm = tuple(
        KernelConfig(dtype, dict(K=k, CHANNELS_LAST=True, BLOCK_P=block_p, BLOCK_C=block_c, LAYERNORM=True),
                     NUM_WARPS)
        for dtype in DTYPES
        for block_p, block_c in map(_layernorm_tile, _LN_BLOCK_C)
        for k in KERNEL_SIZES)
    return plain + layernorm


def _weight_for(weight: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The weight in the layout the tile orientation reads well.

    channels_last tiles read one tap for a block of channels per load: with the [C, K*K] contiguous
    layout those are K*K floats apart, so one warp load would touch a different 128-byte line for
    nearly every lane and cost more L1 time than the input itself. A channel-contiguous copy ([K*K, C]
    storage seen as [C, K*K]) makes it a single vector load. Callers that cache the folded weight in
    that layout (``w_kc.t()`` with ``w_kc`` a contiguous [K*K, C] tensor) skip this per-call copy. NCHW
    tiles broadcast one weight over a warp's pixels, so any layout is fine there.
    """
    if channels_last and weight.shape[0] > 1 and weight.stride(0) != 1:
        return weight.t().contiguous().t()
    return weight


def kernel_args(x, weight, bias, stride, act, out, norm_weight=None, norm_bias=None, eps=0.0) -> tuple:
    """The kernel's runtime arguments (all but the constexprs), in order; also used by the AOT test.

    With ``norm_weight`` and ``norm_bias`` the arguments of a LAYERNORM launch; without, ``bias``
    stands in for both (never read).
    """
    N, C, H, W = x.shape
    layernorm = norm_weight is not None
    weight = _weight_for(weight, layernorm or _is_channels_last(x))
    nw, nb = (norm_weight, norm_bias) if layernorm else (bias, bias)
    return (x, weight, bias, nw, nb, out, C, H, W, out.shape[2], out.shape[3], stride, act, float(eps),
            *x.stride(), *out.stride(), *weight.stride())


def _check(x, weight, bias, kernel_size, stride, act, out):
    if x.dim() != 4 or x.dtype not in DTYPES:
        raise TypeError(f"x: got {x.dim()}-d {x.dtype}, expected [N, C, H, W] of {DTYPES}")
    if kernel_size not in KERNEL_SIZES:
        raise ValueError(f"kernel_size: got {kernel_size}, supported {KERNEL_SIZES}")
    if stride not in STRIDES:
        raise ValueError(f"stride: got {stride}, supported {STRIDES}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act: got {act}, supported {ACTIVATIONS} (none, SiLU, ReLU)")
    N, C, H, W = x.shape
    expected = (N, C, output_size(H, kernel_size, stride), output_size(W, kernel_size, stride))
    if tuple(out.shape) != expected or out.dtype != x.dtype:
        raise ValueError(f"out: got {tuple(out.shape)} {out.dtype}, expected {expected} {x.dtype}")
    kk = kernel_size * kernel_size
    if tuple(weight.shape) != (C, kk) or weight.dtype != torch.float32:
        raise ValueError(f"weight: got {tuple(weight.shape)} {weight.dtype}, expected ({C}, {kk}) float32")
    if tuple(bias.shape) != (C,) or bias.dtype != torch.float32 or not bias.is_contiguous():
        raise ValueError(f"bias: got {tuple(bias.shape)} {bias.dtype}, expected contiguous ({C},) float32")


def dwconv_bn_act_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int,
                         stride: int, act: int, out: torch.Tensor) -> None:
    """Depthwise K x K conv (zero padding K // 2, given stride) + per-channel bias + activation.

    Writes every element of ``out``. ``x`` [N, C, H, W] (fp32/fp16/bf16) and ``out`` [N, C, OH, OW]
    (same dtype) may have any strides (``out``'s must not overlap); ``weight`` is [C, K*K] float32
    (BatchNorm scale folded in; any strides, see ``_weight_for``), ``bias`` [C] float32 contiguous;
    ``act`` 0 none, 1 SiLU, 2 ReLU; accumulation in fp32. Equivalent PyTorch::

        z = torch.nn.functional.conv2d(x.float(), weight.view(C, 1, K, K), bias, stride, K // 2,
                                       groups=C)
        out.copy_([z, torch.nn.functional.silu(z), torch.relu(z)][act])
    """
    _check(x, weight, bias, kernel_size, stride, act, out)
    _launch(x, kernel_size, stride, act, out, kernel_args(x, weight, bias, stride, act, out), False)


def _launch(x, kernel_size, stride, act, out, args, layernorm: bool) -> None:
    if out.numel() == 0:
        return
    cfg = launch_config(x, kernel_size, stride, act, layernorm)
    # Triton launches on the current device: make it x's (a model on cuda:1 with cuda:0 current).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _dwconv_bn_act_kernel[cfg.grid](*args, **cfg.constexprs, num_warps=cfg.num_warps)


def dwconv_layernorm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            norm_weight: torch.Tensor, norm_bias: torch.Tensor, kernel_size: int, stride: int,
                            eps: float, out: torch.Tensor) -> None:
    """Depthwise K x K conv + bias, then LayerNorm over the channels of each output pixel.

    Arguments as ``dwconv_bn_act_triton`` (no ``act``), plus ``norm_weight`` and ``norm_bias``: [C]
    float32 contiguous, and ``eps``; C <= LAYERNORM_MAX_CHANNELS. Equivalent PyTorch::

        y = torch.nn.functional.conv2d(x.float(), weight.view(C, 1, K, K), bias, stride, K // 2, groups=C)
        out.copy_(torch.nn.functional.layer_norm(y.permute(0, 2, 3, 1), (C,), norm_weight, norm_bias,
                                                 eps).permute(0, 3, 1, 2))
    """
    _check(x, weight, bias, kernel_size, stride, ACT_NONE, out)
    C = x.shape[1]
    if C > LAYERNORM_MAX_CHANNELS:
        raise ValueError(f"x: {C} channels, the LayerNorm epilogue supports at most {LAYERNORM_MAX_CHANNELS}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (C,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected contiguous ({C},) float32")
    args = kernel_args(x, weight, bias, stride, ACT_NONE, out, norm_weight, norm_bias, eps)
    _launch(x, kernel_size, stride, ACT_NONE, out, args, True)
