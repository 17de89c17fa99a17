// Prints a digest of the bits of ring attention's gathered output and log-sum-exp, so that two
// runs with the same number of ranks over different transports (shared memory, TCP between
// network namespaces) can be compared bit for bit by ring_netns_test.sh.
//
// Output of rank 0, one line each:
//   host <rank> <processor name>     for every rank (which "host" each rank ran on)
//   digest <16 hex digits>           FNV-1a over every configuration's gathered output and lse
// Exit status 0, or 1 when some rank's output is not finite.
// SPDX-License-Identifier: Apache-2.0
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "posenc/distributed/mpi_ring.hpp"
#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
using posenc::ring_layout;

constexpr index_t heads = 4, kv_heads = 2, head_dim = 16;

template <class T>
posenc::row_matrix<T> random_rows(index_t rows, index_t cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  posenc::row_matrix<T> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
  return m;
}

// 64-bit FNV-1a over raw bytes: any change of any bit changes the digest (with overwhelming odds).
struct fnv1a {
  std::uint64_t h = 14695981039346656037ull;
  template <class T>
  void add(const posenc::row_matrix<T>& m) {
    const auto* b = reinterpret_cast<const unsigned char*>(m.data());
    for (std::size_t i = 0; i < static_cast<std::size_t>(m.size()) * sizeof(T); ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
};

bool all_finite = true;

// One ring attention call on this rank's shard; its gathered output and lse go into the digest on
// rank 0.
template <class T, class E>
void run(const posenc::mpi_ring& ring, fnv1a& digest, const E& enc, index_t n, ring_layout layout, bool causal) {
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = causal, .k_tile = 16, .threads = 1};
  const auto q = random_rows<T>(n, heads * head_dim, 1), k = random_rows<T>(n, kv_heads * head_dim, 2),
             v = random_rows<T>(n, kv_heads * head_dim, 3);
  const auto pos = ring.shard_positions(n, layout);
  const auto mq = posenc::ring_take_rows(q, pos), mk = posenc::ring_take_rows(k, pos),
             mv = posenc::ring_take_rows(v, pos);
  posenc::row_matrix<T> out(mq.rows(), mq.cols()), lse(mq.rows(), heads);
  ring.attention(mq, mk, mv, out, pos, pos, enc, p, {}, lse);
  if (!out.allFinite()) all_finite = false;

  const bool root = ring.rank() == 0;
  posenc::row_matrix<T> full(root ? n : 0, heads * head_dim), full_lse(root ? n : 0, heads);
  ring.gather(out, pos, full);
  ring.gather(lse, pos, full_lse);
  if (root) digest.add(full), digest.add(full_lse);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, bad = 0;
  {
    const posenc::mpi_ring ring;
    rank = ring.rank();
    fnv1a digest;
    // Long enough that a message (one shard's keys, values and positions) passes Open MPI's eager
    // limits, so large transfers take the transports' rendezvous paths too.
    run<float>(ring, digest, posenc::rope<float>({.head_dim = head_dim}), 2048, ring_layout::zigzag, true);
    run<float>(ring, digest, posenc::alibi<float>({.num_heads = heads}), 301, ring_layout::contiguous, false);
    run<double>(ring, digest, posenc::no_position<double>{}, 101, ring_layout::zigzag, true);

    char name[MPI_MAX_PROCESSOR_NAME] = {};
    int len = 0;
    MPI_Get_processor_name(name, &len);
    std::vector<char> names(rank == 0 ? static_cast<std::size_t>(ring.size()) * MPI_MAX_PROCESSOR_NAME : 0);
    MPI_Gather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, names.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 0, ring.comm());
    int mine = all_finite ? 0 : 1;
    MPI_Allreduce(&mine, &bad, 1, MPI_INT, MPI_SUM, ring.comm());
    if (rank == 0) {
      for (int r = 0; r < ring.size(); ++r)
        std::printf("host %d %s\n", r, names.data() + static_cast<std::size_t>(r) * MPI_MAX_PROCESSOR_NAME);
      std::printf("digest %016llx\n", static_cast<unsigned long long>(digest.h));
    }
  }
  if (rank == 0 && bad != 0) std::fprintf(stderr, "ring_digest: %d ranks produced non-finite output\n", bad);
  MPI_Finalize();
  return bad == 0 ? 0 : 1;
}
