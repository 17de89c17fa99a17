// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file distributed/mpi_ring.hpp
/// Ring attention across MPI ranks (docs/ring_attention.md): the schedule of `distributed/ring.hpp`, with
/// each rank one device of the ring. Includes <mpi.h>: a program that includes this header links
/// MPI itself (CMake: `find_package(MPI COMPONENTS CXX)` and `MPI::MPI_CXX`); the rest of posenc
/// never needs MPI.
///
/// Each step a rank sends the message it holds (keys, values and their global positions, one
/// message) to rank `r + 1` and receives the next one from rank `r - 1` with `MPI_Isend` /
/// `MPI_Irecv` into the second of two buffers, while it computes on the first. Open MPI's
/// shared-memory transport moves data only inside MPI calls, a few 32 KiB fragments per call, so
/// the driver calls `MPI_Testall` between the query blocks of a step (`ring_options::query_blocks`):
/// that is what lets the transfer overlap the compute.
/// Open MPI moves a large message in fewer calls with deeper pipelines
/// (`--mca pml_ob1_send_pipeline_depth 64 --mca pml_ob1_recv_pipeline_depth 64`, see
/// docs/ring_attention.md). The result equals `ring_attention_simulate` with the same shards and
/// options, bit for bit.

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <ctime>
#include <utility>
#include <vector>

#include "posenc/distributed/ring.hpp"

namespace posenc {

/// What one rank measured during `mpi_ring::attention`. Times in seconds.
struct ring_stats {
  int steps = 0;                  ///< ring steps (the communicator's size)
  double total_s = 0;             ///< wall time of the call
  double compute_s = 0;           ///< wall time in attention calls and merges
  double compute_cpu_s = 0;       ///< processor time of the process in attention calls and merges (`std::clock`)
  double wait_s = 0;              ///< wall time blocked on transfers after a step's compute: transfer time not hidden
  int transfers_hidden = 0;       ///< steps whose transfer had completed when their compute ended (of `steps - 1`)
  std::size_t message_bytes = 0;  ///< size of each message buffer (the largest shard's message; one buffer when P = 1)
  std::size_t bytes = 0;          ///< memory the call allocated: both buffers, the query copy, accumulator, partials
};

/// A ring of all ranks of a communicator. Construction duplicates the communicator (a collective
/// call), so the ring's messages never meet the program's own; destroy the object before
/// `MPI_Finalize`. Not thread-safe: one call at a time per object.
class mpi_ring {
 public:
  /// Duplicates `comm` (collective over `comm`).
  explicit mpi_ring(MPI_Comm comm = MPI_COMM_WORLD) {
    MPI_Comm_dup(comm, &comm_);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  mpi_ring(const mpi_ring&) = delete;
  mpi_ring& operator=(const mpi_ring&) = delete;
  ~mpi_ring() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  /// This rank's index in the ring (`r`: it receives from `r - 1` and sends to `r + 1`).
  int rank() const { return rank_; }
  /// Number of ranks, the `P` of the ring.
  int size() const { return size_; }
  /// The ring's own (duplicated) communicator.
  MPI_Comm comm() const { return comm_; }

  /// This rank's positions of a sequence of `n` tokens in `layout` (`ring_shard_positions`).
  std::vector<position> shard_positions(index_t n, ring_layout layout) const {
    return ring_shard_positions(n, size_, rank_, layout);
  }

  /// Ring attention of this rank's query shard against every rank's key/value shard; collective
  /// over the ring's communicator. Every rank passes its own shards with their global positions:
  ///
  /// \param q, out  `[n_q, heads * d]` row-major, any row stride (`n_q` may be 0).
  /// \param k, v    `[n_kv, kv_heads * d]` (`n_kv` may be 0); head_dim, heads and kv_heads are the
  ///                same on every rank; shards may differ in size.
  /// \param qpos, kpos  global positions, one per row.
  /// \param enc, p  as for `attention`; a rotation is applied once with the global positions.
  /// \param lse     optional `[n_q, heads]` float or double: the log-sum-exp over all keys.
  /// Returns this rank's timings. Allocates two message buffers (the largest shard's keys, values
  /// and positions each), a copy of the queries, the output accumulator and one partial result.
  template <matrix_argument Q, matrix_argument K, matrix_argument V, matrix_argument O, positional_encoding E,
            class L = std::nullptr_t>
  ring_stats attention(Q&& q, K&& k, V&& v, O&& out, positions qpos, positions kpos, const E& enc,
                       const attention_params& p, const ring_options& o = {}, L&& lse = nullptr) const {
    const double start = MPI_Wtime();
    const auto qv = view_of(std::forward<Q>(q));
    const auto kv = view_of(std::forward<K>(k));
    const auto vv = view_of(std::forward<V>(v));
    const auto ov = view_of(std::forward<O>(out));
    using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
    using msg = detail::ring_message<S>;
    POSENC_ASSERT(kv.rows == kpos.size() && vv.rows == kv.rows, "mpi_ring::attention: k, v and kpos differ in rows");

    // Every rank must agree on the column counts; the buffers fit the largest shard.
    std::int64_t shape[5] = {kv.rows, kv.cols, vv.cols, -kv.cols, -vv.cols};
    MPI_Allreduce(MPI_IN_PLACE, shape, 5, MPI_INT64_T, MPI_MAX, comm_);
    POSENC_ASSERT(shape[1] == -shape[3] && shape[2] == -shape[4] && shape[1] == kv.cols && shape[2] == vv.cols,
                  "mpi_ring::attention: k and v must have the same columns on every rank");

    detail::ring_worker<S, E> worker(qv, qpos, enc, p, o);
    ring_stats st;
    st.steps = size_;
    st.message_bytes = msg::bytes(shape[0], kv.cols, vv.cols);
    // A ring of one never receives: no second buffer.
    const std::size_t second = size_ > 1 ? st.message_bytes : 0;
    const detail::ring_buffer buf[2] = {detail::ring_buffer(st.message_bytes), detail::ring_buffer(second)};
    msg::pack(buf[0].get(), kv, vv, kpos, enc, p);

    // Messages are whole 64-byte blocks, so counts stay far below INT_MAX.
    MPI_Datatype block;
    MPI_Type_contiguous(static_cast<int>(detail::ring_align), MPI_BYTE, &block);
    MPI_Type_commit(&block);
    const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
    const auto blocks = [](std::size_t bytes) { return static_cast<int>(bytes / detail::ring_align); };
    for (int s = 0; s < size_; ++s) {
      const msg cur(buf[s % 2].get());
      MPI_Request req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
      if (s + 1 < size_) {
        MPI_Irecv(buf[(s + 1) % 2].get(), blocks(st.message_bytes), block, prev, s, comm_, &req[0]);
        MPI_Isend(cur.base, blocks(cur.bytes()), block, next, s, comm_, &req[1]);
      }
      const double t0 = MPI_Wtime();
      const std::clock_t c0 = std::clock();
      worker.attend(cur, [&req] {
        int done = 0;
        MPI_Testall(2, req, &done, MPI_STATUSES_IGNORE);
      });
      st.compute_cpu_s += static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
      const double t1 = MPI_Wtime();
      int done = 0;
      MPI_Testall(2, req, &done, MPI_STATUSES_IGNORE);
      if (done && s + 1 < size_) ++st.transfers_hidden;
      MPI_Waitall(2, req, MPI_STATUSES_IGNORE);
      st.compute_s += t1 - t0;
      st.wait_s += MPI_Wtime() - t1;
    }
    MPI_Type_free(&block);
    worker.finish(ov, std::forward<L>(lse));
    st.bytes = st.message_bytes + second + worker.bytes();
    st.total_s = MPI_Wtime() - start;
    return st;
  }

  /// Gathers every rank's output shard into `full` on rank `root`: row `i` of a rank's `shard`
  /// (`[pos.size(), cols]`) goes to row `pos[i]` of `full` (`[n, cols]`, read on `root` only;
  /// other ranks may pass an empty matrix). Collective. Allocates a copy of the shards on `root`.
  template <matrix_argument M, matrix_argument F>
  void gather(M&& shard, positions pos, F&& full, int root = 0) const {
    const auto sv = view_of(std::forward<M>(shard));
    const auto fv = view_of(std::forward<F>(full));
    using S = std::remove_const_t<std::remove_pointer_t<decltype(sv.data)>>;
    POSENC_ASSERT(sv.rows == pos.size(), "mpi_ring::gather: one position per shard row");
    const bool here = rank_ == root;
    const int rows = static_cast<int>(sv.rows);
    std::vector<int> counts(here ? static_cast<std::size_t>(size_) : 0), offsets(counts.size());
    MPI_Gather(&rows, 1, MPI_INT, counts.data(), 1, MPI_INT, root, comm_);
    int total = 0;
    for (std::size_t r = 0; r < counts.size(); ++r) offsets[r] = total, total += counts[r];

    std::vector<position> my_pos(static_cast<std::size_t>(sv.rows)), all_pos(static_cast<std::size_t>(total));
    for (index_t i = 0; i < sv.rows; ++i) my_pos[static_cast<std::size_t>(i)] = pos[i];
    MPI_Gatherv(my_pos.data(), rows, MPI_INT64_T, all_pos.data(), counts.data(), offsets.data(), MPI_INT64_T, root,
                comm_);

    row_matrix<S> mine(sv.rows, sv.cols), all(total, sv.cols);
    for (index_t i = 0; i < sv.rows; ++i) std::copy(sv.row(i), sv.row(i) + sv.cols, mine.data() + i * sv.cols);
    MPI_Datatype row;
    MPI_Type_contiguous(static_cast<int>(static_cast<std::size_t>(sv.cols) * sizeof(S)), MPI_BYTE, &row);
    MPI_Type_commit(&row);
    MPI_Gatherv(mine.data(), rows, row, all.data(), counts.data(), offsets.data(), row, root, comm_);
    MPI_Type_free(&row);
    if (here) ring_put_rows(all, positions(all_pos), fv);
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace posenc
