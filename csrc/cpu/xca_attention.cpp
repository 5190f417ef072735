// CPU kernels for xca_attention: loops (at::parallel_for) around the math in ../xca_attention.h.
// Arguments are validated once, in ../ops.cpp, before xca_attention_cpu is called.
//
// Work item: one image and one chunk of its tokens, all heads. There is one chunk per image unless
// B is too small to keep every thread busy; then the tokens are split and the two passes run as two
// parallel regions with the partial statistics summed in between. All heads at once, so that each
// qkv row is read, and each out row written, whole and contiguous (head by head, every pass would
// touch a few bytes of every row's cache lines). Per item:
//   1. statistics (pass 1 over the chunk's tokens): tiles of tokens' [q | k] rows are converted to
//      acc_t rows ([tile, 2C + kPad], a zero pad at the end), the column sums of squares (nq, nk of
//      every head) accumulated along the way, and per head G = q^T k in register tiles of kRows
//      rows of G x up to three vectors of its columns (gram_tile): per token, a few vector loads of
//      k feed kRows * 3 multiply-adds. Head dims that are not multiples of the tile read a few
//      columns of the next head (or the zero pad) into rows/columns of G that are never used.
//      The result is the header's stats vector (G, nq, nk) per head;
//   2. the d x d attention matrix of each head, row by row with the header's xca_attention_row,
//      stored transposed and zero-padded (At[j][i], i < dp) for step 3;
//   3. out (pass 2): tiles of tokens' v rows converted to acc_t; per head out[n][i-vector] =
//      sum_j v[n][j] * At[j][i-vector] in register tiles of kRows tokens x up to three vectors of
//      channels (value_tile) into an acc_t row buffer, heads in increasing order (a head's padding
//      columns spill into the next head's, which overwrites them), then whole rows converted and
//      stored.
// Explicit vector types (as in patch_attention.cpp) because g++ vectorizes these loops along the
// wrong axis (over the short row of a tile instead of across the vector of columns).
// qkv whose channels are not contiguous (channel stride != 1, e.g. a channel-first [B, 3C, N] seen
// as [B, N, 3C]) takes the CUDA kernels' per-entry functions instead (xca_stats_columns,
// xca_column_offset, xca_output_channel): that keeps the CUDA math under the CPU tests.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../xca_attention.h"
#include "simd.h"

namespace fastvit_kernels {
namespace {

struct Geometry {
  int64_t B, N, C, heads, d;
  int64_t s_b, s_n, s_c;  // qkv strides
  int64_t o_b, o_n, o_c;  // out strides
};

// Register tile: kRows rows (of G in pass 1, tokens in pass 2) x up to kMaxVecs vectors of columns:
// 12 accumulators + 3 loads + 1 broadcast fit the 16 AVX2 registers.
constexpr int64_t kRows = 4;
constexpr int kMaxVecs = 3;
constexpr int64_t kPad = 8;  // head dims are padded to a multiple of this (of every vector width)
// Token tiles: about this many acc_t in the converted [q | k] rows (128 KB of floats, in L2), at
// least kMinTile tokens (so the register tiles' loads and stores of G amortize), at most kMaxTile.
constexpr int64_t kTileFloats = 32768;
constexpr int64_t kMinTile = 16;
constexpr int64_t kMaxTile = 256;
// Tokens per chunk at least this many when an image's tokens are split across threads: the chunk's
// own attention matrices (heads * d^2 exps) and the reduction of the partial statistics stay small
// next to its 2 * tokens * heads * d^2 multiply-adds.
constexpr int64_t kMinChunk = 128;
// Split tokens when B gives fewer than this many items per thread (load balance).
constexpr int64_t kItemsPerThread = 4;

inline int64_t cdiv(int64_t n, int64_t m) { return (n + m - 1) / m; }

// Pass 1, one register tile: g[i0 + r][j0 + vectors] += sum_n q[n][i0 + r] * k[n][j0 + vectors].
template <typename acc_t, int NV>
FVK_CPU_CLONES void gram_tile(const acc_t* __restrict q,  // &q[0][0] of the head in the row buffer
                              const acc_t* __restrict k,  // &k[0][0] of the head in the row buffer
                              int64_t count, int64_t ld,  // tokens, row buffer stride
                              int64_t i0, int64_t j0,
                              acc_t* __restrict g,        // [dq, dp] running sums of the head's G
                              int64_t dp) {
  using V = vec_t<acc_t>;
  constexpr int64_t L = kLanes<acc_t>;
  V c[kRows][NV];
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) c[r][v] = load_vec(g + (i0 + r) * dp + j0 + v * L);
  for (int64_t n = 0; n < count; ++n) {
    V kv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) kv[v] = load_vec(k + n * ld + j0 + v * L);
#pragma GCC unroll 4
    for (int64_t r = 0; r < kRows; ++r) {
      const acc_t qs = q[n * ld + i0 + r];
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) c[r][v] += qs * kv[v];
    }
  }
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) store_vec(g + (i0 + r) * dp + j0 + v * L, c[r][v]);
}

// Pass 2, one register tile: o[r][i0 + vectors] = sum_j v[r][j] * at[j][i0 + vectors], r < kRows.
template <typename acc_t, int NV>
FVK_CPU_CLONES void value_tile(const acc_t* __restrict v,   // &v[0][0] of the head, kRows tokens
                               int64_t ldv,                 // v row stride
                               const acc_t* __restrict at,  // [d, dp] the head's A^T, zero-padded
                               int64_t d, int64_t dp, int64_t i0,
                               acc_t* __restrict o,         // &o[0][0] of the head, kRows tokens
                               int64_t ldo) {               // o row stride
  using V = vec_t<acc_t>;
  constexpr int64_t L = kLanes<acc_t>;
  V c[kRows][NV] = {};
  tile_accumulate<kRows, NV>(c, v, ldv, at + i0, dp, 0, d);
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 3
    for (int w = 0; w < NV; ++w) store_vec(o + r * ldo + i0 + w * L, c[r][w]);
}

// Converts n elements to acc_t, and adds their squares to sq (the column sums of squares).
template <typename acc_t, typename scalar_t>
FVK_CPU_CLONES void convert_row(const scalar_t* __restrict src, int64_t n, acc_t* __restrict dst,
                                acc_t* __restrict sq) {
  for (int64_t c = 0; c < n; ++c) {
    const acc_t x = static_cast<acc_t>(src[c]);
    dst[c] = x;
    if (sq) sq[c] += x * x;
  }
}

// Step 2 for one head: at[j * dp + i] = A[i][j] (A transposed, zero-padded to dp columns), through
// the header's row function into the contiguous row buffer (where its exps vectorize).
template <typename acc_t>
FVK_CPU_CLONES void attention_matrix(const acc_t* stats, int64_t d, int64_t dp, acc_t temperature, acc_t eps,
                                     acc_t* __restrict inv,  // [2 * d] scratch
                                     acc_t* __restrict row,  // [d] scratch
                                     acc_t* __restrict at) { // [d, dp] out
  xca_inverse_norms(stats, d, eps, inv);
  for (int64_t j = 0; j < d; ++j)
    for (int64_t i = d; i < dp; ++i) at[j * dp + i] = acc_t(0);
  for (int64_t i = 0; i < d; ++i) {
    xca_attention_row(stats, inv, d, i, temperature, row);
    for (int64_t j = 0; j < d; ++j) at[j * dp + i] = row[j];
  }
}

// Calls tile<NV>(column) over the dp / L vectors of columns in groups of up to kMaxVecs.
template <typename acc_t, typename F>
inline void over_column_vectors(int64_t dp, F&& tile) {
  constexpr int64_t L = kLanes<acc_t>;
  int64_t c0 = 0;
  for (; c0 + kMaxVecs * L <= dp; c0 += kMaxVecs * L) tile(std::integral_constant<int, kMaxVecs>(), c0);
  if (dp - c0 == 2 * L) tile(std::integral_constant<int, 2>(), c0);
  if (dp - c0 == L) tile(std::integral_constant<int, 1>(), c0);
}

template <typename scalar_t>
struct XcaKernel {
  using acc_t = acc_type_t<scalar_t>;

  const scalar_t* qkv;
  const acc_t* temperature;  // [heads]
  scalar_t* out;
  Geometry g;
  acc_t eps;
  int64_t dp, dq, P, ld_qk, ld_o, tile;

  XcaKernel(const scalar_t* qkv_, const acc_t* temperature_, scalar_t* out_, const Geometry& g_, double eps_)
      : qkv(qkv_), temperature(temperature_), out(out_), g(g_), eps(static_cast<acc_t>(eps_)) {
    dp = round_up(g.d, kPad);
    dq = round_up(g.d, kRows);  // rows of G computed: whole register tiles
    P = xca_stats_size(g.d);
    ld_qk = 2 * g.C + kPad;  // the zero pad keeps the last head's k vectors inside the row
    ld_o = g.C + kPad;       // the last head's padding columns land in the pad
    tile = std::min(kMaxTile, std::max(kMinTile, kTileFloats / ld_qk) / kRows * kRows);
  }

  // Per-thread scratch, allocated once per parallel task.
  struct Scratch {
    std::vector<acc_t> qk, sq, gram, stats, inv, row, at, v, o;
    explicit Scratch(const XcaKernel& x)
        : qk(x.tile * x.ld_qk, acc_t(0)), sq(x.ld_qk), gram(x.g.heads * x.dq * x.dp), stats(x.g.heads * x.P),
          inv(2 * x.g.d), row(x.g.d), at(x.g.heads * x.g.d * x.dp), v(x.tile * x.g.C), o(x.tile * x.ld_o) {}
  };

  // Step 1: the stats vectors of every head of image b over tokens [t0, t1), to stats[heads * P].
  void chunk_stats(int64_t b, int64_t t0, int64_t t1, Scratch& s, acc_t* stats) const {
    const int64_t d = g.d, C = g.C;
    const scalar_t* img = qkv + b * g.s_b;
    if (g.s_c != 1) {  // the CUDA kernel's per-entry path (see the file comment)
      std::vector<int64_t> off(2 * P);  // the two columns of every stats entry, as offsets from q[n][0]
      for (int64_t p = 0; p < P; ++p) {
        int64_t a, c;
        xca_stats_columns<int64_t>(p, d, &a, &c);
        off[2 * p] = xca_column_offset(a, d, C * g.s_c, g.s_c);
        off[2 * p + 1] = xca_column_offset(c, d, C * g.s_c, g.s_c);
      }
      for (int64_t h = 0; h < g.heads; ++h) {
        acc_t* st = stats + h * P;
        std::fill(st, st + P, acc_t(0));
        for (int64_t n = t0; n < t1; ++n) {
          const scalar_t* row = img + n * g.s_n + h * d * g.s_c;
          for (int64_t p = 0; p < P; ++p)
            st[p] += static_cast<acc_t>(row[off[2 * p]]) * static_cast<acc_t>(row[off[2 * p + 1]]);
        }
      }
      return;
    }
    std::fill(s.gram.begin(), s.gram.end(), acc_t(0));
    std::fill(s.sq.begin(), s.sq.end(), acc_t(0));
    for (int64_t n0 = t0; n0 < t1; n0 += tile) {
      const int64_t count = std::min(tile, t1 - n0);
      for (int64_t n = 0; n < count; ++n)
        convert_row(img + (n0 + n) * g.s_n, 2 * C, s.qk.data() + n * ld_qk, s.sq.data());
      for (int64_t h = 0; h < g.heads; ++h) {
        const acc_t* q = s.qk.data() + h * d;
        const acc_t* k = s.qk.data() + C + h * d;
        acc_t* gram = s.gram.data() + h * dq * dp;
        for (int64_t i0 = 0; i0 < dq; i0 += kRows)
          over_column_vectors<acc_t>(dp, [&](auto nv, int64_t j0) {
            gram_tile<acc_t, decltype(nv)::value>(q, k, count, ld_qk, i0, j0, gram, dp);
          });
      }
    }
    for (int64_t h = 0; h < g.heads; ++h) {
      acc_t* st = stats + h * P;
      const acc_t* gram = s.gram.data() + h * dq * dp;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) st[i * d + j] = gram[i * dp + j];
      for (int64_t i = 0; i < d; ++i) st[d * d + i] = s.sq[h * d + i], st[d * d + d + i] = s.sq[C + h * d + i];
    }
  }

  // Step 2: A of every head from its stats vector, transposed and zero-padded:
  // s.at[(h * d + j) * dp + i] = A_h[i][j].
  void attention_matrices(const acc_t* stats, Scratch& s) const {
    for (int64_t h = 0; h < g.heads; ++h)
      attention_matrix(stats + h * P, g.d, dp, temperature[h], eps, s.inv.data(), s.row.data(),
                       s.at.data() + h * g.d * dp);
  }

  // Step 3: out of image b for tokens [t0, t1) from s.at.
  void chunk_output(int64_t b, int64_t t0, int64_t t1, Scratch& s) const {
    const int64_t d = g.d, C = g.C;
    const scalar_t* v_img = qkv + b * g.s_b + 2 * C * g.s_c;
    scalar_t* o_img = out + b * g.o_b;
    if (g.s_c != 1) {  // the CUDA kernel's per-entry path
      for (int64_t n = t0; n < t1; ++n)
        for (int64_t h = 0; h < g.heads; ++h)
          for (int64_t i = 0; i < d; ++i)
            o_img[n * g.o_n + (h * d + i) * g.o_c] = static_cast<scalar_t>(xca_output_channel(
                s.at.data() + h * d * dp + i, dp, v_img + n * g.s_n + h * d * g.s_c, g.s_c, d));
      return;
    }
    for (int64_t n0 = t0; n0 < t1; n0 += tile) {
      const int64_t count = std::min(tile, t1 - n0);
      const int64_t rows = round_up(count, kRows);
      for (int64_t n = 0; n < count; ++n)
        convert_row<acc_t, scalar_t>(v_img + (n0 + n) * g.s_n, C, s.v.data() + n * C, nullptr);
      // Rows past the end of the last register tile: zeros, computed and not stored.
      std::fill(s.v.begin() + count * C, s.v.begin() + rows * C, acc_t(0));
      for (int64_t r0 = 0; r0 < rows; r0 += kRows)
        for (int64_t h = 0; h < g.heads; ++h)  // increasing: see the file comment
          over_column_vectors<acc_t>(dp, [&](auto nv, int64_t i0) {
            value_tile<acc_t, decltype(nv)::value>(s.v.data() + r0 * C + h * d, C, s.at.data() + h * d * dp, d,
                                                   dp, i0, s.o.data() + r0 * ld_o + h * d, ld_o);
          });
      for (int64_t n = 0; n < count; ++n) {
        scalar_t* orow = o_img + (n0 + n) * g.o_n;
        const acc_t* o = s.o.data() + n * ld_o;
        if (g.o_c == 1) {
          for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(o[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) orow[c * g.o_c] = static_cast<scalar_t>(o[c]);
        }
      }
    }
  }

  void run() const {
    const int64_t threads = at::get_num_threads();
    int64_t chunks = 1;
    if (g.B < kItemsPerThread * threads && threads > 1)
      chunks = std::max<int64_t>(1, std::min(cdiv(kItemsPerThread * threads, g.B), g.N / kMinChunk));
    const int64_t chunk_len = cdiv(g.N, chunks);
    chunks = cdiv(g.N, chunk_len);

    if (chunks == 1) {  // both passes per image in one task: its qkv rows stay in cache
      at::parallel_for(0, g.B, 1, [&](int64_t begin, int64_t end) {
        Scratch s(*this);
        for (int64_t b = begin; b < end; ++b) {
          chunk_stats(b, 0, g.N, s, s.stats.data());
          attention_matrices(s.stats.data(), s);
          chunk_output(b, 0, g.N, s);
        }
      });
      return;
    }
    // Split tokens: partial statistics per (image, chunk), then each chunk sums its image's partials
    // (chunks * heads * P adds, small), builds the heads' A and writes its tokens' output.
    const int64_t HP = g.heads * P;
    std::vector<acc_t> partial(g.B * chunks * HP);
    at::parallel_for(0, g.B * chunks, 1, [&](int64_t begin, int64_t end) {
      Scratch s(*this);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t0 = (item % chunks) * chunk_len;
        chunk_stats(item / chunks, t0, std::min(g.N, t0 + chunk_len), s, partial.data() + item * HP);
      }
    });
    at::parallel_for(0, g.B * chunks, 1, [&](int64_t begin, int64_t end) {
      Scratch s(*this);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks, t0 = (item % chunks) * chunk_len;
        const acc_t* img = partial.data() + b * chunks * HP;
        std::copy(img, img + HP, s.stats.begin());
        for (int64_t c = 1; c < chunks; ++c)
          for (int64_t p = 0; p < HP; ++p) s.stats[p] += img[c * HP + p];
        attention_matrices(s.stats.data(), s);
        chunk_output(b, t0, std::min(g.N, t0 + chunk_len), s);
      }
    });
  }
};

}  // namespace

void xca_attention_cpu(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& temperature, double eps,
                       const at::Tensor& out) {
  if (out.numel() == 0) return;
  Geometry g;
  g.B = qkv.size(0), g.N = qkv.size(1), g.C = qkv.size(2) / 3, g.heads = num_heads, g.d = g.C / num_heads;
  g.s_b = qkv.stride(0), g.s_n = qkv.stride(1), g.s_c = qkv.stride(2);
  g.o_b = out.stride(0), g.o_n = out.stride(1), g.o_c = out.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "xca_attention_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    XcaKernel<scalar_t>(qkv.const_data_ptr<scalar_t>(), temperature.const_data_ptr<acc_t>(),
                        out.mutable_data_ptr<scalar_t>(), g, eps)
        .run();
  });
}

}  // namespace fastvit_kernels
