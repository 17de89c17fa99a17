// Blockwise attention against the naive materialising baseline and the machine's ceilings (FMA
// peak, an Eigen SGEMM of the attention shapes compiled for this CPU, memory copy bandwidth), all
// in the same run so ratios between them are meaningful on a noisy machine.
//
// FLOP counted per head: 4 n_q n_kv d for full attention (QK^T and PV), half that for causal.
#include <benchmark/benchmark.h>

#include <random>

#include "ceilings.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/t5_bias.hpp"

namespace {

using posenc::index_t;

posenc::row_matrix<float> random_matrix(index_t r, index_t c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0, 1);
  posenc::row_matrix<float> m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

enum class path { blockwise, naive };

// Arguments: n, head_dim, causal.
template <path P>
void attention_prefill(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1), heads = 8;
  const bool causal = state.range(2) != 0;
  const auto q = random_matrix(n, heads * d, 1), k = random_matrix(n, heads * d, 2), v = random_matrix(n, heads * d, 3);
  posenc::row_matrix<float> out(n, heads * d);
  const posenc::attention_params p{.heads = heads, .causal = causal};
  const auto pos = posenc::arange(0, n);
  posenc::attention_workspace ws;
  for (auto _ : state) {
    if constexpr (P == path::blockwise) {
      posenc::attention(q, k, v, out, pos, pos, posenc::no_position<float>{}, p, nullptr, &ws);
    } else {
      posenc::attention_reference(q, k, v, out, pos, pos, posenc::no_position<float>{}, p);
    }
    benchmark::DoNotOptimize(out.data());
  }
  const double flop = 4.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(d) * heads *
                      (causal ? 0.5 : 1.0);
  state.counters["FLOPS"] = benchmark::Counter(flop * static_cast<double>(state.iterations()),
                                               benchmark::Counter::kIsRate);
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(n * state.iterations()), benchmark::Counter::kIsRate);
  state.counters["workspace_bytes"] = static_cast<double>(ws.bytes());
}

void prefill_args(benchmark::internal::Benchmark* b, long max_n) {
  for (long d : {64L, 128L})
    for (long causal : {0L, 1L})
      for (long n = 1024; n <= max_n; n *= 2) b->Args({n, d, causal});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

enum class encoder { none, rope_in_kernel, alibi, t5 };

// The cost of each encoder family inside the kernel: same shapes as attention/blockwise, one
// encoder per run. Arguments: n, head_dim, causal, encoder.
void attention_encoders(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1), heads = 8;
  const bool causal = state.range(2) != 0;
  const auto which = static_cast<encoder>(state.range(3));
  const auto q = random_matrix(n, heads * d, 1), k = random_matrix(n, heads * d, 2), v = random_matrix(n, heads * d, 3);
  posenc::row_matrix<float> out(n, heads * d);
  const posenc::attention_params p{.heads = heads, .causal = causal};
  const auto pos = posenc::arange(0, n);
  posenc::attention_workspace ws;
  const posenc::rope<float> rope({.head_dim = d});
  const posenc::alibi<float> alibi({.num_heads = heads});
  const posenc::t5_relative_bias<float> t5({.num_heads = heads}, random_matrix(32, heads, 4));
  for (auto _ : state) {
    switch (which) {
      case encoder::none: posenc::attention(q, k, v, out, pos, pos, posenc::no_position<float>{}, p, nullptr, &ws); break;
      case encoder::rope_in_kernel: posenc::attention(q, k, v, out, pos, pos, rope, p, nullptr, &ws); break;
      case encoder::alibi: posenc::attention(q, k, v, out, pos, pos, alibi, p, nullptr, &ws); break;
      case encoder::t5: posenc::attention(q, k, v, out, pos, pos, t5, p, nullptr, &ws); break;
    }
    benchmark::DoNotOptimize(out.data());
  }
  const double flop = 4.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(d) * heads *
                      (causal ? 0.5 : 1.0);
  state.counters["FLOPS"] = benchmark::Counter(flop * static_cast<double>(state.iterations()),
                                               benchmark::Counter::kIsRate);
}

// Decode: `n_q` queries at the end of a KV cache of `n_kv` tokens, 8 heads sharing 2 kv heads,
// d = 128. Memory bound: reports the bytes of K and V read per second, to compare with the
// same-run copy bandwidth. Arguments: n_kv, n_q.
void attention_decode(benchmark::State& state) {
  const index_t n_kv = state.range(0), n_q = state.range(1), heads = 8, kv_heads = 2, d = 128;
  const auto q = random_matrix(n_q, heads * d, 1), k = random_matrix(n_kv, kv_heads * d, 2),
             v = random_matrix(n_kv, kv_heads * d, 3);
  posenc::row_matrix<float> out(n_q, heads * d);
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true};
  posenc::attention_workspace ws;
  for (auto _ : state) {
    posenc::attention(q, k, v, out, posenc::arange(n_kv - n_q, n_q), posenc::arange(0, n_kv),
                      posenc::no_position<float>{}, p, nullptr, &ws);
    benchmark::DoNotOptimize(out.data());
  }
  const double bytes = 2.0 * static_cast<double>(n_kv) * kv_heads * d * sizeof(float);
  state.counters["kv_bytes_per_second"] =
      benchmark::Counter(bytes * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

}  // namespace

BENCHMARK(posenc_bench::fma_peak)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(posenc_bench::copy_bandwidth)->Arg(256L << 20)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(attention_prefill<path::blockwise>)->Name("attention/blockwise")->Apply([](auto* b) { prefill_args(b, 16384); });
BENCHMARK(attention_prefill<path::naive>)->Name("attention/naive")->Apply([](auto* b) { prefill_args(b, 4096); });
BENCHMARK(attention_encoders)
    ->Name("attention/encoder")
    ->ArgNames({"n", "d", "causal", "enc"})
    ->Apply([](auto* b) {
      for (long e = 0; e < 4; ++e) b->Args({4096, 128, 1, e});
      b->Unit(benchmark::kMillisecond)->UseRealTime();
    });
BENCHMARK(attention_decode)
    ->Name("attention/decode")
    ->ArgNames({"n_kv", "n_q"})
    ->Args({32768, 1})
    ->Args({65536, 1})
    ->Args({131072, 1})
    ->Args({131072, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
