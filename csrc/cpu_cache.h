// A caching allocator for CPU tensors, the CPU counterpart of PyTorch's CUDA caching allocator.
//
// Why: glibc serves large blocks (above its mmap threshold, 128 KiB to 32 MiB) with fresh mmap'd
// pages and returns them to the OS on free, so every large tensor of every forward pass pays one page
// fault per 4 KiB page on first touch. On the 2-core VM this project runs on, that is ~2 us a page:
// more than the kernel that then writes the tensor. Blocks freed here are kept and handed out again
// (same size class), so their pages stay mapped.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <tuple>

namespace fastvit_kernels {

// Uninitialised CPU tensor of `sizes` / `dtype` / `memory_format` whose storage comes from the cache.
at::Tensor cpu_cached_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat memory_format);

// (bytes held by live tensors from the cache, bytes cached idle, idle limit).
std::tuple<int64_t, int64_t, int64_t> cpu_cache_stats();

// Returns every idle block to the OS.
void cpu_cache_release();

// Idle blocks beyond `bytes` are freed instead of cached (0: nothing is cached).
void cpu_cache_set_limit(int64_t bytes);

}  // namespace fastvit_kernels
