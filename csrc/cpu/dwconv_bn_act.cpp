// CPU kernels for dwconv_bn_act: loops (at::parallel_for) around the math in ../dwconv_bn_act.h.
// Arguments are validated once, in ../ops.cpp, before dwconv_bn_act_cpu is called.
//
// Three paths, chosen by x's strides:
//  - width-contiguous x (NCHW, and views with strided rows or planes): bands of rows of one plane,
//    copied into a zero-padded buffer, then one flat vector loop for the whole band (dwconv_nchw).
//  - channel-contiguous x (channels_last): per output pixel, vector loops over the channels
//    (dwconv_channels_last).
//  - anything else: dwconv_point_sum from the header per output element, bounds-checked, exactly
//    what the CUDA kernel computes (dwconv_generic).
// All paths add the taps in the header's order (ky-major, from zero) and finish with the header's
// dwconv_epilogue (bias + activation), so they agree with each other and with the CUDA kernel up to
// the compiler's use of fused multiply-adds.
//
// dwconv_layernorm (EdgeNeXt's ConvBlock) runs the channels_last path with its LayerNorm epilogue
// (template flag LN): that path already holds all C sums of an output pixel in a scratch row, which
// is what a LayerNorm over the channels needs. Inputs of other layouts are copied to channels_last
// first.
//
// Borders: the NCHW path zero-pads in its band buffer instead of calling the bounds-checked
// per-point function for border outputs: at 14x14 the border is 27% of the outputs, and scalar
// calls for those cost more than eager PyTorch's whole op. The channels_last path skips the
// out-of-bounds taps of border pixels while keeping the loops over channels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../dwconv_bn_act.h"
#include "../dwconv_layernorm.h"
#include "simd.h"

namespace fastvit_kernels {
namespace {

struct Dims {
  int64_t N, C, H, W, OH, OW;
  int K, S;
};

#if defined(__GNUC__)
#define FVK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FVK_ALWAYS_INLINE inline
#endif

// Register-blocked inner loops (many independent accumulators, so the multiply-add latency is
// hidden) are written with GCC vector extensions, g++ and clang++ only: plain element-wise
// arithmetic on 32-byte vectors, AVX2 registers in the x86-64-v3 clone and pairs of SSE registers
// in the baseline one. g++'s auto-vectorizer gives one accumulator per loop iteration, and those
// loops ran latency-bound at K = 7. Other compilers get the plain loops.
#if defined(__GNUC__)
#define FVK_VECTOR_EXT 1
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(T);
};
#endif

// Target work per parallel task chunk, in output elements: below this, OpenMP's fork/join costs
// more than it saves.
constexpr int64_t kGrainElems = 16384;

// channels_last, K >= 5: output pixels per group, see cl_row_blocked.
constexpr int64_t kGroup = 16;

int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

// ------------------------------------------------------------------------------------------------
// Epilogue, shared by the fast paths: out[i * out_step] = act(acc[i] + bias[i * bias_step]).
// bias_step is 0 on the NCHW path (one channel per row) and 1 on the channels_last path.
// always_inline: it is then compiled for the instruction set of the clone that calls it.

template <int ACT, typename scalar_t, typename acc_t>
FVK_ALWAYS_INLINE void store_act(const acc_t* __restrict acc,  // n window sums
                                 const acc_t* __restrict bias,  // bias of the first element
                                 int64_t bias_step,             // 0 or 1, see above
                                 scalar_t* __restrict out,      // first output element
                                 int64_t out_step,              // output stride between elements
                                 int64_t n) {
  // The unit-stride cases are spelled out so that they vectorize (fast_exp is branch-free).
  if (out_step == 1 && bias_step == 0) {
    const acc_t b = bias[0];
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(dwconv_epilogue<ACT>(acc[i], b));
  } else if (out_step == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(dwconv_epilogue<ACT>(acc[i], bias[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i * out_step] = static_cast<scalar_t>(dwconv_epilogue<ACT>(acc[i], bias[i * bias_step]));
    }
  }
}

template <typename scalar_t, typename acc_t>
FVK_ALWAYS_INLINE void store_act(int act, const acc_t* acc, const acc_t* bias, int64_t bias_step,
                                 scalar_t* out, int64_t out_step, int64_t n) {
  switch (act) {
    case kActSilu:
      return store_act<kActSilu>(acc, bias, bias_step, out, out_step, n);
    case kActRelu:
      return store_act<kActRelu>(acc, bias, bias_step, out, out_step, n);
    default:
      return store_act<kActNone>(acc, bias, bias_step, out, out_step, n);
  }
}

// What the channels_last path does with the C window sums of one output pixel: bias + activation
// (dwconv_bn_act), or, with the template flag LN, bias + LayerNorm over the channels
// (dwconv_layernorm, math in ../dwconv_layernorm.h).
template <typename acc_t>
struct PixelEpilogue {
  const acc_t* bias;         // [C]
  int act;                   // kAct*, without LN
  const acc_t* norm_weight;  // [C], with LN
  const acc_t* norm_bias;    // [C], with LN
  acc_t eps;                 // with LN
};

template <bool LN, typename scalar_t, typename acc_t>
FVK_ALWAYS_INLINE void store_pixel(const PixelEpilogue<acc_t>& e,
                                   acc_t* __restrict acc,     // C window sums; LN overwrites them
                                   scalar_t* __restrict out,  // &out[n, 0, oy, ox]
                                   int64_t o_sc,              // out stride along C
                                   int64_t C) {
  if constexpr (LN) {
    for (int64_t c = 0; c < C; ++c) acc[c] += e.bias[c];
    acc_t mean, rstd;
    layernorm_stats(acc, C, e.eps, mean, rstd);
    const acc_t* __restrict nw = e.norm_weight;
    const acc_t* __restrict nb = e.norm_bias;
    if (o_sc == 1) {  // channels_last out (always, from the op): spelled out so that it vectorizes
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(layernorm_apply(acc[c], mean, rstd, nw[c], nb[c]));
    } else {
      for (int64_t c = 0; c < C; ++c) {
        out[c * o_sc] = static_cast<scalar_t>(layernorm_apply(acc[c], mean, rstd, nw[c], nb[c]));
      }
    }
  } else {
    store_act(e.act, acc, e.bias, 1, out, o_sc, C);
  }
}

// ------------------------------------------------------------------------------------------------
// NCHW path (x width-contiguous). A task is a band of output rows of one (n, c) plane:
//   1. fill_band: the band's input rows, converted to acc_t, zero-padded by K/2 on each side (rows
//      above/below the image are zeros). For stride 2 each padded row is stored as its even
//      columns, then (odd_offset further) its odd columns, so that stride-2 taps read contiguous
//      memory instead of shuffling every vector.
//   2. conv_flat: the window sums of the whole band as ONE loop over flat positions
//      j = row * (S * pitch) + col: no borders and no per-row set-up, so the loop vectorizes
//      whatever the width (per-row loops of 14 or 7 columns barely vectorize). Columns col >= OW
//      of each row are computed and dropped: 2*(K/2) of W + 2*(K/2) for stride 1, about half for
//      stride 2.
//   3. store_band: bias + activation, then the OW valid columns of each row into out.

// Layout of the band buffer: `rows` rows of `pitch` values (and for S == 2 the odd columns at
// odd_offset); padded column p of input row iy is at pitch * (iy - iy_first) + p for S == 1, and at
// pitch * (iy - iy_first) + p / 2 (+ odd_offset if p is odd) for S == 2.
struct BandLayout {
  int64_t pitch;       // S == 1: W + 2*pad; S == 2: ceil((W + 2*pad) / 2)
  int64_t odd_offset;  // S == 2: offset of the odd-column rows; unused for S == 1
};

// Rows here are often 7 to 64 wide, where a vectorized loop spends most of its time in remainder
// code. The row helpers below work in chunks of 8 (or 4 for short rows) with a fixed trip count,
// one vector load/store each, the last chunk overlapping the one before instead of a remainder.
// (Chunk bodies are functions, not lambdas: a lambda's captures lose __restrict, and g++ then
// keeps every load and store in order, one float at a time.)

template <int N, typename src_t, typename dst_t>
FVK_ALWAYS_INLINE void copy_chunk(const src_t* __restrict src, dst_t* __restrict dst) {
  for (int k = 0; k < N; ++k) dst[k] = static_cast<dst_t>(src[k]);
}

template <int N, typename src_t, typename dst_t>
FVK_ALWAYS_INLINE void split_chunk(const src_t* __restrict src, dst_t* __restrict first,
                                   dst_t* __restrict second) {
  for (int k = 0; k < N; ++k) {
    first[k] = static_cast<dst_t>(src[2 * k]);
    second[k] = static_cast<dst_t>(src[2 * k + 1]);
  }
}

// dst[i] = src[i] for i < n, converted.
template <typename src_t, typename dst_t>
FVK_ALWAYS_INLINE void copy_row(const src_t* __restrict src, dst_t* __restrict dst, int64_t n) {
  if (n >= 8) {
    for (int64_t i = 0;; i += 8) {
      i = std::min(i, n - 8);
      copy_chunk<8>(src + i, dst + i);
      if (i == n - 8) break;
    }
  } else if (n >= 4) {
    copy_chunk<4>(src, dst);
    copy_chunk<4>(src + n - 4, dst + n - 4);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(src[i]);
  }
}

// first[i] = src[2i], second[i] = src[2i + 1] for i < n, converted.
template <typename src_t, typename dst_t>
FVK_ALWAYS_INLINE void split_pairs(const src_t* __restrict src, dst_t* __restrict first,
                                   dst_t* __restrict second, int64_t n) {
  if (n >= 8) {
    for (int64_t i = 0;; i += 8) {
      i = std::min(i, n - 8);
      split_chunk<8>(src + 2 * i, first + i, second + i);
      if (i == n - 8) break;
    }
  } else if (n >= 4) {
    split_chunk<4>(src, first, second);
    split_chunk<4>(src + 2 * (n - 4), first + n - 4, second + n - 4);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      first[i] = static_cast<dst_t>(src[2 * i]);
      second[i] = static_cast<dst_t>(src[2 * i + 1]);
    }
  }
}

// The band buffer's padding entries are zero from its allocation and never written after, so a
// row in the image writes only its W values; a row above or below the image is zeroed whole.
template <typename scalar_t, typename acc_t>
FVK_CPU_CLONES void fill_band(const scalar_t* x_plane,  // &x[n, c, 0, 0]
                              int64_t x_sh,             // x stride along H
                              int64_t x_sw,             // x stride along W (1 unless W == 1)
                              int64_t H, int64_t W, int pad, int S,
                              int64_t iy_first,         // input row of the first buffer row
                              int64_t rows,             // buffer rows to fill
                              BandLayout L,
                              acc_t* __restrict buf) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t iy = iy_first + r;
    const scalar_t* src = x_plane + iy * x_sh;
    acc_t* __restrict even = buf + r * L.pitch;   // S == 1: the padded row
    acc_t* __restrict odd = even + L.odd_offset;  // S == 2 only
    if (iy < 0 || iy >= H) {
      for (int64_t i = 0; i < L.pitch; ++i) even[i] = acc_t(0);
      if (S == 2) {
        for (int64_t i = 0; i < L.pitch; ++i) odd[i] = acc_t(0);
      }
    } else if (S == 1) {
      if (x_sw == 1) {
        copy_row(src, even + pad, W);
      } else {
        for (int64_t i = 0; i < W; ++i) even[pad + i] = static_cast<acc_t>(src[i * x_sw]);
      }
    } else if (W == 1) {  // x_sw may be anything
      (pad % 2 == 0 ? even : odd)[pad / 2] = static_cast<acc_t>(src[0]);
    } else {
      // x columns 2m and 2m+1 are padded columns 2m+pad and 2m+1+pad: one even and one odd
      // column, in that order when pad is even.
      acc_t* first = pad % 2 == 0 ? even + pad / 2 : odd + pad / 2;
      acc_t* second = pad % 2 == 0 ? odd + pad / 2 : even + (pad + 1) / 2;
      split_pairs(src, first, second, W / 2);
      if (W % 2 == 1) first[W / 2] = static_cast<acc_t>(src[W - 1]);
    }
  }
}

#ifdef FVK_VECTOR_EXT
// conv_flat for j in [0, n), n >= 8 vectors: blocks of 8 vectors of outputs, each block's 8
// accumulators in registers across all K*K taps (8 independent multiply-add chains), every tap's
// weight broadcast once per block. The last block overlaps the one before rather than leaving a
// remainder (recomputing an output writes the same sum).
template <int K, int S, typename acc_t>
FVK_ALWAYS_INLINE void conv_flat_blocks(const acc_t* __restrict even, const acc_t* __restrict odd,
                                        int64_t pitch, const acc_t* wr, acc_t* __restrict acc,
                                        int64_t n) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::kLanes, B = 8;
  for (int64_t j = 0;; j += B * L) {
    j = std::min(j, n - B * L);
    V a[B];
    for (int b = 0; b < B; ++b) a[b] = V{};
    // ky stays a loop: fully unrolled, g++ hoists all K*K broadcast weights out of the j loop and
    // then spills the accumulators.
#pragma GCC unroll 1
    for (int ky = 0; ky < K; ++ky) {
#pragma GCC unroll 9
      for (int kx = 0; kx < K; ++kx) {
        const V w = V{} + wr[ky * K + kx];  // broadcast
        const acc_t* src = ((S == 2 && kx % 2 == 1) ? odd : even) + j + ky * pitch + kx / S;
        for (int b = 0; b < B; ++b) {
          V xv;  // unaligned load
          std::memcpy(&xv, src + b * L, sizeof xv);
          a[b] += w * xv;
        }
      }
    }
    for (int b = 0; b < B; ++b) std::memcpy(acc + j + b * L, &a[b], sizeof a[b]);
    if (j == n - B * L) break;
  }
}
#endif

// acc[j] = sum over taps (ky, kx), in order, of w[ky*K + kx] * in[j + ky*pitch + kx] (stride 1;
// stride 2 reads tap kx from the even or odd columns, at kx / 2). K and S are compile-time so that
// the taps unroll.
template <int K, int S, typename acc_t>
FVK_CPU_CLONES void conv_flat(const acc_t* __restrict in,  // band buffer, see BandLayout
                              BandLayout L,
                              const acc_t* __restrict w,   // K*K taps of this channel, row-major
                              acc_t* __restrict acc,       // n window sums, row pitch S * L.pitch
                              int64_t n) {
  acc_t wr[K * K];
  for (int t = 0; t < K * K; ++t) wr[t] = w[t];
  const acc_t* const odd = in + (S == 2 ? L.odd_offset : 0);
#ifdef FVK_VECTOR_EXT
  if (n >= 8 * Vec<acc_t>::kLanes) {
    conv_flat_blocks<K, S>(in, odd, L.pitch, wr, acc, n);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    acc_t s = acc_t(0);
#pragma GCC unroll 9
    for (int ky = 0; ky < K; ++ky) {
#pragma GCC unroll 9
      for (int kx = 0; kx < K; ++kx) {
        const acc_t* src = (S == 2 && kx % 2 == 1) ? odd : in;
        s += wr[ky * K + kx] * src[j + ky * L.pitch + kx / S];
      }
    }
    acc[j] = s;
  }
}

template <typename acc_t>
using ConvFlatFn = void (*)(const acc_t*, BandLayout, const acc_t*, acc_t*, int64_t);

template <int S, typename acc_t>
ConvFlatFn<acc_t> conv_flat_for_k(int K) {
  switch (K) {
    case 1: return &conv_flat<1, S, acc_t>;
    case 3: return &conv_flat<3, S, acc_t>;
    case 5: return &conv_flat<5, S, acc_t>;
    case 7: return &conv_flat<7, S, acc_t>;
    default: return &conv_flat<9, S, acc_t>;  // ops.cpp admits only odd K in 1..9
  }
}

// Bias + activation of the OW valid columns of each row of the band, into out. The valid columns
// are first packed together, so that the epilogue is one long vector loop over exactly rows * OW
// values (per-row loops of 7 or 14 values run mostly in remainder code; the SiLU selects only
// vectorize inside loops), written straight into out when the band is contiguous there.
template <typename scalar_t, typename acc_t>
FVK_CPU_CLONES void store_band(int act,
                               const acc_t* acc,    // window sums, `rows` rows of pitch acc_pitch
                               int64_t acc_pitch, int64_t rows, int64_t OW,
                               const acc_t* bias,   // &bias[c]
                               acc_t* packed,       // scratch, 2 * rows * OW values
                               scalar_t* out,       // &out[n, c, first row, 0]
                               int64_t o_sh,        // out stride along H
                               int64_t o_sw) {      // out stride along W
  for (int64_t r = 0; r < rows; ++r) copy_row(acc + r * acc_pitch, packed + r * OW, OW);
  if (o_sw == 1 && (o_sh == OW || rows == 1)) {
    store_act(act, packed, bias, 0, out, 1, rows * OW);
    return;
  }
  // out is strided (e.g. channels_last): the epilogue into the scratch, then scalar stores.
  acc_t* epi = packed + rows * OW;
  store_act(act, packed, bias, 0, epi, 1, rows * OW);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < OW; ++i) out[r * o_sh + i * o_sw] = static_cast<scalar_t>(epi[r * OW + i]);
  }
}

template <typename scalar_t, typename acc_t>
void dwconv_nchw(const at::Tensor& x, const acc_t* weight, const acc_t* bias, const Dims& d, int act,
                 const at::Tensor& out) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t x_sn = x.stride(0), x_sc = x.stride(1), x_sh = x.stride(2), x_sw = x.stride(3);
  const int64_t o_sn = out.stride(0), o_sc = out.stride(1), o_sh = out.stride(2), o_sw = out.stride(3);
  const int K = d.K, S = d.S, pad = d.K / 2;
  const int64_t PW = d.W + 2 * pad;  // padded row width
  const ConvFlatFn<acc_t> conv = S == 1 ? conv_flat_for_k<1, acc_t>(K) : conv_flat_for_k<2, acc_t>(K);

  // A task is a band of output rows of one plane. Band height: the band's input rows take about
  // 32 KiB (L1), or the whole plane if smaller...
  int64_t band = std::max<int64_t>(1, ((32768 / int64_t(sizeof(acc_t))) / PW - K) / S + 1);
  band = std::min(band, d.OH);
  // ...and there are enough tasks to keep every thread busy.
  const int64_t planes = d.N * d.C;
  const int64_t want_tasks = 4 * at::get_num_threads();
  if (planes * ((d.OH + band - 1) / band) < want_tasks) {
    const int64_t bands_per_plane = std::min(d.OH, (want_tasks + planes - 1) / planes);
    band = (d.OH + bands_per_plane - 1) / bands_per_plane;
  }
  const int64_t bands = (d.OH + band - 1) / band;
  const int64_t max_rows_in = (band - 1) * S + K;
  BandLayout L;
  L.pitch = S == 1 ? PW : (PW + 1) / 2;
  L.odd_offset = max_rows_in * L.pitch;
  const int64_t acc_pitch = S * L.pitch;

  at::parallel_for(0, planes * bands, grain_for(band * d.OW), [&](int64_t t0, int64_t t1) {
    // Zero-filled: padding entries are never written after.
    std::vector<acc_t> scratch(S * max_rows_in * L.pitch + band * acc_pitch + 2 * band * d.OW);
    acc_t* buf = scratch.data();
    acc_t* acc = buf + S * max_rows_in * L.pitch;
    acc_t* packed = acc + band * acc_pitch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / bands, oy0 = (t % bands) * band;
      const int64_t rows = std::min(band, d.OH - oy0);
      const int64_t n = plane / d.C, c = plane % d.C;
      fill_band(xp + n * x_sn + c * x_sc, x_sh, x_sw, d.H, d.W, pad, S, oy0 * S - pad, (rows - 1) * S + K,
                L, buf);
      conv(buf, L, weight + c * K * K, acc, (rows - 1) * acc_pitch + d.OW);
      store_band(act, acc, acc_pitch, rows, d.OW, bias + c, packed, op + n * o_sn + c * o_sc + oy0 * o_sh,
                 o_sh, o_sw);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// channels_last path (x channel-contiguous). A task is an output row (n, oy).
//
// cl_row_passes (any dtype): per output pixel, passes over its C channels, each adding up to four
// in-bounds taps to a row of sums in memory, then one epilogue pass over the channels. At K = 3 the
// op is memory-bound and this, reading x pixel by pixel, is the fastest order we measured.
//
// cl_row_blocked (float/double x, C >= 8, K >= 5): per group of kGroup output pixels and block of
// 32 floats / 16 doubles of channels, the sums over the in-bounds taps stay in vector registers;
// the block's weights (K*K*128 bytes) and its window of x stay in L1 while the group runs. At K = 7
// the passes ran at 0.9x of eager PyTorch (each pass moves the sums through memory and streams
// K*K*C weights per pixel); this runs at 1.3-1.5x.
//
// Both add the taps in the header's order (ky-major, from zero).

#ifdef FVK_VECTOR_EXT
// Window sums of channels [c0, c0 + R * lanes) of the P output pixels ox, ox + 1, ... of one row,
// whose in-bounds taps are rows [ky0, ky1) x columns [kx0, kx1) of the window, into
// dst + p * C (p < P). x_win points at x[n, c0, oy*S - pad, ox*S - pad] (never dereferenced
// outside the in-bounds taps), w_c0 at weight_t[0, c0].
// P = 2 shares each weight load between two pixels and, with R = 4, runs 8 independent FMA chains:
// enough to cover the FMA latency, which four chains are not (K = 7 ran at ~0.8 FMA per cycle).
template <int P, int R, typename acc_t>
FVK_ALWAYS_INLINE void cl_pixels(const acc_t* x_win, int64_t x_sh, int64_t x_sw, int S,
                                 const acc_t* w_c0, int K, int64_t C, int ky0, int ky1, int kx0,
                                 int kx1, acc_t* dst) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::kLanes;
  V a[P][R];
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) a[p][r] = V{};
  for (int ky = ky0; ky < ky1; ++ky) {
    for (int kx = kx0; kx < kx1; ++kx) {
      const acc_t* xp = x_win + ky * x_sh + kx * x_sw;
      const acc_t* wp = w_c0 + (ky * K + kx) * C;
      for (int r = 0; r < R; ++r) {
        V wv;  // unaligned loads through memcpy
        std::memcpy(&wv, wp + r * L, sizeof wv);
        for (int p = 0; p < P; ++p) {
          V xv;
          std::memcpy(&xv, xp + p * S * x_sw + r * L, sizeof xv);
          a[p][r] += wv * xv;
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) std::memcpy(dst + p * C + r * L, &a[p][r], sizeof a[p][r]);
}

// Window sums of channels [c0, c0 + R * lanes) of output pixels [ox_begin, ox_end) of row oy,
// into acc[(ox - ox_begin) * C + c]. x_n is &x[n, 0, 0, 0] (channel stride 1).
template <int R, typename acc_t>
FVK_ALWAYS_INLINE void cl_block_sums(const acc_t* x_n, int64_t x_sh, int64_t x_sw,
                                     const acc_t* weight_t,  // [K*K, C]
                                     const Dims& d, int64_t oy, int64_t ox_begin, int64_t ox_end,
                                     int64_t c0, acc_t* acc) {
  const int K = d.K, pad = d.K / 2;
  const int64_t C = d.C, iy0 = oy * d.S - pad;
  // In-bounds taps: rows [ky0, ky1) of the window for the whole row, columns [kx0, kx1) per pixel.
  const int ky0 = static_cast<int>(std::max<int64_t>(0, -iy0));
  const int ky1 = static_cast<int>(std::min<int64_t>(K, d.H - iy0));
  const auto kx_range = [&](int64_t ox, int& kx0, int& kx1) {
    const int64_t ix0 = ox * d.S - pad;
    kx0 = static_cast<int>(std::max<int64_t>(0, -ix0));
    kx1 = static_cast<int>(std::min<int64_t>(K, d.W - ix0));
  };
  for (int64_t ox = ox_begin; ox < ox_end;) {
    int kx0, kx1, next_kx0 = -1, next_kx1 = -1;
    kx_range(ox, kx0, kx1);
    if (ox + 1 < ox_end) kx_range(ox + 1, next_kx0, next_kx1);
    const acc_t* x_win = x_n + iy0 * x_sh + (ox * d.S - pad) * x_sw + c0;
    acc_t* dst = acc + (ox - ox_begin) * C + c0;
    if (next_kx0 == kx0 && next_kx1 == kx1) {  // two pixels with the same taps (not at a border)
      cl_pixels<2, R>(x_win, x_sh, x_sw, d.S, weight_t + c0, K, C, ky0, ky1, kx0, kx1, dst);
      ox += 2;
    } else {
      cl_pixels<1, R>(x_win, x_sh, x_sw, d.S, weight_t + c0, K, C, ky0, ky1, kx0, kx1, dst);
      ox += 1;
    }
  }
}

template <bool LN, typename acc_t>
FVK_CPU_CLONES void cl_row_blocked(const acc_t* x_n,       // &x[n, 0, 0, 0]
                                   int64_t x_sh,           // x stride along H
                                   int64_t x_sw,           // x stride along W (along C: 1)
                                   const acc_t* weight_t,  // [K*K, C]
                                   const PixelEpilogue<acc_t>& e,
                                   const Dims& d, int64_t oy,
                                   acc_t* out_row,         // &out[n, 0, oy, 0]
                                   int64_t o_sc,           // out stride along C
                                   int64_t o_sw,           // out stride along W
                                   acc_t* acc) {           // scratch, kGroup * C values
  constexpr int L = Vec<acc_t>::kLanes;
  const int64_t C = d.C;  // >= L
  // Groups of kGroup output pixels, all channel blocks of a group before the next group: a block's
  // x window (K rows x (kGroup + K - 1) pixels x 128 bytes) then stays in L1 while the group runs,
  // and x is still read pixel by pixel (whole cache lines, in order) for the prefetcher.
  for (int64_t g0 = 0; g0 < d.OW; g0 += kGroup) {
    const int64_t g1 = std::min(d.OW, g0 + kGroup);
    // Blocks of 4 (or, for C < 4L, 1) vectors of channels; the last block overlaps the one before
    // rather than leaving a remainder (recomputing a channel writes the same sums).
    if (C >= 4 * L) {
      for (int64_t c0 = 0;; c0 += 4 * L) {
        c0 = std::min(c0, C - 4 * L);
        cl_block_sums<4>(x_n, x_sh, x_sw, weight_t, d, oy, g0, g1, c0, acc);
        if (c0 == C - 4 * L) break;
      }
    } else {
      for (int64_t c0 = 0;; c0 += L) {
        c0 = std::min(c0, C - L);
        cl_block_sums<1>(x_n, x_sh, x_sw, weight_t, d, oy, g0, g1, c0, acc);
        if (c0 == C - L) break;
      }
    }
    for (int64_t ox = g0; ox < g1; ++ox) {
      store_pixel<LN>(e, acc + (ox - g0) * C, out_row + ox * o_sw, o_sc, C);
    }
  }
}
#endif  // FVK_VECTOR_EXT

// acc[c] += sum over the G taps, in order, of w[t][c] * x[t][c], for c < C.
template <int G, typename scalar_t, typename acc_t>
FVK_ALWAYS_INLINE void add_taps(const scalar_t* const* tap_x, const acc_t* const* tap_w, int64_t C,
                                acc_t* __restrict acc) {
  const scalar_t* __restrict x0 = tap_x[0];
  const scalar_t* __restrict x1 = tap_x[G > 1 ? 1 : 0];
  const scalar_t* __restrict x2 = tap_x[G > 2 ? 2 : 0];
  const scalar_t* __restrict x3 = tap_x[G > 3 ? 3 : 0];
  const acc_t* __restrict w0 = tap_w[0];
  const acc_t* __restrict w1 = tap_w[G > 1 ? 1 : 0];
  const acc_t* __restrict w2 = tap_w[G > 2 ? 2 : 0];
  const acc_t* __restrict w3 = tap_w[G > 3 ? 3 : 0];
  for (int64_t c = 0; c < C; ++c) {
    acc_t a = acc[c];
    a += w0[c] * static_cast<acc_t>(x0[c]);
    if (G > 1) a += w1[c] * static_cast<acc_t>(x1[c]);
    if (G > 2) a += w2[c] * static_cast<acc_t>(x2[c]);
    if (G > 3) a += w3[c] * static_cast<acc_t>(x3[c]);
    acc[c] = a;
  }
}

template <bool LN, typename scalar_t, typename acc_t>
FVK_CPU_CLONES void cl_row_passes(const scalar_t* x_n,     // &x[n, 0, 0, 0]
                                  int64_t x_sh,            // x stride along H
                                  int64_t x_sw,            // x stride along W (along C: 1)
                                  const acc_t* weight_t,   // [K*K, C]
                                  const PixelEpilogue<acc_t>& e,
                                  const Dims& d, int64_t oy,
                                  scalar_t* out_row,       // &out[n, 0, oy, 0]
                                  int64_t o_sc,            // out stride along C
                                  int64_t o_sw,            // out stride along W
                                  acc_t* __restrict acc) { // scratch, C values
  const int K = d.K, pad = d.K / 2;
  const int64_t C = d.C;
  const scalar_t* tap_x[81];  // per in-bounds tap: &x[n, 0, iy, ix]
  const acc_t* tap_w[81];     // per in-bounds tap: &weight_t[ky*K + kx, 0]
  for (int64_t ox = 0; ox < d.OW; ++ox) {
    int taps = 0;
    for (int ky = 0; ky < K; ++ky) {
      const int64_t iy = oy * d.S - pad + ky;
      if (iy < 0 || iy >= d.H) continue;
      for (int kx = 0; kx < K; ++kx) {
        const int64_t ix = ox * d.S - pad + kx;
        if (ix < 0 || ix >= d.W) continue;
        tap_x[taps] = x_n + iy * x_sh + ix * x_sw;
        tap_w[taps] = weight_t + (ky * K + kx) * C;
        ++taps;
      }
    }
    for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
    int t = 0;
    for (; t + 4 <= taps; t += 4) add_taps<4>(tap_x + t, tap_w + t, C, acc);
    switch (taps - t) {
      case 3: add_taps<3>(tap_x + t, tap_w + t, C, acc); break;
      case 2: add_taps<2>(tap_x + t, tap_w + t, C, acc); break;
      case 1: add_taps<1>(tap_x + t, tap_w + t, C, acc); break;
      default: break;
    }
    store_pixel<LN>(e, acc, out_row + ox * o_sw, o_sc, C);
  }
}

template <bool LN, typename scalar_t, typename acc_t>
void dwconv_channels_last(const at::Tensor& x, const acc_t* weight_t, const PixelEpilogue<acc_t>& e,
                          const Dims& d, const at::Tensor& out) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t x_sn = x.stride(0), x_sh = x.stride(2), x_sw = x.stride(3);
  const int64_t o_sn = out.stride(0), o_sc = out.stride(1), o_sh = out.stride(2), o_sw = out.stride(3);
#ifdef FVK_VECTOR_EXT
  // At K = 3 the passes are as fast (the row is memory-bound, and they read x pixel by pixel).
  const bool blocked = std::is_same_v<scalar_t, acc_t> && d.C >= Vec<acc_t>::kLanes && d.K >= 5;
#else
  const bool blocked = false;
#endif

  at::parallel_for(0, d.N * d.OH, grain_for(d.OW * d.C), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(blocked ? kGroup * d.C : d.C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / d.OH, oy = t % d.OH;
#ifdef FVK_VECTOR_EXT
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (blocked) {
          cl_row_blocked<LN>(xp + n * x_sn, x_sh, x_sw, weight_t, e, d, oy, op + n * o_sn + oy * o_sh, o_sc,
                             o_sw, acc.data());
          continue;
        }
      }
#endif
      cl_row_passes<LN>(xp + n * x_sn, x_sh, x_sw, weight_t, e, d, oy, op + n * o_sn + oy * o_sh, o_sc, o_sw,
                        acc.data());
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Generic path (any strides): the CUDA kernel's computation, one output element at a time. Cloned
// like the fast paths, so that it too uses fused multiply-adds where they exist (as nvcc does) and
// gives the same bits as they do.

template <typename scalar_t, typename acc_t>
FVK_CPU_CLONES void generic_range(const scalar_t* xp,      // x data, strides x_s*
                                  const int64_t* x_s,      // x strides (N, C, H, W)
                                  const acc_t* weight,     // [C, K*K]
                                  const acc_t* bias,       // [C]
                                  const Dims& d, int act,
                                  scalar_t* op,            // out data, strides o_s*
                                  const int64_t* o_s,      // out strides (N, C, H, W)
                                  int64_t i0, int64_t i1) {  // range of (n, c, oy, ox) linear indices
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t ox = i % d.OW, oy = (i / d.OW) % d.OH;
    const int64_t c = (i / (d.OW * d.OH)) % d.C, n = i / (d.OW * d.OH * d.C);
    const acc_t sum = dwconv_point_sum(xp + n * x_s[0] + c * x_s[1], x_s[2], x_s[3], d.H, d.W,
                                       weight + c * d.K * d.K, d.K, d.S, oy, ox);
    op[n * o_s[0] + c * o_s[1] + oy * o_s[2] + ox * o_s[3]] =
        static_cast<scalar_t>(dwconv_epilogue(sum, bias[c], act));
  }
}

template <typename scalar_t, typename acc_t>
void dwconv_generic(const at::Tensor& x, const acc_t* weight, const acc_t* bias, const Dims& d, int act,
                    const at::Tensor& out) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t x_s[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t o_s[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  at::parallel_for(0, d.N * d.C * d.OH * d.OW, kGrainElems, [&](int64_t i0, int64_t i1) {
    generic_range(xp, x_s, weight, bias, d, act, op, o_s, i0, i1);
  });
}

}  // namespace

void dwconv_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const Dims d{x.size(0), x.size(1), x.size(2), x.size(3), out.size(2), out.size(3),
               static_cast<int>(kernel_size), static_cast<int>(stride)};
  // A size-1 dimension's stride says nothing about the layout.
  const bool width_contiguous = x.stride(3) == 1 || d.W == 1;
  const bool channel_contiguous = x.stride(1) == 1 || d.C == 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t* w = weight.const_data_ptr<acc_t>();
    const acc_t* b = bias.const_data_ptr<acc_t>();
    if (width_contiguous) {
      dwconv_nchw<scalar_t>(x, w, b, d, static_cast<int>(act), out);
    } else if (channel_contiguous) {
      const at::Tensor weight_t = weight.t().contiguous();  // [K*K, C], C*K*K values: cheap
      const PixelEpilogue<acc_t> e{b, static_cast<int>(act), nullptr, nullptr, acc_t(0)};
      dwconv_channels_last<false, scalar_t>(x, weight_t.const_data_ptr<acc_t>(), e, d, out);
    } else {
      dwconv_generic<scalar_t>(x, w, b, d, static_cast<int>(act), out);
    }
  });
}

void dwconv_layernorm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t kernel_size,
                          int64_t stride, double eps, const at::Tensor& out) {
  if (out.numel() == 0) return;
  // The LayerNorm needs all channels of a pixel together: the channels_last path's order. Other
  // layouts pay one copy of x into it (EdgeNeXt's maps are channels_last already).
  const bool channel_contiguous = x.stride(1) == 1 || x.size(1) == 1;
  const at::Tensor xc = channel_contiguous ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  const Dims d{xc.size(0), xc.size(1), xc.size(2), xc.size(3), out.size(2), out.size(3),
               static_cast<int>(kernel_size), static_cast<int>(stride)};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dwconv_layernorm_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const at::Tensor weight_t = weight.t().contiguous();  // [K*K, C]
    const PixelEpilogue<acc_t> e{bias.const_data_ptr<acc_t>(), kActNone, norm_weight.const_data_ptr<acc_t>(),
                                 norm_bias.const_data_ptr<acc_t>(), static_cast<acc_t>(eps)};
    dwconv_channels_last<true, scalar_t>(xc, weight_t.const_data_ptr<acc_t>(), e, d, out);
  });
}

}  // namespace fastvit_kernels
