// The machine's own ceilings, measured in the same run as the kernels they bound: the FMA peak
// of all cores and the memory copy bandwidth.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <vector>

#include "posenc/detail/cpu.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace posenc_bench {

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

#if defined(__x86_64__)
POSENC_SIMD_WARNINGS_OFF
// Twelve independent chains of 16-lane fused multiply-adds: enough to cover the FMA latency on
// every current x86 core (4 cycles x up to 2 issues per cycle). The chains start from distinct
// values so the compiler cannot merge them; x < 1 keeps them finite.
__attribute__((target("avx512f,fma"))) inline float fma_chains_avx512(long iters) {
  // Named variables, not an array: an array indexed in a loop may be kept in memory, which turns
  // the chains into store-to-load dependencies.
  __m512 a0 = _mm512_set1_ps(1.00f), a1 = _mm512_set1_ps(1.01f), a2 = _mm512_set1_ps(1.02f);
  __m512 a3 = _mm512_set1_ps(1.03f), a4 = _mm512_set1_ps(1.04f), a5 = _mm512_set1_ps(1.05f);
  __m512 a6 = _mm512_set1_ps(1.06f), a7 = _mm512_set1_ps(1.07f), a8 = _mm512_set1_ps(1.08f);
  __m512 a9 = _mm512_set1_ps(1.09f), a10 = _mm512_set1_ps(1.10f), a11 = _mm512_set1_ps(1.11f);
  const __m512 x = _mm512_set1_ps(0.9999999f), y = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
    a0 = _mm512_fmadd_ps(a0, x, y);
    a1 = _mm512_fmadd_ps(a1, x, y);
    a2 = _mm512_fmadd_ps(a2, x, y);
    a3 = _mm512_fmadd_ps(a3, x, y);
    a4 = _mm512_fmadd_ps(a4, x, y);
    a5 = _mm512_fmadd_ps(a5, x, y);
    a6 = _mm512_fmadd_ps(a6, x, y);
    a7 = _mm512_fmadd_ps(a7, x, y);
    a8 = _mm512_fmadd_ps(a8, x, y);
    a9 = _mm512_fmadd_ps(a9, x, y);
    a10 = _mm512_fmadd_ps(a10, x, y);
    a11 = _mm512_fmadd_ps(a11, x, y);
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                 _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
  return _mm512_reduce_add_ps(_mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11))));
}
POSENC_SIMD_WARNINGS_ON
#endif

/// FMA peak of all threads, in FLOP/s (2 per lane per FMA).
inline void fma_peak(benchmark::State& state) {
#if defined(__x86_64__)
  if (!__builtin_cpu_supports("avx512f")) {
    state.SkipWithError("no AVX-512 on this CPU");
    return;
  }
  const long iters = 1L << 22;
  const int threads = max_threads();
  for (auto _ : state) {
    float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += fma_chains_avx512(iters);
    benchmark::DoNotOptimize(sink);
  }
  const double flops = 2.0 * 16 * 12 * static_cast<double>(iters) * threads;
  state.counters["FLOPS"] = benchmark::Counter(flops * static_cast<double>(state.iterations()),
                                               benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
#else
  state.SkipWithError("FMA peak is measured on x86-64 only");
#endif
}

/// Memory copy bandwidth of all threads on `state.range(0)` bytes, counting bytes read plus
/// bytes written. Small buffers (the cache-resident copy) are copied many times per parallel
/// region, so that starting the threads does not count.
inline void copy_bandwidth(benchmark::State& state) {
  const std::size_t bytes = static_cast<std::size_t>(state.range(0));
  const std::size_t reps = std::max<std::size_t>(1, (std::size_t{64} << 20) / bytes);
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  const int threads = max_threads();
  for (auto _ : state) {
#pragma omp parallel num_threads(threads)
    {
#if defined(_OPENMP)
      const std::size_t t = static_cast<std::size_t>(omp_get_thread_num()), nt = static_cast<std::size_t>(threads);
#else
      const std::size_t t = 0, nt = 1;
#endif
      const std::size_t chunk = bytes / nt, begin = t * chunk, len = t + 1 == nt ? bytes - begin : chunk;
      for (std::size_t r = 0; r < reps; ++r) {
        std::memcpy(dst.data() + begin, src.data() + begin, len);
        benchmark::ClobberMemory();
      }
    }
  }
  state.counters["bytes_per_second"] = benchmark::Counter(
      2.0 * static_cast<double>(bytes) * static_cast<double>(reps) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
}

}  // namespace posenc_bench
