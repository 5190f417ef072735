// CPU kernels for bias_attention: loops (at::parallel_for) around the math in ../bias_attention.h.
// Arguments are validated once, in ../ops.cpp, before bias_attention_cpu is called.
//
// A parallel task is a range of work items (image, head, block of kQueryBlock queries). For each
// (image, head) it meets, a task gathers that head's keys and values once into acc_t buffers: K
// transposed [dk, Np] and V [Nk, dvp], zero-padded to whole vectors of keys / channels (float32 values
// with contiguous channels, a whole number of vectors, are read in place instead); and the
// head's bias table "mirrored" [R_h, 2 R_w - 1], row dy holding table[h, dy * R_w + |t|] for
// t = -(R_w - 1) .. R_w - 1. A query at (qy, qx) sees the keys of grid row ky with the biases
// mirrored[|qy - ky|][R_w - 1 - qx + kx], kx = 0 .. R_w - 1: a contiguous run, so each query's bias
// row is R_h copies, not Nk gathers. Then, per tile of kRows query rows (the tile's queries gathered
// into [kRows, dk]):
//   1. S[kRows, Np] is filled with the bias rows (-inf for the padded keys, which then drop out of
//      the softmax), and attend_tile adds scale * Q K^T in register tiles of kRows x kCols vectors of
//      keys: each K vector load feeds kRows multiply-adds, each query broadcast kCols, which is what
//      makes this compute-bound instead of bound by loads (a per-row loop does one load per
//      multiply-add). Each dot product is summed over channels in ascending order from zero, as
//      bias_attention_dot does;
//   2. per row, the softmax as one block of the header's online softmax: the row max, then in one pass
//      the weights p_j = e^(s_j - max) and their sum (simd.h's softmax_row);
//   3. out[kRows, dv] = act(P V / sum) in register tiles of kRows x kCols vectors of channels, the
//      activation at the store.
// Steps 1-3 run in 64-byte vectors on CPUs with AVX-512 (simd.h's cpu_has_avx512), else in 32-byte ones.
// Queries whose channels are not contiguous (q channel stride != 1, e.g. timm's use_conv layout) take
// the CUDA kernel's per-row function, bias_attention_row, instead: that keeps the CUDA math under the
// CPU tests.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../bias_attention.h"
#include "simd.h"

namespace fastvit_kernels {
namespace {

// Queries per work item: enough work per item (kQueryBlock * Nk * (dk + dv) multiply-adds) to amortize
// the gather of K and V for a task that starts on a new (image, head), and small enough that LeViT's
// 196-query heads still split across threads.
constexpr int64_t kQueryBlock = 36;
// Register tile: kRows query rows x kCols vectors of keys (or channels), the shape of the usual AVX2
// GEMM micro-kernel. A vector is 32 bytes (8 floats, 4 doubles: one AVX2 register); 6 x 2
// accumulators + 2 loads + 1 broadcast fill 15 of the 16 vector registers, and each step of the
// reduction makes 12 multiply-adds from 8 loads (2 vectors + 6 broadcasts): bound by the FMA units,
// not by the load ports (one vector x 8 rows: 8 multiply-adds from 9 loads). A width that is an odd
// number of vectors ends with one 6 x 1 tile. Explicit vector types because g++ vectorizes the naive
// loops along the wrong axis.
constexpr int64_t kRows = 6;
constexpr int kCols = 2;
// Keys and channels are padded to a multiple of this (of every 32-byte vector's lanes), or twice it on
// the AVX-512 path (of every 64-byte vector's).
constexpr int64_t kPad = 8;
static_assert(kQueryBlock % kRows == 0, "a query block is whole tiles");

// The tiles' inner loops, inlined into the multiversioned functions below (an always_inline callee
// takes its caller's target, so it is compiled for AVX2 in the x86-64-v3 clone).
#define FVK_INLINE inline __attribute__((always_inline))

// s[r, j0 + j] += scale * sum_e q[r, e] kt[e, j0 + j] for the NV vectors (type V) of keys from j0.
template <int NV, typename V, typename acc_t>
FVK_INLINE void score_block(const acc_t* __restrict q, const acc_t* __restrict kt, int64_t Np, int64_t dk,
                            acc_t scale, acc_t* __restrict s, int64_t j0) {
  constexpr int64_t L = lanes_of<V, acc_t>;
  V c[kRows][NV] = {};
  tile_accumulate<kRows, NV>(c, q, dk, kt + j0, Np, 0, dk);
#pragma GCC unroll 6
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int n = 0; n < NV; ++n) {
      acc_t* p = s + r * Np + j0 + n * L;
      store_as(p, c[r][n] * scale + load_as<V>(p));
    }
}

// o[r, e0 + e] = inv_sum[r] * sum_{j < Nk} s[r, j] v[j, e0 + e] for the NV vectors of channels from e0.
template <int NV, typename V, typename acc_t>
FVK_INLINE void value_block(const acc_t* __restrict s, const acc_t* __restrict v, const acc_t* __restrict inv_sum,
                            int64_t Np, int64_t Nk, int64_t ldv, int64_t dvp, acc_t* __restrict o, int64_t e0) {
  constexpr int64_t L = lanes_of<V, acc_t>;
  V c[kRows][NV] = {};
  tile_accumulate<kRows, NV>(c, s, Np, v + e0, ldv, 0, Nk);
#pragma GCC unroll 6
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int n = 0; n < NV; ++n) store_as(o + r * dvp + e0 + n * L, c[r][n] * inv_sum[r]);
}

// Steps 1-3 of the file comment for one tile, before the activation, in vectors of Bytes bytes (Np
// and dvp multiples of their lane count). On entry s[r, j] holds the bias of query r and key j (-inf
// past the last key); on return it holds the unnormalised softmax weights, and
// o[r, e] = inv_sum[r] * sum_j s[r, j] v[j, e]. The padded keys' weights are 0, so that sum stops at Nk.
template <int Bytes, typename acc_t>
FVK_INLINE void attend_tile(const acc_t* __restrict q,   // [kRows, dk] the tile's queries
                            const acc_t* __restrict kt,  // [dk, Np] keys, transposed, zero-padded
                            const acc_t* __restrict v,   // [Nk, dvp] values, row stride ldv
                            int64_t Np, int64_t Nk, int64_t dk, int64_t ldv, int64_t dvp, acc_t scale,
                            acc_t* __restrict s,         // [kRows, Np] in: bias; out: weights
                            acc_t* __restrict inv_sum,   // [kRows]
                            acc_t* __restrict o) {       // [kRows, dvp] out
  using V = vecw_t<acc_t, Bytes>;
  constexpr int64_t L = lanes_of<V, acc_t>;
  int64_t j0 = 0;
  for (; j0 + kCols * L <= Np; j0 += kCols * L) score_block<kCols, V>(q, kt, Np, dk, scale, s, j0);
  if (j0 < Np) score_block<1, V>(q, kt, Np, dk, scale, s, j0);
  for (int64_t r = 0; r < kRows; ++r) inv_sum[r] = softmax_row<acc_t, V>(s + r * Np, Np);
  int64_t e0 = 0;
  for (; e0 + kCols * L <= dvp; e0 += kCols * L) value_block<kCols, V>(s, v, inv_sum, Np, Nk, ldv, dvp, o, e0);
  if (e0 < dvp) value_block<1, V>(s, v, inv_sum, Np, Nk, ldv, dvp, o, e0);
}

// attend_tile in 32-byte vectors (AVX2 in the x86-64-v3 clone) and, where the CPU has it, in 64-byte
// AVX-512 vectors (twice the lanes per multiply-add; Np and dvp then multiples of 16 floats).
template <typename acc_t>
FVK_CPU_CLONES void attend_tile_avx2(const acc_t* q, const acc_t* kt, const acc_t* v, int64_t Np, int64_t Nk,
                                     int64_t dk, int64_t ldv, int64_t dvp, acc_t scale, acc_t* s, acc_t* inv_sum,
                                     acc_t* o) {
  attend_tile<32>(q, kt, v, Np, Nk, dk, ldv, dvp, scale, s, inv_sum, o);
}
#if FVK_AVX512_VARIANT
template <typename acc_t>
FVK_AVX512 void attend_tile_avx512(const acc_t* q, const acc_t* kt, const acc_t* v, int64_t Np, int64_t Nk,
                                   int64_t dk, int64_t ldv, int64_t dvp, acc_t scale, acc_t* s, acc_t* inv_sum,
                                   acc_t* o) {
  attend_tile<64>(q, kt, v, Np, Nk, dk, ldv, dvp, scale, s, inv_sum, o);
}
#endif

template <typename scalar_t, typename table_t>
void bias_attention_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const table_t* table,
                           scalar_t* out, const BiasAttentionGeometry& g, double scale_d) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int kChunk = bias_attention_chunk<acc_t>();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t dk = g.dk, dv = g.dv, Nk = g.Nk, R_h = g.R_h, R_w = g.R_w, W2 = 2 * R_w - 1;
  const bool wide = cpu_has_avx512();  // false where the AVX-512 variants are not compiled
  const int64_t pad = wide ? 2 * kPad : kPad;  // a whole number of 64-byte vectors of floats
  const int64_t Np = round_up(Nk, pad), dvp = round_up(dv, pad);
  const int64_t q_blocks = (g.Nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t items = g.B * g.heads * q_blocks;
  const bool per_row = g.q_c != 1;
  // float32 values whose channels are contiguous and a whole number of vectors are read where they
  // are (row stride v_n) instead of gathered: for a downsampling head (49 queries, 196 keys) the
  // gather was about a third of the kernel's time.
  const bool values_in_place = std::is_same<scalar_t, acc_t>::value && g.v_c == 1 && dv % pad == 0;
  // Grain: about 2^18 multiply-adds of work per chunk before OpenMP's fork/join pays off.
  const int64_t work_per_item = std::max<int64_t>(1, std::min(g.Nq, kQueryBlock) * Nk * (dk + dv));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work_per_item);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt(per_row ? 0 : dk * Np, acc_t(0)), vb(per_row || values_in_place ? 0 : Nk * dvp, acc_t(0)),
        mirrored(per_row ? 0 : R_h * W2), qt(kRows * dk), s(kRows * Np), inv_sum(kRows), o(kRows * dvp);
    int64_t packed = -1;  // (image, head) index held in kt, vb and mirrored
    const acc_t* v_tile = nullptr;  // that head's values: vb, or v itself
    int64_t ldv = dvp;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % q_blocks;
      const int64_t bh = item / q_blocks;  // image * heads + head
      const int64_t h = bh % g.heads, b = bh / g.heads;
      const int64_t i_begin = qb * kQueryBlock, i_end = std::min(g.Nq, i_begin + kQueryBlock);
      if (per_row) {  // the CUDA kernel's per-row path (see the file comment)
        for (int64_t i = i_begin; i < i_end; ++i)
          for (int64_t e0 = 0; e0 < dv; e0 += kChunk)
            bias_attention_row<kChunk, acc_t>(q, k, v, table, out, g, b, h, i, e0, scale);
        continue;
      }
      if (bh != packed) {
        const scalar_t* k_head = k + b * g.k_b + h * g.k_h;
        const scalar_t* v_head = v + b * g.v_b + h * g.v_h;
        for (int64_t j = 0; j < Nk; ++j)
          for (int64_t e = 0; e < dk; ++e) kt[e * Np + j] = static_cast<acc_t>(k_head[j * g.k_n + e * g.k_c]);
        if (values_in_place) {
          v_tile = reinterpret_cast<const acc_t*>(v_head), ldv = g.v_n;  // scalar_t is acc_t here
        } else {
          for (int64_t j = 0; j < Nk; ++j)
            for (int64_t e = 0; e < dv; ++e) vb[j * dvp + e] = static_cast<acc_t>(v_head[j * g.v_n + e * g.v_c]);
          v_tile = vb.data(), ldv = dvp;
        }
        const table_t* t_head = table + h * g.t_h;
        for (int64_t dy = 0; dy < R_h; ++dy)  // |qy - ky| = dy and qx - kx = -t: bias_attention_index
          for (int64_t t = -(R_w - 1); t < R_w; ++t)
            mirrored[dy * W2 + (R_w - 1) + t] = static_cast<acc_t>(t_head[(dy * R_w + (t < 0 ? -t : t)) * g.t_n]);
        packed = bh;
      }
      const scalar_t* q_head = q + b * g.q_b + h * g.q_h;
      for (int64_t i0 = i_begin; i0 < i_end; i0 += kRows) {
        const int64_t rows = std::min(kRows, i_end - i0);
        for (int64_t r = 0; r < kRows; ++r) {  // rows past the end repeat the last query, unstored
          const int64_t i = i0 + std::min(r, rows - 1);
          const scalar_t* q_row = q_head + i * g.q_n;
          for (int64_t e = 0; e < dk; ++e) qt[r * dk + e] = static_cast<acc_t>(q_row[e]);
          int64_t qy, qx;
          bias_attention_query_position(i, g.nqw, g.stride, qy, qx);
          acc_t* s_row = s.data() + r * Np;
          for (int64_t ky = 0; ky < R_h; ++ky) {
            const acc_t* run = mirrored.data() + (qy > ky ? qy - ky : ky - qy) * W2 + (R_w - 1) - qx;
            std::copy(run, run + R_w, s_row + ky * R_w);
          }
          std::fill(s_row + Nk, s_row + Np, acc_t(-INFINITY));
        }
#if FVK_AVX512_VARIANT
        if (wide)
          attend_tile_avx512(qt.data(), kt.data(), v_tile, Np, Nk, dk, ldv, dvp, scale, s.data(), inv_sum.data(),
                             o.data());
        else
#endif
          attend_tile_avx2(qt.data(), kt.data(), v_tile, Np, Nk, dk, ldv, dvp, scale, s.data(), inv_sum.data(),
                           o.data());
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* o_row = out + b * g.o_b + (i0 + r) * g.o_n + h * dv * g.o_c;
          for (int64_t e = 0; e < dv; ++e)
            o_row[e * g.o_c] = static_cast<scalar_t>(bias_attention_activation(o[r * dvp + e], g.act));
        }
      }
    }
  });
}

}  // namespace

void bias_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                        int64_t res_h, int64_t res_w, int64_t stride, double scale, int64_t act,
                        const at::Tensor& out) {
  if (out.numel() == 0) return;
  BiasAttentionGeometry g;
  g.B = q.size(0), g.heads = q.size(1), g.Nq = q.size(2), g.Nk = k.size(2), g.dk = q.size(3), g.dv = v.size(3);
  g.R_h = res_h, g.R_w = res_w, g.stride = stride, g.nqw = (res_w + stride - 1) / stride;
  g.q_b = q.stride(0), g.q_h = q.stride(1), g.q_n = q.stride(2), g.q_c = q.stride(3);
  g.k_b = k.stride(0), g.k_h = k.stride(1), g.k_n = k.stride(2), g.k_c = k.stride(3);
  g.v_b = v.stride(0), g.v_h = v.stride(1), g.v_n = v.stride(2), g.v_c = v.stride(3);
  g.t_h = table.stride(0), g.t_n = table.stride(1);
  g.o_b = out.stride(0), g.o_n = out.stride(1), g.o_c = out.stride(2);
  g.act = act;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "bias_attention_cpu", [&] {
    // The table is float32 (a model's parameters kept in fp32 next to 16-bit activations) or q's dtype.
    if (table.scalar_type() == at::kFloat) {
      bias_attention_kernel<scalar_t, float>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                             v.const_data_ptr<scalar_t>(), table.const_data_ptr<float>(),
                                             out.mutable_data_ptr<scalar_t>(), g, scale);
    } else {
      bias_attention_kernel<scalar_t, scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                                v.const_data_ptr<scalar_t>(), table.const_data_ptr<scalar_t>(),
                                                out.mutable_data_ptr<scalar_t>(), g, scale);
    }
  });
}

}  // namespace fastvit_kernels
