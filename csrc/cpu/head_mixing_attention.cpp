// CPU kernels for head_mixing_attention: loops (at::parallel_for) around the math in
// ../head_mixing_attention.h. Arguments are validated once, in ../ops.cpp, before
// head_mixing_attention_cpu is called.
//
// A parallel task is a range of work items (image, block of kQueryBlock queries). For each image it
// meets, a task gathers that image's keys and values, all heads, once into acc_t buffers: K
// transposed [heads, d, Np] and V [heads, Nk, dvp], zero-padded to multiples of kPad keys / channels.
// Then per tile of kRows query rows (all heads at once, since the mixing needs every head's scores):
//   1. s[h, :] = scale * q[h] K[h]^T into a [heads, Np] scratch per row, in register tiles of kRows rows
//      x kCols vectors of keys (the sum over channels in ascending order from zero, as hma_dot);
//   2. the header's pre-mix, softmax, post-mix and LayerNorm over heads on that scratch (a second
//      [heads, Np] buffer takes each mix);
//   3. out[g, :] = sum_j a[g, j] V[g, j, :] in register tiles of kRows rows x kCols vectors of channels
//      (keys in ascending order, as hma_out_element).
// The [heads, Nq, Nk] map exists only as kRows rows of [2, heads, Np] scratch per thread.
// Queries whose channels are not contiguous (q channel stride != 1) take the CUDA kernel's element
// functions, hma_dot and hma_out_element on the unpacked k and v, instead: that keeps the CUDA math
// under the CPU tests.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../head_mixing_attention.h"
#include "simd.h"

namespace fastvit_kernels {
namespace {

// Queries per work item: enough work per item (kQueryBlock * heads * Nk * (d + dv) multiply-adds) to
// amortize the gather of an image's K and V when a task starts on a new image, small enough that
// a batch of 8 images of 65 tokens still splits across threads.
constexpr int64_t kQueryBlock = 16;
constexpr int64_t kPad = 8;  // keys and channels padded to a multiple of this (every vector width)

// Register tile: kRows query rows x kCols vectors of keys (or channels), each K (V) vector load feeding
// kRows multiply-adds and each query (weight) broadcast kCols: 4 x 2 accumulators + 2 loads + 1
// broadcast in 11 of the 16 AVX2 registers. A per-row loop would instead load and store the score row
// once per channel (two memory operations per multiply-add). Explicit vector types because g++
// vectorizes the naive loops along the wrong axis.
constexpr int64_t kRows = 4;
constexpr int kCols = 2;
static_assert(kQueryBlock % kRows == 0, "a query block is whole tiles");

#define FVK_INLINE inline __attribute__((always_inline))

// s_r[j0 + j] = scale * sum_e q[r, e] kt[e, j0 + j] for the NV vectors of keys from j0, rows r of the
// tile; the sum over channels in ascending order from zero, as hma_dot.
template <int NV, typename acc_t>
FVK_INLINE void score_block(const acc_t* __restrict__ q, int64_t q_ld,  // q[r * q_ld + e]
                            const acc_t* __restrict__ kt, int64_t Np, int64_t d, acc_t scale,
                            acc_t* const* s, int64_t j0) {
  using V = vec_t<acc_t>;
  constexpr int64_t L = kLanes<acc_t>;
  V c[kRows][NV] = {};
  tile_accumulate<kRows, NV>(c, q, q_ld, kt + j0, Np, 0, d);
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int n = 0; n < NV; ++n) store_vec(s[r] + j0 + n * L, c[r][n] * scale);
}

// o[r, e0 + e] = sum_j a_r[j] v[j, e0 + e] for the NV vectors of channels from e0 (keys ascending).
template <int NV, typename acc_t>
FVK_INLINE void value_block(const acc_t* const* a, const acc_t* __restrict__ v, int64_t Nk, int64_t dvp,
                            acc_t* __restrict__ o, int64_t e0) {
  using V = vec_t<acc_t>;
  constexpr int64_t L = kLanes<acc_t>;
  V c[kRows][NV] = {};
  for (int64_t j = 0; j < Nk; ++j) {
    V vv[NV];
#pragma GCC unroll 2
    for (int n = 0; n < NV; ++n) vv[n] = load_vec(v + j * dvp + e0 + n * L);
#pragma GCC unroll 4
    for (int64_t r = 0; r < kRows; ++r) {
      const acc_t w = a[r][j];
#pragma GCC unroll 2
      for (int n = 0; n < NV; ++n) c[r][n] += w * vv[n];
    }
  }
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int n = 0; n < NV; ++n) store_vec(o + r * dvp + e0 + n * L, c[r][n]);
}

// One tile of kRows query rows, all heads (steps 1-3 of the file comment). Compiled for AVX2 and
// baseline x86-64. Row r's scratch is bufs + r * 2 * heads * Np: its buf0, then its buf1.
template <typename acc_t, typename scalar_t>
FVK_CPU_CLONES void tile_packed(const acc_t* __restrict__ qa,  // [kRows, heads, d] the tile's queries
                                const acc_t* __restrict__ kt,  // [heads, d, Np] keys, transposed, zero-padded
                                const acc_t* __restrict__ vb,  // [heads, Nk, dvp] values, zero-padded
                                acc_t* __restrict__ bufs,      // [kRows, 2, heads, Np] scratch
                                acc_t* __restrict__ o,         // [kRows, dvp] one head's output
                                scalar_t* out_row, int64_t rows,  // out[b, i0, 0]; rows to store
                                const HeadMixGeometry& g, const HeadMixParams<acc_t>& p, int64_t Np,
                                int64_t dvp, acc_t scale) {
  constexpr int64_t L = kLanes<acc_t>;
  const int64_t heads = g.heads, d = g.d, dv = g.dv, Nk = g.Nk, row_buf = 2 * heads * Np;
  const acc_t* a[kRows];
  acc_t* s[kRows];
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = 0; r < kRows; ++r) s[r] = bufs + r * row_buf + (g.has_pre ? 0 : heads * Np) + h * Np;
    int64_t j0 = 0;
    for (; j0 + kCols * L <= Np; j0 += kCols * L) score_block<kCols>(qa + h * d, heads * d, kt + h * d * Np, Np, d, scale, s, j0);
    if (j0 < Np) score_block<1>(qa + h * d, heads * d, kt + h * d * Np, Np, d, scale, s, j0);
  }
  for (int64_t r = 0; r < kRows; ++r) {
    acc_t* buf0 = bufs + r * row_buf;
    a[r] = hma_map_from_scores(buf0, buf0 + heads * Np, Np, heads, Nk, g, p);
  }
  for (int64_t h = 0; h < heads; ++h) {
    const acc_t* a_h[kRows];
    for (int64_t r = 0; r < kRows; ++r) a_h[r] = a[r] + h * Np;
    int64_t e0 = 0;
    for (; e0 + kCols * L <= dvp; e0 += kCols * L) value_block<kCols>(a_h, vb + h * Nk * dvp, Nk, dvp, o, e0);
    if (e0 < dvp) value_block<1>(a_h, vb + h * Nk * dvp, Nk, dvp, o, e0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = 0; e < dv; ++e) out_row[r * g.o_n + (h * dv + e) * g.o_c] = static_cast<scalar_t>(o[r * dvp + e]);
  }
}

// The same row through the header's element functions on the unpacked q, k, v (the CUDA kernel's math).
template <typename acc_t, typename scalar_t>
void row_per_element(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out, acc_t* buf0,
                     acc_t* buf1, int64_t ld, const HeadMixGeometry& g, const HeadMixParams<acc_t>& p,
                     int64_t b, int64_t i, acc_t scale) {
  acc_t* scores = g.has_pre ? buf0 : buf1;
  for (int64_t h = 0; h < g.heads; ++h)
    for (int64_t j = 0; j < g.Nk; ++j)
      scores[h * ld + j] = hma_dot(q + b * g.q_b + h * g.q_h + i * g.q_n, g.q_c,
                                   k + b * g.k_b + h * g.k_h + j * g.k_n, g.k_c, g.d, scale);
  const acc_t* a = hma_map_from_scores(buf0, buf1, ld, g.heads, g.Nk, g, p);
  scalar_t* out_row = out + b * g.o_b + i * g.o_n;
  for (int64_t h = 0; h < g.heads; ++h)
    for (int64_t e = 0; e < g.dv; ++e)
      out_row[(h * g.dv + e) * g.o_c] =
          static_cast<scalar_t>(hma_out_element(a + h * ld, v + b * g.v_b + h * g.v_h, g.v_n, g.v_c, g.Nk, e));
}

template <typename scalar_t>
void head_mixing_attention_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                                  const HeadMixGeometry& g, const HeadMixParams<acc_type_t<scalar_t>>& p,
                                  double scale_d) {
  using acc_t = acc_type_t<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t heads = g.heads, d = g.d, dv = g.dv, Nk = g.Nk;
  const int64_t Np = round_up(Nk, kPad), dvp = round_up(dv, kPad);
  const int64_t q_blocks = (g.Nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t items = g.B * q_blocks;
  const bool per_element = g.q_c != 1;
  // Grain: about 2^18 multiply-adds of work per chunk before OpenMP's fork/join pays off.
  const int64_t work_per_item = std::max<int64_t>(1, std::min(g.Nq, kQueryBlock) * heads * Nk * (d + dv));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work_per_item);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt(per_element ? 0 : heads * d * Np, acc_t(0)),
        vb(per_element ? 0 : heads * Nk * dvp, acc_t(0)), qa(kRows * heads * d),
        bufs(kRows * 2 * heads * Np, acc_t(0)), o(kRows * dvp);
    acc_t* buf0 = bufs.data();
    acc_t* buf1 = buf0 + heads * Np;
    int64_t packed = -1;  // the image held in kt and vb
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / q_blocks;
      const int64_t i_begin = (item % q_blocks) * kQueryBlock, i_end = std::min(g.Nq, i_begin + kQueryBlock);
      if (per_element) {  // the CUDA kernel's element functions (see the file comment)
        for (int64_t i = i_begin; i < i_end; ++i)
          row_per_element(q, k, v, out, buf0, buf1, Np, g, p, b, i, scale);
        continue;
      }
      if (b != packed) {
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* k_head = k + b * g.k_b + h * g.k_h;
          const scalar_t* v_head = v + b * g.v_b + h * g.v_h;
          acc_t* kt_h = kt.data() + h * d * Np;
          acc_t* vb_h = vb.data() + h * Nk * dvp;
          for (int64_t j = 0; j < Nk; ++j) {
            for (int64_t e = 0; e < d; ++e) kt_h[e * Np + j] = static_cast<acc_t>(k_head[j * g.k_n + e * g.k_c]);
            for (int64_t e = 0; e < dv; ++e) vb_h[j * dvp + e] = static_cast<acc_t>(v_head[j * g.v_n + e * g.v_c]);
          }
        }
        packed = b;
      }
      for (int64_t i0 = i_begin; i0 < i_end; i0 += kRows) {
        const int64_t rows = std::min(kRows, i_end - i0);
        for (int64_t r = 0; r < kRows; ++r) {  // rows past the end repeat the last query, unstored
          const int64_t i = i0 + std::min(r, rows - 1);
          for (int64_t h = 0; h < heads; ++h) {
            const scalar_t* q_row = q + b * g.q_b + h * g.q_h + i * g.q_n;
            for (int64_t e = 0; e < d; ++e) qa[(r * heads + h) * d + e] = static_cast<acc_t>(q_row[e]);
          }
        }
        tile_packed(qa.data(), kt.data(), vb.data(), bufs.data(), o.data(), out + b * g.o_b + i0 * g.o_n, rows, g,
                    p, Np, dvp, scale);
      }
    }
  });
}

}  // namespace

// The optional parameters as acc_t contiguous tensors (a no-op for float32 parameters with 16-bit or
// float32 inputs; heads x heads numbers otherwise).
static at::Tensor as_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

void head_mixing_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                               const c10::optional<at::Tensor>& pre_mix, const c10::optional<at::Tensor>& post_mix,
                               const c10::optional<at::Tensor>& norm_weight,
                               const c10::optional<at::Tensor>& norm_bias, double norm_eps, const at::Tensor& out) {
  if (out.numel() == 0) return;
  HeadMixGeometry g;
  g.B = q.size(0), g.heads = q.size(1), g.Nq = q.size(2), g.Nk = k.size(2), g.d = q.size(3), g.dv = v.size(3);
  g.q_b = q.stride(0), g.q_h = q.stride(1), g.q_n = q.stride(2), g.q_c = q.stride(3);
  g.k_b = k.stride(0), g.k_h = k.stride(1), g.k_n = k.stride(2), g.k_c = k.stride(3);
  g.v_b = v.stride(0), g.v_h = v.stride(1), g.v_n = v.stride(2), g.v_c = v.stride(3);
  g.o_b = out.stride(0), g.o_n = out.stride(1), g.o_c = out.stride(2);
  g.has_pre = pre_mix.has_value(), g.has_post = post_mix.has_value();
  g.has_norm = norm_weight.has_value(), g.has_norm_bias = norm_bias.has_value();
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor pre = as_acc(pre_mix, acc), post = as_acc(post_mix, acc), w = as_acc(norm_weight, acc),
                   bias = as_acc(norm_bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "head_mixing_attention_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    HeadMixParams<acc_t> p;
    p.pre = pre.defined() ? pre.const_data_ptr<acc_t>() : nullptr;
    p.post = post.defined() ? post.const_data_ptr<acc_t>() : nullptr;
    p.norm_weight = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    p.norm_bias = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    p.norm_eps = static_cast<acc_t>(norm_eps);
    head_mixing_attention_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                           v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, p,
                                           scale);
  });
}

}  // namespace fastvit_kernels
