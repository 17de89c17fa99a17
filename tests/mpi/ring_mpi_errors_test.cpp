// The MPI ring when ranks make mistakes, run by ctest under `mpirun -np P` (P = 2, 3): every
// rank must get an exception that says what is wrong, and no rank may hang (ctest's timeout
// fails the test if one does). After each mistake the ring must still work.
//
// Cases: ranks that disagree on heads with the same key width, on head_dim, on the sequence
// length given to shard_positions, on the element type (float on one rank, double on another),
// on the encoder's parameters; one rank with a shape bug; heads = 0 everywhere; kv_heads that do
// not divide heads with every shard empty; gather with a position outside the sequence.
// SPDX-License-Identifier: Apache-2.0
#include <mpi.h>

#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>

#include "posenc/distributed/mpi_ring.hpp"
#include "posenc/distributed/ring.hpp"
#include "posenc/encoders/rope.hpp"

namespace {

using posenc::index_t;
using posenc::position;
template <class T>
using mat = posenc::row_matrix<T>;

int failures = 0;

// Runs `f` and checks that it throws an exception of type `E` whose message contains `text`.
template <class E>
void expect(int rank, const char* what, const std::string& text, const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    if (std::string(e.what()).find(text) == std::string::npos) {
      ++failures;
      std::fprintf(stderr, "FAILED on rank %d: %s: message \"%s\" lacks \"%s\"\n", rank, what, e.what(), text.c_str());
    }
    return;
  } catch (const std::exception& e) {
    ++failures;
    std::fprintf(stderr, "FAILED on rank %d: %s: unexpected exception type: %s\n", rank, what, e.what());
    return;
  }
  ++failures;
  std::fprintf(stderr, "FAILED on rank %d: %s: no exception\n", rank, what);
}

template <class T>
mat<T> filled(index_t rows, index_t cols, double v) {
  return mat<T>::Constant(rows, cols, static_cast<T>(v));
}

// One valid ring call on every rank, checking that the ring still works after a mistake.
void valid_call(const posenc::mpi_ring& ring) {
  const index_t n = 40;
  const auto pos = ring.shard_positions(n, posenc::ring_layout::zigzag);
  const auto rows = static_cast<index_t>(pos.size());
  const mat<float> q = filled<float>(rows, 4 * 16, 0.1), k = filled<float>(rows, 2 * 16, 0.2);
  mat<float> v = filled<float>(rows, 2 * 16, 0.0), out(rows, 4 * 16);
  for (index_t i = 0; i < rows; ++i) v.row(i).setConstant(static_cast<float>(pos[static_cast<std::size_t>(i)]));
  ring.attention(q, k, v, out, pos, pos, posenc::no_position<float>{},
                 {.heads = 4, .kv_heads = 2, .causal = true, .threads = 1});
  // Equal logits: each query's output is the mean of the values it sees, positions 0..p.
  for (index_t i = 0; i < rows; ++i) {
    const double want = static_cast<double>(pos[static_cast<std::size_t>(i)]) / 2;
    if (std::abs(out(i, 0) - want) > 1e-4 * (1 + want)) {
      ++failures;
      std::fprintf(stderr, "FAILED on rank %d: valid call after a mistake: %g, want %g\n", ring.rank(),
                   static_cast<double>(out(i, 0)), want);
      return;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    const posenc::mpi_ring ring;
    const int rank = ring.rank();
    const index_t rows = 8;
    const auto pos = posenc::arange(rank * rows, rows);
    const posenc::no_position<float> none;

    // Heads differ but the key width is the same: 4 heads x 16 vs 2 heads x 32, kv 2 x 16 = 1 x 32.
    expect<std::invalid_argument>(rank, "heads differ", "the ranks disagree on attention_params.heads", [&] {
      const index_t heads = rank == 0 ? 4 : 2, kv_heads = rank == 0 ? 2 : 1;
      const mat<float> q = filled<float>(rows, 64, 0.1), k = filled<float>(rows, 32, 0.2);
      mat<float> out(rows, 64);
      ring.attention(q, k, k, out, pos, pos, none, {.heads = heads, .kv_heads = kv_heads, .threads = 1});
    });
    valid_call(ring);

    // head_dim differs with the same head counts: different widths everywhere.
    expect<std::invalid_argument>(rank, "head_dim differs", "the ranks disagree on head_dim", [&] {
      const index_t d = rank == 0 ? 16 : 8;
      const mat<float> q = filled<float>(rows, 2 * d, 0.1), k = filled<float>(rows, 2 * d, 0.2);
      mat<float> out(rows, 2 * d);
      ring.attention(q, k, k, out, pos, pos, none, {.heads = 2, .threads = 1});
    });
    valid_call(ring);

    // The sequence length each rank shards.
    expect<std::invalid_argument>(rank, "n differs", "the ranks disagree on the sequence length n",
                                  [&] { ring.shard_positions(100 + rank, posenc::ring_layout::zigzag); });
    valid_call(ring);

    // float on rank 0, double elsewhere: refused before a message of either size moves.
    expect<std::invalid_argument>(rank, "element types differ", "the ranks disagree on the element type", [&] {
      if (rank == 0) {
        const mat<float> q = filled<float>(rows, 32, 0.1);
        mat<float> out(rows, 32);
        ring.attention(q, q, q, out, pos, pos, none, {.heads = 2, .threads = 1});
      } else {
        const mat<double> q = filled<double>(rows, 32, 0.1);
        mat<double> out(rows, 32);
        ring.attention(q, q, q, out, pos, pos, posenc::no_position<double>{}, {.heads = 2, .threads = 1});
      }
    });
    valid_call(ring);

    // RoPE with another base on the last rank.
    expect<std::invalid_argument>(rank, "encoders differ", "the ranks disagree on the encoder", [&] {
      const posenc::rope<float> rope({.head_dim = 16, .base = rank == ring.size() - 1 ? 5e5 : 1e4});
      const mat<float> q = filled<float>(rows, 32, 0.1);
      mat<float> out(rows, 32);
      ring.attention(q, q, q, out, pos, pos, rope, {.heads = 2, .threads = 1});
    });
    valid_call(ring);

    // A shape bug on rank 1 only: rank 1 gets its own precondition_error, the others ring_error.
    const std::function<void()> short_out = [&] {
      const mat<float> q = filled<float>(rows, 32, 0.1);
      mat<float> out(rank == 1 ? rows - 1 : rows, 32);
      ring.attention(q, q, q, out, pos, pos, none, {.heads = 2, .threads = 1});
    };
    if (rank == 1) {
      expect<posenc::precondition_error>(rank, "shape bug on this rank", "out is [7, 32] but q is [8, 32]", short_out);
    } else {
      expect<posenc::ring_error>(rank, "shape bug on rank 1", "rank 1 failed: posenc: attention: out is [7, 32]",
                                 short_out);
    }
    valid_call(ring);

    // heads = 0 everywhere: each rank's own invalid_argument, as attention gives.
    expect<std::invalid_argument>(rank, "heads = 0", "attention_params.heads = 0", [&] {
      const mat<float> q = filled<float>(rows, 32, 0.1);
      mat<float> out(rows, 32);
      ring.attention(q, q, q, out, pos, pos, none, {.heads = 0, .threads = 1});
    });
    // kv_heads that do not divide heads, every shard empty.
    expect<std::invalid_argument>(rank, "kv_heads = 3 with empty shards", "attention_params.kv_heads = 3", [&] {
      const mat<float> q(0, 64), k(0, 48);
      mat<float> out(0, 64);
      ring.attention(q, k, k, out, posenc::arange(0, 0), posenc::arange(0, 0), none,
                     {.heads = 4, .kv_heads = 3, .threads = 1});
    });
    valid_call(ring);

    // The backward: the last rank's dk has the wrong shape; it throws its own error, the others
    // a ring_error naming it, before any data moves.
    const std::function<void()> bad_backward = [&] {
      const mat<float> q = filled<float>(rows, 64, 0.1), k = filled<float>(rows, 32, 0.2),
                       lse = filled<float>(rows, 4, 1.0);
      mat<float> dq(rows, 64), dk(rows, rank == ring.size() - 1 ? 31 : 32), dv(rows, 32);
      ring.attention_backward(q, k, k, q, lse, q, dq, dk, dv, pos, pos, none,
                              {.heads = 4, .kv_heads = 2, .threads = 1});
    };
    if (rank == ring.size() - 1) {
      expect<posenc::precondition_error>(rank, "backward dk shape here", "dk is [", bad_backward);
    } else {
      expect<posenc::ring_error>(rank, "backward dk shape elsewhere", "failed: posenc: ring attention backward",
                                 bad_backward);
    }
    valid_call(ring);

    // gather: the last rank names a position outside the root's sequence.
    const std::function<void()> bad_gather = [&] {
      const mat<float> shard = filled<float>(2, 4, 1.0);
      std::vector<position> where = {2 * rank, 2 * rank + 1};
      if (rank == ring.size() - 1) where[1] = 1000;
      mat<float> full(rank == 0 ? 2 * ring.size() : 0, 4);
      ring.gather(shard, posenc::positions(where), full);
    };
    if (rank == ring.size() - 1) {
      expect<posenc::precondition_error>(rank, "gather out of range here", "position 1000", bad_gather);
    } else {
      expect<posenc::ring_error>(rank, "gather out of range elsewhere", "failed: posenc: mpi_ring::gather: position 1000",
                                 bad_gather);
    }
    valid_call(ring);
  }
  int all = 0;
  MPI_Allreduce(&failures, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Finalize();
  return all == 0 ? 0 : 1;
}
