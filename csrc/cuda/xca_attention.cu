// CUDA launch of xca_attention: indexing and launch only, the math is ../xca_attention.h.
// Arguments are validated once, in ../ops.cpp, before xca_attention_cuda is called.
//
// The simple fallback for when Triton is missing or fails (the Triton kernel is the fast path), in
// three launches:
//   1. xca_stats_kernel: block ((image * head, chunk of tokens), group of stats entries). The block
//      stages tiles of its chunk's [q | k] rows in shared memory (acc_t, coalesced loads); each
//      thread sums kEntries entries of the stats vector (G, nq, nk) over the chunk and writes its
//      partial sums to a workspace. Chunks split the tokens when B * heads alone would leave SMs idle.
//   2. xca_softmax_kernel: block per image * head: sums the chunks' partials, inverts the 2 * d norms
//      (xca_inv_norm, into shared memory), then one thread per row runs xca_attention_row into
//      A [B * heads, d, d].
//   3. xca_output_kernel: one thread per output element (b, n, head, i), i fastest (coalesced
//      stores; a warp reads the same v row, a broadcast): xca_output_channel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../xca_attention.h"

namespace fastvit_kernels {
namespace {

// Sizes and strides (in elements) passed by value: one kernel serves every layout.
struct XcaGeometry {
  int64_t B, N, C, heads, d;
  int64_t s_b, s_n, s_c;  // qkv strides
  int64_t o_b, o_n, o_c;  // out strides
  int64_t P;              // stats entries per head, d*d + 2*d
  int64_t chunks, chunk_len;
};

constexpr int kStatsThreads = 256;
// Stats entries per thread (registers): a block covers kStatsThreads * kEntries of them; heads
// with more (d > 30) take several blocks (gridDim.y), each re-reading the tile from L2.
constexpr int kEntries = 4;
// Shared memory for one token tile of [q | k], acc_t: under the 48 KB default for any d <= 768.
constexpr int64_t kTileBytes = 16 * 1024;

template <typename scalar_t>
__global__ void __launch_bounds__(kStatsThreads) xca_stats_kernel(
    const scalar_t* __restrict__ qkv,         // [B, N, 3*C], strides g.s_*, last dim (3, heads, d)
    acc_type_t<scalar_t>* __restrict__ part,  // [B * heads, g.chunks, g.P] out: partial stats vectors
    const XcaGeometry g, const int tile_tokens) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);  // [tile_tokens, 2 * d]: q then k channels
  const int64_t chunk = blockIdx.x % g.chunks, bh = blockIdx.x / g.chunks;
  const int64_t width = 2 * g.d;
  const scalar_t* q0 = qkv + (bh / g.heads) * g.s_b + (bh % g.heads) * g.d * g.s_c;

  // This thread's entries and their columns in the tile (a tile row is [q | k]: k_off = d, stride 1).
  int a_col[kEntries], b_col[kEntries];
  acc_t acc[kEntries];
  // 32-bit: P < 2^31 for any d the shared tile allows.
  const int p0 = static_cast<int>(blockIdx.y) * kStatsThreads * kEntries + static_cast<int>(threadIdx.x);
  const int d = static_cast<int>(g.d), P = static_cast<int>(g.P);
#pragma unroll
  for (int r = 0; r < kEntries; ++r) {
    int a = 0, b = 0;
    if (p0 + r * kStatsThreads < P) xca_stats_columns(p0 + r * kStatsThreads, d, &a, &b);
    a_col[r] = static_cast<int>(xca_column_offset(a, d, d, 1));
    b_col[r] = static_cast<int>(xca_column_offset(b, d, d, 1));
    acc[r] = acc_t(0);
  }

  const int64_t t0 = chunk * g.chunk_len, t1 = min(g.N, t0 + g.chunk_len);
  for (int64_t n0 = t0; n0 < t1; n0 += tile_tokens) {
    const int64_t count = min(static_cast<int64_t>(tile_tokens), t1 - n0);
    __syncthreads();  // the previous tile has been read by every thread
    // 32-bit tile indices: a 64-bit division is a subroutine call (and spilled registers around it).
    const int tile_size = static_cast<int>(count * width), w = static_cast<int>(width);
    for (int e = threadIdx.x; e < tile_size; e += kStatsThreads) {
      const int n = e / w, c = e % w;
      tile[e] = static_cast<acc_t>(q0[(n0 + n) * g.s_n + xca_column_offset(c, g.d, g.C * g.s_c, g.s_c)]);
    }
    __syncthreads();
    for (int n = 0; n < static_cast<int>(count); ++n) {
      const acc_t* row = tile + n * w;
#pragma unroll
      for (int r = 0; r < kEntries; ++r) acc[r] += row[a_col[r]] * row[b_col[r]];
    }
  }
  acc_t* out = part + (bh * g.chunks + chunk) * g.P;
#pragma unroll
  for (int r = 0; r < kEntries; ++r)
    if (p0 + r * kStatsThreads < P) out[p0 + r * kStatsThreads] = acc[r];
}

template <typename acc_t>
__global__ void xca_softmax_kernel(
    acc_t* __restrict__ part,               // [B * heads, g.chunks, g.P]; chunk 0 becomes the sum
    const acc_t* __restrict__ temperature,  // [heads]
    acc_t* __restrict__ attn,               // [B * heads, d, d] out: A row-major
    const XcaGeometry g, const acc_t eps) {
  const int64_t bh = blockIdx.x;
  acc_t* stats = part + bh * g.chunks * g.P;
  if (g.chunks > 1) {
    for (int64_t p = threadIdx.x; p < g.P; p += blockDim.x) {
      acc_t s = stats[p];
      for (int64_t c = 1; c < g.chunks; ++c) s += stats[c * g.P + p];
      stats[p] = s;
    }
    __syncthreads();  // also orders the global writes above before the reads below (same block)
  }
  extern __shared__ unsigned char smem_raw[];
  acc_t* inv = reinterpret_cast<acc_t*>(smem_raw);  // [2 * d] inverted norms, shared by the rows
  for (int64_t c = threadIdx.x; c < 2 * g.d; c += blockDim.x) inv[c] = xca_inv_norm(stats[g.d * g.d + c], eps);
  __syncthreads();
  const acc_t t = load_ro(temperature + bh % g.heads);
  for (int64_t i = threadIdx.x; i < g.d; i += blockDim.x)
    xca_attention_row(stats, inv, g.d, i, t, attn + (bh * g.d + i) * g.d);
}

// Grid-stride loop over (b, n, head, i) with i innermost, 64-bit indices.
template <typename scalar_t>
__global__ void xca_output_kernel(
    const scalar_t* __restrict__ qkv,               // [B, N, 3*C], strides g.s_*
    const acc_type_t<scalar_t>* __restrict__ attn,  // [B * heads, d, d]
    scalar_t* __restrict__ out,                     // [B, N, C], strides g.o_*, last dim (heads, d)
    const XcaGeometry g) {
  const int64_t total = g.B * g.N * g.C;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t c = idx % g.C, n = (idx / g.C) % g.N, b = idx / (g.C * g.N);
    const int64_t head = c / g.d, i = c % g.d;
    const scalar_t* v = qkv + b * g.s_b + n * g.s_n + (2 * g.C + head * g.d) * g.s_c;
    const auto o = xca_output_channel(attn + ((b * g.heads + head) * g.d + i) * g.d, int64_t(1), v, g.s_c, g.d);
    out[b * g.o_b + n * g.o_n + c * g.o_c] = static_cast<scalar_t>(o);
  }
}

}  // namespace

void xca_attention_cuda(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& temperature, double eps,
                        const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(qkv.device());

  XcaGeometry g;
  g.B = qkv.size(0), g.N = qkv.size(1), g.C = qkv.size(2) / 3, g.heads = num_heads, g.d = g.C / num_heads;
  g.s_b = qkv.stride(0), g.s_n = qkv.stride(1), g.s_c = qkv.stride(2);
  g.o_b = out.stride(0), g.o_n = out.stride(1), g.o_c = out.stride(2);
  g.P = xca_stats_size(g.d);

  const int64_t BH = g.B * num_heads;
  const int64_t groups = (g.P + kStatsThreads * kEntries - 1) / (kStatsThreads * kEntries);
  // Enough blocks for two per SM, chunks of at least 64 tokens.
  int sms = 0;  // (ATen/cuda/CUDAContext.h would need the cuSPARSE headers: ask the runtime directly)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, qkv.get_device()));
  const int64_t want = (2 * int64_t(sms) + BH * groups - 1) / (BH * groups);
  g.chunks = std::max<int64_t>(1, std::min<int64_t>(want, g.N / 64));
  g.chunk_len = (g.N + g.chunks - 1) / g.chunks;
  g.chunks = (g.N + g.chunk_len - 1) / g.chunk_len;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "xca_attention_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const int64_t row_bytes = 2 * g.d * static_cast<int64_t>(sizeof(acc_t));
    TORCH_CHECK(row_bytes <= 48 * 1024, "xca_attention_cuda: head_dim ", g.d,
                " is too large for the CUDA kernel's shared-memory tile");
    const int tile_tokens = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(64, kTileBytes / row_bytes)));
    const auto acc_opts = qkv.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor part = at::empty({BH * g.chunks * g.P}, acc_opts);
    at::Tensor attn = at::empty({BH * g.d * g.d}, acc_opts);

    const dim3 stats_grid(static_cast<unsigned>(BH * g.chunks), static_cast<unsigned>(groups));
    xca_stats_kernel<scalar_t><<<stats_grid, kStatsThreads, tile_tokens * row_bytes, stream>>>(
        qkv.const_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(), g, tile_tokens);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    xca_softmax_kernel<acc_t><<<static_cast<unsigned>(BH), 128, 2 * g.d * sizeof(acc_t), stream>>>(
        part.mutable_data_ptr<acc_t>(), temperature.const_data_ptr<acc_t>(), attn.mutable_data_ptr<acc_t>(), g,
        static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    constexpr int kThreads = 256;
    const int64_t total = g.B * g.N * g.C;
    // Grid-stride loop: a capped grid covers any size.
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 16);
    xca_output_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        qkv.const_data_ptr<scalar_t>(), attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastvit_kernels
