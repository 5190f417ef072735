// What the CPU kernels share for explicit vectorisation: 32-byte vector types (one AVX2 register: 8
// floats, 4 doubles), unaligned loads and stores of them, and FVK_CPU_CLONES, which compiles a hot
// function twice, for x86-64-v3 (AVX2 + FMA) and baseline x86-64, the dynamic loader picking one by
// the CPU's features (GCC function multiversioning). Explicit vector types because g++ vectorizes
// the kernels' naive register-tile loops along the wrong axis.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FVK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FVK_CPU_CLONES
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

template <typename acc_t>
inline vec_t<acc_t> load_vec(const acc_t* p) {
  vec_t<acc_t> v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}
template <typename acc_t>
inline void store_vec(acc_t* p, vec_t<acc_t> v) {
  std::memcpy(p, &v, sizeof v);
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace fastvit_kernels
