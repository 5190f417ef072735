// CUDA launch of patch_attention: indexing and launch only, the math is ../patch_attention.h.
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

// Sizes and strides (in elements) passed by value: one kernel serves every layout.
struct PatchAttentionGeometry {
  int64_t B, C, heads, d, ph, pw, nw, N;
  int64_t s_b, s_h, s_w, s_c;  // qkv strides
  int64_t o_b, o_h, o_w, o_c;  // out strides
};

// Output channels accumulated per pass of a thread: acc[] is a per-thread array (local memory
// unless the compiler keeps it in registers). Head dims above this are covered in chunks, each
// recomputing the row's scores: any head dim works, the common ones (16..64) in one pass.
constexpr int kChunk = 64;

// Grid-stride loop over (sequence, head, query) with the query innermost, 64-bit indices.
template <typename scalar_t>
__global__ void patch_attention_kernel(
    const scalar_t* __restrict__ qkv,  // [B, H, W, 3*C], strides g.s_*, last dim (3, heads, d)
    scalar_t* __restrict__ out,        // [B, H, W, C], strides g.o_*, last dim (heads, d)
    const PatchAttentionGeometry g, const acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t acc[kChunk];
  const int64_t total = g.B * g.ph * g.pw * g.heads * g.N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tok_sh = g.ph * g.s_h, tok_sw = g.pw * g.s_w;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t m = i % g.N;
    int64_t r = i / g.N;
    const int64_t head = r % g.heads;
    r /= g.heads;
    const int64_t px = r % g.pw;
    r /= g.pw;
    const int64_t py = r % g.ph;
    const int64_t b = r / g.ph;
    const scalar_t* base = qkv + patch_sequence_offset(b, py, px, g.s_b, g.s_h, g.s_w) + head * g.d * g.s_c;
    const scalar_t* q = base + patch_token_offset(m, g.nw, tok_sh, tok_sw);
    const int64_t y = (m / g.nw) * g.ph + py, x = (m % g.nw) * g.pw + px;
    scalar_t* o = out + b * g.o_b + y * g.o_h + x * g.o_w + head * g.d * g.o_c;
    for (int64_t e0 = 0; e0 < g.d; e0 += kChunk) {
      const int64_t ne = min(static_cast<int64_t>(kChunk), g.d - e0);
      patch_attention_row(q, base + g.C * g.s_c, base + 2 * g.C * g.s_c, g.s_c, g.N, g.nw, tok_sh, tok_sw,
                          g.d, scale, e0, ne, acc, o + e0 * g.o_c, g.o_c);
    }
  }
}

}  // namespace

void patch_attention_cuda(const at::Tensor& qkv, int64_t num_heads, int64_t ph, int64_t pw, double scale,
                          const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(qkv.device());

  PatchAttentionGeometry g;
  g.B = qkv.size(0), g.C = qkv.size(3) / 3, g.heads = num_heads, g.d = g.C / num_heads;
  g.ph = ph, g.pw = pw, g.nw = qkv.size(2) / pw, g.N = (qkv.size(1) / ph) * g.nw;
  g.s_b = qkv.stride(0), g.s_h = qkv.stride(1), g.s_w = qkv.stride(2), g.s_c = qkv.stride(3);
  g.o_b = out.stride(0), g.o_h = out.stride(1), g.o_w = out.stride(2), g.o_c = out.stride(3);

  // 128 threads: the per-thread accumulators make this kernel register-heavy, and smaller blocks
  // keep more of them resident.
  constexpr int kThreads = 128;
  const int64_t total = g.B * ph * pw * num_heads * g.N;
  // Grid-stride loop: a capped grid covers any size.
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "patch_attention_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    patch_attention_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastvit_kernels
