// CPU kernels for patch_attention and cross attention: loops (at::parallel_for) around the math in
// ../patch_attention.h, on separate q, k, v and out views (see there). Arguments are validated once,
// in ../ops.cpp, before patch_attention_cpu is called.
//
// A parallel task is a range of work items (sequence, head, block of kQueryBlock queries). For each
// (sequence, head) it meets, a task gathers the sequence's Nk keys and values once into acc_t buffers
// (the patch grouping's address arithmetic, patch_token_offset, happens here): K transposed
// [d, Np] and V [Np, dvp], zero-padded to whole vectors of keys / channels. Then, per tile of
// kRows query rows (the tile's queries gathered into [kRows, d]):
//   1. scores S[kRows, Np] = Q K^T in register tiles of kRows x one vector of keys (attend_tile): each K vector
//      load feeds kRows multiply-adds, which is what makes this compute-bound instead of bound by
//      loads (a per-row loop does one load per multiply-add). Each score is summed over channels in
//      ascending order from zero, as attention_score does;
//   2. per row, the softmax as one block of the header's online softmax: the row max, then in one pass
//      the weights p_j = e^(s_j - max) (padded keys get 0) and their sum (simd.h's softmax_row);
//   3. out[kRows, dv] = P V in register tiles of kRows x one vector of channels, scaled by 1 / sum at
//      the store.
// Steps 1-3 run in 64-byte vectors on CPUs with AVX-512 (simd.h's cpu_has_avx512), else in 32-byte ones.
// Any head dims: the tile is kRows x one vector whatever d and dv (the buffers are on the heap); the
// Python dispatch sends head dims above 128 to the reference, whose matmuls are faster there (K and
// V no longer stay in cache across tiles; numbers in fastvit_kernels/ops/patch_attention.py).
// Inputs whose channels are not contiguous (a channel stride of q, k or v != 1) take the CUDA
// kernel's per-row function, patch_attention_row, instead: that keeps the CUDA math under the CPU tests.
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

// Queries per work item: enough work per item (kQueryBlock * N * d multiply-adds, twice) to amortize
// the gather of K and V for a task that starts on a new (sequence, head), and small enough that
// sequences of a few hundred tokens still split across threads.
constexpr int64_t kQueryBlock = 32;
// Register tile: kRows query rows x one vector of keys (or channels). A vector is 32 bytes (8 floats,
// 4 doubles: one AVX2 register); kRows accumulators + one load + one broadcast fit the 16 vector
// registers. Explicit vector types because g++ vectorizes the naive loops along the wrong axis.
constexpr int64_t kRows = 8;
// Keys and channels are padded to a multiple of this (of every 32-byte vector's lanes), or twice it on
// the AVX-512 path (of every 64-byte vector's).
constexpr int64_t kPad = 8;
static_assert(kQueryBlock % kRows == 0, "a query block is whole tiles");

// Steps 1-3 of the file comment for one tile, in vectors V (Np and dp multiples of their lane count):
// s[r, j] = the unnormalised softmax weights of query r, o[r, e] = sum_j s[r, j] v[j, e] / sum_j s[r, j].
template <typename V, typename acc_t>
inline __attribute__((always_inline)) void attend_tile(
    const acc_t* __restrict q,   // [kRows, d] the tile's queries
    const acc_t* __restrict kt,  // [d, Np] keys, transposed, zero-padded
    const acc_t* __restrict v,   // [Np, dp] values, zero-padded
    int64_t N, int64_t Np, int64_t d, int64_t dp, acc_t scale,
    acc_t* __restrict s,         // [kRows, Np] scratch: the weights
    acc_t* __restrict inv_sum,   // [kRows] scratch
    acc_t* __restrict o) {       // [kRows, dp] out
  constexpr int64_t L = lanes_of<V, acc_t>;
  for (int64_t j0 = 0; j0 < Np; j0 += L) {
    V c[kRows] = {};
    for (int64_t e = 0; e < d; ++e) {
      const V k = load_as<V>(kt + e * Np + j0);
#pragma GCC unroll 8
      for (int64_t r = 0; r < kRows; ++r) c[r] += q[r * d + e] * k;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) store_as(s + r * Np + j0, c[r] * scale);
  }
  // Softmax per row (simd.h's softmax_row): padded keys get -inf, so they drop out of the max and get
  // weight 0.
  for (int64_t r = 0; r < kRows; ++r) {
    acc_t* __restrict row = s + r * Np;
    for (int64_t j = N; j < Np; ++j) row[j] = -INFINITY;
    inv_sum[r] = softmax_row<acc_t, V>(row, Np);
  }
  for (int64_t e0 = 0; e0 < dp; e0 += L) {
    V c[kRows] = {};
    for (int64_t j = 0; j < Np; ++j) {
      const V vv = load_as<V>(v + j * dp + e0);
#pragma GCC unroll 8
      for (int64_t r = 0; r < kRows; ++r) c[r] += s[r * Np + j] * vv;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) store_as(o + r * dp + e0, c[r] * inv_sum[r]);
  }
}

// attend_tile in 32-byte vectors (AVX2 in the x86-64-v3 clone) and, where the CPU has it, in 64-byte
// AVX-512 vectors (Np and dp then multiples of 16 floats).
template <typename acc_t>
FVK_CPU_CLONES void attend_tile_avx2(const acc_t* q, const acc_t* kt, const acc_t* v, int64_t N, int64_t Np,
                                     int64_t d, int64_t dp, acc_t scale, acc_t* s, acc_t* inv_sum, acc_t* o) {
  attend_tile<vec_t<acc_t>>(q, kt, v, N, Np, d, dp, scale, s, inv_sum, o);
}
#if FVK_AVX512_VARIANT
template <typename acc_t>
FVK_AVX512 void attend_tile_avx512(const acc_t* q, const acc_t* kt, const acc_t* v, int64_t N, int64_t Np,
                                   int64_t d, int64_t dp, acc_t scale, acc_t* s, acc_t* inv_sum, acc_t* o) {
  attend_tile<vecw_t<acc_t, 64>>(q, kt, v, N, Np, d, dp, scale, s, inv_sum, o);
}
#endif

template <typename scalar_t>
void patch_attention_kernel(const scalar_t* q_ptr, const scalar_t* k_ptr, const scalar_t* v_ptr, scalar_t* out,
                            const AttentionGeometry& g, double scale_d) {
  using acc_t = acc_type_t<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const bool wide = cpu_has_avx512();  // false where the AVX-512 variants are not compiled
  const int64_t pad = wide ? 2 * kPad : kPad;  // a whole number of 64-byte vectors of floats
  const int64_t d = g.d, dv = g.dv, Nq = g.Nq, Nk = g.Nk, Np = round_up(Nk, pad), dp = round_up(dv, pad);
  const int64_t q_blocks = (Nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t items = g.B * g.ph * g.pw * g.heads * q_blocks;
  // A sequence's token m lies (m / nw) * ph rows and (m % nw) * pw columns from its first pixel.
  const int64_t q_sh = g.ph * g.q.h, q_sw = g.pw * g.q.w, o_sh = g.ph * g.o.h, o_sw = g.pw * g.o.w;
  const int64_t k_sh = g.ph * g.k.h, k_sw = g.pw * g.k.w, v_sh = g.ph * g.v.h, v_sw = g.pw * g.v.w;
  const bool unit_channels = g.q.c == 1 && g.k.c == 1 && g.v.c == 1;
  // Grain: about 2^18 multiply-adds of work per chunk before OpenMP's fork/join pays off.
  const int64_t work_per_item = std::max<int64_t>(1, std::min(Nq, kQueryBlock) * Nk * (d + dv) / 2);
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
      const scalar_t* q_seq = q_ptr + patch_sequence_offset(b, head, py, px, g.q);
      const scalar_t* k_seq = k_ptr + patch_sequence_offset(b, head, py, px, g.k);
      const scalar_t* v_seq = v_ptr + patch_sequence_offset(b, head, py, px, g.v);
      scalar_t* o_seq = out + patch_sequence_offset(b, head, py, px, g.o);
      const int64_t m_begin = qb * kQueryBlock, m_end = std::min(Nq, m_begin + kQueryBlock);
      if (!unit_channels) {  // the CUDA kernel's per-row path (see the file comment)
        for (int64_t m = m_begin; m < m_end; ++m) {
          patch_attention_row(q_seq + patch_token_offset(m, g.nw_q, q_sh, q_sw), k_seq, v_seq, g, scale,
                              int64_t(0), dv, o.data(), o_seq + patch_token_offset(m, g.nw_q, o_sh, o_sw), g.o.c);
        }
        continue;
      }
      if (sh != packed) {
        for (int64_t n = 0; n < Nk; ++n) {
          const scalar_t* krow = k_seq + patch_token_offset(n, g.nw_k, k_sh, k_sw);
          const scalar_t* vrow = v_seq + patch_token_offset(n, g.nw_k, v_sh, v_sw);
          for (int64_t e = 0; e < d; ++e) kt[e * Np + n] = static_cast<acc_t>(krow[e]);
          for (int64_t e = 0; e < dv; ++e) v[n * dp + e] = static_cast<acc_t>(vrow[e]);
        }
        packed = sh;
      }
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
        const int64_t rows = std::min(kRows, m_end - m0);
        for (int64_t r = 0; r < kRows; ++r) {  // rows past the end repeat the last query, unstored
          const scalar_t* qrow = q_seq + patch_token_offset(m0 + std::min(r, rows - 1), g.nw_q, q_sh, q_sw);
          for (int64_t e = 0; e < d; ++e) q[r * d + e] = static_cast<acc_t>(qrow[e]);
        }
#if FVK_AVX512_VARIANT
        if (wide)
          attend_tile_avx512(q.data(), kt.data(), v.data(), Nk, Np, d, dp, scale, s.data(), inv_sum.data(), o.data());
        else
#endif
          attend_tile_avx2(q.data(), kt.data(), v.data(), Nk, Np, d, dp, scale, s.data(), inv_sum.data(), o.data());
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* orow = o_seq + patch_token_offset(m0 + r, g.nw_q, o_sh, o_sw);
          for (int64_t e = 0; e < dv; ++e) orow[e * g.o.c] = static_cast<scalar_t>(o[r * dp + e]);
        }
      }
    }
  });
}

}  // namespace

void patch_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph, int64_t pw,
                         double scale, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const AttentionGeometry g = make_attention_geometry(q.sizes().data(), q.strides().data(), k.sizes().data(),
                                                      k.strides().data(), v.sizes().data(), v.strides().data(),
                                                      out.strides().data(), ph, pw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "patch_attention_cpu", [&] {
    patch_attention_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, scale);
  });
}

}  // namespace fastvit_kernels
