// Bias tile generation: elements of a logits tile biased per second, for ALiBi, T5 and Shaw's
// per-tile steps, with contiguous position ranges and with explicit position lists.
#include <benchmark/benchmark.h>

#include <cstddef>
#include <numeric>
#include <random>
#include <vector>

#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "run_settings.hpp"

namespace {

using posenc::index_t;
using posenc::position;

// Positions of a tile sitting deep in a long sequence (near 2^40): a range, or the same values as
// an explicit list in shuffled order (a KV cache with reused slots, a zigzag shard).
struct tile_positions {
  std::vector<position> q_list, k_list;
  posenc::positions q, k;
  tile_positions(index_t n, bool lists) {
    const position q0 = (position{1} << 40) + 4096, k0 = (position{1} << 40) + 4096 - n / 2;
    if (!lists) {
      q = posenc::arange(q0, n);
      k = posenc::arange(k0, n);
      return;
    }
    q_list.resize(static_cast<std::size_t>(n));
    k_list.resize(static_cast<std::size_t>(n));
    std::iota(q_list.begin(), q_list.end(), q0);
    std::iota(k_list.begin(), k_list.end(), k0);
    std::mt19937_64 rng(1);
    std::shuffle(q_list.begin(), q_list.end(), rng);
    std::shuffle(k_list.begin(), k_list.end(), rng);
    q = posenc::positions(q_list);
    k = posenc::positions(k_list);
  }
};

// Elements biased per second, and the bytes of the tile read and written (`element_bytes` each way)
// per second: the tiles fit in cache, so the report compares them with the cache copy bandwidth.
void set_rate(benchmark::State& state, index_t n, std::size_t element_bytes) {
  const double elements = static_cast<double>(n * n) * static_cast<double>(state.iterations());
  state.counters["elements"] = benchmark::Counter(elements, benchmark::Counter::kIsRate);
  state.counters["bytes_per_second"] =
      benchmark::Counter(2.0 * static_cast<double>(element_bytes) * elements, benchmark::Counter::kIsRate);
}

template <class E>
void BM_alibi_tile(benchmark::State& state) {
  const index_t n = state.range(0);
  const tile_positions pos(n, state.range(1) != 0);
  const posenc::alibi<float> enc({.num_heads = 32, .head_offset = 8});
  posenc::row_matrix<E> tile = posenc::row_matrix<E>::Zero(n, n);
  for (auto _ : state) {
    enc.add_bias_tile(tile, 3, pos.q, pos.k);
    benchmark::DoNotOptimize(tile.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, n, sizeof(E));
}

template <class E>
void BM_t5_tile(benchmark::State& state) {
  const index_t n = state.range(0);
  const tile_positions pos(n, state.range(1) != 0);
  posenc::row_matrix<float> table(32, 16);
  std::mt19937_64 rng(2);
  std::uniform_real_distribution<float> u(-1, 1);
  for (index_t i = 0; i < table.size(); ++i) table.data()[i] = u(rng);
  const posenc::t5_relative_bias<float> enc({.num_heads = 16}, table);
  posenc::row_matrix<E> tile = posenc::row_matrix<E>::Zero(n, n);
  for (auto _ : state) {
    enc.add_bias_tile(tile, 5, pos.q, pos.k);
    benchmark::DoNotOptimize(tile.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, n, sizeof(E));
}

// Shaw's per-key-tile work: the query-term bias (step 2) plus the value weights (step 3).
void BM_shaw_tile_steps(benchmark::State& state) {
  const index_t n = state.range(0), d = 64, K = 16;
  const tile_positions pos(n, state.range(1) != 0);
  const posenc::row_matrix<float> table = posenc::row_matrix<float>::Constant(2 * K + 1, d, 0.01f);
  const posenc::shaw_relative<float> enc({.head_dim = d, .max_relative_position = K}, table, table);
  const posenc::row_matrix<float> g = posenc::row_matrix<float>::Constant(n, 2 * K + 1, 0.5f);
  const posenc::row_matrix<float> p = posenc::row_matrix<float>::Constant(n, n, 0.25f);
  posenc::row_matrix<float> tile = posenc::row_matrix<float>::Zero(n, n);
  posenc::row_matrix<float> w = posenc::row_matrix<float>::Zero(n, 2 * K + 1);
  for (auto _ : state) {
    enc.add_bias_tile(tile, g, pos.q, pos.k);
    enc.accumulate_value_weights(p, pos.q, pos.k, w);
    benchmark::DoNotOptimize(tile.data());
    benchmark::DoNotOptimize(w.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, n, sizeof(float));
}

// Arguments: tile side, then 0 for range positions or 1 for explicit lists.
// The quick run (POSENC_BENCH_MODE=quick) checks the kernel's tile size only.
void tile_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tile", "lists"});
  const bool quick = posenc_bench::mode() == posenc_bench::run_mode::quick;
  for (int lists : {0, 1})
    for (int n : {64, 128, 256})
      if (!quick || n == 128) b->Args({n, lists});
}

}  // namespace

BENCHMARK_TEMPLATE(BM_alibi_tile, float)->Apply(tile_args);
BENCHMARK_TEMPLATE(BM_alibi_tile, double)->Apply(tile_args);
BENCHMARK_TEMPLATE(BM_t5_tile, float)->Apply(tile_args);
BENCHMARK_TEMPLATE(BM_t5_tile, double)->Apply(tile_args);
BENCHMARK(BM_shaw_tile_steps)->Apply(tile_args);
