// Depthwise conv + LayerNorm over the channels of each output pixel (EdgeNeXt's ConvBlock): the
// per-pixel normalisation math, shared by the CPU kernel (the channels_last path of
// csrc/cpu/dwconv_bn_act.cpp, with its LayerNorm epilogue) and the CUDA kernel
// (csrc/cuda/dwconv_bn_act.cu). The convolution itself is ../dwconv_bn_act.h's.
//
//   y[c]   = bias[c] + window sum of channel c (dwconv_point_sum)
//   mean   = sum_c y[c] / C
//   var    = sum_c (y[c] - mean)^2 / C      (two passes: no cancellation for large means)
//   out[c] = (y[c] - mean) / sqrt(var + eps) * norm_weight[c] + norm_bias[c]
//
// in the accumulation type (float, double for double), as F.layer_norm computes it.
#pragma once

#include "dwconv_bn_act.h"

namespace fastvit_kernels {

FVK_HD inline float layernorm_sqrt(float v) { return sqrtf(v); }
FVK_HD inline double layernorm_sqrt(double v) { return sqrt(v); }

// 1 / sqrt(var + eps) from the sum of squared deviations of n values. A division by an IEEE sqrt,
// not an approximate rsqrt, so that host and device round alike.
template <typename acc_t>
FVK_HD inline acc_t layernorm_rstd(acc_t sum_sq_dev, int64_t n, acc_t eps) {
  return acc_t(1) / layernorm_sqrt(sum_sq_dev / static_cast<acc_t>(n) + eps);
}

// One normalised, affine-transformed value.
template <typename acc_t>
FVK_HD inline acc_t layernorm_apply(acc_t y, acc_t mean, acc_t rstd, acc_t weight, acc_t bias) {
  return (y - mean) * rstd * weight + bias;
}

// Mean and rstd of the n values v[0..n) (one pixel's channels, contiguous): the CPU epilogue. The
// CUDA kernel forms the same two sums with warp reductions and calls layernorm_rstd. Each sum runs
// in eight independent chains: one chain is latency-bound (an add's latency per channel), which at
// EdgeNeXt's widths cost more than the pixel's vectorized conv taps.
template <typename acc_t>
FVK_HD inline void layernorm_stats(const acc_t* v, int64_t n, acc_t eps, acc_t& mean, acc_t& rstd) {
  constexpr int kChains = 8;
  const int64_t n8 = n / kChains * kChains;
  acc_t s[kChains];
  for (int k = 0; k < kChains; ++k) s[k] = acc_t(0);
  for (int64_t i = 0; i < n8; i += kChains) {
    for (int k = 0; k < kChains; ++k) s[k] += v[i + k];
  }
  for (int64_t i = n8; i < n; ++i) s[0] += v[i];
  mean = (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) / static_cast<acc_t>(n);
  for (int k = 0; k < kChains; ++k) s[k] = acc_t(0);
  for (int64_t i = 0; i < n8; i += kChains) {
    for (int k = 0; k < kChains; ++k) s[k] += (v[i + k] - mean) * (v[i + k] - mean);
  }
  for (int64_t i = n8; i < n; ++i) s[0] += (v[i] - mean) * (v[i] - mean);
  rstd = layernorm_rstd(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])), n, eps);
}

}  // namespace fastvit_kernels
