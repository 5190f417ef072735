// CUDA launch of dwconv_bn_act: indexing and launch only, the math is ../dwconv_bn_act.h.
// Arguments are validated once, in ../ops.cpp, before dwconv_bn_act_cuda is called.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../dwconv_bn_act.h"

namespace fastvit_kernels {
namespace {

// Sizes and strides (in elements) passed by value: one kernel serves every layout.
struct DwconvGeometry {
  int64_t N, C, H, W, OH, OW;
  int64_t x_sn, x_sc, x_sh, x_sw;  // x strides
  int64_t o_sn, o_sc, o_sh, o_sw;  // out strides
  int K, stride, act;
  // Order of the linear thread index: channels innermost (n, oy, ox, c) when out is channels_last,
  // else width innermost (n, c, oy, ox). Neighbouring threads then write neighbouring addresses.
  bool channels_inner;
};

// One thread per output element, grid-stride loop, 64-bit indices.
template <typename scalar_t>
__global__ void dwconv_bn_act_kernel(
    const scalar_t* __restrict__ x,                  // [N, C, H, W], strides g.x_s*
    const acc_type_t<scalar_t>* __restrict__ weight,  // [C, K*K] contiguous
    const acc_type_t<scalar_t>* __restrict__ bias,    // [C]
    scalar_t* __restrict__ out,                      // [N, C, OH, OW], strides g.o_s*
    const DwconvGeometry g) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t total = g.N * g.C * g.OH * g.OW;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t n, c, oy, ox;
    if (g.channels_inner) {
      c = i % g.C;
      int64_t r = i / g.C;
      ox = r % g.OW;
      r /= g.OW;
      oy = r % g.OH;
      n = r / g.OH;
    } else {
      ox = i % g.OW;
      int64_t r = i / g.OW;
      oy = r % g.OH;
      r /= g.OH;
      c = r % g.C;
      n = r / g.C;
    }
    const acc_t sum = dwconv_point_sum(x + n * g.x_sn + c * g.x_sc, g.x_sh, g.x_sw, g.H, g.W,
                                       weight + c * g.K * g.K, g.K, g.stride, oy, ox);
    out[n * g.o_sn + c * g.o_sc + oy * g.o_sh + ox * g.o_sw] =
        static_cast<scalar_t>(dwconv_epilogue(sum, load_ro(bias + c), g.act));
  }
}

}  // namespace

void dwconv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());

  DwconvGeometry g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.OH = out.size(2), g.OW = out.size(3);
  g.x_sn = x.stride(0), g.x_sc = x.stride(1), g.x_sh = x.stride(2), g.x_sw = x.stride(3);
  g.o_sn = out.stride(0), g.o_sc = out.stride(1), g.o_sh = out.stride(2), g.o_sw = out.stride(3);
  g.K = static_cast<int>(kernel_size), g.stride = static_cast<int>(stride), g.act = static_cast<int>(act);
  g.channels_inner = g.C > 1 && out.stride(1) == 1;  // channels_last out

  constexpr int kThreads = 256;
  // Grid-stride loop: a capped grid covers any size and amortizes the index set-up.
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, int64_t(1) << 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_bn_act_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    dwconv_bn_act_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastvit_kernels
