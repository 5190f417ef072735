// Depthwise conv (+ folded BatchNorm as a per-channel bias) + activation: the per-element math,
// shared by the CPU kernels (csrc/cpu/dwconv_bn_act.cpp) and the CUDA kernel
// (csrc/cuda/dwconv_bn_act.cu).
//
//   out[n,c,oy,ox] = act(bias[c] + sum_{ky,kx} weight[c, ky*K+kx] * x[n, c, oy*S-K/2+ky, ox*S-K/2+kx])
//
// with x = 0 outside the image. Sums run over taps in ky-major, kx-minor order starting from zero,
// and the bias is added last; the CPU fast paths keep that order, so all paths round alike.
#pragma once

#include "common.h"

namespace fastvit_kernels {

// Values of the op's `act` argument.
enum DwconvAct : int { kActNone = 0, kActSilu = 1, kActRelu = 2 };

template <int ACT, typename acc_t>
FVK_HD inline acc_t dwconv_act(acc_t z) {
  if (ACT == kActSilu) {
    // z * sigmoid(z); below z ~ -88.7, fast_exp(-z) = inf and the result is -0, as in torch.
    // z times a reciprocal, not z divided: g++ clones the clamped paths of fast_exp into the vector
    // loop, and a division of z there would cost a second vector division.
    return z * (acc_t(1) / (acc_t(1) + fast_exp(-z)));
  } else if (ACT == kActRelu) {
    return z < acc_t(0) ? acc_t(0) : z;  // this way round a NaN stays NaN, as in torch.relu
  } else {
    return z;
  }
}

// Epilogue with the activation known at compile time (CPU vector loops: no branch inside).
template <int ACT, typename acc_t>
FVK_HD inline acc_t dwconv_epilogue(acc_t sum, acc_t bias) {
  return dwconv_act<ACT>(sum + bias);
}

// Epilogue with the activation chosen at run time (CUDA: the branch is uniform across the grid).
template <typename acc_t>
FVK_HD inline acc_t dwconv_epilogue(acc_t sum, acc_t bias, int act) {
  switch (act) {
    case kActSilu:
      return dwconv_epilogue<kActSilu>(sum, bias);
    case kActRelu:
      return dwconv_epilogue<kActRelu>(sum, bias);
    default:
      return dwconv_epilogue<kActNone>(sum, bias);
  }
}

// The window sum (no bias) of one output point of one (n, c) plane, taps outside the image skipped.
// Any strides: this is the whole computation of the CUDA kernel and of the CPU generic path.
template <typename scalar_t, typename acc_t>
FVK_HD inline acc_t dwconv_point_sum(
    const scalar_t* x_plane,  // &x[n, c, 0, 0]
    int64_t x_sh,             // x stride along H, in elements
    int64_t x_sw,             // x stride along W, in elements
    int64_t H, int64_t W,     // x plane size
    const acc_t* w_c,         // &weight[c, 0]: K*K taps, row-major (ky, kx)
    int K, int stride,
    int64_t oy, int64_t ox) {  // output coordinates
  const int64_t iy0 = oy * stride - K / 2;
  const int64_t ix0 = ox * stride - K / 2;
  acc_t sum = acc_t(0);
  for (int ky = 0; ky < K; ++ky) {
    const int64_t iy = iy0 + ky;
    if (iy < 0 || iy >= H) continue;
    for (int kx = 0; kx < K; ++kx) {
      const int64_t ix = ix0 + kx;
      if (ix < 0 || ix >= W) continue;
      sum += load_ro(w_c + ky * K + kx) * static_cast<acc_t>(x_plane[iy * x_sh + ix * x_sw]);
    }
  }
  return sum;
}

}  // namespace fastvit_kernels
