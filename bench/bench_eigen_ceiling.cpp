// The Eigen SGEMM ceiling: the two products of attention (S = Q K^T and O = P V, per head) as
// Eigen matrix products, compiled for this CPU (-march=native, see bench/CMakeLists.txt) so the
// ceiling is Eigen's best on this machine, not the portable build's. FLOP counted: 4 n^2 d per
// head, as in bench_attention; scripts/bench runs both in one session.
#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include "run_settings.hpp"

namespace {

void eigen_sgemm_attention_shapes(benchmark::State& state) {
  const Eigen::Index n = state.range(0), d = state.range(1);
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const mat q = mat::Random(n, d), k = mat::Random(n, d), v = mat::Random(n, d);
  mat s(n, n), o(n, d);
  for (auto _ : state) {
    s.noalias() = q * k.transpose();
    o.noalias() = s * v;
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["FLOPS"] = benchmark::Counter(4.0 * static_cast<double>(n) * static_cast<double>(n) *
                                                   static_cast<double>(d) * static_cast<double>(state.iterations()),
                                               benchmark::Counter::kIsRate);
}

}  // namespace

// The attention benchmarks' shapes (d = 128; 64 too for the full run's d = 64 prefill), at the
// sequence lengths of POSENC_BENCH_MODE (bench/run_settings.hpp); the report compares each
// attention point with the SGEMM of its head_dim at the nearest measured n.
BENCHMARK(eigen_sgemm_attention_shapes)
    ->Name("ceiling/eigen_sgemm")
    ->ArgNames({"n", "d"})
    ->Apply([](benchmark::internal::Benchmark* b) {
      for (long d : {128L, 64L})
        for (long n = 1024; n <= posenc_bench::by_mode(4096, 16384, 16384); n *= 4) b->Args({n, d});
    })
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
