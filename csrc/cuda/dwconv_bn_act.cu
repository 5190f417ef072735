// CUDA launch of dwconv_bn_act and dwconv_layernorm (one translation unit: nvcc builds are slow):
// indexing and launch only, the math is ../dwconv_bn_act.h and ../dwconv_layernorm.h.
// Arguments are validated once, in ../ops.cpp, before the launchers here are called.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../dwconv_bn_act.h"
#include "../dwconv_layernorm.h"

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

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// dwconv_layernorm: one warp per output pixel (grid-stride loop over pixels), lane l computing
// channels l, l + 32, ...: consecutive lanes read and write consecutive channels, coalesced for
// channels_last x and out. Each lane keeps its conv results in its own slots of a shared-memory
// row of C values (C is a run-time size, so not registers), and the warp forms the mean and then
// the sum of squared deviations with shuffles. Lanes only ever read their own slots: no barriers.
template <typename scalar_t>
__global__ void dwconv_layernorm_kernel(
    const scalar_t* __restrict__ x,                        // [N, C, H, W], strides g.x_s*
    const acc_type_t<scalar_t>* __restrict__ weight,       // [C, K*K] contiguous
    const acc_type_t<scalar_t>* __restrict__ bias,         // [C] conv bias
    const acc_type_t<scalar_t>* __restrict__ norm_weight,  // [C] LayerNorm scale
    const acc_type_t<scalar_t>* __restrict__ norm_bias,    // [C] LayerNorm shift
    scalar_t* __restrict__ out,                            // [N, C, OH, OW], strides g.o_s*
    const DwconvGeometry g, const acc_type_t<scalar_t> eps) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(sizeof(double)) unsigned char shared_bytes[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  acc_t* row = reinterpret_cast<acc_t*>(shared_bytes) + static_cast<int64_t>(warp) * g.C;
  const int64_t pixels = g.N * g.OH * g.OW;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  // p is the same for the whole warp, so every lane reaches the shuffles.
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * warps + warp; p < pixels; p += step) {
    const int64_t ox = p % g.OW, oy = (p / g.OW) % g.OH, n = p / (g.OW * g.OH);
    acc_t sum = acc_t(0);
    for (int64_t c = lane; c < g.C; c += 32) {
      const acc_t y = dwconv_epilogue<kActNone>(
          dwconv_point_sum(x + n * g.x_sn + c * g.x_sc, g.x_sh, g.x_sw, g.H, g.W, weight + c * g.K * g.K, g.K,
                           g.stride, oy, ox),
          load_ro(bias + c));
      row[c] = y;
      sum += y;
    }
    const acc_t mean = warp_sum(sum) / static_cast<acc_t>(g.C);
    acc_t sq = acc_t(0);
    for (int64_t c = lane; c < g.C; c += 32) {
      const acc_t d = row[c] - mean;
      sq += d * d;
    }
    const acc_t rstd = layernorm_rstd(warp_sum(sq), g.C, eps);
    scalar_t* o = out + n * g.o_sn + oy * g.o_sh + ox * g.o_sw;
    for (int64_t c = lane; c < g.C; c += 32) {
      o[c * g.o_sc] = static_cast<scalar_t>(
          layernorm_apply(row[c], mean, rstd, load_ro(norm_weight + c), load_ro(norm_bias + c)));
    }
  }
}

DwconvGeometry geometry(const at::Tensor& x, const at::Tensor& out, int64_t kernel_size, int64_t stride,
                        int64_t act) {
  DwconvGeometry g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.OH = out.size(2), g.OW = out.size(3);
  g.x_sn = x.stride(0), g.x_sc = x.stride(1), g.x_sh = x.stride(2), g.x_sw = x.stride(3);
  g.o_sn = out.stride(0), g.o_sc = out.stride(1), g.o_sh = out.stride(2), g.o_sw = out.stride(3);
  g.K = static_cast<int>(kernel_size), g.stride = static_cast<int>(stride), g.act = static_cast<int>(act);
  g.channels_inner = g.C > 1 && out.stride(1) == 1;  // channels_last out
  return g;
}

}  // namespace

void dwconv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const DwconvGeometry g = geometry(x, out, kernel_size, stride, act);

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

// Shared memory per block the launcher may use without opting in (every arch): one C-value row per
// warp. ops/dwconv_layernorm.py states the same limit (CUDA_MAX_SHARED_BYTES) to refuse larger C.
constexpr int64_t kLayerNormMaxShared = 48 * 1024;

void dwconv_layernorm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t kernel_size,
                           int64_t stride, double eps, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const DwconvGeometry g = geometry(x, out, kernel_size, stride, kActNone);
  const int64_t row_bytes = g.C * static_cast<int64_t>(x.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float));
  TORCH_CHECK(row_bytes <= kLayerNormMaxShared, "dwconv_layernorm_out: the CUDA kernel keeps one pixel's C values "
              "in shared memory and supports C * sizeof(accumulator) <= ", kLayerNormMaxShared, " bytes, got C = ",
              g.C, " (", row_bytes, " bytes)");
  // 8 warps (pixels) per block while their rows fit; grid-stride loop over the rest.
  const int warps = static_cast<int>(std::min<int64_t>(8, kLayerNormMaxShared / row_bytes));
  const int64_t pixels = g.N * g.OH * g.OW;
  const int64_t blocks = std::min<int64_t>((pixels + warps - 1) / warps, int64_t(1) << 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_layernorm_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    dwconv_layernorm_kernel<scalar_t><<<static_cast<unsigned>(blocks), warps * 32, warps * row_bytes, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(),
        norm_weight.const_data_ptr<acc_t>(), norm_bias.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), g,
        static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastvit_kernels
