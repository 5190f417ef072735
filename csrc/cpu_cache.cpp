#include "cpu_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastvit_kernels {
namespace {

// Below this, glibc serves blocks from its heap, whose pages stay mapped: no caching needed.
constexpr size_t kMinCachedBytes = size_t(128) << 10;
// 64 B: a cache line, and what PyTorch's CPU allocator aligns to.
constexpr size_t kAlignment = 64;

// Size classes: 8 per power of two (at most 12.5% of a block unused), in whole 4 KiB pages.
size_t size_class(size_t n) {
  size_t pow2 = size_t(1) << (63 - __builtin_clzll(n));
  size_t step = pow2 / 8 < 4096 ? 4096 : pow2 / 8;
  return (n + step - 1) / step * step;
}

struct Block {
  void* data;
  size_t bytes;  // its size class
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    c10::Device cpu(c10::DeviceType::CPU);
    if (n < kMinCachedBytes) {
      void* data = alloc_raw(n == 0 ? 1 : n);
      return {data, data, &free_raw, cpu};
    }
    const size_t bytes = size_class(n);
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(bytes);
      if (it != idle_.end() && !it->second.empty()) {
        block = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= bytes;
      }
      live_bytes_ += bytes;
    }
    if (block == nullptr) {
      block = new Block{nullptr, bytes};
      try {
        block->data = alloc_raw(bytes);
      } catch (...) {
        release();  // the idle blocks may be what stands between us and the memory
        try {
          block->data = alloc_raw(bytes);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex_);
          live_bytes_ -= bytes;
          delete block;
          throw;
        }
      }
    }
    return {block->data, block, &give_back, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void give_back_block(Block* block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ -= block->bytes;
      if (idle_bytes_ + block->bytes <= limit_) {
        idle_[block->bytes].push_back(block);
        idle_bytes_ += block->bytes;
        return;
      }
    }
    std::free(block->data);
    delete block;
  }

  void release() {
    std::vector<Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& entry : idle_) {
        blocks.insert(blocks.end(), entry.second.begin(), entry.second.end());
      }
      idle_.clear();
      idle_bytes_ = 0;
    }
    for (Block* block : blocks) {
      std::free(block->data);
      delete block;
    }
  }

  void set_limit(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      if (idle_bytes_ <= limit_) return;
    }
    release();
  }

  std::tuple<int64_t, int64_t, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(live_bytes_), int64_t(idle_bytes_), int64_t(limit_)};
  }

 private:
  static void* alloc_raw(size_t n) {
    void* data = nullptr;
    if (posix_memalign(&data, kAlignment, n) != 0) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, "fastvit_kernels CPU cache: failed to allocate ", n, " bytes");
    }
    return data;
  }

  static void free_raw(void* data) { std::free(data); }
  static void give_back(void* ctx);

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> idle_;  // size class -> idle blocks
  size_t live_bytes_ = 0, idle_bytes_ = 0;
  size_t limit_ = size_t(1) << 30;
};

// Never destroyed: tensors freed during interpreter shutdown still call into it.
CachingCpuAllocator& allocator() {
  static auto* instance = new CachingCpuAllocator();
  return *instance;
}

void CachingCpuAllocator::give_back(void* ctx) { allocator().give_back_block(static_cast<Block*>(ctx)); }

}  // namespace

at::Tensor cpu_cached_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat memory_format) {
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   memory_format);
}

std::tuple<int64_t, int64_t, int64_t> cpu_cache_stats() { return allocator().stats(); }

void cpu_cache_release() { allocator().release(); }

void cpu_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "cpu_cache_set_limit: bytes must be >= 0, got ", bytes);
  allocator().set_limit(size_t(bytes));
}

}  // namespace fastvit_kernels
