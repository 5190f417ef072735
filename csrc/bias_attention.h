// LeViT attention with a learned relative-position bias: the per-query-row math, shared by the CPU
// kernels (csrc/cpu/bias_attention.cpp) and the CUDA kernel (csrc/cuda/bias_attention.cu).
//
// q [B, heads, Nq, dk], k [B, heads, Nk, dk], v [B, heads, Nk, dv], any strides; table [heads, Nk];
// out [B, Nq, heads * dv] with channel h * dv + e. The keys are the R_h x R_w grid, key j at
// (j / R_w, j % R_w); the queries are that grid subsampled by `stride` (timm's AttentionDownsample;
// stride 1 is LeViT's Attention), nqw = ceil(R_w / stride) per row, query i at
// ((i / nqw) * stride, (i % nqw) * stride). For one query row of one (image, head):
//
//   s_j = scale * sum_e q[e] * k_j[e] + table[h, |qy - ky| * R_w + |qx - kx|]   (acc_t, e ascending)
//   out[e] = act(sum_j exp(s_j - max_j s) v_j[e] / sum_j exp(s_j - max_j s))
//
// The bias index is computed from the two tokens' coordinates: no [heads, Nq, Nk] bias exists
// anywhere, and the table read is always the current one.
#pragma once

#include "common.h"

// Fully unrolled loops over a compile-time channel chunk keep the accumulators in registers on the
// GPU (a runtime trip count would index them dynamically and put them in local memory).
#ifdef __CUDACC__
#define FVK_UNROLL _Pragma("unroll")
#else
#define FVK_UNROLL _Pragma("GCC unroll 64")
#endif

namespace fastvit_kernels {

enum BiasAttentionAct : int64_t { kBiasAttentionNone = 0, kBiasAttentionHardswish = 1 };

// Sizes and strides (in elements), passed by value to the CUDA kernel: one kernel for every layout.
struct BiasAttentionGeometry {
  int64_t B, heads, Nq, Nk, dk, dv;
  int64_t R_h, R_w, stride, nqw;      // key grid, query subsampling, queries per query-grid row
  int64_t q_b, q_h, q_n, q_c;         // q strides: image, head, token, channel
  int64_t k_b, k_h, k_n, k_c;         // k strides
  int64_t v_b, v_h, v_n, v_c;         // v strides
  int64_t t_h, t_n;                   // table strides: head, entry
  int64_t o_b, o_n, o_c;              // out strides: image, token, channel (h * dv + e)
  int64_t act;                        // BiasAttentionAct
};

// Grid position (qy, qx) of query i: the key grid subsampled by `stride`, nqw queries per row.
FVK_HD inline void bias_attention_query_position(int64_t i, int64_t nqw, int64_t stride, int64_t& qy,
                                                 int64_t& qx) {
  qy = (i / nqw) * stride;
  qx = (i % nqw) * stride;
}

// Table entry of the bias between a query at (qy, qx) and a key at (ky, kx): timm's
// _compute_attention_bias_idxs, |dy| * R_w + |dx| (always < R_h * R_w).
FVK_HD inline int64_t bias_attention_index(int64_t qy, int64_t qx, int64_t ky, int64_t kx, int64_t R_w) {
  const int64_t dy = qy > ky ? qy - ky : ky - qy;
  const int64_t dx = qx > kx ? qx - kx : kx - qx;
  return dy * R_w + dx;
}

// Hardswish as PyTorch computes it: x * min(max(x + 3, 0), 6) / 6.
template <typename acc_t>
FVK_HD inline acc_t hardswish(acc_t x) {
  acc_t r = x + acc_t(3);
  r = r > acc_t(0) ? r : acc_t(0);
  r = r < acc_t(6) ? r : acc_t(6);
  return x * r / acc_t(6);
}

template <typename acc_t>
FVK_HD inline acc_t bias_attention_activation(acc_t x, int64_t act) {
  return act == kBiasAttentionHardswish ? hardswish(x) : x;
}

// Output channels per pass of bias_attention_row: 256 bytes of accumulators (64 floats, 32 doubles),
// which fit the registers of a CUDA thread next to the rest of the row's state (the common value
// dims, 32 and 64, take one pass; 128 takes two).
template <typename acc_t>
constexpr int bias_attention_chunk() {
  return 256 / static_cast<int>(sizeof(acc_t));
}

// scale * (q . k) over dk channels, in acc_t, channels in ascending order from zero.
template <typename acc_t, typename scalar_t>
FVK_HD inline acc_t bias_attention_dot(const scalar_t* q, int64_t q_c, const scalar_t* k, int64_t k_c,
                                       int64_t dk, acc_t scale) {
  acc_t dot = acc_t(0);
  for (int64_t e = 0; e < dk; ++e) dot += static_cast<acc_t>(q[e * q_c]) * static_cast<acc_t>(k[e * k_c]);
  return scale * dot;
}

// The whole row for output channels [e0, e0 + min(kChunk, dv - e0)) of query i of (image b, head h):
// scores with the bias over all Nk keys, one-pass online softmax (running max mx, running sum, the
// accumulators rescaled by exp(old max - new max) whenever the max grows: O(log Nk) times per row for
// random scores), then normalisation, activation and store. Callers cover dv in chunks of kChunk
// channels, recomputing the scores per chunk.
template <int kChunk, typename acc_t, typename scalar_t, typename table_t>
FVK_HD inline void bias_attention_row(
    const scalar_t* q,      // q[0, 0, 0, 0]
    const scalar_t* k,      // k[0, 0, 0, 0]
    const scalar_t* v,      // v[0, 0, 0, 0]
    const table_t* table,   // table[0, 0]
    scalar_t* out,          // out[0, 0, 0]
    const BiasAttentionGeometry& g, int64_t b, int64_t h, int64_t i, int64_t e0, acc_t scale) {
  const scalar_t* q_row = q + b * g.q_b + h * g.q_h + i * g.q_n;
  const scalar_t* k_row = k + b * g.k_b + h * g.k_h;
  const scalar_t* v_row = v + b * g.v_b + h * g.v_h + e0 * g.v_c;
  const table_t* t_head = table + h * g.t_h;
  const int64_t ne = g.dv - e0 < kChunk ? g.dv - e0 : kChunk;
  int64_t qy, qx;
  bias_attention_query_position(i, g.nqw, g.stride, qy, qx);

  acc_t acc[kChunk];
  FVK_UNROLL
  for (int e = 0; e < kChunk; ++e) acc[e] = acc_t(0);
  // -inf: the first key always raises the max, where exp(-inf) = 0 (fast_exp clamps) clears nothing.
  acc_t mx = -INFINITY, sum = acc_t(0);
  for (int64_t ky = 0; ky < g.R_h; ++ky) {
    for (int64_t kx = 0; kx < g.R_w; ++kx) {
      const int64_t j = ky * g.R_w + kx;
      // A plain load: load_ro's __ldg has no c10::Half / c10::BFloat16 overload (16-bit tables).
      const acc_t bias = static_cast<acc_t>(t_head[bias_attention_index(qy, qx, ky, kx, g.R_w) * g.t_n]);
      const acc_t s = bias_attention_dot(q_row, g.q_c, k_row + j * g.k_n, g.k_c, g.dk, scale) + bias;
      if (s > mx) {  // a NaN score compares false and poisons sum and acc below, as softmax would
        const acc_t c = fast_exp(mx - s);
        sum *= c;
        FVK_UNROLL
        for (int e = 0; e < kChunk; ++e) acc[e] *= c;
        mx = s;
      }
      const acc_t p = fast_exp(s - mx);
      sum += p;
      const scalar_t* v_j = v_row + j * g.v_n;
      FVK_UNROLL
      for (int e = 0; e < kChunk; ++e)
        if (e < ne) acc[e] += p * static_cast<acc_t>(v_j[e * g.v_c]);
    }
  }
  const acc_t inv = acc_t(1) / sum;  // sum >= 1 (the max key contributes exp(0)): no division by 0
  scalar_t* o = out + b * g.o_b + i * g.o_n + (h * g.dv + e0) * g.o_c;
  FVK_UNROLL
  for (int e = 0; e < kChunk; ++e)
    if (e < ne) o[e * g.o_c] = static_cast<scalar_t>(bias_attention_activation(acc[e] * inv, g.act));
}

}  // namespace fastvit_kernels
