// CPU kernels for patch_attention: loops (at::parallel_for) around the math in ../patch_attention.h.
// Arguments are validated once, in ../ops.cpp, before patch_attention_cpu is called.
//
// A parallel task is a range of work items (sequence, head, block of kQueryBlock queries). For each
// (sequence, head) it meets, a task gathers the sequence's keys and values once into acc_t buffers
// (the patch grouping's address arithmetic, patch_token_offset, happens here): K transposed
// [d, N] and V [N, d]. Per query row it then
//   1. computes the N scores with the channel loop outside and the key loop inside: each score is
//      still summed over channels in ascending order from zero, exactly attention_score's sum, but
//      the inner loop runs over keys with no reduction across iterations, so it vectorizes (a
//      per-key dot product over d would be a serial reduction: g++ may not reorder float sums);
//   2. runs the header's online softmax over the keys with the whole row as one block: one
//      online_softmax_rescale to the row's max, the weights p_j = fast_exp(s_j - max) in one
//      vector loop, then online_softmax_accumulate per key (a vector multiply-add over d channels),
//      and online_softmax_store. The CUDA kernel's per-key online_softmax_step gives the same
//      weights whenever its running max has reached the row's max; before that it rescales.
// Steps 1-2 round like the CUDA kernel's patch_attention_row, up to the compiler's use of fused
// multiply-adds.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../patch_attention.h"

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

// The hot loops are compiled twice, for x86-64-v3 (AVX2 + FMA) and for baseline x86-64; the dynamic
// loader picks one by the CPU's features (GCC function multiversioning), as in dwconv_bn_act.cpp.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FVK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FVK_CPU_CLONES
#endif

// One query row against a gathered (sequence, head): steps 1 and 2 of the file comment.
template <typename acc_t, typename out_t>
FVK_CPU_CLONES void attend_row(const acc_t* __restrict q,   // [d] the query, converted
                               const acc_t* __restrict kt,  // [d, N] keys, transposed
                               const acc_t* __restrict v,   // [N, d] values
                               int64_t N, int64_t d, acc_t scale,
                               acc_t* __restrict s,    // [N] scratch: scores, then weights
                               acc_t* __restrict acc,  // [d] scratch: accumulators
                               out_t* out, int64_t o_sc) {
  // 1. s[j] = scale * sum_e q[e] * k_j[e], channels outer.
  for (int64_t j = 0; j < N; ++j) s[j] = acc_t(0);
  for (int64_t e = 0; e < d; ++e) {
    const acc_t qe = q[e];
    const acc_t* __restrict krow = kt + e * N;
    for (int64_t j = 0; j < N; ++j) s[j] += qe * krow[j];
  }
  acc_t mx = -INFINITY;
  for (int64_t j = 0; j < N; ++j) {
    s[j] *= scale;
    mx = s[j] > mx ? s[j] : mx;  // a NaN score is skipped here and poisons the row below
  }
  // 2. The row as one block of the online softmax.
  OnlineSoftmax<acc_t> st = online_softmax_init(acc, d);
  online_softmax_rescale(st, mx, acc, d);
  for (int64_t j = 0; j < N; ++j) s[j] = fast_exp(s[j] - mx);
  for (int64_t j = 0; j < N; ++j) online_softmax_accumulate(st, s[j], v + j * d, int64_t(1), acc, d);
  online_softmax_store(st, acc, d, out, o_sc);
}

template <typename scalar_t>
void patch_attention_kernel(const scalar_t* qkv, scalar_t* out, const Geometry& g, double scale_d) {
  using acc_t = acc_type_t<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t d = g.d, N = g.N;
  const int64_t q_blocks = (N + kQueryBlock - 1) / kQueryBlock;
  const int64_t items = g.B * g.ph * g.pw * g.heads * q_blocks;
  const int64_t tok_sh = g.ph * g.s_h, tok_sw = g.pw * g.s_w;
  // Grain: about 2^18 multiply-adds of work per chunk before OpenMP's fork/join pays off.
  const int64_t work_per_item = std::max<int64_t>(1, std::min(N, kQueryBlock) * N * d);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work_per_item);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt(d * N), v(N * d), q(d), s(N), acc(d);
    int64_t packed = -1;  // (sequence, head) index held in kt and v
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % q_blocks;
      const int64_t sh = item / q_blocks;  // sequence * heads + head
      const int64_t head = sh % g.heads;
      const int64_t seq = sh / g.heads;
      const int64_t px = seq % g.pw, py = (seq / g.pw) % g.ph, b = seq / (g.pw * g.ph);
      const scalar_t* base = qkv + patch_sequence_offset(b, py, px, g.s_b, g.s_h, g.s_w);
      const scalar_t* q_seq = base + (0 * g.C + head * d) * g.s_c;
      if (sh != packed) {
        const scalar_t* k_seq = base + (1 * g.C + head * d) * g.s_c;
        const scalar_t* v_seq = base + (2 * g.C + head * d) * g.s_c;
        for (int64_t m = 0; m < N; ++m) {
          const int64_t off = patch_token_offset(m, g.nw, tok_sh, tok_sw);
          for (int64_t e = 0; e < d; ++e) {
            kt[e * N + m] = static_cast<acc_t>(k_seq[off + e * g.s_c]);
            v[m * d + e] = static_cast<acc_t>(v_seq[off + e * g.s_c]);
          }
        }
        packed = sh;
      }
      const int64_t m_end = std::min(N, (qb + 1) * kQueryBlock);
      for (int64_t m = qb * kQueryBlock; m < m_end; ++m) {
        const int64_t off = patch_token_offset(m, g.nw, tok_sh, tok_sw);
        for (int64_t e = 0; e < d; ++e) q[e] = static_cast<acc_t>(q_seq[off + e * g.s_c]);
        const int64_t y = (m / g.nw) * g.ph + py, x = (m % g.nw) * g.pw + px;
        attend_row(q.data(), kt.data(), v.data(), N, d, scale, s.data(), acc.data(),
                   out + b * g.o_b + y * g.o_h + x * g.o_w + head * d * g.o_c, g.o_c);
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
