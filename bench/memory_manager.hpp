// Google Benchmark's MemoryManager on top of bench/alloc_counter.hpp: after timing a point, the
// library runs it once more between Start() and Stop() and reports "max_bytes_used" and
// "allocs_per_iter" in its JSON. A benchmark calls kernel_begins() right before its timed loop,
// so the figures count the kernel's own allocations, not the inputs the benchmark set up.
// Include in exactly one translation unit per executable (it includes alloc_counter.hpp).
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>

#include "alloc_counter.hpp"

namespace posenc_bench {

namespace detail {
inline std::int64_t heap_base = 0;
}

/// Marks the start of the kernel's part of a benchmark: the heap held now is the inputs'.
inline void kernel_begins() {
  detail::heap_base = heap::current();
  heap::reset();
}

class kernel_memory final : public benchmark::MemoryManager {
 public:
  void Start() override { kernel_begins(); }
  void Stop(Result& r) override {
    r.num_allocs = heap::allocations();
    r.max_bytes_used = heap::peak() - detail::heap_base;
    r.total_allocated_bytes = heap::allocated();
    r.net_heap_growth = heap::current() - detail::heap_base;
  }
  // Google Benchmark 1.7 still declares the pointer form pure virtual.
  void Stop(Result* r) override { Stop(*r); }
};

inline kernel_memory memory_manager;
inline const bool memory_manager_registered = [] {
  benchmark::RegisterMemoryManager(&memory_manager);
  return true;
}();

}  // namespace posenc_bench
