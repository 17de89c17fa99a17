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
///
/// `mpi_ring::attention_backward` is the backward of the same ring (`distributed/ring_backward.hpp`):
/// keys, values and their gradients travel, dQ stays; it equals `ring_attention_backward_simulate`
/// bit for bit.
///
/// Mistakes fail on every rank, never hang: each collective call first checks its arguments on
/// every rank and exchanges the verdicts with one small `MPI_Allgather` (fixed-size records, so
/// ranks that disagree on the element type cannot truncate a message). If a rank's arguments are
/// invalid, or the ranks disagree on something they must share (heads, kv_heads, head_dim, the
/// key and value widths, the element type, the mask, the scale, the encoder, `query_blocks`),
/// every rank throws before any data moves: the rank at fault its own exception, the others
/// `posenc::ring_error` naming that rank and its message. An exception during the ring's steps
/// (out of memory) stops that rank's computing but not its sending and receiving, so the ring
/// completes, and every rank throws after a last exchange of verdicts.

#include <mpi.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <limits>
#include <optional>
#include <span>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "posenc/distributed/ring.hpp"
#include "posenc/distributed/ring_backward.hpp"

namespace posenc {

/// Thrown on every rank of a ring call when another rank's arguments were invalid or its part of
/// the call failed: the message names that rank and repeats its error.
class ring_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// What a rank tells the others before (and after) a collective ring call: whether its part is
/// fine, the facts every rank must share, and its error message.
struct ring_verdict {
  static constexpr int fields = 18;
  std::int64_t ok = 1;
  std::int64_t field[fields] = {};
  char text[400] = {};

  void fail(std::string_view what) {
    ok = 0;
    const std::size_t n = std::min(what.size(), sizeof text - 1);
    std::memcpy(text, what.data(), n);
    text[n] = 0;
  }
};

/// Names of the shared facts in `ring_verdict::field`, for messages (`nullptr`: not compared).
struct ring_fact {
  int index;
  const char* name;
};

/// Exchanges every rank's verdict (one `MPI_Allgather` of fixed-size records) and throws on every
/// rank when one failed or when the facts in `agree` differ between ranks. `local` is this rank's
/// own exception, rethrown here when it failed. Returns every rank's verdict.
inline std::vector<ring_verdict> ring_exchange(MPI_Comm comm, int size, int rank, const ring_verdict& mine,
                                               const std::exception_ptr& local, std::string_view call,
                                               std::span<const ring_fact> agree) {
  std::vector<ring_verdict> all(static_cast<std::size_t>(size));
  MPI_Allgather(&mine, static_cast<int>(sizeof(ring_verdict)), MPI_BYTE, all.data(),
                static_cast<int>(sizeof(ring_verdict)), MPI_BYTE, comm);
  // A rank that failed reports its own error; the others name the first rank that failed.
  if (!all[static_cast<std::size_t>(rank)].ok && local) std::rethrow_exception(local);
  for (int r = 0; r < size; ++r) {
    const ring_verdict& v = all[static_cast<std::size_t>(r)];
    if (v.ok) continue;
    throw ring_error("posenc: " + std::string(call) + ": rank " + std::to_string(r) + " failed: " +
                     std::string(v.text, strnlen(v.text, sizeof v.text)));
  }
  for (const ring_fact f : agree) {
    for (int r = 1; r < size; ++r) {
      const std::int64_t a = all[0].field[f.index], b = all[static_cast<std::size_t>(r)].field[f.index];
      if (a != b)
        throw std::invalid_argument("posenc: " + std::string(call) + ": the ranks disagree on " + f.name +
                                    ": rank 0 has " + std::to_string(a) + ", rank " + std::to_string(r) + " has " +
                                    std::to_string(b));
    }
  }
  return all;
}

inline std::vector<ring_verdict> ring_exchange(MPI_Comm comm, int size, int rank, const ring_verdict& mine,
                                               const std::exception_ptr& local, std::string_view call,
                                               std::initializer_list<ring_fact> agree) {
  return ring_exchange(comm, size, rank, mine, local, call, std::span<const ring_fact>(agree.begin(), agree.size()));
}

/// The message of the exception in flight (inside a catch block).
inline std::string ring_what() {
  try {
    throw;
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}

/// FNV-1a of bytes, for the encoder's digest.
inline std::uint64_t ring_hash(std::uint64_t h, const void* data, std::size_t n) {
  const auto* b = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

/// A digest of what the encoder does, from its public description: its name, head size,
/// frequencies and magnitude (rotations), slopes or bucket parameters (biases), tables (Shaw).
/// Ranks whose encoders differ in any of these would compute different attention.
template <class E>
std::uint64_t encoder_digest(const E& enc) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  const std::string_view name = enc.name();
  h = ring_hash(h, name.data(), name.size());
  auto add = [&h](auto x) { h = ring_hash(h, &x, sizeof x); };
  if constexpr (requires { enc.head_dim(); }) add(static_cast<std::int64_t>(enc.head_dim()));
  if constexpr (requires { enc.inv_freq(); enc.magnitude(); enc.rotary_dim(); enc.layout(); }) {
    for (double f : enc.inv_freq()) add(f);
    add(enc.magnitude());
    add(static_cast<std::int64_t>(enc.rotary_dim()));
    add(static_cast<int>(enc.layout()));
  }
  if constexpr (requires { enc.params().num_heads; enc.params().head_offset; }) {
    add(static_cast<std::int64_t>(enc.params().num_heads));
    add(static_cast<std::int64_t>(enc.params().head_offset));
  }
  if constexpr (requires { enc.slope(index_t{0}); enc.params().form; }) {
    add(static_cast<int>(enc.params().form));
    for (index_t hh = 0; hh < enc.params().num_heads - enc.params().head_offset; ++hh) add(enc.slope(hh));
  }
  if constexpr (requires { enc.params().num_buckets; enc.params().max_distance; enc.params().bidirectional; }) {
    add(static_cast<std::int64_t>(enc.params().num_buckets));
    add(static_cast<std::int64_t>(enc.params().max_distance));
    add(static_cast<int>(enc.params().bidirectional));
  }
  if constexpr (requires { enc.key_table(); enc.value_table(); }) {
    for (const auto t : {enc.key_table(), enc.value_table()})
      for (index_t r = 0; r < t.rows; ++r) h = ring_hash(h, t.row(r), static_cast<std::size_t>(t.cols) * sizeof(*t.data));
  }
  return h;
}

template <class S>
constexpr std::int64_t storage_code() {
  if constexpr (std::same_as<S, float>) return 1;
  if constexpr (std::same_as<S, double>) return 2;
  if constexpr (std::same_as<S, Eigen::bfloat16>) return 3;
  return 4;
}

/// Writes the facts every rank of a ring call must share into `v.field` (and this rank's key rows
/// into field 13, which is not compared): storage type, heads, head_dim, the key and value widths,
/// the mask, the scale, the encoder, the options, soft-cap and sinks.
template <class S, class E>
void ring_shared_facts(ring_verdict& v, const E& enc, const attention_params& p, index_t head_dim, index_t k_rows,
                       index_t k_cols, index_t v_cols, index_t query_blocks) {
  const double scale = p.scale ? *p.scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
  v.field[0] = storage_code<S>();
  v.field[1] = p.heads;
  v.field[2] = p.kv_heads == 0 ? p.heads : p.kv_heads;
  v.field[3] = head_dim;
  v.field[4] = k_cols;
  v.field[5] = v_cols;
  v.field[6] = p.causal;
  v.field[7] = p.window_left;
  v.field[8] = p.window_right;
  v.field[9] = std::bit_cast<std::int64_t>(scale);
  v.field[10] = static_cast<std::int64_t>(E::family);
  v.field[11] = static_cast<std::int64_t>(encoder_digest(enc));
  v.field[12] = query_blocks;
  v.field[13] = k_rows;
  v.field[14] = std::bit_cast<std::int64_t>(p.softcap);
  std::uint64_t sink_hash = 0xcbf29ce484222325ull;
  for (const float z : p.sinks) sink_hash = ring_hash(sink_hash, &z, sizeof z);
  v.field[15] = static_cast<std::int64_t>(sink_hash ^ p.sinks.size());
  v.field[16] = p.chunk_size.value_or(0);
  v.field[17] = p.bf16_qk;
}

/// The names of the facts `ring_shared_facts` writes, for `ring_exchange`.
inline constexpr ring_fact ring_shared_fact_names[] = {
    {0, "the element type of q, k and v (1 float, 2 double, 3 bfloat16, 4 half)"},
    {1, "attention_params.heads"},
    {2, "kv_heads"},
    {3, "head_dim (q columns / heads)"},
    {4, "the columns of k"},
    {5, "the columns of v"},
    {6, "attention_params.causal"},
    {7, "attention_params.window_left"},
    {8, "attention_params.window_right"},
    {9, "the logit scale (bits of the double)"},
    {10, "the encoder's family"},
    {11, "the encoder (a digest of its parameters)"},
    {12, "ring_options.query_blocks"},
    {14, "attention_params.softcap (bits of the double)"},
    {15, "attention_params.sinks (a digest of the values)"},
    {16, "attention_params.chunk_size (0 for none)"},
    {17, "attention_params.bf16_qk"}};

/// The message of the backward: a `ring_message` of keys, values and positions (keys not
/// rotated: the backward rotates copies), followed by the gradients dK and dV that travel with
/// them, each part 64-byte aligned.
template <class S>
struct ring_grad_message {
  static std::size_t bytes(index_t rows, index_t k_cols, index_t v_cols) {
    const auto r = static_cast<std::size_t>(rows);
    return ring_message<S>::bytes(rows, k_cols, v_cols) + ring_round(r * static_cast<std::size_t>(k_cols) * sizeof(S)) +
           ring_round(r * static_cast<std::size_t>(v_cols) * sizeof(S));
  }
  explicit ring_grad_message(std::byte* buf) : m(buf) {}
  ring_message<S> m;
  std::size_t bytes() const { return bytes(m.rows, m.k_cols, m.v_cols); }
  S* dk() const { return reinterpret_cast<S*>(m.base + ring_message<S>::bytes(m.rows, m.k_cols, m.v_cols)); }
  S* dv() const {
    return reinterpret_cast<S*>(reinterpret_cast<std::byte*>(dk()) +
                                ring_round(static_cast<std::size_t>(m.rows * m.k_cols) * sizeof(S)));
  }
  strided_view<S> dk_view() const { return {dk(), m.rows, m.k_cols, m.k_cols}; }
  strided_view<S> dv_view() const { return {dv(), m.rows, m.v_cols, m.v_cols}; }
  /// Packs keys, values and positions, and zero gradients (padding zeroed too).
  template <class SK>
  static ring_grad_message pack(std::byte* buf, strided_view<SK> k, strided_view<SK> v, positions kpos) {
    ring_message<S>::pack(buf, k, v, kpos, no_position<compute_t<S>>{});
    ring_grad_message g(buf);
    const std::size_t at = ring_message<S>::bytes(g.m.rows, g.m.k_cols, g.m.v_cols);
    std::memset(buf + at, 0, g.bytes() - at);
    return g;
  }
};

/// The MPI type the ring's messages travel as: 64-byte blocks (a message is a whole number of
/// them), freed at the end of its scope.
struct ring_block_type {
  MPI_Datatype type;
  ring_block_type() {
    MPI_Type_contiguous(static_cast<int>(ring_align), MPI_BYTE, &type);
    MPI_Type_commit(&type);
  }
  ~ring_block_type() { MPI_Type_free(&type); }
  ring_block_type(const ring_block_type&) = delete;
  ring_block_type& operator=(const ring_block_type&) = delete;
  /// The blocks of a message of `bytes` bytes (a count past INT_MAX blocks is refused before).
  static int count(std::size_t bytes) { return static_cast<int>(bytes / ring_align); }
};

/// Sums `n` values of `x` over the ring's ranks into `x` (MPI_Allreduce in place).
template <class T>
void ring_allreduce_sum(MPI_Comm comm, T* x, std::size_t n) {
  if (n == 0) return;
  MPI_Allreduce(MPI_IN_PLACE, x, static_cast<int>(n), std::same_as<T, float> ? MPI_FLOAT : MPI_DOUBLE, MPI_SUM, comm);
}

}  // namespace detail

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
  /// Collective: every rank must pass the same `n` and `layout`; if they differ (or one rank's
  /// values are invalid) every rank throws, so that shards of different sequences never meet.
  std::vector<position> shard_positions(index_t n, ring_layout layout) const {
    detail::ring_verdict mine;
    std::exception_ptr local;
    std::vector<position> out;
    try {
      out = ring_shard_positions(n, size_, rank_, layout);
    } catch (...) {
      local = std::current_exception();
      mine.fail(detail::ring_what());
    }
    mine.field[0] = n;
    mine.field[1] = static_cast<std::int64_t>(layout);
    detail::ring_exchange(comm_, size_, rank_, mine, local, "mpi_ring::shard_positions",
                          {{0, "the sequence length n"}, {1, "the layout"}});
    return out;
  }

  /// Ring attention of this rank's query shard against every rank's key/value shard; collective
  /// over the ring's communicator. Every rank passes its own shards with their global positions:
  ///
  /// \param q, out  `[n_q, heads * d]` row-major, any row stride (`n_q` may be 0).
  /// \param k, v    `[n_kv, kv_heads * d]` (`n_kv` may be 0); the element type, head_dim, heads,
  ///                kv_heads, mask, scale, encoder and options are the same on every rank
  ///                (checked); shards may differ in size.
  /// \param qpos, kpos  global positions, one per row.
  /// \param enc, p  as for `attention`: the encoder is applied by the ring (a rotation once, with
  ///                the global positions; `no_position` for inputs rotated already).
  /// \param lse     optional `[n_q, heads]` float or double: the log-sum-exp over all keys.
  /// Returns this rank's timings. Throws on every rank, before any data moves, when some rank's
  /// arguments are invalid or the ranks disagree (see the file comment). Allocates two message
  /// buffers (the largest shard's keys, values and positions each), a copy of the queries, the
  /// output accumulator and one partial result.
  template <matrix_argument Q, matrix_argument K, matrix_argument V, matrix_argument O, positional_encoding E,
            class L = std::nullptr_t>
  ring_stats attention(Q&& q, K&& k, V&& v, O&& out, positions qpos, positions kpos, const E& enc,
                       const attention_params& p, const ring_options& o = {}, L&& lse = nullptr) const {
    static_assert(E::family != encoding_family::additive_input,
                  "posenc::mpi_ring::attention: additive-input encoders (sinusoidal) act on token embeddings "
                  "before the Q/K/V projections; pass posenc::no_position here");
    const double start = MPI_Wtime();
    const auto qv = view_of(std::forward<Q>(q));
    const auto kv = view_of(std::forward<K>(k));
    const auto vv = view_of(std::forward<V>(v));
    const auto ov = view_of(std::forward<O>(out));
    using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
    using msg = detail::ring_message<S>;
    constexpr const char* call = "mpi_ring::attention";

    // 1. Every rank checks its own arguments; the verdicts and the shared facts are exchanged.
    detail::ring_verdict mine;
    std::exception_ptr local;
    try {
      detail::require(o.query_blocks >= 1, "ring_options.query_blocks", o.query_blocks, "must be positive");
      index_t head_dim = 0;
      detail::ring_check_device(enc, p, qv.rows, qv.cols, qpos.size(), ov.rows, ov.cols, kv.rows, kv.cols, vv.rows,
                                vv.cols, kpos.size(), head_dim);
      if constexpr (!std::is_null_pointer_v<std::remove_cvref_t<L>>) {
        const auto lv = view_of(lse);
        POSENC_ASSERT(lv.rows == qv.rows && lv.cols == p.heads, "mpi_ring::attention: lse is [", lv.rows, ", ",
                      lv.cols, "] but must be [n_q, heads] = [", qv.rows, ", ", p.heads, "]");
      }
      detail::ring_shared_facts<S>(mine, enc, p, head_dim, kv.rows, kv.cols, vv.cols, o.query_blocks);
    } catch (...) {
      local = std::current_exception();
      mine.fail(detail::ring_what());
    }
    const std::vector<detail::ring_verdict> all =
        detail::ring_exchange(comm_, size_, rank_, mine, local, call, detail::ring_shared_fact_names);
    std::int64_t widest = 0;
    for (const detail::ring_verdict& r : all) widest = std::max(widest, r.field[13]);

    // 2. Every rank allocates its buffers and packs its message; a failure is exchanged too.
    ring_stats st;
    st.steps = size_;
    std::vector<detail::ring_buffer> buf;
    std::optional<detail::ring_worker<S, E>> worker;
    try {
      // Each row travels as its position and its keys and values; the count of 64-byte blocks
      // must fit MPI's int.
      const auto row_bytes = static_cast<std::int64_t>(sizeof(position)) +
                             static_cast<std::int64_t>(kv.cols + vv.cols) * static_cast<std::int64_t>(sizeof(S));
      if (widest > (std::int64_t{std::numeric_limits<int>::max()} - 8) * 64 / row_bytes)
        detail::invalid("mpi_ring::attention key rows", widest,
                        "a message of the largest shard would exceed 2^31 blocks of 64 bytes");
      st.message_bytes = msg::bytes(widest, kv.cols, vv.cols);
      buf.emplace_back(st.message_bytes);
      if (size_ > 1) buf.emplace_back(st.message_bytes);  // a ring of one never receives
      msg::pack(buf[0].get(), kv, vv, kpos, enc);
      worker.emplace(qv, qpos, enc, p, o);
    } catch (...) {
      local = std::current_exception();
      mine.fail(detail::ring_what());
    }
    detail::ring_exchange(comm_, size_, rank_, mine, local, call, {});

    // 3. The ring. A failure while computing stops the computing, never the transfers.
    const detail::ring_block_type blocks;  // a count past INT_MAX blocks (128 GiB) is refused above
    const MPI_Datatype block = blocks.type;
    const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
    for (int s = 0; s < size_; ++s) {
      const msg cur(buf[static_cast<std::size_t>(s % 2)].get());
      MPI_Request req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
      if (s + 1 < size_) {
        MPI_Irecv(buf[static_cast<std::size_t>((s + 1) % 2)].get(), blocks.count(st.message_bytes), block, prev, s, comm_,
                  &req[0]);
        MPI_Isend(cur.base, blocks.count(cur.bytes()), block, next, s, comm_, &req[1]);
      }
      const double t0 = MPI_Wtime();
      const std::clock_t c0 = std::clock();
      if (!local) {
        try {
          worker->attend(cur, [&req] {
            int done = 0;
            MPI_Testall(2, req, &done, MPI_STATUSES_IGNORE);
          });
        } catch (...) {
          local = std::current_exception();
          mine.fail(detail::ring_what());
        }
      }
      st.compute_cpu_s += static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
      const double t1 = MPI_Wtime();
      int done = 0;
      MPI_Testall(2, req, &done, MPI_STATUSES_IGNORE);
      if (done && s + 1 < size_) ++st.transfers_hidden;
      MPI_Waitall(2, req, MPI_STATUSES_IGNORE);
      st.compute_s += t1 - t0;
      st.wait_s += MPI_Wtime() - t1;
    }
    detail::ring_exchange(comm_, size_, rank_, mine, local, call, {});
    worker->finish(ov, std::forward<L>(lse));
    st.bytes = st.message_bytes * buf.size() + worker->bytes();
    st.total_s = MPI_Wtime() - start;
    return st;
  }

  /// The gradients of ring attention (the backward of `attention`; docs/ring_attention.md): this
  /// rank's dq, dk and dv (overwritten), collective over the ring. The keys and values travel the
  /// ring as in the forward, with their gradients dK and dV, to which each rank adds its queries'
  /// share; dQ stays here; a last hop brings dK and dV home. Every rank passes its shards:
  ///
  /// \param q, k, v   the forward's inputs (not rotated: a rotation encoder rotates copies here).
  /// \param out, lse  the forward's output `[n_q, heads * d]` and log-sum-exp `[n_q, heads]` over all
  ///                  keys (`attention(..., lse)` writes it).
  /// \param dout      the gradient of the loss with respect to `out`.
  /// \param dq, dk, dv  written: shaped like q, k and v.
  /// \param grads     optional parameter gradients: the sum over every rank's queries is added to
  ///                  them on every rank (an `MPI_Allreduce`), as the simulator adds every device's.
  /// Float or double storage. dq, dk and dv equal `ring_attention_backward_simulate` with the same
  /// shards bit for bit; the parameter gradients within float rounding (the ranks' sums are
  /// reduced in MPI's order). Throws on every rank, before any data moves, when some rank's
  /// arguments are invalid or the ranks disagree (as `attention`). Allocates two messages (the
  /// largest shard's keys, values, positions, dK and dV each), dQ and the backward's workspace.
  template <matrix_argument Q, matrix_argument K, matrix_argument V, matrix_argument O, matrix_argument L,
            matrix_argument DO, matrix_argument DQ, matrix_argument DK, matrix_argument DV, positional_encoding E>
  ring_stats attention_backward(Q&& q, K&& k, V&& v, O&& out, L&& lse, DO&& dout, DQ&& dq, DK&& dk, DV&& dv,
                                positions qpos, positions kpos, const E& enc, const attention_params& p,
                                const parameter_gradients<E>& grads = {}) const {
    static_assert(E::family != encoding_family::additive_input,
                  "posenc::mpi_ring::attention_backward: additive-input encoders (sinusoidal) act on token "
                  "embeddings before the projections; pass posenc::no_position here");
    const double start = MPI_Wtime();
    const ring_backward_device<std::remove_const_t<std::remove_pointer_t<decltype(view_of(q).data)>>> dev{
        view_of(std::as_const(q)), view_of(std::as_const(k)),    view_of(std::as_const(v)),
        view_of(std::as_const(out)), view_of(std::as_const(lse)), view_of(std::as_const(dout)),
        qpos,                       kpos,                        view_of(dq),
        view_of(dk),                view_of(dv)};
    using S = std::remove_const_t<std::remove_pointer_t<decltype(dev.q.data)>>;
    static_assert(std::same_as<S, float> || std::same_as<S, double>,
                  "posenc::mpi_ring::attention_backward: the backward computes in float or double");
    using msg = detail::ring_grad_message<S>;
    constexpr const char* call = "mpi_ring::attention_backward";

    // 1. Every rank checks its own arguments; the verdicts and the shared facts are exchanged.
    detail::ring_verdict mine;
    std::exception_ptr local;
    try {
      index_t head_dim = 0;
      detail::ring_check_device(enc, p, dev.q.rows, dev.q.cols, qpos.size(), dev.out.rows, dev.out.cols, dev.k.rows,
                                dev.k.cols, dev.v.rows, dev.v.cols, kpos.size(), head_dim);
      detail::ring_check_backward_device(dev, p.heads, rank_);
      detail::refuse_bf16_qk(p, call);
      detail::ring_shared_facts<S>(mine, enc, p, head_dim, dev.k.rows, dev.k.cols, dev.v.cols, 0);
    } catch (...) {
      local = std::current_exception();
      mine.fail(detail::ring_what());
    }
    const std::vector<detail::ring_verdict> all =
        detail::ring_exchange(comm_, size_, rank_, mine, local, call, detail::ring_shared_fact_names);
    std::int64_t widest = 0;
    for (const detail::ring_verdict& r : all) widest = std::max(widest, r.field[13]);

    // 2. Buffers, this rank's message, the worker and its own parameter gradients.
    ring_stats st;
    st.steps = size_;
    std::vector<detail::ring_buffer> buf;
    std::optional<detail::ring_backward_worker<S, E>> worker;
    parameter_gradients<E> mine_grads = grads;
    std::vector<float> sinks;
    std::vector<double> slopes;
    row_matrix<S> table, key_table, value_table;
    try {
      const auto row_bytes = static_cast<std::int64_t>(sizeof(position)) +
                             2 * static_cast<std::int64_t>(dev.k.cols + dev.v.cols) * static_cast<std::int64_t>(sizeof(S));
      if (widest > (std::int64_t{std::numeric_limits<int>::max()} - 8) * 64 / row_bytes)
        detail::invalid("mpi_ring::attention_backward key rows", widest,
                        "a message of the largest shard would exceed 2^31 blocks of 64 bytes");
      st.message_bytes = msg::bytes(widest, dev.k.cols, dev.v.cols);
      buf.emplace_back(st.message_bytes);
      if (size_ > 1) buf.emplace_back(st.message_bytes);
      msg::pack(buf[0].get(), dev.k, dev.v, kpos);
      worker.emplace(dev, enc, p);
      // This rank's shares start from zero; their sum over the ranks is added to `grads` at the end.
      sinks.assign(grads.sinks.size(), 0.0f);
      mine_grads.sinks = sinks;
      if constexpr (detail::is_alibi<E>::value) {
        slopes.assign(grads.slopes.size(), 0.0);
        mine_grads.slopes = slopes;
      } else if constexpr (detail::is_t5<E>::value) {
        table = row_matrix<S>::Zero(grads.table.rows, grads.table.cols);
        mine_grads.table = view_of(table);
      } else if constexpr (relative_key_value<E>) {
        key_table = row_matrix<S>::Zero(grads.key_table.rows, grads.key_table.cols);
        value_table = row_matrix<S>::Zero(grads.value_table.rows, grads.value_table.cols);
        mine_grads.key_table = view_of(key_table);
        mine_grads.value_table = view_of(value_table);
      }
    } catch (...) {
      local = std::current_exception();
      mine.fail(detail::ring_what());
    }
    detail::ring_exchange(comm_, size_, rank_, mine, local, call, {});

    // 3. The ring: compute on the message held, then pass it on (it carries the gradients just
    // added, so it moves after the compute). P steps and P hops: the last hop brings each rank its
    // own keys' dK and dV. A failure while computing stops the computing, never the transfers.
    const detail::ring_block_type blocks;
    const MPI_Datatype block = blocks.type;
    const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
    for (int s = 0; s < size_; ++s) {
      const msg cur(buf[static_cast<std::size_t>(s % 2)].get());
      const double t0 = MPI_Wtime();
      const std::clock_t c0 = std::clock();
      if (!local) {
        try {
          worker->step(cur.m.keys(), cur.m.values(), cur.m.kpos(), cur.dk_view(), cur.dv_view(), mine_grads);
        } catch (...) {
          local = std::current_exception();
          mine.fail(detail::ring_what());
        }
      }
      st.compute_cpu_s += static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
      const double t1 = MPI_Wtime();
      if (size_ > 1)
        MPI_Sendrecv(cur.m.base, blocks.count(cur.bytes()), block, next, s, buf[static_cast<std::size_t>((s + 1) % 2)].get(),
                     blocks.count(st.message_bytes), block, prev, s, comm_, MPI_STATUS_IGNORE);
      st.compute_s += t1 - t0;
      st.wait_s += MPI_Wtime() - t1;
    }
    detail::ring_exchange(comm_, size_, rank_, mine, local, call, {});

    // 4. dQ, this rank's keys' dK and dV, and the parameter gradients summed over the ranks.
    worker->finish();
    const msg home(buf[static_cast<std::size_t>(size_ > 1 ? size_ % 2 : 0)].get());
    for (index_t j = 0; j < dev.k.rows; ++j) {
      std::copy(home.dk() + j * dev.k.cols, home.dk() + (j + 1) * dev.k.cols, dev.dk.row(j));
      std::copy(home.dv() + j * dev.v.cols, home.dv() + (j + 1) * dev.v.cols, dev.dv.row(j));
    }
    detail::ring_allreduce_sum(comm_, sinks.data(), sinks.size());
    for (std::size_t h = 0; h < sinks.size(); ++h) grads.sinks[h] += sinks[h];
    auto add_matrix = [&](row_matrix<S>& part, strided_view<S> to) {
      detail::ring_allreduce_sum(comm_, part.data(), static_cast<std::size_t>(part.size()));
      for (index_t r = 0; r < to.rows; ++r)
        for (index_t c = 0; c < to.cols; ++c) to(r, c) += part(r, c);
    };
    if constexpr (detail::is_alibi<E>::value) {
      detail::ring_allreduce_sum(comm_, slopes.data(), slopes.size());
      for (std::size_t h = 0; h < slopes.size(); ++h) grads.slopes[h] += slopes[h];
    } else if constexpr (detail::is_t5<E>::value) {
      add_matrix(table, grads.table);
    } else if constexpr (relative_key_value<E>) {
      add_matrix(key_table, grads.key_table);
      add_matrix(value_table, grads.value_table);
    }
    st.bytes = st.message_bytes * buf.size();
    st.total_s = MPI_Wtime() - start;
    return st;
  }

  /// Gathers every rank's output shard into `full` on rank `root`: row `i` of a rank's `shard`
  /// (`[pos.size(), cols]`) goes to row `pos[i]` of `full` (`[n, cols]`, read on `root` only;
  /// other ranks may pass an empty matrix). Collective. Every rank checks, before any data moves,
  /// that its shard has one position per row, the columns of `full` and only positions in
  /// `[0, n)`; otherwise every rank throws (as `attention`). Allocates a copy of the shards on
  /// `root`.
  template <matrix_argument M, matrix_argument F>
  void gather(M&& shard, positions pos, F&& full, int root = 0) const {
    const auto sv = view_of(std::forward<M>(shard));
    const auto fv = view_of(std::forward<F>(full));
    using S = std::remove_const_t<std::remove_pointer_t<decltype(sv.data)>>;
    constexpr const char* call = "mpi_ring::gather";
    detail::require(root >= 0 && root < size_, "mpi_ring::gather root", root,
                    "must be a rank of the ring (size " + std::to_string(size_) + ")");
    const bool here = rank_ == root;
    detail::ring_verdict mine;
    std::exception_ptr local;
    try {
      POSENC_ASSERT(sv.rows == pos.size(), "mpi_ring::gather: ", pos.size(), " positions for ", sv.rows,
                    " shard rows");
      detail::require(sv.rows <= std::numeric_limits<int>::max(), "mpi_ring::gather shard rows", sv.rows,
                      "must fit in an int (MPI counts)");
      detail::require(static_cast<std::int64_t>(sv.cols) * static_cast<std::int64_t>(sizeof(S)) <=
                          std::numeric_limits<int>::max(),
                      "mpi_ring::gather shard columns", sv.cols, "a row must be below 2^31 bytes (MPI counts)");
    } catch (...) {
      local = std::current_exception();
      mine.fail(detail::ring_what());
    }
    mine.field[0] = static_cast<std::int64_t>(sizeof(S));
    mine.field[1] = sv.cols;
    mine.field[2] = here ? fv.rows : 0;
    mine.field[3] = here ? fv.cols : 0;
    mine.field[4] = sv.rows;
    const std::vector<detail::ring_verdict> all =
        detail::ring_exchange(comm_, size_, rank_, mine, local, call, {{0, "the element size"}, {1, "the columns"}});
    std::int64_t rows_in_all = 0;
    for (const detail::ring_verdict& r : all) rows_in_all += r.field[4];
    detail::require(rows_in_all <= std::numeric_limits<int>::max(), "mpi_ring::gather rows of all shards", rows_in_all,
                    "must fit in an int (MPI displacements)");
    // Every position must be a row of the root's `full`, whose columns must match.
    const std::int64_t n = all[static_cast<std::size_t>(root)].field[2];
    try {
      POSENC_ASSERT(all[static_cast<std::size_t>(root)].field[3] == sv.cols, "mpi_ring::gather: full has ",
                    all[static_cast<std::size_t>(root)].field[3], " columns on the root but the shards ", sv.cols);
      for (index_t i = 0; i < pos.size(); ++i)
        POSENC_ASSERT(pos[i] >= 0 && pos[i] < n, "mpi_ring::gather: position ", pos[i], " (entry ", i,
                      ") is not a row of full, which has ", n, " rows on the root");
    } catch (...) {
      local = std::current_exception();
      mine.fail(detail::ring_what());
    }
    detail::ring_exchange(comm_, size_, rank_, mine, local, call, {});

    const int rows = static_cast<int>(sv.rows);
    std::vector<int> counts(here ? static_cast<std::size_t>(size_) : 0), offsets(counts.size());
    MPI_Gather(&rows, 1, MPI_INT, counts.data(), 1, MPI_INT, root, comm_);
    std::int64_t total = 0;
    for (std::size_t r = 0; r < counts.size(); ++r) offsets[r] = static_cast<int>(total), total += counts[r];

    std::vector<position> my_pos(static_cast<std::size_t>(sv.rows)), all_pos(static_cast<std::size_t>(total));
    for (index_t i = 0; i < sv.rows; ++i) my_pos[static_cast<std::size_t>(i)] = pos[i];
    MPI_Gatherv(my_pos.data(), rows, MPI_INT64_T, all_pos.data(), counts.data(), offsets.data(), MPI_INT64_T, root,
                comm_);

    row_matrix<S> mine_rows(sv.rows, sv.cols), all_rows(total, sv.cols);
    for (index_t i = 0; i < sv.rows; ++i) std::copy(sv.row(i), sv.row(i) + sv.cols, mine_rows.data() + i * sv.cols);
    MPI_Datatype row;
    MPI_Type_contiguous(static_cast<int>(static_cast<std::size_t>(sv.cols) * sizeof(S)), MPI_BYTE, &row);
    MPI_Type_commit(&row);
    MPI_Gatherv(mine_rows.data(), rows, row, all_rows.data(), counts.data(), offsets.data(), row, root, comm_);
    MPI_Type_free(&row);
    if (here) ring_put_rows(all_rows, positions(all_pos), fv);
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace posenc
