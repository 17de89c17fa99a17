// RoPE apply bandwidth against a plain copy of the same bytes, measured in the same run.
//
// x is [tokens, 32 heads * 128] float, rotated in place: the kernel reads and writes every byte
// once, so its traffic is 2N bytes for N = tokens * 4096 * 4 (the cos/sin rows, 512 bytes per
// token, are not counted). The copy reference is memcpy of N bytes into another buffer (read N,
// write N), timed right after the rotation inside the same benchmark, on buffers of the same size.
//
// memcpy's destination is written without being read, so unless the C library streams past the
// cache it also pays a read for ownership of every destination line: it moves about 3N bytes for
// the 2N it is credited with. An in-place kernel pays no such read, so the same-run copy is
// joined by an in-place stream: x[i] *= f over the same number of bytes (read N, write N to the
// same lines; SSE2, which is enough to saturate memory), the ceiling for any in-place kernel.
//
// Counters: GBps (bytes read + written per second), copy_GBps (the same-run memcpy), ratio
// (GBps / copy_GBps), inplace_GBps (the same-run in-place stream), ratio_inplace. Arguments: tokens, layout (0
// half-split, 1 interleaved), SIMD level (0 portable, 1 AVX2, 2 AVX-512; a level the CPU lacks or
// POSENC_SIMD_CAP excludes is skipped).
//
// Build with the includer's usual flags (plain -O2, no -march): the AVX paths are chosen at run
// time.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "posenc/encoders/rope.hpp"
#include "run_settings.hpp"

namespace {

constexpr posenc::index_t k_heads = 32;
constexpr posenc::index_t k_head_dim = 128;
constexpr posenc::index_t k_cols = k_heads * k_head_dim;

using clock_type = std::chrono::steady_clock;

// Fills with small values so repeated rotations stay finite (magnitude 1 keeps the norm).
void fill(posenc::row_matrix<float>& x) {
  for (posenc::index_t i = 0; i < x.rows(); ++i)
    for (posenc::index_t j = 0; j < x.cols(); ++j) x(i, j) = static_cast<float>((i * 31 + j * 17) % 97) / 97.0f - 0.5f;
}

// memcpy of `bytes` from a fresh buffer into another, `reps` times; returns GB/s of read + write.
double copy_gbps(std::size_t bytes, int reps) {
  std::vector<char> src(bytes, 1), dst(bytes, 0);  // touched: no page faults in the timed part
  std::memcpy(dst.data(), src.data(), bytes);
  const auto t0 = clock_type::now();
  for (int r = 0; r < reps; ++r) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
  benchmark::DoNotOptimize(dst.data());
  return 2.0 * static_cast<double>(bytes) * reps / s / 1e9;
}

volatile float g_one = 1.0f;

// x[i] *= 1 over `bytes` of floats, in place, `reps` times; returns GB/s of read + write.
double inplace_gbps(std::size_t bytes, int reps) {
  std::vector<float> buf(bytes / sizeof(float), 0.5f);
  const float f = g_one;
  const std::size_t n = buf.size();
  float* p = buf.data();
  auto pass = [&] {
#if defined(__SSE2__)
    const __m128 vf = _mm_set1_ps(f);
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      _mm_storeu_ps(p + i, _mm_mul_ps(_mm_loadu_ps(p + i), vf));
      _mm_storeu_ps(p + i + 4, _mm_mul_ps(_mm_loadu_ps(p + i + 4), vf));
      _mm_storeu_ps(p + i + 8, _mm_mul_ps(_mm_loadu_ps(p + i + 8), vf));
      _mm_storeu_ps(p + i + 12, _mm_mul_ps(_mm_loadu_ps(p + i + 12), vf));
    }
    for (; i < n; ++i) p[i] *= f;
#else
    for (std::size_t i = 0; i < n; ++i) p[i] *= f;
#endif
    benchmark::ClobberMemory();
  };
  pass();
  const auto t0 = clock_type::now();
  for (int r = 0; r < reps; ++r) pass();
  const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
  benchmark::DoNotOptimize(buf.data());
  return 2.0 * static_cast<double>(bytes) * reps / s / 1e9;
}

template <class Body>
void run(benchmark::State& state, posenc::index_t tokens, Body&& body) {
  const auto bytes = static_cast<std::size_t>(tokens * k_cols) * sizeof(float);
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = clock_type::now();
    body();
    seconds += std::chrono::duration<double>(clock_type::now() - t0).count();
    benchmark::ClobberMemory();
  }
  const double iters = static_cast<double>(state.iterations());
  const double gbps = 2.0 * static_cast<double>(bytes) * iters / seconds / 1e9;
  const int reps = std::max(2, static_cast<int>(iters));
  const double copy = copy_gbps(bytes, reps);
  const double inplace = inplace_gbps(bytes, reps);
  state.counters["GBps"] =
      benchmark::Counter(2.0 * static_cast<double>(bytes) * iters / 1e9, benchmark::Counter::kIsRate);
  state.counters["copy_GBps"] = copy;
  state.counters["ratio"] = gbps / copy;
  state.counters["inplace_GBps"] = inplace;
  state.counters["ratio_inplace"] = gbps / inplace;
}

posenc::rope_layout layout_arg(const benchmark::State& state) {
  return state.range(1) == 0 ? posenc::rope_layout::half_split : posenc::rope_layout::interleaved;
}

// Caps the SIMD level; false (and the benchmark skipped) when the CPU lacks it or POSENC_SIMD_CAP
// is below it.
bool set_level(benchmark::State& state, posenc::index_t arg) {
  const auto want = static_cast<posenc::detail::simd_level>(arg);
  if (want > posenc::detail::detected_simd_level()) {
    state.SkipWithError("SIMD level not available on this CPU");
    return false;
  }
  if (want > posenc_bench::simd_cap_setting()) {
    state.SkipWithError("SIMD level above POSENC_SIMD_CAP");
    return false;
  }
  posenc::detail::set_simd_cap(want);
  return true;
}

void BM_rope_cache(benchmark::State& state) {
  const posenc::index_t tokens = state.range(0);
  if (!set_level(state, state.range(2))) return;
  const posenc::rope<float> rope({.head_dim = k_head_dim, .layout = layout_arg(state), .base = 5e5});
  const auto cache = rope.make_cache(0, tokens);
  posenc::row_matrix<float> x(tokens, k_cols);
  fill(x);
  run(state, tokens, [&] { rope.rotate(x, posenc::arange(0, tokens), cache); });
  posenc_bench::apply_simd_cap();
}

void BM_rope_direct(benchmark::State& state) {
  const posenc::index_t tokens = state.range(0);
  if (!set_level(state, state.range(2))) return;
  const posenc::rope<float> rope({.head_dim = k_head_dim, .layout = layout_arg(state), .base = 5e5});
  posenc::row_matrix<float> x(tokens, k_cols);
  fill(x);
  run(state, tokens, [&] { rope.rotate(x, posenc::arange(0, tokens)); });
  posenc_bench::apply_simd_cap();
}

// The copy alone, for the listing.
void BM_copy(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0) * k_cols) * sizeof(float);
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.counters["GBps"] = benchmark::Counter(
      2.0 * static_cast<double>(bytes) * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// Tokens per POSENC_BENCH_MODE (bench/run_settings.hpp): quick checks one size at the SIMD level
// in use (the best the CPU has, under POSENC_SIMD_CAP); the default and full runs compare all
// levels.
std::vector<long> token_counts() {
  switch (posenc_bench::mode()) {
    case posenc_bench::run_mode::quick: return {4096};
    case posenc_bench::run_mode::full: return {1024, 4096, 16384, 65536};
    default: return {1024, 16384};
  }
}

void sizes(benchmark::internal::Benchmark* b, bool all_levels) {
  all_levels = all_levels && posenc_bench::mode() != posenc_bench::run_mode::quick;
  for (long tokens : token_counts())
    for (long layout : {0L, 1L}) {
      if (all_levels) {
        for (long level : {2L, 1L, 0L}) b->Args({tokens, layout, level});
      } else {
        b->Args({tokens, layout, static_cast<long>(posenc::detail::simd_level_in_use())});
      }
    }
  b->ArgNames({"tokens", "layout", "simd"})->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_copy)
    ->Apply([](benchmark::internal::Benchmark* b) {
      for (long t : token_counts()) b->Arg(t);
    })
    ->ArgName("tokens")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_rope_cache)->Apply([](benchmark::internal::Benchmark* b) { sizes(b, true); });
BENCHMARK(BM_rope_direct)->Apply([](benchmark::internal::Benchmark* b) { sizes(b, false); });
