// What the CPU kernels share for explicit vectorisation: 32-byte vector types (one AVX2 register: 8
// floats, 4 doubles), unaligned loads and stores of them, and FVK_CPU_CLONES, which compiles a hot
// function twice, for x86-64-v3 (AVX2 + FMA) and baseline x86-64, the dynamic loader picking one by
// the CPU's features (GCC function multiversioning). Explicit vector types because g++ vectorizes
// the kernels' naive register-tile loops along the wrong axis. The register tile, exponential and
// softmax also take 64-byte vectors, for kernels with an AVX-512 variant (FVK_AVX512, chosen at run
// time by cpu_has_avx512()).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../common.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FVK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// A kernel's AVX-512 variant: 64-byte vectors (16 floats), compiled for x86-64-v4 and called only where
// cpu_has_avx512() says the CPU runs it. Kernels that have one pick it at run time.
#define FVK_AVX512_VARIANT 1
#define FVK_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define FVK_CPU_CLONES
#define FVK_AVX512_VARIANT 0
#define FVK_AVX512
#endif

namespace fastvit_kernels {

template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename acc_t>
using vec_t = typename Vec<acc_t>::type;
template <typename acc_t>
constexpr int64_t kLanes = sizeof(vec_t<acc_t>) / sizeof(acc_t);

// A vector of acc_t of any width: 32 bytes is vec_t, 64 the AVX-512 variants' (FVK_AVX512).
template <typename acc_t, int Bytes>
struct WideVec {
  typedef acc_t type __attribute__((vector_size(Bytes)));
};
template <typename acc_t, int Bytes>
using vecw_t = typename WideVec<acc_t, Bytes>::type;
// Lanes of vector type V of acc_t.
template <typename V, typename acc_t>
constexpr int64_t lanes_of = sizeof(V) / sizeof(acc_t);

// An unaligned load / store of a vector of any width.
template <typename V, typename acc_t>
inline __attribute__((always_inline)) V load_as(const acc_t* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename acc_t>
inline __attribute__((always_inline)) void store_as(acc_t* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename acc_t>
inline vec_t<acc_t> load_vec(const acc_t* p) {
  return load_as<vec_t<acc_t>>(p);
}
template <typename acc_t>
inline void store_vec(acc_t* p, vec_t<acc_t> v) {
  store_as(p, v);
}

// Whether this CPU runs the FVK_AVX512 variants (x86-64-v4: AVX-512 F, BW, CD, DQ, VL) and the
// environment does not turn them off (FASTVIT_KERNELS_CPU_AVX512=0, for A/B measurements and for
// testing the 32-byte path on an AVX-512 machine).
inline bool cpu_has_avx512() {
#if FVK_AVX512_VARIANT
  static const bool supported = __builtin_cpu_supports("x86-64-v4");
  if (!supported) return false;
  const char* env = std::getenv("FASTVIT_KERNELS_CPU_AVX512");
  return env == nullptr || std::strcmp(env, "0") != 0;
#else
  return false;
#endif
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The register tile of the CPU kernels' small matrix products:
//   acc[r][n] += sum_{k0 <= k < k1} a[r * lda + k] * b[k * ldb + n * lanes .. + lanes)
// for ROWS rows of `a` and NV vectors of `b`'s columns, k ascending. Each step loads NV vectors of b
// and broadcasts ROWS scalars of a into ROWS * NV multiply-adds: the shape of the usual AVX2 GEMM
// micro-kernel (6 x 2 accumulators + 2 loads + 1 broadcast fill 15 of the 16 vector registers), bound
// by the FMA units rather than the load ports. Always inlined, so it takes its caller's target (AVX2
// in the FVK_CPU_CLONES x86-64-v3 clone, AVX-512 with 64-byte V in an FVK_AVX512 function); the loops
// over ROWS and NV unroll completely.
template <int ROWS, int NV, typename V, typename acc_t>
inline __attribute__((always_inline)) void tile_accumulate(V (&acc)[ROWS][NV], const acc_t* __restrict a,
                                                           int64_t lda, const acc_t* __restrict b, int64_t ldb,
                                                           int64_t k0, int64_t k1) {
  constexpr int64_t L = lanes_of<V, acc_t>;
  for (int64_t k = k0; k < k1; ++k) {
    V bk[NV];
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) bk[n] = load_as<V>(b + k * ldb + n * L);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const acc_t ar = a[r * lda + k];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) acc[r][n] += ar * bk[n];
    }
  }
}

// e^x lane by lane for x <= 0 (a softmax's s - max) or NaN, which stays NaN. For float, lanes under -87
// give exactly 0 (e^-87 is about the smallest normal float; fast_exp gives denormals down to -104): above
// it 2^n is one normal float, so it is fast_exp's polynomial with one scaling and no clamp at the top.
template <typename acc_t, typename V = vec_t<acc_t>>
inline __attribute__((always_inline)) V exp_nonpositive(V x) {
  if constexpr (std::is_same<acc_t, float>::value) {
    typedef int32_t vi32 __attribute__((vector_size(sizeof(V))));
    const V zero = {};
    const V low = zero - 87.0f;
    const auto under = x < low;
    V t;
    const V p = exp_reduced_bits(under ? low : x, t);
    vi32 n;
    std::memcpy(&n, &t, sizeof n);
    n = (n - float_as_int(12582912.0f) + 127) << 23;  // 2^n as float bits
    V scale;
    std::memcpy(&scale, &n, sizeof scale);
    return under ? zero : p * scale;
  } else {
    for (int64_t l = 0; l < lanes_of<V, acc_t>; ++l) x[l] = std::exp(x[l]);
    return x;
  }
}

// A softmax row in place, unnormalised: row[j] = e^(row[j] - max) for j < n (a multiple of the lane
// count); returns 1 / sum_j row[j]. Max and sum are kept per lane (no serial dependence from one value
// to the next) and reduced across lanes at the end; the exponentials and the sum are one pass. -inf
// entries (padding) get weight 0; a NaN is skipped by the max and poisons the row through the sum.
template <typename acc_t, typename V = vec_t<acc_t>>
inline __attribute__((always_inline)) acc_t softmax_row(acc_t* __restrict row, int64_t n) {
  constexpr int64_t L = lanes_of<V, acc_t>;
  V vmax = load_as<V>(row);
  for (int64_t j = L; j < n; j += L) {
    const V x = load_as<V>(row + j);
    vmax = x > vmax ? x : vmax;
  }
  acc_t mx = vmax[0];
  for (int64_t l = 1; l < L; ++l) mx = vmax[l] > mx ? vmax[l] : mx;
  const V vmx = V{} + mx;
  V vsum = {};
  for (int64_t j = 0; j < n; j += L) {
    const V p = exp_nonpositive<acc_t, V>(load_as<V>(row + j) - vmx);
    store_as(row + j, p);
    vsum += p;
  }
  acc_t sum = acc_t(0);
  for (int64_t l = 0; l < L; ++l) sum += vsum[l];
  return acc_t(1) / sum;  // sum >= 1: the max contributes e^0
}

}  // namespace fastvit_kernels
