// The encoders on their own, outside attention: sinusoidal added to embeddings and RoPE under
// each frequency policy, rotating queries in place. Both stream their matrix once (read and write
// every byte), so each point reports the bytes moved per second; the report divides them by the
// same run's copy bandwidth (bench_attention's posenc_bench::copy_bandwidth). Memory: Google
// Benchmark's MemoryManager counts each call's own heap allocations (none are expected).
//
//   encoders/sinusoidal/<tokens>            x: [tokens, 4096] float, x += PE(pos)
//   encoders/<rope policy>/<cache|direct>/<tokens>   x: [tokens, 32 heads x 128] float, rotated
//                                           with a cos/sin cache built once, or with angles
//                                           computed per element
#include <benchmark/benchmark.h>

#include <string>

#include "common.hpp"
#include "memory_manager.hpp"
#include "posenc/encoders/sinusoidal.hpp"

namespace {

using posenc_bench::encoder;
using posenc_bench::index_t;

std::string label(const char* enc, const char* variant, index_t tokens, index_t cols) {
  return std::string("group=encoder_apply enc=") + enc + " variant=" + variant + " tokens=" + std::to_string(tokens) +
         " cols=" + std::to_string(cols);
}

// Bytes read plus bytes written per second, for a kernel streaming `tokens x cols` floats in place.
void set_bytes(benchmark::State& state, index_t tokens, index_t cols) {
  const double bytes = 2.0 * static_cast<double>(tokens * cols) * sizeof(float);
  state.counters["bytes_per_second"] =
      benchmark::Counter(bytes * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["tokens_per_second"] = benchmark::Counter(
      static_cast<double>(tokens) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

void sinusoidal_add(benchmark::State& state, index_t tokens) {
  constexpr index_t dim = 4096;
  state.SetLabel(label("sinusoidal", "add_to", tokens, dim));
  const posenc::sinusoidal<float> enc({.dim = dim});
  posenc::row_matrix<float> x = posenc::row_matrix<float>::Zero(tokens, dim);
  posenc_bench::kernel_begins();
  for (auto _ : state) {
    enc.add_to(x, posenc::arange(0, tokens));
    benchmark::DoNotOptimize(x.data());
    benchmark::ClobberMemory();
  }
  posenc_bench::kernel_ends();
  set_bytes(state, tokens, dim);
}

void rope_rotate(benchmark::State& state, encoder e, bool cached, index_t tokens) {
  constexpr index_t heads = 32, d = 128;
  const std::string name(posenc_bench::name_of(e));
  state.SetLabel(label(name.c_str(), cached ? "cache" : "direct", tokens, heads * d));
  const posenc::rope<float> rope(posenc_bench::rope_params_of(e, d, tokens));
  const auto pos = posenc::arange(0, tokens);
  const auto cache = rope.make_cache(0, tokens);
  // Rotations keep norms: repeated calls keep the values finite.
  posenc::row_matrix<float> x = posenc_bench::random_matrix(tokens, heads * d, 7);
  posenc_bench::kernel_begins();
  for (auto _ : state) {
    if (cached) {
      rope.rotate(x, pos, cache);
    } else {
      rope.rotate(x, pos);
    }
    benchmark::DoNotOptimize(x.data());
    benchmark::ClobberMemory();
  }
  posenc_bench::kernel_ends();
  set_bytes(state, tokens, heads * d);
}

bool register_all() {
  using posenc_bench::by_mode;
  // 16k tokens is 256 MiB per matrix, far past the caches; the full run adds 1 GiB (65536).
  const std::vector<long> sizes = by_mode(0, 1, 2) == 0 ? std::vector<long>{4096}
                                  : by_mode(0, 1, 2) == 1 ? std::vector<long>{1024, 16384}
                                                          : std::vector<long>{1024, 4096, 16384, 65536};
  for (long t : sizes)
    benchmark::RegisterBenchmark(("encoders/sinusoidal/" + std::to_string(t)).c_str(),
                                 [t](benchmark::State& s) { sinusoidal_add(s, t); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  for (int e = static_cast<int>(encoder::rope); e <= static_cast<int>(encoder::rope_longrope); ++e)
    for (bool cached : {true, false})
      for (long t : sizes) {
        if (!cached && e != static_cast<int>(encoder::rope) && t != sizes.back()) continue;
        const auto enc = static_cast<encoder>(e);
        benchmark::RegisterBenchmark(("encoders/" + std::string(posenc_bench::name_of(enc)) +
                                      (cached ? "/cache/" : "/direct/") + std::to_string(t))
                                         .c_str(),
                                     [=](benchmark::State& s) { rope_rotate(s, enc, cached, t); })
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
      }
  return true;
}

const bool registered = register_all();

}  // namespace
