// The transformer MLP of a block, fc1 -> activation (GELU, SiLU, Hardswish or none) -> fc2 -> layer
// scale -> residual, in one CPU kernel for inference:
//
//   out[m, :] = residual[m, :] + gamma * (act(x[m, :] W1^T + b1) W2^T + b2)    (each term only when given)
//
// Why: eager PyTorch runs that as two GEMMs plus four passes over memory (the activation, the layer
// scale, the residual add, and the bias broadcast addmm writes before it accumulates), and the hidden
// activation, 4x the block's width, goes through memory twice. Here a task takes a block of kBlockRows
// rows and keeps its hidden activations in a [kBlockRows, H] buffer that stays in L1/L2: x is read once
// and out written once. Both products run in register tiles of kRows rows x kCols vectors of output
// columns (simd.h's tile_accumulate, as in bias_attention.cpp): per reduction step, kCols vector loads
// of the packed weight and kRows broadcasts feed kRows * kCols multiply-adds. MKL's
// GEMMs reach 50-98 GFLOP/s on EdgeNeXt's shapes (K or N = 24-288, M = 2k-33k) on the 2-core EPYC
// this was written on, these tiles 116-140.
//
// float32 only; rows of x, residual and out contiguous in channels. Sums over channels run in float32
// in blocks of kSumBlock (see tile): not bit-identical to MKL's blocking.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common.h"
#include "simd.h"

namespace fastvit_kernels {
namespace {

// Values of the `act` argument (fastvit_kernels/memory.py, FUSED_MLP_ACTIVATIONS).
enum MlpAct : int { kMlpNone = 0, kMlpGelu = 1, kMlpHardswish = 2, kMlpSilu = 3 };

constexpr int kRows = 6;  // register tile: 6 rows x 2 vectors (tile_accumulate, simd.h)
constexpr int kCols = 2;
constexpr int64_t kL = kLanes<float>;
constexpr int64_t kTileCols = kCols * kL;  // 16: the packed weights' panel width (pack_panels)
// Rows per task: the hidden block [kBlockRows, H] (at most 4 * 320 wide where memory.fused_mlp calls
// this: 123 KB) stays in L2, and each panel of a packed weight is reused by kBlockRows / kRows row
// tiles while it is in L1.
constexpr int64_t kBlockRows = 24;
static_assert(kBlockRows % kRows == 0, "a block is whole tiles");
// Channels per partial sum (see tile).
constexpr int64_t kSumBlock = 32;

#define FVK_INLINE inline __attribute__((always_inline))

// GELU, exact (erf) form: 0.5 x (1 + erf(x / sqrt 2)), branch-free so the loops over it vectorize.
// erfc(z), z >= 0, by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7); for x < 0 the result is
// 0.5 x erfc(|z|), which avoids the cancellation in 1 + erf(z) where erf(z) ~ -1.
FVK_INLINE float gelu_erf(float x) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  // z^2 capped at 80 (|x| > 12.6, where GELU(x) is max(x, 0) to within 1e-35): beyond it e^-z^2 is a
  // denormal float, and each denormal result costs this CPU a microcode assist (an epilogue that let
  // them through ran at half speed).
  const float zz = z * z;
  const float half_erfc = 0.5f * p * t * fast_exp_in_range(-(zz < 80.0f ? zz : 80.0f));  // in [0, 0.5]
  return x * (x < 0.0f ? half_erfc : 1.0f - half_erfc);
}

template <int ACT>
FVK_INLINE float mlp_act(float v) {
  if (ACT == kMlpGelu) {
    return gelu_erf(v);
  } else if (ACT == kMlpHardswish) {
    const float r = v + 3.0f;  // x * relu6(x + 3) / 6, divided as torch's CPU kernel does
    return v * (r < 0.0f ? 0.0f : (r > 6.0f ? 6.0f : r)) / 6.0f;
  } else if (ACT == kMlpSilu) {
    return v * (1.0f / (1.0f + fast_exp(-v)));  // as dwconv_bn_act's SiLU
  } else {
    return v;
  }
}

// c[r, j0 .. j0 + NV * kL) = bias[j0 ..] + sum_k a[r * lda + k] * panel[k, 0 .. NV * kL) for the kRows
// rows of `a`, `panel` being the packed weight's columns j0 .. j0 + NV * kL (see pack_panels). The sum
// runs in blocks of kSumBlock channels, each block summed from zero and then added to c: blocked
// summation, whose rounding error grows with kSumBlock + K / kSumBlock instead of K (the float32 error
// of a 640-channel sum was 3x eager's with one running sum).
template <int NV>
FVK_INLINE void tile(const float* __restrict a, int64_t lda, int64_t K, const float* __restrict panel,
                     const float* __restrict bias, float* __restrict c, int64_t ldc, int64_t j0) {
  using V = vec_t<float>;
  for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
    const int64_t k1 = std::min(K, k0 + kSumBlock);
    V acc[kRows][NV] = {};
    tile_accumulate<kRows, NV>(acc, a, lda, panel, NV * kL, k0, k1);
#pragma GCC unroll 6
    for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 2
      for (int n = 0; n < NV; ++n) {
        float* p = c + r * ldc + j0 + n * kL;
        store_vec(p, acc[r][n] + load_vec(k0 == 0 ? bias + j0 + n * kL : p));
      }
  }
}

// c[rows, 0 .. ldw) = a[rows, 0 .. K) w[K, ldw] + bias for a block of whole row tiles, w packed by
// pack_panels (ldw a multiple of kL). Column panels outside, row tiles inside: a panel is reused by
// every row tile of the block while it is in L1.
FVK_INLINE void block_product(const float* a, int64_t lda, int64_t rows, int64_t K, const float* w, int64_t ldw,
                              const float* bias, float* c, int64_t ldc) {
  int64_t j0 = 0;
  for (; j0 + kTileCols <= ldw; j0 += kTileCols)
    for (int64_t r0 = 0; r0 < rows; r0 += kRows)
      tile<kCols>(a + r0 * lda, lda, K, w + j0 * K, bias, c + r0 * ldc, ldc, j0);
  if (j0 < ldw)
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) tile<1>(a + r0 * lda, lda, K, w + j0 * K, bias, c + r0 * ldc, ldc, j0);
}

template <int ACT>
FVK_CPU_CLONES void mlp_block(const float* __restrict x,    // [rows, C] input rows, row stride x_m
                              int64_t x_m, int64_t rows, int64_t C, int64_t H,
                              const float* __restrict w1t,  // fc1 weight^T [C, Hp], packed by pack_panels
                              const float* __restrict b1p,  // [Hp] fc1 bias, zero-padded
                              const float* __restrict w2t,  // fc2 weight^T [H, Cp], packed by pack_panels
                              const float* __restrict b2p,  // [Cp] fc2 bias, zero-padded
                              const float* __restrict gamma,     // [C] layer scale or null
                              const float* __restrict residual,  // [rows, C], row stride r_m, or null
                              int64_t r_m,
                              float* __restrict out,        // [rows, C], row stride o_m
                              int64_t o_m,
                              float* __restrict xb,         // [kBlockRows, C] scratch: padded copy of x
                              float* __restrict hidden,     // [kBlockRows, Hp] scratch
                              float* __restrict yb) {       // [kBlockRows, Cp] scratch
  const int64_t Hp = round_up(H, kL), Cp = round_up(C, kL);
  const int64_t tiles = round_up(rows, kRows);
  // Rows past the end repeat the last row (computed, never stored), so every tile is full.
  for (int64_t r = 0; r < tiles; ++r) std::memcpy(xb + r * C, x + std::min(r, rows - 1) * x_m, C * sizeof(float));
  block_product(xb, C, tiles, C, w1t, Hp, b1p, hidden, Hp);
  for (int64_t i = 0; i < tiles * Hp; ++i) hidden[i] = mlp_act<ACT>(hidden[i]);
  block_product(hidden, Hp, tiles, H, w2t, Cp, b2p, yb, Cp);
  for (int64_t r = 0; r < rows; ++r) {
    const float* y = yb + r * Cp;
    float* o = out + r * o_m;
    const float* res = residual ? residual + r * r_m : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const float v = gamma ? gamma[c] * y[c] : y[c];
      o[c] = res ? res[c] + v : v;
    }
  }
}

// Packs w [N, K] (an nn.Linear weight) transposed, as panels of kTileCols columns (the last one kL
// wide when ldw is an odd number of vectors): columns j0 .. j0 + width of w^T stored as [K, width] from
// offset j0 * K, zero beyond N. A tile then reads its weights sequentially (with w^T row-major, each
// step of the sum was a new cache line, for wide layers a new page). Bias [N] or none as [ldw].
void pack_panels(const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t ldw, std::vector<float>& wt,
                 std::vector<float>& bp) {
  const int64_t N = w.size(0), K = w.size(1), s0 = w.stride(0), s1 = w.stride(1);
  const float* src = w.const_data_ptr<float>();
  wt.assign(K * ldw, 0.0f);
  const int64_t panels = (ldw + kTileCols - 1) / kTileCols;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j0 = p * kTileCols, width = std::min(kTileCols, ldw - j0);
      float* panel = wt.data() + j0 * K;
      for (int64_t j = j0; j < std::min(j0 + width, N); ++j)
        for (int64_t k = 0; k < K; ++k) panel[k * width + (j - j0)] = src[j * s0 + k * s1];
    }
  });
  bp.assign(ldw, 0.0f);
  if (bias.has_value())
    for (int64_t n = 0; n < N; ++n) bp[n] = bias->const_data_ptr<float>()[n * bias->stride(0)];
}

template <int ACT>
void mlp_rows(const at::Tensor& x, int64_t H, const std::vector<float>& w1t, const std::vector<float>& b1p,
              const std::vector<float>& w2t, const std::vector<float>& b2p, const float* gamma,
              const c10::optional<at::Tensor>& residual, const at::Tensor& out) {
  const int64_t M = x.size(0), C = x.size(1);
  const int64_t Hp = round_up(H, kL), Cp = round_up(C, kL);
  const float* xp = x.const_data_ptr<float>();
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  const int64_t r_m = residual.has_value() ? residual->stride(0) : 0;
  float* op = out.mutable_data_ptr<float>();
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  // Grain: about 2^18 multiply-adds per chunk before OpenMP's fork/join pays off.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, kBlockRows * 2 * C * H));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xb(kBlockRows * C), hidden(kBlockRows * Hp), yb(kBlockRows * Cp);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t m0 = blk * kBlockRows, rows = std::min(kBlockRows, M - m0);
      mlp_block<ACT>(xp + m0 * x.stride(0), x.stride(0), rows, C, H, w1t.data(), b1p.data(), w2t.data(), b2p.data(),
                     gamma, rp ? rp + m0 * r_m : nullptr, r_m, op + m0 * out.stride(0), out.stride(0), xb.data(),
                     hidden.data(), yb.data());
    }
  });
}

}  // namespace

void fused_mlp_cpu(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                   const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& gamma,
                   const c10::optional<at::Tensor>& residual, int64_t act, const at::Tensor& out) {
  auto check_f32 = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "fused_mlp: ", name,
                " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  };
  check_f32(x, "x"), check_f32(w1, "w1"), check_f32(w2, "w2"), check_f32(out, "out");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "fused_mlp: x must be [M, C] with contiguous rows, got sizes ",
              x.sizes(), " strides ", x.strides());
  const int64_t M = x.size(0), C = x.size(1), H = w1.size(0);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, "fused_mlp: w1 must be [H, C=", C, "], got ", w1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == H, "fused_mlp: w2 must be [C=", C, ", H=", H,
              "], got ", w2.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == C && out.stride(1) == 1,
              "fused_mlp: out must be [", M, ", ", C, "] with contiguous rows, got sizes ", out.sizes(), " strides ",
              out.strides());
  auto check_vector = [&](const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
    if (!t.has_value()) return;
    check_f32(*t, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fused_mlp: ", name, " must be [", n, "], got ", t->sizes());
  };
  check_vector(b1, H, "b1"), check_vector(b2, C, "b2"), check_vector(gamma, C, "gamma");
  if (residual.has_value()) {
    check_f32(*residual, "residual");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == C && residual->stride(1) == 1,
                "fused_mlp: residual must be [", M, ", ", C, "] with contiguous rows, got sizes ", residual->sizes(),
                " strides ", residual->strides());
  }
  TORCH_CHECK(act == kMlpNone || act == kMlpGelu || act == kMlpHardswish || act == kMlpSilu,
              "fused_mlp: act must be 0 (none), 1 (gelu), 2 (hardswish) or 3 (silu), got ", act);
  if (M == 0 || C == 0) return;
  std::vector<float> w1t, b1p, w2t, b2p;
  pack_panels(w1, b1, round_up(H, kL), w1t, b1p);
  pack_panels(w2, b2, round_up(C, kL), w2t, b2p);
  std::vector<float> g;
  if (gamma.has_value()) {
    g.resize(C);
    for (int64_t c = 0; c < C; ++c) g[c] = gamma->const_data_ptr<float>()[c * gamma->stride(0)];
  }
  const float* gp = gamma.has_value() ? g.data() : nullptr;
  const at::Tensor xc = x.stride(0) >= C ? x : x.contiguous();
  if (act == kMlpGelu) {
    mlp_rows<kMlpGelu>(xc, H, w1t, b1p, w2t, b2p, gp, residual, out);
  } else if (act == kMlpSilu) {
    mlp_rows<kMlpSilu>(xc, H, w1t, b1p, w2t, b2p, gp, residual, out);
  } else if (act == kMlpHardswish) {
    mlp_rows<kMlpHardswish>(xc, H, w1t, b1p, w2t, b2p, gp, residual, out);
  } else {
    mlp_rows<kMlpNone>(xc, H, w1t, b1p, w2t, b2p, gp, residual, out);
  }
}

}  // namespace fastvit_kernels
