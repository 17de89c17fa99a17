// Google Benchmark's MemoryManager on top of bench/alloc_counter.hpp: after timing a point, the
// library runs it once more between Start() and Stop() and reports "max_bytes_used" and
// "allocs_per_iter" in its JSON. A benchmark calls kernel_begins() right before its timed loop
// (or before an untimed warm-up call, then timed_loop_begins() before the loop) and kernel_ends()
// right after it, so the figures count the kernel's own allocations, not the inputs the benchmark
// set up nor the bookkeeping after the loop.
// Include in exactly one translation unit per executable (it includes alloc_counter.hpp).
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "alloc_counter.hpp"

namespace posenc_bench {

namespace detail {
inline std::int64_t heap_base = 0;
struct heap_figures {
  std::int64_t allocs = 0, allocated = 0, peak = 0;
};
inline heap_figures at_end{};
inline heap_figures at_loop{};  // the counts when the timed loop began (peak unused)
inline bool ended = false;
}  // namespace detail

/// Marks the start of the kernel's part of a benchmark: the heap held now is the inputs'.
inline void kernel_begins() {
  detail::heap_base = heap::current();
  heap::reset();
  detail::at_loop = {};
  detail::ended = false;
}

/// Marks the start of the timed loop where untimed warm-up calls come between it and
/// kernel_begins(): the heap peak still covers them (a reused workspace they allocate is the
/// kernel's), the allocation counts start here (so a reused workspace counts 0 allocations).
inline void timed_loop_begins() { detail::at_loop = {heap::allocations(), heap::allocated(), 0}; }

/// Marks the end of the timed loop: what the benchmark and the library allocate afterwards (its
/// counters, its results) is not the kernel's.
inline void kernel_ends() {
  detail::at_end = {heap::allocations() - detail::at_loop.allocs, heap::allocated() - detail::at_loop.allocated,
                    heap::peak()};
  detail::ended = true;
}

class kernel_memory final : public benchmark::MemoryManager {
 public:
  void Start() override { kernel_begins(); }
  void Stop(Result& r) override {
    const detail::heap_figures f =
        detail::ended ? detail::at_end : detail::heap_figures{heap::allocations(), heap::allocated(), heap::peak()};
    r.num_allocs = f.allocs;
    r.max_bytes_used = f.peak - detail::heap_base;
    r.total_allocated_bytes = f.allocated;
  }
  // Google Benchmark 1.7 still declares the pointer form pure virtual.
  void Stop(Result* r) override { Stop(*r); }
};

/// The heap figures of the last timed loop, as counters of `state` (`heap_peak_bytes`: the peak
/// above the inputs, as max_bytes_used; `allocs_per_call`: allocations per call of the timed loop).
/// A benchmark run with repetitions gets them this way: see memory_manager_registered.
inline void heap_counters(benchmark::State& state) {
  const double iters = state.iterations() > 0 ? static_cast<double>(state.iterations()) : 1.0;
  state.counters["heap_peak_bytes"] = static_cast<double>(detail::at_end.peak - detail::heap_base);
  state.counters["allocs_per_call"] = static_cast<double>(detail::at_end.allocs) / iters;
}

inline kernel_memory memory_manager;
/// Registered unless POSENC_BENCH_MEMORY_MANAGER=0. With --benchmark_repetitions, Google Benchmark
/// 1.7 keeps each repetition's figures through a pointer into a vector that grows while the
/// repetitions run: the figures of all but the last repetition are garbage, and a process of nine
/// points at three repetitions each crashed reading them. bench/run.py runs its repeated points
/// without it; they report heap_counters instead.
inline const bool memory_manager_registered = [] {
  const char* v = std::getenv("POSENC_BENCH_MEMORY_MANAGER");
  if (v != nullptr && std::string_view(v) == "0") return false;
  benchmark::RegisterMemoryManager(&memory_manager);
  return true;
}();

}  // namespace posenc_bench
