// The machine's own ceilings, measured in the same run as the kernels they bound: the peak of
// multiply-adds on all the cores attention uses, for the instruction set its kernels run with,
// the memory copy bandwidth and the memory read bandwidth.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/detail/cpu.hpp"
#include "run_settings.hpp"

#if POSENC_X86_DISPATCH
#include <immintrin.h>
#endif

namespace posenc_bench {

/// Workers of the attention benchmarks' thread pool (`shape::pool()`: one per hardware
/// thread); the all-core ceilings use the same count.
inline int attention_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

/// `threads` threads that run `work(t)`, t = 0 .. threads - 1, together once per `run()`. Thread 0
/// is the caller; the others start once and wait on a barrier between runs, so a run costs two
/// barrier waits rather than starting threads (which would weigh on the shortest ceilings).
class thread_team {
 public:
  thread_team(int threads, std::function<void(int)> work) : work_(std::move(work)), start_(threads), done_(threads) {
    for (int t = 1; t < threads; ++t)
      workers_.emplace_back([this, t] {
        for (;;) {
          start_.arrive_and_wait();
          if (stop_) return;
          work_(t);
          done_.arrive_and_wait();
        }
      });
  }
  ~thread_team() {
    stop_ = true;  // seen by the workers after the barrier, which orders it
    start_.arrive_and_wait();
    for (auto& w : workers_) w.join();
  }
  thread_team(const thread_team&) = delete;
  thread_team& operator=(const thread_team&) = delete;

  /// Every thread runs `work` once; returns when all have finished.
  void run() {
    start_.arrive_and_wait();
    work_(0);
    done_.arrive_and_wait();
  }

 private:
  std::function<void(int)> work_;
  std::barrier<> start_, done_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// ---- multiply-add chains, one version per instruction set ----
//
// Twelve independent chains per thread: enough to cover the FMA latency on every current x86 core
// (4 cycles x up to 2 issues per cycle, 8 in flight) with room to spare. The chains start from
// distinct values so the compiler cannot merge them; x < 1 keeps them finite. Named variables, not
// an array: an array indexed in a loop may be kept in memory, which turns the chains into
// store-to-load dependencies. Each returns the sum of its chains, for the caller to keep.

constexpr int fma_chain_count = 12;

#if POSENC_X86_DISPATCH
POSENC_SIMD_WARNINGS_OFF
/// 16-lane AVX-512 fused multiply-adds (`vfmadd` on zmm registers).
POSENC_TARGET_AVX512 inline float fma_chains_avx512(long iters) {
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

/// 8-lane AVX2 fused multiply-adds (`vfmadd` on ymm registers): 12 chains and the two constants
/// fill 14 of the 16 registers.
POSENC_TARGET_AVX2 inline float fma_chains_avx2(long iters) {
  __m256 a0 = _mm256_set1_ps(1.00f), a1 = _mm256_set1_ps(1.01f), a2 = _mm256_set1_ps(1.02f);
  __m256 a3 = _mm256_set1_ps(1.03f), a4 = _mm256_set1_ps(1.04f), a5 = _mm256_set1_ps(1.05f);
  __m256 a6 = _mm256_set1_ps(1.06f), a7 = _mm256_set1_ps(1.07f), a8 = _mm256_set1_ps(1.08f);
  __m256 a9 = _mm256_set1_ps(1.09f), a10 = _mm256_set1_ps(1.10f), a11 = _mm256_set1_ps(1.11f);
  const __m256 x = _mm256_set1_ps(0.9999999f), y = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
    a0 = _mm256_fmadd_ps(a0, x, y);
    a1 = _mm256_fmadd_ps(a1, x, y);
    a2 = _mm256_fmadd_ps(a2, x, y);
    a3 = _mm256_fmadd_ps(a3, x, y);
    a4 = _mm256_fmadd_ps(a4, x, y);
    a5 = _mm256_fmadd_ps(a5, x, y);
    a6 = _mm256_fmadd_ps(a6, x, y);
    a7 = _mm256_fmadd_ps(a7, x, y);
    a8 = _mm256_fmadd_ps(a8, x, y);
    a9 = _mm256_fmadd_ps(a9, x, y);
    a10 = _mm256_fmadd_ps(a10, x, y);
    a11 = _mm256_fmadd_ps(a11, x, y);
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                 _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  const __m256 t = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
POSENC_SIMD_WARNINGS_ON
#endif

// The portable kernels are plain loops that the compiler vectorises with the build's own flags
// (the x86-64 baseline is SSE2: 4 lanes, no FMA), so their ceiling is plain C++ multiply-adds on
// the widest vector those flags give: `a * x + y`, which the compiler fuses only when the flags
// include FMA (g++ and clang contract by default then).
#if defined(__GNUC__) || defined(__clang__)
#if defined(__AVX512F__)
inline constexpr int portable_lanes = 16;
#elif defined(__AVX__)
inline constexpr int portable_lanes = 8;
#elif defined(__SSE2__) || defined(__ARM_NEON)
inline constexpr int portable_lanes = 4;
#else
inline constexpr int portable_lanes = 1;
#define POSENC_BENCH_SCALAR_PORTABLE 1
#endif
#else
inline constexpr int portable_lanes = 1;
#define POSENC_BENCH_SCALAR_PORTABLE 1
#endif

#if defined(POSENC_BENCH_SCALAR_PORTABLE)
using portable_vector = float;
inline float lane_sum(float v) { return v; }
#else
/// GCC/clang vector extension: arithmetic on it is the compiler's own, with the build's flags.
using portable_vector = float __attribute__((vector_size(portable_lanes * sizeof(float))));
inline float lane_sum(portable_vector v) {
  float s = 0;
  for (int i = 0; i < portable_lanes; ++i) s += v[i];
  return s;
}
#endif

#if defined(__FMA__)
inline constexpr const char* portable_op = "fma";
#else
inline constexpr const char* portable_op = "mul+add";
#endif

/// `portable_lanes`-lane multiply-adds in plain C++. The constants are read through `volatile`:
/// with them in sight, the compiler proves the chains do not change (each start value is a fixed
/// point of `a * x + y` in float) and folds the loop away.
inline float fma_chains_portable(long iters) {
  static volatile float start = 1.0f, step = 0.01f, mul = 0.9999999f, add = 1e-7f;
  const portable_vector one = portable_vector{} + start, d = portable_vector{} + step;
  portable_vector a0 = one, a1 = one + d, a2 = one + 2.0f * d, a3 = one + 3.0f * d;
  portable_vector a4 = one + 4.0f * d, a5 = one + 5.0f * d, a6 = one + 6.0f * d, a7 = one + 7.0f * d;
  portable_vector a8 = one + 8.0f * d, a9 = one + 9.0f * d, a10 = one + 10.0f * d, a11 = one + 11.0f * d;
  const portable_vector x = portable_vector{} + mul, y = portable_vector{} + add;
  for (long it = 0; it < iters; ++it) {
    a0 = a0 * x + y;
    a1 = a1 * x + y;
    a2 = a2 * x + y;
    a3 = a3 * x + y;
    a4 = a4 * x + y;
    a5 = a5 * x + y;
    a6 = a6 * x + y;
    a7 = a7 * x + y;
    a8 = a8 * x + y;
    a9 = a9 * x + y;
    a10 = a10 * x + y;
    a11 = a11 * x + y;
  }
  return lane_sum(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11)));
}

/// One version of the chains: the function, its lanes, its operation ("fma" or "mul+add").
struct fma_chains {
  float (*run)(long iters);
  int lanes;
  const char* op;
};

/// The chains of `level`; a level this build cannot target gets the portable ones.
inline fma_chains fma_chains_for(posenc::detail::simd_level level) {
#if POSENC_X86_DISPATCH
  if (level == posenc::detail::simd_level::avx512) return {fma_chains_avx512, 16, "fma"};
  if (level == posenc::detail::simd_level::avx2) return {fma_chains_avx2, 8, "fma"};
#else
  (void)level;
#endif
  return {fma_chains_portable, portable_lanes, portable_op};
}

/// The multiply-add peak of all attention threads, in FLOP/s (2 per lane per multiply-add), for
/// the instruction set the attention kernels run with now: the widest the CPU has, lowered by the
/// library's cap (POSENC_SIMD_CAP, bench/run_settings.hpp). The label names it, for the report:
/// `isa=avx2 lanes=8 op=fma chains=12 threads=2 detected=avx512 cap=avx2` (`cap=none` when unset).
inline void fma_peak(benchmark::State& state) {
  const auto level = posenc::detail::simd_level_in_use();
  const fma_chains chains = fma_chains_for(level);
  const int threads = attention_threads();
  const char* cap = std::getenv("POSENC_SIMD_CAP");  // a valid name: simd_cap_setting() checked it
  const long iters = 1L << 22;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  thread_team team(threads, [&](int t) { sink[static_cast<std::size_t>(t)] = chains.run(iters); });
  for (auto _ : state) {
    team.run();
    benchmark::DoNotOptimize(sink.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * chains.lanes * fma_chain_count * static_cast<double>(iters) * threads;
  state.counters["FLOPS"] =
      benchmark::Counter(flops * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
  state.counters["lanes"] = chains.lanes;
  state.SetLabel("isa=" + std::string(simd_name(level)) + " lanes=" + std::to_string(chains.lanes) + " op=" +
                 chains.op + " chains=" + std::to_string(fma_chain_count) + " threads=" + std::to_string(threads) +
                 " detected=" + std::string(simd_name(posenc::detail::detected_simd_level())) +
                 " cap=" + std::string(cap != nullptr && *cap != '\0' ? cap : "none"));
}

/// Memory copy bandwidth of all attention threads on `state.range(0)` bytes, counting bytes read
/// plus bytes written. Small buffers (the cache-resident copy) are copied many times per run of
/// the team, so that waking the threads does not count.
inline void copy_bandwidth(benchmark::State& state) {
  const std::size_t bytes = static_cast<std::size_t>(state.range(0));
  const std::size_t reps = std::max<std::size_t>(1, (std::size_t{64} << 20) / bytes);
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  const int threads = attention_threads();
  const std::size_t nt = static_cast<std::size_t>(threads), chunk = bytes / nt;
  thread_team team(threads, [&](int t) {
    const std::size_t begin = static_cast<std::size_t>(t) * chunk,
                      len = static_cast<std::size_t>(t) + 1 == nt ? bytes - begin : chunk;
    for (std::size_t r = 0; r < reps; ++r) {
      std::memcpy(dst.data() + begin, src.data() + begin, len);
      benchmark::ClobberMemory();
    }
  });
  for (auto _ : state) team.run();
  state.counters["bytes_per_second"] = benchmark::Counter(
      2.0 * static_cast<double>(bytes) * static_cast<double>(reps) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}

// ---- read bandwidth: a sum over a buffer, one version per instruction set ----
//
// Eight independent accumulators per thread hide the add latency (4 cycles, 2 adds per cycle),
// so the loop is bound by the loads alone. The buffer holds ones and each lane of each accumulator
// sums at most 2^24 of them, so every partial sum is exact and the total can be checked: a loop
// the compiler shortened, or a chunk a thread skipped, shows as a wrong sum.

constexpr int read_accumulators = 8;

#if POSENC_X86_DISPATCH
POSENC_SIMD_WARNINGS_OFF
/// Sum of `n` floats (`n` a multiple of 128), 16 lanes at a time.
POSENC_TARGET_AVX512 inline double read_sum_avx512(const float* p, std::size_t n) {
  __m512 a[read_accumulators];
  for (auto& x : a) x = _mm512_setzero_ps();
  for (std::size_t i = 0; i < n; i += 16 * read_accumulators)
#pragma GCC unroll 8
    for (int k = 0; k < read_accumulators; ++k) a[k] = _mm512_add_ps(a[k], _mm512_loadu_ps(p + i + 16 * k));
  double s = 0;
  for (auto& x : a) s += static_cast<double>(_mm512_reduce_add_ps(x));
  return s;
}

/// Sum of `n` floats (`n` a multiple of 64), 8 lanes at a time.
POSENC_TARGET_AVX2 inline double read_sum_avx2(const float* p, std::size_t n) {
  __m256 a[read_accumulators];
  for (auto& x : a) x = _mm256_setzero_ps();
  for (std::size_t i = 0; i < n; i += 8 * read_accumulators)
#pragma GCC unroll 8
    for (int k = 0; k < read_accumulators; ++k) a[k] = _mm256_add_ps(a[k], _mm256_loadu_ps(p + i + 8 * k));
  double s = 0;
  for (auto& x : a) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, x);
    for (float v : lanes) s += static_cast<double>(v);
  }
  return s;
}
POSENC_SIMD_WARNINGS_ON
#endif

/// Sum of `n` floats (`n` a multiple of `portable_lanes * read_accumulators`) on the build's own
/// vectors.
inline double read_sum_portable(const float* p, std::size_t n) {
  portable_vector a[read_accumulators] = {};
  constexpr std::size_t step = static_cast<std::size_t>(portable_lanes);
  for (std::size_t i = 0; i < n; i += step * read_accumulators)
    for (std::size_t k = 0; k < read_accumulators; ++k) {
      portable_vector x;
      std::memcpy(&x, p + i + step * k, sizeof x);
      a[k] += x;
    }
  double s = 0;
  for (auto& x : a) s += static_cast<double>(lane_sum(x));
  return s;
}

/// The widest read loop the CPU has, whatever the cap: like `memcpy` in the copy ceiling, it
/// measures the memory, not an instruction set. Returns its name.
inline const char* read_sum_for(double (*&run)(const float*, std::size_t)) {
#if POSENC_X86_DISPATCH
  switch (posenc::detail::detected_simd_level()) {
    case posenc::detail::simd_level::avx512: run = read_sum_avx512; return "avx512";
    case posenc::detail::simd_level::avx2: run = read_sum_avx2; return "avx2";
    default: break;
  }
#endif
  run = read_sum_portable;
  return "portable";
}

/// Memory read bandwidth of all attention threads on `state.range(0)` bytes, counting bytes read
/// only: the ceiling of a kernel that streams its inputs and writes little (decode reads the whole
/// K/V cache and writes one row per head). Each thread sums its share of a buffer of ones, so that
/// no byte is written during the run; small buffers are summed many times per run of the team.
/// A wrong sum stops the point with an error.
inline void read_bandwidth(benchmark::State& state) {
  const std::size_t bytes = static_cast<std::size_t>(state.range(0));
  const std::size_t reps = std::max<std::size_t>(1, (std::size_t{64} << 20) / bytes);
  const int threads = attention_threads();
  const std::size_t nt = static_cast<std::size_t>(threads);
  // Every thread's share a whole number of 512-byte blocks (the widest loop's step).
  constexpr std::size_t block = 128;
  const std::size_t n = bytes / sizeof(float) / (block * nt) * (block * nt), share = n / nt;
  // Written once here, so that every page is backed by memory of its own (an untouched buffer
  // would read the kernel's shared zero page, which stays in cache).
  std::vector<float> buf(n, 1.0f);
  double (*run)(const float*, std::size_t) = nullptr;
  const char* isa = read_sum_for(run);
  std::vector<double> sums(nt);
  thread_team team(threads, [&](int t) {
    const float* p = buf.data() + static_cast<std::size_t>(t) * share;
    double s = 0;
    for (std::size_t r = 0; r < reps; ++r) {
      s += run(p, share);
      benchmark::ClobberMemory();
    }
    sums[static_cast<std::size_t>(t)] = s;
  });
  for (auto _ : state) team.run();
  const double got = std::accumulate(sums.begin(), sums.end(), 0.0);
  const double want = static_cast<double>(n) * static_cast<double>(reps);
  if (got != want) {
    state.SkipWithError(("read_bandwidth: the sum of the buffer is " + std::to_string(got) + ", not " +
                         std::to_string(want) + ": some of it was not read")
                            .c_str());
    return;
  }
  state.counters["bytes_per_second"] =
      benchmark::Counter(static_cast<double>(n * sizeof(float)) * static_cast<double>(reps) *
                             static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
  state.SetLabel("isa=" + std::string(isa) + " threads=" + std::to_string(threads) +
                 " accumulators=" + std::to_string(read_accumulators));
}

}  // namespace posenc_bench
