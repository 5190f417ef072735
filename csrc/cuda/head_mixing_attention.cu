// CUDA launch of head_mixing_attention: indexing and launch only, the math is ../head_mixing_attention.h.
// Arguments are validated once, in ../ops.cpp, before head_mixing_attention_cuda is called.
//
// One block per (image, query row), grid-stride over rows. The row's [heads, Nk] map lives in shared
// memory, twice (each head mix reads one buffer and writes the other), next to the row's queries
// [heads, d]: 4 * (2 heads Nk + heads d) bytes in fp32 (CaiT-S at 224: 8 heads x 197 keys, 14 KB; the
// largest the device allows, 227 KB on sm_90, fits e.g. 16 heads x 1700 keys). Rows whose map does
// not fit are refused with an error here, and by the Python dispatch before (the reference serves
// them). The block's threads split each step of the header: scores and mixes over (head, key),
// the softmax one warp per head (the header's three partial steps with warp reductions between), the
// LayerNorm over keys, the output over (head, channel). This is the simple fallback for when Triton
// is missing or refuses the input (Triton is the fast path).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../head_mixing_attention.h"

namespace fastvit_kernels {
namespace {

constexpr int kThreads = 256;  // 8 warps: one per head of CaiT's / DeepViT's 8-12 heads in the softmax

template <typename acc_t>
__device__ inline acc_t warp_max(acc_t x) {
  for (int off = 16; off > 0; off /= 2) {
    const acc_t y = __shfl_xor_sync(0xffffffffu, x, off);
    x = y > x ? y : x;
  }
  return x;
}

template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t x) {
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) head_mixing_attention_kernel(
    const scalar_t* __restrict__ q,  // [B, heads, Nq, d], strides g.q_*
    const scalar_t* __restrict__ k,  // [B, heads, Nk, d], strides g.k_*
    const scalar_t* __restrict__ v,  // [B, heads, Nk, dv], strides g.v_*
    scalar_t* __restrict__ out,      // [B, Nq, heads * dv], strides g.o_*
    const HeadMixGeometry g,
    const HeadMixParams<acc_type_t<scalar_t>> p,  // acc_t, contiguous (the launcher converts them)
    const acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* qa = reinterpret_cast<acc_t*>(smem_raw);  // [heads, d] the row's queries
  acc_t* buf0 = qa + g.heads * g.d;                 // [heads, Nk]
  acc_t* buf1 = buf0 + g.heads * g.Nk;              // [heads, Nk]
  const int64_t heads = g.heads, Nk = g.Nk, d = g.d, dv = g.dv, ld = Nk;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n_warps = kThreads / 32;

  for (int64_t row = blockIdx.x; row < g.B * g.Nq; row += gridDim.x) {
    const int64_t b = row / g.Nq, i = row % g.Nq;
    for (int64_t idx = tid; idx < heads * d; idx += kThreads) {
      const int64_t h = idx / d, e = idx % d;
      qa[idx] = static_cast<acc_t>(q[b * g.q_b + h * g.q_h + i * g.q_n + e * g.q_c]);
    }
    __syncthreads();
    acc_t* scores = g.has_pre ? buf0 : buf1;
    for (int64_t idx = tid; idx < heads * Nk; idx += kThreads) {
      const int64_t h = idx / Nk, j = idx % Nk;
      scores[idx] = hma_dot(qa + h * d, int64_t(1), k + b * g.k_b + h * g.k_h + j * g.k_n, g.k_c, d, scale);
    }
    __syncthreads();
    if (g.has_pre) {
      for (int64_t idx = tid; idx < heads * Nk; idx += kThreads)
        hma_mix_head(buf0, buf1, ld, heads, p.pre, idx / Nk, idx % Nk, idx % Nk + 1, int64_t(1));
      __syncthreads();
    }
    for (int64_t h = warp; h < heads; h += n_warps) {  // one warp per head row: uniform per warp
      acc_t* r = buf1 + h * ld;
      const acc_t mx = warp_max(hma_row_max(r, lane, Nk, 32));
      const acc_t sum = warp_sum(hma_exp_sum(r, mx, lane, Nk, 32));
      __syncwarp();
      hma_scale_row(r, acc_t(1) / sum, lane, Nk, 32);
    }
    __syncthreads();
    acc_t* a = buf1;
    if (g.has_post) {
      for (int64_t idx = tid; idx < heads * Nk; idx += kThreads)
        hma_mix_head(buf1, buf0, ld, heads, p.post, idx / Nk, idx % Nk, idx % Nk + 1, int64_t(1));
      __syncthreads();
      a = buf0;
    }
    if (g.has_norm) {
      for (int64_t j = tid; j < Nk; j += kThreads) hma_norm_columns(a, ld, heads, p, j, j + 1, int64_t(1));
      __syncthreads();
    }
    // Neighbouring threads take neighbouring channels: coalesced value reads and output stores.
    for (int64_t idx = tid; idx < heads * dv; idx += kThreads) {
      const int64_t h = idx / dv, e = idx % dv;
      const acc_t o = hma_out_element(a + h * ld, v + b * g.v_b + h * g.v_h, g.v_n, g.v_c, Nk, e);
      out[b * g.o_b + i * g.o_n + (h * dv + e) * g.o_c] = static_cast<scalar_t>(o);
    }
    __syncthreads();  // the next row overwrites qa and the buffers
  }
}

at::Tensor as_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

}  // namespace

void head_mixing_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                const c10::optional<at::Tensor>& pre_mix,
                                const c10::optional<at::Tensor>& post_mix,
                                const c10::optional<at::Tensor>& norm_weight,
                                const c10::optional<at::Tensor>& norm_bias, double norm_eps, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(q.device());

  HeadMixGeometry g;
  g.B = q.size(0), g.heads = q.size(1), g.Nq = q.size(2), g.Nk = k.size(2), g.d = q.size(3), g.dv = v.size(3);
  g.q_b = q.stride(0), g.q_h = q.stride(1), g.q_n = q.stride(2), g.q_c = q.stride(3);
  g.k_b = k.stride(0), g.k_h = k.stride(1), g.k_n = k.stride(2), g.k_c = k.stride(3);
  g.v_b = v.stride(0), g.v_h = v.stride(1), g.v_n = v.stride(2), g.v_c = v.stride(3);
  g.o_b = out.stride(0), g.o_n = out.stride(1), g.o_c = out.stride(2);
  g.has_pre = pre_mix.has_value(), g.has_post = post_mix.has_value();
  g.has_norm = norm_weight.has_value(), g.has_norm_bias = norm_bias.has_value();
  // The parameters as acc_t contiguous tensors: a no-op for float32 parameters with 16-bit or float32
  // inputs (a model under autocast), a heads x heads copy otherwise. The kernel reads them from L1.
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor pre = as_acc(pre_mix, acc), post = as_acc(post_mix, acc), w = as_acc(norm_weight, acc),
                   bias = as_acc(norm_bias, acc);

  const int64_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const int64_t smem = acc_bytes * (2 * g.heads * g.Nk + g.heads * g.d);
  int device = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t smem_max = smem_optin;
  TORCH_CHECK(smem <= smem_max, "head_mixing_attention_out: heads ", g.heads, " x Nk ", g.Nk, " (d ", g.d,
              ") needs ", smem, " bytes of shared memory for one query row, more than this device's ", smem_max,
              "; use the reference backend for such inputs");
  const int64_t rows = g.B * g.Nq;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, int64_t(1) << 20));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "head_mixing_attention_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    HeadMixParams<acc_t> p;
    p.pre = pre.defined() ? pre.const_data_ptr<acc_t>() : nullptr;
    p.post = post.defined() ? post.const_data_ptr<acc_t>() : nullptr;
    p.norm_weight = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    p.norm_bias = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    p.norm_eps = static_cast<acc_t>(norm_eps);
    auto kernel = head_mixing_attention_kernel<scalar_t>;
    if (smem > 48 * 1024) {  // above the default limit a kernel must opt in
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<blocks, kThreads, static_cast<size_t>(smem), stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), g, p, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastvit_kernels
