// Ring attention: the longest context that fits a per-process memory budget, against the number
// of processes, from measured memory.
//
// One causal attention layer with Llama 3 8B's shapes (32 query heads, 8 kv heads, head_dim 128,
// bf16 storage, RoPE), sharded zigzag over P devices of the in-process ring simulator
// (`ring_attention_simulate`, the MPI driver's schedule). For P = 1, 2, 4, 8 and n = 256 .. 1024
// tokens, the heap the call allocates is measured by a counting allocator (every byte, peak during
// the call): the devices' shards of q, k, v and the output, their messages, query copies,
// accumulators and the kernel's workspace. Per device that is the peak over P. The measurements
// show that a device's memory depends on its shard size n / P alone (the points of every P fall on
// one line): a straight line bytes = a + b * (n / P), fitted to the points with shards of at least
// 128 tokens (below that the kernel's tile workspace is not yet at full size), must match them within
// 5%. The longest context within a budget B per process is then P * (B - a) / b. In a ring of
// P > 1 an MPI rank holds one more message buffer than a simulated device (it receives the next
// message while computing on the current one): its size per token, from the message format (keys,
// values, a position), is added to b for the budget curves of P > 1.
//
// Usage: ring_memory OUTPUT_FOLDER   (writes ring_memory.csv and ring_memory_measured.csv)
// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <cstdio>
#include <exception>
#include <random>
#include <vector>

#include "alloc_counter.hpp"  // bench/: counts every byte malloc hands out
#include "picture_common.hpp"
#include "posenc/distributed/ring.hpp"
#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
using bf16 = Eigen::bfloat16;
constexpr index_t heads = 32, kv_heads = 8, head_dim = 128;

struct point {
  int ranks;
  index_t tokens;
  double per_device;  // peak heap bytes of the call / ranks
};

point measure(int ranks, index_t n, const posenc::rope<float>& rope) {
  posenc::row_matrix<bf16> q(n, heads * head_dim), k(n, kv_heads * head_dim), v(n, kv_heads * head_dim),
      out(n, heads * head_dim);
  std::mt19937 rng(static_cast<unsigned>(n));
  std::normal_distribution<float> normal;
  for (auto* m : {&q, &k, &v})
    for (index_t i = 0; i < m->size(); ++i) m->data()[i] = bf16(normal(rng));
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true, .threads = 1};
  namespace heap = posenc_bench::heap;
  heap::reset();
  const std::int64_t before = heap::current();
  posenc::ring_attention_simulate(q, k, v, out, ranks, posenc::ring_layout::zigzag, rope, p);
  const double used = static_cast<double>(heap::peak() - before);
  if (heap::current() != before) throw std::runtime_error("ring_attention_simulate kept memory after returning");
  return {ranks, n, used / ranks};
}

}  // namespace

int main(int argc, char** argv) try {
  const auto dir = pictures::output_folder(argc, argv);
  const posenc::rope<float> rope({.head_dim = head_dim, .base = 5e5, .scaling = posenc::llama3_scaling{}});

  std::vector<point> points;
  for (int ranks : {1, 2, 4, 8})
    for (index_t n : {256, 512, 1024}) points.push_back(measure(ranks, n, rope));

  // Least squares per_device = a + b * (n / P) over the shards of at least min_shard tokens.
  constexpr double min_shard = 128;
  double sx = 0, sy = 0, sxx = 0, sxy = 0, m = 0;
  for (const auto& pt : points) {
    const double x = double(pt.tokens) / pt.ranks;
    if (x < min_shard) continue;
    sx += x, sy += pt.per_device, sxx += x * x, sxy += x * pt.per_device, m += 1;
  }
  const double b = (m * sxy - sx * sy) / (m * sxx - sx * sx);
  const double a = (sy - b * sx) / m;
  double worst = 0;
  pictures::csv measured(dir / "ring_memory_measured.csv",
                         {"processes", "tokens", "tokens_per_process", "peak_bytes_per_process", "fit_bytes"});
  for (const auto& pt : points) {
    const double x = double(pt.tokens) / pt.ranks, fit = a + b * x;
    if (x >= min_shard) worst = std::max(worst, std::abs(pt.per_device - fit) / pt.per_device);
    measured.row({double(pt.ranks), double(pt.tokens), x, pt.per_device, fit});
  }
  measured.finish();

  // The MPI driver's second message buffer: keys, values and a position per token of its shard.
  const double message_per_token = double(2 * kv_heads * head_dim * sizeof(bf16) + sizeof(posenc::position));
  const double gib = 1024.0 * 1024.0 * 1024.0;
  pictures::csv out(dir / "ring_memory.csv", {"processes", "fixed_bytes", "bytes_per_token", "max_tokens_1GiB",
                                              "max_tokens_4GiB", "max_tokens_16GiB"});
  for (int ranks : {1, 2, 4, 8}) {
    const double per_token = ranks > 1 ? b + message_per_token : b;
    std::vector<double> row = {double(ranks), a, per_token};
    for (double budget : {1.0, 4.0, 16.0}) row.push_back(std::floor((budget * gib - a) / per_token) * ranks);
    out.row(row);
  }
  out.finish();
  std::printf(
      "per device: %.0f bytes + %.0f bytes per token of its shard (fit within %.2f%% for shards of at "
      "least %.0f tokens); an MPI rank adds %.0f bytes per token for its receive buffer\n",
      a, b, 100 * worst, min_shard, message_per_token);
  std::printf("longest context in 16 GiB per process: %.0f tokens per process in a ring of P > 1\n",
              std::floor((16 * gib - a) / (b + message_per_token)));
  return worst < 0.05 && b > 0 && a >= 0 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "ring_memory: %s\n", e.what());
  return 1;
}
