// Cross-covariance attention (XCiT's XCA, EdgeNeXt's SDTA): the per-element math, shared by the CPU
// kernels (csrc/cpu/xca_attention.cpp) and the CUDA kernels (csrc/cuda/xca_attention.cu).
//
// qkv is [B, N, 3*C], last dim laid out (3, heads, d); out is [B, N, C], last dim (heads, d). Per
// (image b, head h), with q, k, v the head's [N, d] slices (token n, channel i):
//
//   G[i][j] = sum_n q[n][i] k[n][j],   nq[i] = sum_n q[n][i]^2,   nk[j] = sum_n k[n][j]^2
//   S[i][j] = t_h * G[i][j] / (max(sqrt(nq[i]), eps) * max(sqrt(nk[j]), eps))
//   A[i][:] = softmax(S[i][:])
//   out[n][i] = sum_j A[i][j] v[n][j]
//
// which is timm's softmax(t * F.normalize(q) @ F.normalize(k)^T) @ v on the channel-first [d, N]
// views: the L2 normalisation over tokens is folded into the d x d matrix, so q and k are read once.
//
// The statistics of one (b, h) over a range of tokens are one vector of P = d*d + 2*d sums, the
// "stats vector": G row-major, then nq, then nk. Every entry is a dot product of two columns of the
// token tile [q | k] (2*d columns): partial sums over token ranges simply add.
#pragma once

#include "common.h"

namespace fastvit_kernels {

// Length of the stats vector of a head of d channels.
FVK_HD inline int64_t xca_stats_size(int64_t d) { return d * d + 2 * d; }

// Entry p of the stats vector is the dot product over tokens of columns a and b of [q | k]
// (columns 0..d-1 are q's channels, d..2d-1 are k's): G[i][j] = q_i . k_j, nq[i] = q_i . q_i,
// nk[j] = k_j . k_j. (index_t: the CUDA kernel computes this in 32 bits, where a 64-bit division is
// a subroutine call.)
template <typename index_t>
FVK_HD inline void xca_stats_columns(index_t p, index_t d, index_t* a, index_t* b) {
  if (p < d * d) {
    *a = p / d;
    *b = d + p % d;
  } else {
    *a = *b = p - d * d;  // nq[i]: column i; nk[j] (p = d*d + d + j): column d + j
  }
}

// Offset (in elements) of column c of [q | k] from q[n][0], in a row where k[n][0] is k_off further
// than q[n][0] and channels are s_c apart. Entry p of the stats vector, for one token, adds
// row[offset(a)] * row[offset(b)] with (a, b) from xca_stats_columns.
FVK_HD inline int64_t xca_column_offset(int64_t c, int64_t d, int64_t k_off, int64_t s_c) {
  return c < d ? c * s_c : k_off + (c - d) * s_c;
}

// 1 / max(sqrt(sum_sq), eps): F.normalize's divisor, inverted.
template <typename acc_t>
FVK_HD inline acc_t xca_inv_norm(acc_t sum_sq, acc_t eps) {
  const acc_t n = sqrt(sum_sq);
  return acc_t(1) / (n > eps ? n : eps);
}

// The inverted divisors of all 2*d columns from a (complete) stats vector: inv[i] for q channel i,
// inv[d + j] for k channel j. Once per head, shared by its d rows.
template <typename acc_t>
FVK_HD inline void xca_inverse_norms(const acc_t* stats, int64_t d, acc_t eps, acc_t* inv) {
  for (int64_t c = 0; c < 2 * d; ++c) inv[c] = xca_inv_norm(stats[d * d + c], eps);
}

// Row i of the attention matrix: a[j] = A[i][j], j < d, from the head's stats vector and inverse
// norms. The softmax subtracts the row max and divides once; a NaN in the stats poisons the row, as
// softmax would. Separate loops so that the CPU compiler vectorizes the exps (a map over j).
template <typename acc_t>
FVK_HD inline void xca_attention_row(const acc_t* stats,  // [d*d + 2*d] stats vector of the head
                                     const acc_t* inv,    // [2*d] from xca_inverse_norms
                                     int64_t d, int64_t i,
                                     acc_t temperature,   // t_h
                                     acc_t* a) {          // out: row i of A, contiguous
  const acc_t* g = stats + i * d;
  const acc_t* inv_k = inv + d;
  const acc_t row_scale = temperature * inv[i];
  for (int64_t j = 0; j < d; ++j) a[j] = row_scale * g[j] * inv_k[j];
  acc_t mx = -INFINITY;
  for (int64_t j = 0; j < d; ++j) mx = a[j] > mx ? a[j] : mx;
  for (int64_t j = 0; j < d; ++j) a[j] = fast_exp(a[j] - mx);
  acc_t sum = acc_t(0);
  for (int64_t j = 0; j < d; ++j) sum += a[j];
  const acc_t inv_sum = acc_t(1) / sum;  // sum >= 1: the max entry contributes exp(0)
  for (int64_t j = 0; j < d; ++j) a[j] *= inv_sum;
}

// out[n][i] = sum_j A[i][j] v[n][j], j ascending from zero.
template <typename acc_t, typename scalar_t>
FVK_HD inline acc_t xca_output_channel(const acc_t* a_row,  // &A[i][0]
                                       int64_t a_stride,    // distance from A[i][j] to A[i][j+1]
                                       const scalar_t* v,   // &v[n][0]
                                       int64_t s_c,         // v channel stride
                                       int64_t d) {
  acc_t o = acc_t(0);
  for (int64_t j = 0; j < d; ++j) o += a_row[j * a_stride] * static_cast<acc_t>(v[j * s_c]);
  return o;
}

}  // namespace fastvit_kernels
