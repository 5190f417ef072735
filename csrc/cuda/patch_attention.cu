// CUDA launch of patch_attention and cross attention (separate q, k, v, out views): indexing and
// launch only, the math is ../patch_attention.h.
// Arguments are validated once, in ../ops.cpp, before patch_attention_cuda is called.
//
// One thread per (sequence, head, query token) runs patch_attention_row: the simple fallback for
// when Triton is missing or fails (the Triton kernel is the fast path). Neighbouring threads take
// neighbouring queries of one (sequence, head), so a warp reads the same key/value row at the same
// time (one broadcast load instead of 32).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../patch_attention.h"

namespace fastvit_kernels {
namespace {

// Output channels accumulated per pass of a thread: acc[] is a per-thread array (local memory
// unless the compiler keeps it in registers). Value head dims above this are covered in chunks, each
// recomputing the row's scores: any head dim works, the common ones (16..64) in one pass; the Python
// dispatch sends head dims above 128 (three or more passes) to the reference instead
// (fastvit_kernels/ops/patch_attention.py, MAX_HEAD_DIM).
constexpr int kChunk = 64;

// Grid-stride loop over (sequence, head, query) with the query innermost, 64-bit indices.
template <typename scalar_t>
__global__ void patch_attention_kernel(
    const scalar_t* __restrict__ q_ptr,  // q [B, heads, Hq, Wq, d], strides g.q
    const scalar_t* __restrict__ k_ptr,  // k [B, heads, Hk, Wk, d], strides g.k
    const scalar_t* __restrict__ v_ptr,  // v [B, heads, Hk, Wk, dv], strides g.v
    scalar_t* __restrict__ out,          // out [B, heads, Hq, Wq, dv], strides g.o
    const AttentionGeometry g, const acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t acc[kChunk];
  const int64_t total = g.B * g.ph * g.pw * g.heads * g.Nq;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t m = i % g.Nq;
    int64_t r = i / g.Nq;
    const int64_t head = r % g.heads;
    r /= g.heads;
    const int64_t px = r % g.pw;
    r /= g.pw;
    const int64_t py = r % g.ph;
    const int64_t b = r / g.ph;
    const scalar_t* q = q_ptr + patch_sequence_offset(b, head, py, px, g.q) +
                        patch_token_offset(m, g.nw_q, g.ph * g.q.h, g.pw * g.q.w);
    const scalar_t* k_seq = k_ptr + patch_sequence_offset(b, head, py, px, g.k);
    const scalar_t* v_seq = v_ptr + patch_sequence_offset(b, head, py, px, g.v);
    scalar_t* o = out + patch_sequence_offset(b, head, py, px, g.o) +
                  patch_token_offset(m, g.nw_q, g.ph * g.o.h, g.pw * g.o.w);
    for (int64_t e0 = 0; e0 < g.dv; e0 += kChunk) {
      const int64_t ne = min(static_cast<int64_t>(kChunk), g.dv - e0);
      patch_attention_row(q, k_seq, v_seq, g, scale, e0, ne, acc, o + e0 * g.o.c, g.o.c);
    }
  }
}

}  // namespace

void patch_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph, int64_t pw,
                          double scale, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(q.device());
  const AttentionGeometry g = make_attention_geometry(q.sizes().data(), q.strides().data(), k.sizes().data(),
                                                      k.strides().data(), v.sizes().data(), v.strides().data(),
                                                      out.strides().data(), ph, pw);

  // 128 threads: the per-thread accumulators make this kernel register-heavy, and smaller blocks
  // keep more of them resident.
  constexpr int kThreads = 128;
  const int64_t total = g.B * ph * pw * g.heads * g.Nq;
  // Grid-stride loop: a capped grid covers any size.
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "patch_attention_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    patch_attention_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), g, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastvit_kernels
