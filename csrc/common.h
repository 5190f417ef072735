// Shared by every op's math header, the CPU kernels (g++) and the CUDA kernels (nvcc).
// Keep it free of ATen includes: it is the only thing the math headers depend on.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Math that both backends run is written once as FVK_HD inline functions; the CPU tests then cover
// what the CUDA kernels compute.
#ifdef __CUDACC__
#define FVK_HD __host__ __device__
#else
#define FVK_HD
#endif

namespace fastvit_kernels {

// Accumulator type for a storage type: float for float/half/bfloat16, double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type_t = typename AccType<scalar_t>::type;

// Read-only load of small tables (weights, biases) shared by many threads: through the read-only
// (texture) cache on the GPU, a plain load on the CPU.
template <typename T>
FVK_HD inline T load_ro(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

FVK_HD inline int32_t float_as_int(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof i);  // the compiler turns this into a register move (and vectorizes it)
  return i;
#endif
}

FVK_HD inline float int_as_float(int32_t i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}

// The core of fast_exp below: e^x = 2^n e^r, returns e^r and sets t = x log2(e) + 1.5 * 2^23, whose
// low mantissa bits hold n (the caller bounds x). F is float, or on the CPU a vector of floats
// (simd.h's exp_nonpositive), so that both run one polynomial.
template <typename F>
FVK_HD inline F exp_reduced_bits(F x, F& t) {
  // Adding 1.5 * 2^23 rounds x*log2(e) to the nearest integer n without a call to rintf.
  const float shifter = 12582912.0f;
  t = x * 1.44269504088896341f + shifter;
  const F n = t - shifter;
  const F r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for precision
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp_reduced_bits with n as an integer.
FVK_HD inline float exp_reduced(float x, int32_t& n_out) {
  float t;
  const float p = exp_reduced_bits(x, t);
  n_out = float_as_int(t) - float_as_int(12582912.0f);
  return p;
}

// exp(x) for float, branch-free so that g++ vectorizes loops that call it (libm's expf is a scalar
// call), and the same code on host and device so the CPU tests check the CUDA epilogue.
// Error <= ~1 ulp (checked against libm over the whole float range). Vectorizing it needs
// -fno-trapping-math (setup.py): g++ otherwise folds the clamped paths to constants, branches to
// them, and will not turn the branches back into vector selects.
// Range reduction x = n*ln2 + r, |r| <= ln2/2, a degree-7 minimax polynomial for e^r (Cephes
// coefficients), then scaling by 2^n as 2^(n/2) * 2^(n - n/2): each factor is a normal float for
// every n the clamp allows, and the last product overflows to +inf or underflows (gradually) to 0
// exactly where exp does. A NaN stays NaN (the clamps compare false and pass it through).
FVK_HD inline float fast_exp(float x) {
  x = x > 89.0f ? 89.0f : x;      // e^89 > FLT_MAX: still +inf
  x = x < -104.0f ? -104.0f : x;  // e^-104 < the smallest denormal: still 0
  int32_t e;                                    // n, in [-150, 129]
  const float p = exp_reduced(x, e);
  const int32_t e1 = e >> 1;                    // floor(n / 2), in [-75, 64]
  return p * int_as_float((e1 + 127) << 23) * int_as_float((e - e1 + 127) << 23);
}

// fast_exp for x in [-87, 88] only: no clamps, and 2^n is one normal float there, so fewer operations
// for callers that bound x themselves (the fused MLP's GELU ran 8% faster than with fast_exp). Same
// polynomial, same error.
FVK_HD inline float fast_exp_in_range(float x) {
  int32_t n;
  const float p = exp_reduced(x, n);
  return p * int_as_float((n + 127) << 23);
}

FVK_HD inline double fast_exp(double x) { return exp(x); }

}  // namespace fastvit_kernels
