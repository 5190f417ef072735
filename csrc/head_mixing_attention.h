// Attention with heads mixed by learned heads x heads matrices (CaiT's talking heads, DeepViT's
// re-attention): the per-query-row math, shared by the CPU kernels
// (csrc/cpu/head_mixing_attention.cpp) and the CUDA kernel (csrc/cuda/head_mixing_attention.cu).
//
// q [B, heads, Nq, d], k [B, heads, Nk, d], v [B, heads, Nk, dv], any strides; out [B, Nq, heads * dv]
// with channel g * dv + e. The mixing parameters arrive converted to acc_t and contiguous (the
// launchers do that: they are heads x heads numbers). For one query row i of one image b, with a
// scratch of two [heads, ld] buffers (ld >= Nk) of acc_t:
//
//   s[h, j] = scale * sum_e q[h, e] k[h, j, e]                      (hma_dot, e ascending from 0)
//   t[g, j] = sum_h s[h, j] pre[h, g]                               (hma_mix_head; t = s without pre)
//   p[h, :] = softmax(t[h, :])                                      (hma_row_max, hma_exp_sum, hma_scale_row)
//   m[g, j] = sum_h p[h, j] post[h, g]                              (hma_mix_head; m = p without post)
//   a[:, j] = LayerNorm over heads of m[:, j] (weight, optional bias)  (hma_norm_columns; a = m without)
//   out[g, e] = sum_j a[g, j] v[g, j, e]                            (hma_out_element, j ascending from 0)
//
// All loops over keys j take (j_begin, j_end, j_step): the CPU calls them with step 1 (loops g++
// vectorizes), the CUDA kernel with its thread index and block size. The heads x Nk map lives in
// that scratch only (CPU: per thread; CUDA: shared memory), never in global memory.
#pragma once

#include "common.h"

namespace fastvit_kernels {

// Sizes, strides (in elements) and flags, passed by value to the CUDA kernel: one kernel for every
// layout and every combination of the optional steps (the flags are uniform branches per block).
struct HeadMixGeometry {
  int64_t B, heads, Nq, Nk, d, dv;
  int64_t q_b, q_h, q_n, q_c;  // q strides: image, head, token, channel
  int64_t k_b, k_h, k_n, k_c;  // k strides
  int64_t v_b, v_h, v_n, v_c;  // v strides
  int64_t o_b, o_n, o_c;       // out strides: image, token, channel (g * dv + e)
  bool has_pre, has_post, has_norm, has_norm_bias;
};

// The mixing parameters in acc_t, contiguous; null when the step is off.
template <typename acc_t>
struct HeadMixParams {
  const acc_t* pre;          // [heads, heads]: t[g] = sum_h s[h] pre[h, g]
  const acc_t* post;         // [heads, heads]: m[g] = sum_h p[h] post[h, g]
  const acc_t* norm_weight;  // [heads]
  const acc_t* norm_bias;    // [heads] or null
  acc_t norm_eps;
};

// scale * (q . k) over d channels, in acc_t, channels in ascending order from zero.
template <typename acc_t, typename q_t, typename k_t>
FVK_HD inline acc_t hma_dot(const q_t* q, int64_t q_c, const k_t* k, int64_t k_c, int64_t d, acc_t scale) {
  acc_t dot = acc_t(0);
  for (int64_t e = 0; e < d; ++e) dot += static_cast<acc_t>(q[e * q_c]) * static_cast<acc_t>(k[e * k_c]);
  return scale * dot;
}

// dst[g, j] = sum_h src[h, j] mix[h, g] for the keys j of the range, h ascending from 0. src and dst
// are [heads, ld] buffers (distinct: every dst row reads every src row).
template <typename acc_t>
FVK_HD inline void hma_mix_head(const acc_t* __restrict__ src, acc_t* __restrict__ dst, int64_t ld, int64_t heads,
                                const acc_t* __restrict__ mix, int64_t g, int64_t j_begin, int64_t j_end,
                                int64_t j_step) {
  acc_t* out = dst + g * ld;
  for (int64_t j = j_begin; j < j_end; j += j_step) out[j] = acc_t(0);
  for (int64_t h = 0; h < heads; ++h) {
    const acc_t w = mix[h * heads + g];
    const acc_t* in = src + h * ld;
    for (int64_t j = j_begin; j < j_end; j += j_step) out[j] += in[j] * w;
  }
}

// Softmax of one head's row in three steps so that a block of threads can reduce between them:
// the max of the range (the caller reduces partial maxima), row[j] = exp(row[j] - max) and the sum of
// the range (the caller reduces partial sums), then row[j] *= 1 / sum.
template <typename acc_t>
FVK_HD inline acc_t hma_row_max(const acc_t* row, int64_t j_begin, int64_t j_end, int64_t j_step) {
  acc_t mx = -INFINITY;
  for (int64_t j = j_begin; j < j_end; j += j_step) mx = row[j] > mx ? row[j] : mx;  // NaN: skipped here,
  return mx;                                                                           // poisons the row below
}

template <typename acc_t>
FVK_HD inline acc_t hma_exp_sum(acc_t* row, acc_t mx, int64_t j_begin, int64_t j_end, int64_t j_step) {
  acc_t sum = acc_t(0);
  for (int64_t j = j_begin; j < j_end; j += j_step) {
    row[j] = fast_exp(row[j] - mx);
    sum += row[j];
  }
  return sum;
}

template <typename acc_t>
FVK_HD inline void hma_scale_row(acc_t* row, acc_t factor, int64_t j_begin, int64_t j_end, int64_t j_step) {
  for (int64_t j = j_begin; j < j_end; j += j_step) row[j] *= factor;
}

// The whole softmax of one row, serially (the CPU, and the CUDA kernel's thread per head).
template <typename acc_t>
FVK_HD inline void hma_softmax_row(acc_t* row, int64_t n) {
  const acc_t mx = hma_row_max(row, 0, n, 1);
  const acc_t sum = hma_exp_sum(row, mx, 0, n, 1);
  hma_scale_row(row, acc_t(1) / sum, 0, n, 1);  // sum >= 1: the max key contributes exp(0)
}

// sqrt in acc_t's precision on host and device (a plain sqrt(float) on the host is the double one).
template <typename acc_t>
FVK_HD inline acc_t hma_sqrt(acc_t x) {
#ifdef __CUDA_ARCH__
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// LayerNorm across heads of each column j of buf [heads, ld], in place, as F.layer_norm computes it:
// mean, biased variance of (x - mean), rstd = 1 / sqrt(var + eps), (x - mean) * rstd * w[h] (+ b[h]).
template <typename acc_t>
FVK_HD inline void hma_norm_columns(acc_t* buf, int64_t ld, int64_t heads, const HeadMixParams<acc_t>& p,
                                    int64_t j_begin, int64_t j_end, int64_t j_step) {
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(heads);
  for (int64_t j = j_begin; j < j_end; j += j_step) {
    acc_t mean = acc_t(0);
    for (int64_t h = 0; h < heads; ++h) mean += buf[h * ld + j];
    mean *= inv_heads;
    acc_t var = acc_t(0);
    for (int64_t h = 0; h < heads; ++h) {
      const acc_t x = buf[h * ld + j] - mean;
      var += x * x;
    }
    const acc_t rstd = acc_t(1) / hma_sqrt(var * inv_heads + p.norm_eps);
    for (int64_t h = 0; h < heads; ++h) {
      const acc_t y = (buf[h * ld + j] - mean) * rstd * p.norm_weight[h];
      buf[h * ld + j] = p.norm_bias ? y + p.norm_bias[h] : y;
    }
  }
}

// out[e] of one head: sum_j a[j] v[j, e] over the Nk keys, j ascending from 0.
template <typename acc_t, typename v_t>
FVK_HD inline acc_t hma_out_element(const acc_t* a, const v_t* v, int64_t v_n, int64_t v_c, int64_t Nk,
                                    int64_t e) {
  acc_t o = acc_t(0);
  for (int64_t j = 0; j < Nk; ++j) o += a[j] * static_cast<acc_t>(v[j * v_n + e * v_c]);
  return o;
}

// Steps 2-5 of the file comment for one query row whose scores are in buf0 (with pre-mixing) or
// buf1 (without), serially; returns the buffer holding the map a. The CPU calls this; the CUDA
// kernel runs the same steps split over its threads.
template <typename acc_t>
FVK_HD inline acc_t* hma_map_from_scores(acc_t* buf0, acc_t* buf1, int64_t ld, int64_t heads, int64_t Nk,
                                         const HeadMixGeometry& g, const HeadMixParams<acc_t>& p) {
  if (g.has_pre)
    for (int64_t h = 0; h < heads; ++h) hma_mix_head(buf0, buf1, ld, heads, p.pre, h, 0, Nk, 1);
  for (int64_t h = 0; h < heads; ++h) hma_softmax_row(buf1 + h * ld, Nk);
  acc_t* a = buf1;
  if (g.has_post) {
    for (int64_t h = 0; h < heads; ++h) hma_mix_head(buf1, buf0, ld, heads, p.post, h, 0, Nk, 1);
    a = buf0;
  }
  if (g.has_norm) hma_norm_columns(a, ld, heads, p, 0, Nk, 1);
  return a;
}

}  // namespace fastvit_kernels
