// CUDA launch of bias_attention: indexing and launch only, the math is ../bias_attention.h.
// Arguments are validated once, in ../ops.cpp, before bias_attention_cuda is called.
//
// One thread per (image, head, query) runs bias_attention_row over the head's value channels in
// chunks of bias_attention_chunk<acc_t>() (accumulators in registers): the simple fallback for when
// Triton is missing or fails (the Triton kernel is the fast path). Neighbouring threads take
// neighbouring queries of one (image, head), so a warp reads the same key/value row at the same time
// (one broadcast load instead of 32), and its bias reads fall in one small table row.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../bias_attention.h"

namespace fastvit_kernels {
namespace {

// Grid-stride loop over (image, head, query) with the query innermost, 64-bit indices.
template <typename scalar_t, typename table_t>
__global__ void bias_attention_kernel(
    const scalar_t* __restrict__ q,      // [B, heads, Nq, dk], strides g.q_*
    const scalar_t* __restrict__ k,      // [B, heads, Nk, dk], strides g.k_*
    const scalar_t* __restrict__ v,      // [B, heads, Nk, dv], strides g.v_*
    const table_t* __restrict__ table,   // [heads, R_h * R_w], strides g.t_*
    scalar_t* __restrict__ out,          // [B, Nq, heads * dv], strides g.o_*
    const BiasAttentionGeometry g, const acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int kChunk = bias_attention_chunk<acc_t>();
  const int64_t total = g.B * g.heads * g.Nq;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t i = idx % g.Nq;
    const int64_t bh = idx / g.Nq;
    const int64_t h = bh % g.heads, b = bh / g.heads;
    for (int64_t e0 = 0; e0 < g.dv; e0 += kChunk)
      bias_attention_row<kChunk, acc_t>(q, k, v, table, out, g, b, h, i, e0, scale);
  }
}

template <typename scalar_t, typename table_t>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
            const at::Tensor& out, const BiasAttentionGeometry& g, double scale) {
  using acc_t = acc_type_t<scalar_t>;
  // 128 threads: the per-thread accumulators make this kernel register-heavy, and smaller blocks
  // keep more of them resident.
  constexpr int kThreads = 128;
  const int64_t total = g.B * g.heads * g.Nq;
  // Grid-stride loop: a capped grid covers any size.
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  bias_attention_kernel<scalar_t, table_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
      table.const_data_ptr<table_t>(), out.mutable_data_ptr<scalar_t>(), g, static_cast<acc_t>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void bias_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                         int64_t res_h, int64_t res_w, int64_t stride, double scale, int64_t act,
                         const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(q.device());

  BiasAttentionGeometry g;
  g.B = q.size(0), g.heads = q.size(1), g.Nq = q.size(2), g.Nk = k.size(2), g.dk = q.size(3), g.dv = v.size(3);
  g.R_h = res_h, g.R_w = res_w, g.stride = stride, g.nqw = (res_w + stride - 1) / stride;
  g.q_b = q.stride(0), g.q_h = q.stride(1), g.q_n = q.stride(2), g.q_c = q.stride(3);
  g.k_b = k.stride(0), g.k_h = k.stride(1), g.k_n = k.stride(2), g.k_c = k.stride(3);
  g.v_b = v.stride(0), g.v_h = v.stride(1), g.v_n = v.stride(2), g.v_c = v.stride(3);
  g.t_h = table.stride(0), g.t_n = table.stride(1);
  g.o_b = out.stride(0), g.o_n = out.stride(1), g.o_c = out.stride(2);
  g.act = act;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "bias_attention_cuda", [&] {
    // The table is float32 (parameters kept in fp32 next to 16-bit activations) or q's dtype.
    if (table.scalar_type() == at::kFloat) {
      launch<scalar_t, float>(q, k, v, table, out, g, scale);
    } else {
      launch<scalar_t, scalar_t>(q, k, v, table, out, g, scale);
    }
  });
}

}  // namespace fastvit_kernels
