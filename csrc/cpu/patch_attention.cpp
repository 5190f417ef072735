// CPU kernels for patch_attention: loops (at::parallel_for) around the math in ../patch_attention.h.
// Arguments are validated once, in ../ops.cpp, before patch_attention_cpu is called.
//
// A parallel task is a range of work items (sequence, head, block of kQueryBlock queries). For each
// (sequence, head) it meets, a task gathers the sequence's keys and values once into acc_t buffers
// (the patch grouping's address arithmetic, patch_token_offset, happens here): K transposed
// [d, Np] and V [Np, dp], zero-padded to multiples of kPad keys / channels. Then, per tile of
// kRows query rows (the tile's queries gathered into [kRows, d]):
//   1. scores S[kRows, Np] = Q K^T in register tiles of kRows x one vector of keys (score_tile): each K vector
//      load feeds kRows multiply-adds, which is what makes this compute-bound instead of bound by
//      loads (a per-row loop does one load per multiply-add). Each score is summed over channels in
//      ascending order from zero, as attention_score does;
//   2. per row, the softmax as one block of the header's online softmax: the row max, weights
//      p_j = fast_exp(scale * s_j - max) (padded keys get 0), their sum (max and sum per vector
//      lane, then across lanes);
//   3. out[kRows, d] = P V in register tiles of kRows x one vector of channels (value_tile), scaled by
//      1 / sum at the store.
// Queries whose channels are not contiguous (channel stride != 1) take the CUDA kernel's per-row
// function, patch_attention_row, instead: that keeps the CUDA math under the CPU tests.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../patch_attention.h"
#include "simd.h"

namespace fastvit_kernels {
namespace {

struct Geometry {
  int64_t B, H, W, C, heads, d, ph, pw, nw, N;
  int64_t s_b, s_h, s_w, s_c;  // qkv strides
  int64_t o_b, o_h, o_w, o_c;  // out strides
};

// Queries per work item: enough work per item (kQueryBlock * N * d multiply-adds, twice) to amortize
// the gather of K and V for a task that starts on a new (sequence, head), and small enough that
// sequences of a few hundred tokens still split across threads.
constexpr int64_t kQueryBlock = 32;
// Register tile: kRows query rows x one vector of keys (or channels). A vector is 32 bytes (8 floats,
// 4 doubles: one AVX2 register); kRows accumulators + one load + one broadcast fit the 16 vector
// registers. Explicit vector types because g++ vectorizes the naive loops along the wrong axis.
constexpr int64_t kRows = 8;
constexpr int64_t kPad = 8;  // keys and channels are padded to a multiple of this (of every vector width)
static_assert(kQueryBlock % kRows == 0, "a query block is whole tiles");

// Steps 1-2 of the file comment for one tile: s[r, j] = softmax weights (unnormalised) of query r,
// inv_sum[r] = 1 / sum_j s[r, j].
template <typename acc_t>
FVK_CPU_CLONES void score_tile(const acc_t* __restrict q,   // [kRows, d] the tile's queries
                               const acc_t* __restrict kt,  // [d, Np] keys, transposed, zero-padded
                               int64_t N, int64_t Np, int64_t d, acc_t scale,
                               acc_t* __restrict s,         // [kRows, Np] out: weights
                               acc_t* __restrict inv_sum) { // [kRows] out
  using V = vec_t<acc_t>;
  for (int64_t j0 = 0; j0 < Np; j0 += kLanes<acc_t>) {
    V c[kRows] = {};
    for (int64_t e = 0; e < d; ++e) {
      const V k = load_vec(kt + e * Np + j0);
#pragma GCC unroll 8
      for (int64_t r = 0; r < kRows; ++r) c[r] += q[r * d + e] * k;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) store_vec(s + r * Np + j0, c[r] * scale);
  }
  // Softmax per row over whole vectors: padded keys get -inf, so they drop out of the max and get
  // weight fast_exp(-inf) = 0. Max and sum are kept per lane (no serial dependence from one key to
  // the next) and reduced across lanes at the end.
  constexpr int64_t L = kLanes<acc_t>;
  for (int64_t r = 0; r < kRows; ++r) {
    acc_t* __restrict row = s + r * Np;
    for (int64_t j = N; j < Np; ++j) row[j] = -INFINITY;
    V vmax = load_vec(row);
    for (int64_t j0 = L; j0 < Np; j0 += L) {
      const V x = load_vec(row + j0);
      vmax = x > vmax ? x : vmax;  // a NaN score is skipped here and poisons the row below
    }
    acc_t mx = vmax[0];
    for (int64_t l = 1; l < L; ++l) mx = vmax[l] > mx ? vmax[l] : mx;
    for (int64_t j = 0; j < Np; ++j) row[j] = fast_exp(row[j] - mx);
    V vsum = {};
    for (int64_t j0 = 0; j0 < Np; j0 += L) vsum += load_vec(row + j0);
    acc_t sum = acc_t(0);
    for (int64_t l = 0; l < L; ++l) sum += vsum[l];
    inv_sum[r] = acc_t(1) / sum;  // sum >= 1: the max key contributes exp(0)
  }
}

// Step 3 for one tile: o[r, e] = inv_sum[r] * sum_j s[r, j] v[j, e], channels padded to dp.
template <typename acc_t>
FVK_CPU_CLONES void value_tile(const acc_t* __restrict s,   // [kRows, Np] weights from score_tile
                               const acc_t* __restrict v,   // [Np, dp] values, zero-padded
                               const acc_t* __restrict inv_sum, int64_t Np, int64_t dp,
                               acc_t* __restrict o) {       // [kRows, dp] out
  using V = vec_t<acc_t>;
  for (int64_t e0 = 0; e0 < dp; e0 += kLanes<acc_t>) {
    V c[kRows] = {};
    for (int64_t j = 0; j < Np; ++j) {
      const V vv = load_vec(v + j * dp + e0);
#pragma GCC unroll 8
      for (int64_t r = 0; r < kRows; ++r) c[r] += s[r * Np + j] * vv;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) store_vec(o + r * dp + e0, c[r] * inv_sum[r]);
  }
}

template <typename scalar_t>
void patch_attention_kernel(const scalar_t* qkv, scalar_t* out, const Geometry& g, double scale_d) {
  using acc_t = acc_type_t<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t d = g.d, N = g.N, Np = round_up(N, kPad), dp = round_up(d, kPad);
  const int64_t q_blocks = (N + kQueryBlock - 1) / kQueryBlock;
  const int64_t items = g.B * g.ph * g.pw * g.heads * q_blocks;
  const int64_t tok_sh = g.ph * g.s_h, tok_sw = g.pw * g.s_w;
  // Grain: about 2^18 multiply-adds of work per chunk before OpenMP's fork/join pays off.
  const int64_t work_per_item = std::max<int64_t>(1, std::min(N, kQueryBlock) * N * d);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work_per_item);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt(d * Np, acc_t(0)), v(Np * dp, acc_t(0)), q(kRows * d), s(kRows * Np),
        inv_sum(kRows), o(kRows * dp);
    int64_t packed = -1;  // (sequence, head) index held in kt and v
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % q_blocks;
      const int64_t sh = item / q_blocks;  // sequence * heads + head
      const int64_t head = sh % g.heads;
      const int64_t seq = sh / g.heads;
      const int64_t px = seq % g.pw, py = (seq / g.pw) % g.ph, b = seq / (g.pw * g.ph);
      const scalar_t* base = qkv + patch_sequence_offset(b, py, px, g.s_b, g.s_h, g.s_w);
      const scalar_t* q_seq = base + (0 * g.C + head * d) * g.s_c;
      const scalar_t* k_seq = base + (1 * g.C + head * d) * g.s_c;
      const scalar_t* v_seq = base + (2 * g.C + head * d) * g.s_c;
      const int64_t m_begin = qb * kQueryBlock, m_end = std::min(N, m_begin + kQueryBlock);
      if (g.s_c != 1) {  // the CUDA kernel's per-row path (see the file comment)
        for (int64_t m = m_begin; m < m_end; ++m) {
          const int64_t y = (m / g.nw) * g.ph + py, x = (m % g.nw) * g.pw + px;
          patch_attention_row(q_seq + patch_token_offset(m, g.nw, tok_sh, tok_sw), k_seq, v_seq, g.s_c, N,
                              g.nw, tok_sh, tok_sw, d, scale, int64_t(0), d, o.data(),
                              out + b * g.o_b + y * g.o_h + x * g.o_w + head * d * g.o_c, g.o_c);
        }
        continue;
      }
      if (sh != packed) {
        for (int64_t m = 0; m < N; ++m) {
          const int64_t off = patch_token_offset(m, g.nw, tok_sh, tok_sw);
          for (int64_t e = 0; e < d; ++e) {
            kt[e * Np + m] = static_cast<acc_t>(k_seq[off + e]);
            v[m * dp + e] = static_cast<acc_t>(v_seq[off + e]);
          }
        }
        packed = sh;
      }
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
        const int64_t rows = std::min(kRows, m_end - m0);
        for (int64_t r = 0; r < kRows; ++r) {  // rows past the end repeat the last query, unstored
          const scalar_t* qrow = q_seq + patch_token_offset(m0 + std::min(r, rows - 1), g.nw, tok_sh, tok_sw);
          for (int64_t e = 0; e < d; ++e) q[r * d + e] = static_cast<acc_t>(qrow[e]);
        }
        score_tile(q.data(), kt.data(), N, Np, d, scale, s.data(), inv_sum.data());
        value_tile(s.data(), v.data(), inv_sum.data(), Np, dp, o.data());
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t m = m0 + r, y = (m / g.nw) * g.ph + py, x = (m % g.nw) * g.pw + px;
          scalar_t* orow = out + b * g.o_b + y * g.o_h + x * g.o_w + head * d * g.o_c;
          for (int64_t e = 0; e < d; ++e) orow[e * g.o_c] = static_cast<scalar_t>(o[r * dp + e]);
        }
      }
    }
  });
}

}  // namespace

void patch_attention_cpu(const at::Tensor& qkv, int64_t num_heads, int64_t ph, int64_t pw, double scale,
                         const at::Tensor& out) {
  if (out.numel() == 0) return;
  Geometry g;
  g.B = qkv.size(0), g.H = qkv.size(1), g.W = qkv.size(2), g.C = qkv.size(3) / 3;
  g.heads = num_heads, g.d = g.C / num_heads, g.ph = ph, g.pw = pw;
  g.nw = g.W / pw, g.N = (g.H / ph) * g.nw;
  g.s_b = qkv.stride(0), g.s_h = qkv.stride(1), g.s_w = qkv.stride(2), g.s_c = qkv.stride(3);
  g.o_b = out.stride(0), g.o_h = out.stride(1), g.o_w = out.stride(2), g.o_c = out.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "patch_attention_cpu", [&] {
    patch_attention_kernel<scalar_t>(qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g,
                                     scale);
  });
}

}  // namespace fastvit_kernels
