// Patch-grouped multi-head attention (MobileViT) and cross attention: the per-query-row math, shared
// by the CPU kernels (csrc/cpu/patch_attention.cpp) and the CUDA kernel (csrc/cuda/patch_attention.cu).
//
// q, k, v and out are separate 5-D views with their own element strides (any layout):
//   q [B, heads, Hq, Wq, d], k [B, heads, Hk, Wk, d], v [B, heads, Hk, Wk, dv], out [B, heads, Hq, Wq, dv].
// MobileViT's packed qkv [B, H, W, 3*C] (last dim (3, heads, d)) is three such views of one tensor
// (Hq = Hk = H, Wq = Wk = W); cross attention (Nq queries over Nk keys of other tensors) is q viewed as
// [B, heads, 1, Nq, d], k and v as [B, heads, 1, Nk, *], with a 1 x 1 patch.
// Sequence (b, py, px) holds the tokens at offset (py, px) inside their ph x pw patch: its query m is
// (i, j) = (m / nw_q, m % nw_q), the pixel (y, x) = (i*ph + py, j*pw + px) of q's grid, and its key n the
// same on k's grid (nw_k = Wk / pw). The grouping is only this address arithmetic: no unfold/fold copies.
// For one query row of one (sequence, head):
//
//   s_j = scale * sum_e q[e] * k_j[e]                 (acc_t, e ascending from zero, e < d)
//   out[e] = sum_j exp(s_j - max_j s) v_j[e] / sum_j exp(s_j - max_j s)     (e < dv)
//
// computed in one pass over the keys (online softmax: running max m, running sum l, and the
// accumulator acc[e] rescaled by exp(m_old - m_new) whenever the max grows).
#pragma once

#include "common.h"

namespace fastvit_kernels {

// Element strides of one 5-D view [B, heads, H, W, channels].
struct AttentionStrides {
  int64_t b, head, h, w, c;
};

// Sizes and strides of one call, filled once by the launcher (make_attention_geometry) and passed by
// value to the kernels: one kernel serves every layout.
struct AttentionGeometry {
  int64_t B, heads, d, dv, ph, pw;
  int64_t nw_q, Nq;  // queries per sequence row (Wq / pw), per sequence ((Hq / ph) * nw_q)
  int64_t nw_k, Nk;  // the same for keys and values
  AttentionStrides q, k, v, o;
};

FVK_HD inline AttentionStrides attention_strides(const int64_t* s) { return {s[0], s[1], s[2], s[3], s[4]}; }

// From the 5-D views' sizes and strides (validated by ../ops.cpp).
inline AttentionGeometry make_attention_geometry(const int64_t* q_size, const int64_t* q_stride,
                                                 const int64_t* k_size, const int64_t* k_stride,
                                                 const int64_t* v_size, const int64_t* v_stride,
                                                 const int64_t* o_stride, int64_t ph, int64_t pw) {
  AttentionGeometry g;
  g.B = q_size[0], g.heads = q_size[1], g.d = q_size[4], g.dv = v_size[4], g.ph = ph, g.pw = pw;
  g.nw_q = q_size[3] / pw, g.Nq = (q_size[2] / ph) * g.nw_q;
  g.nw_k = k_size[3] / pw, g.Nk = (k_size[2] / ph) * g.nw_k;
  g.q = attention_strides(q_stride), g.k = attention_strides(k_stride);
  g.v = attention_strides(v_stride), g.o = attention_strides(o_stride);
  return g;
}

// Offset (in elements) of token m of a sequence from the sequence's first pixel (i = j = 0):
// (m / nw) * ph rows down and (m % nw) * pw columns right. tok_sh = ph * s_h, tok_sw = pw * s_w.
FVK_HD inline int64_t patch_token_offset(int64_t m, int64_t nw, int64_t tok_sh, int64_t tok_sw) {
  return (m / nw) * tok_sh + (m % nw) * tok_sw;
}

// Offset of the first pixel (i = j = 0) of sequence (b, py, px), head `head`, of a view with strides s.
FVK_HD inline int64_t patch_sequence_offset(int64_t b, int64_t head, int64_t py, int64_t px,
                                            const AttentionStrides& s) {
  return b * s.b + head * s.head + py * s.h + px * s.w;
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
// online softmax over the sequence's Nk keys, the store. Callers with a bounded accumulator (CUDA:
// acc in registers/local memory) cover dv in chunks of ne channels, recomputing the scores per chunk.
template <typename acc_t, typename scalar_t, typename out_t>
FVK_HD inline void patch_attention_row(
    const scalar_t* q,          // &q[b, head, y, x, 0]: the query row
    const scalar_t* k_seq,      // &k[b, head, first pixel of the sequence, 0]
    const scalar_t* v_seq,      // &v[b, head, first pixel of the sequence, 0]
    const AttentionGeometry& g, // sizes and the q, k, v strides
    acc_t scale,
    int64_t e0, int64_t ne,     // accumulated/stored value channels [e0, e0 + ne)
    acc_t* acc,                 // ne scratch accumulators
    out_t* out,                 // &out[b, head, y, x, e0]
    int64_t o_sc) {             // out channel stride
  const int64_t k_sh = g.ph * g.k.h, k_sw = g.pw * g.k.w, v_sh = g.ph * g.v.h, v_sw = g.pw * g.v.w;
  OnlineSoftmax<acc_t> st = online_softmax_init(acc, ne);
  for (int64_t n = 0; n < g.Nk; ++n) {
    const acc_t s = attention_score(q, g.q.c, k_seq + patch_token_offset(n, g.nw_k, k_sh, k_sw), g.k.c, g.d, scale);
    online_softmax_step(st, s, v_seq + patch_token_offset(n, g.nw_k, v_sh, v_sw) + e0 * g.v.c, g.v.c, acc, ne);
  }
  online_softmax_store(st, acc, ne, out, o_sc);
}

}  // namespace fastvit_kernels
