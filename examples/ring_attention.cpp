// Ring attention across MPI ranks: each rank holds 1/P of a 4096-token sequence, keys and values
// travel around the ring, and the gathered result is checked against single-process attention.
// Causal RoPE with the zigzag layout, then full attention with ALiBi and the contiguous layout.
//
//   mpirun -np 4 ./ring_attention       (flags for containers and small machines: docs/ring_attention.md)
//
// Prints the largest difference from single-process attention and each rank's peak memory.
// SPDX-License-Identifier: Apache-2.0
#include <mpi.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "posenc/distributed/mpi_ring.hpp"
#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
using posenc::position;
constexpr index_t n = 4096, heads = 8, kv_heads = 2, head_dim = 64;

// The rows of a projection at `pos`, each drawn from its own seed: a rank makes its shard without
// ever holding the whole sequence, and rank 0 makes the same rows for the whole sequence.
posenc::row_matrix<float> rows_at(const std::vector<position>& pos, index_t cols, unsigned which) {
  posenc::row_matrix<float> m(static_cast<index_t>(pos.size()), cols);
  std::normal_distribution<float> normal;
  for (index_t i = 0; i < m.rows(); ++i) {
    std::mt19937 rng(static_cast<unsigned>(pos[static_cast<std::size_t>(i)]) * 4u + which);
    for (index_t c = 0; c < cols; ++c) m(i, c) = normal(rng);
  }
  return m;
}

// Runs the ring with `enc` and returns (on rank 0) the largest difference from one process.
template <class E>
float run(const posenc::mpi_ring& ring, const E& enc, posenc::ring_layout layout, bool causal) {
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = causal, .threads = 1};
  const auto pos = ring.shard_positions(n, layout);
  const auto q = rows_at(pos, heads * head_dim, 0), k = rows_at(pos, kv_heads * head_dim, 1),
             v = rows_at(pos, kv_heads * head_dim, 2);
  posenc::row_matrix<float> out(q.rows(), q.cols());
  const posenc::ring_stats stats = ring.attention(q, k, v, out, pos, pos, enc, p);

  posenc::row_matrix<float> full(ring.rank() == 0 ? n : 0, heads * head_dim);
  ring.gather(out, pos, full);
  // Every rank's peak resident memory so far (before rank 0 allocates the whole sequence for the
  // check; its figure for the second run includes the first run's check), and what the ring
  // itself allocated: two message buffers, the query copy, the accumulator, one partial result.
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double mine[2] = {static_cast<double>(usage.ru_maxrss) / 1024.0, static_cast<double>(stats.bytes) / (1 << 20)};
  std::vector<double> peaks(2 * static_cast<std::size_t>(ring.size()));
  MPI_Gather(mine, 2, MPI_DOUBLE, peaks.data(), 2, MPI_DOUBLE, 0, ring.comm());
  if (ring.rank() != 0) return 0;

  std::vector<position> all(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) all[static_cast<std::size_t>(i)] = i;
  const auto fq = rows_at(all, heads * head_dim, 0), fk = rows_at(all, kv_heads * head_dim, 1),
             fv = rows_at(all, kv_heads * head_dim, 2);
  posenc::row_matrix<float> single(n, heads * head_dim);
  posenc::attention(fq, fk, fv, single, posenc::arange(0, n), posenc::arange(0, n), enc, p);
  const float err = (full - single).cwiseAbs().maxCoeff();
  std::printf("%s, %s, %s, %d ranks x %td tokens: largest difference from single-process attention %.2g\n",
              std::string(enc.name()).c_str(), causal ? "causal" : "full",
              layout == posenc::ring_layout::zigzag ? "zigzag" : "contiguous", ring.size(), n / ring.size(),
              static_cast<double>(err));
  for (int r = 0; r < ring.size(); ++r)
    std::printf("  rank %d: peak resident memory %.1f MiB, of which the ring allocated %.1f MiB\n", r,
                peaks[2 * static_cast<std::size_t>(r)], peaks[2 * static_cast<std::size_t>(r) + 1]);
  return err;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  float err = 0;
  int rank = 0;
  {
    const posenc::mpi_ring ring;
    rank = ring.rank();
    err = std::max(
        err, run(ring, posenc::rope<float>({.head_dim = head_dim, .base = 5e5}), posenc::ring_layout::zigzag, true));
    err = std::max(err, run(ring, posenc::alibi<float>({.num_heads = heads, .form = posenc::alibi_form::symmetric}),
                            posenc::ring_layout::contiguous, false));
  }
  MPI_Finalize();
  return rank != 0 || err < 1e-5f ? 0 : 1;
}
