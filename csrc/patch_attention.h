// Patch-grouped multi-head attention (MobileViT): the per-query-row math, shared by the CPU kernels
// (csrc/cpu/patch_attention.cpp) and the CUDA kernel (csrc/cuda/patch_attention.cu).
//
// qkv is [B, H, W, 3*C] in image order, last dim laid out (3, heads, d); out is [B, H, W, C], last
// dim (heads, d). Sequence (b, py, px) holds the N = nh * nw tokens at offset (py, px) inside their
// ph x pw patch; its token m is (i, j) = (m / nw, m % nw), the pixel (y, x) = (i*ph + py, j*pw + px):
//
//   qkv offset of (b, y, x, part, head, e) = b*s_b + y*s_h + x*s_w + (part*C + head*d + e)*s_c
//
// with part 0/1/2 = q/k/v. The grouping is only this address arithmetic: no unfold/fold copies.
// For one query row of one (sequence, head):
//
//   s_j = scale * sum_e q[e] * k_j[e]                 (acc_t, e ascending from zero)
//   out[e] = sum_j exp(s_j - max_j s) v_j[e] / sum_j exp(s_j - max_j s)
//
// computed in one pass over the keys (online softmax: running max m, running sum l, and the
// accumulator acc[e] rescaled by exp(m_old - m_new) whenever the max grows).
#pragma once

#include "common.h"

namespace fastvit_kernels {

// Offset (in elements) of token m of a sequence from the sequence's first pixel (i = j = 0):
// (m / nw) * ph rows down and (m % nw) * pw columns right. tok_sh = ph * s_h, tok_sw = pw * s_w.
FVK_HD inline int64_t patch_token_offset(int64_t m, int64_t nw, int64_t tok_sh, int64_t tok_sw) {
  return (m / nw) * tok_sh + (m % nw) * tok_sw;
}

// Offset of the first pixel (i = j = 0) of sequence (b, py, px).
FVK_HD inline int64_t patch_sequence_offset(int64_t b, int64_t py, int64_t px, int64_t s_b, int64_t s_h,
                                            int64_t s_w) {
  return b * s_b + py * s_h + px * s_w;
}

// scale * (q . k) over d channels, in acc_t, channels in ascending order from zero.
template <typename acc_t, typename q_t, typename k_t>
FVK_HD inline acc_t attention_score(const q_t* q,   // &q[0] of the query row
                                    int64_t q_sc,   // q channel stride
                                    const k_t* k,   // &k[0] of the key row
                                    int64_t k_sc,   // k channel stride
                                    int64_t d, acc_t scale) {
  acc_t dot = acc_t(0);
  for (int64_t e = 0; e < d; ++e) dot += static_cast<acc_t>(q[e * q_sc]) * static_cast<acc_t>(k[e * k_sc]);
  return scale * dot;
}

// Running state of one row's online softmax: max score so far and sum of exp(s - max).
template <typename acc_t>
struct OnlineSoftmax {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
FVK_HD inline OnlineSoftmax<acc_t> online_softmax_init(acc_t* acc, int64_t ne) {
  for (int64_t e = 0; e < ne; ++e) acc[e] = acc_t(0);
  // -inf: the first key always takes the "new max" branch, where exp(-inf - s) = 0 clears nothing
  // (acc and sum are still zero). fast_exp clamps its argument, so -inf gives exactly 0.
  return OnlineSoftmax<acc_t>{-INFINITY, acc_t(0)};
}

// Raises the running max to new_max (>= st.max): sum and acc are rescaled by exp(old max - new_max).
template <typename acc_t>
FVK_HD inline void online_softmax_rescale(OnlineSoftmax<acc_t>& st, acc_t new_max, acc_t* acc, int64_t ne) {
  const acc_t c = fast_exp(st.max - new_max);
  st.sum *= c;
  for (int64_t e = 0; e < ne; ++e) acc[e] *= c;
  st.max = new_max;
}

// Adds one key of weight p = exp(s - st.max) and value row v: sum += p, acc[e] += p * v[e].
template <typename acc_t, typename v_t>
FVK_HD inline void online_softmax_accumulate(OnlineSoftmax<acc_t>& st, acc_t p,
                                             const v_t* v,  // &v_j[e0]: first accumulated channel
                                             int64_t v_sc,  // v channel stride
                                             acc_t* acc, int64_t ne) {
  st.sum += p;
  for (int64_t e = 0; e < ne; ++e) acc[e] += p * static_cast<acc_t>(v[e * v_sc]);
}

// Adds key j (score s, value row v) to the row's state. When s raises the max, acc and sum are
// first rescaled: for random scores that happens O(log N) times per row, so the common step is one
// exp and one multiply-add per channel. A NaN score compares false and poisons sum and acc (as
// softmax would). Callers holding a block of scores may instead rescale once to the block's max
// and accumulate each key with p = exp(s - max): the same values, one rescale per block.
template <typename acc_t, typename v_t>
FVK_HD inline void online_softmax_step(OnlineSoftmax<acc_t>& st, acc_t s, const v_t* v, int64_t v_sc,
                                       acc_t* acc, int64_t ne) {
  if (s > st.max) online_softmax_rescale(st, s, acc, ne);
  online_softmax_accumulate(st, fast_exp(s - st.max), v, v_sc, acc, ne);
}

// out[e * o_sc] = acc[e] / sum for e < ne: the softmax normalisation, once per row.
template <typename acc_t, typename out_t>
FVK_HD inline void online_softmax_store(const OnlineSoftmax<acc_t>& st, const acc_t* acc, int64_t ne,
                                        out_t* out, int64_t o_sc) {
  const acc_t inv = acc_t(1) / st.sum;  // sum >= 1 (the max key contributes exp(0)): no division by 0
  for (int64_t e = 0; e < ne; ++e) out[e * o_sc] = static_cast<out_t>(acc[e] * inv);
}

// The whole row for output channels [e0, e0 + ne) of one head: scores over all d channels, the
// online softmax over the sequence's N keys, the store. Callers with a bounded accumulator (CUDA:
// acc in registers/local memory) cover d in chunks of ne channels, recomputing the scores per chunk.
template <typename acc_t, typename scalar_t, typename out_t>
FVK_HD inline void patch_attention_row(
    const scalar_t* q,       // &qkv[b, y, x, 0*C + head*d]: the query row
    const scalar_t* k_seq,   // &qkv[first pixel of the sequence, 1*C + head*d]
    const scalar_t* v_seq,   // &qkv[first pixel of the sequence, 2*C + head*d]
    int64_t s_c,             // qkv channel stride
    int64_t N, int64_t nw,   // tokens per sequence, tokens per sequence row (W / pw)
    int64_t tok_sh,          // ph * qkv stride along H
    int64_t tok_sw,          // pw * qkv stride along W
    int64_t d, acc_t scale,
    int64_t e0, int64_t ne,  // accumulated/stored channels [e0, e0 + ne)
    acc_t* acc,              // ne scratch accumulators
    out_t* out,              // &out[b, y, x, head*d + e0]
    int64_t o_sc) {          // out channel stride
  OnlineSoftmax<acc_t> st = online_softmax_init(acc, ne);
  for (int64_t m = 0; m < N; ++m) {
    const int64_t off = patch_token_offset(m, nw, tok_sh, tok_sw);
    const acc_t s = attention_score(q, s_c, k_seq + off, s_c, d, scale);
    online_softmax_step(st, s, v_seq + off + e0 * s_c, s_c, acc, ne);
  }
  online_softmax_store(st, acc, ne, out, o_sc);
}

}  // namespace fastvit_kernels
