// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file distributed/ring.hpp
/// Ring attention (docs/ring_attention.md): the schedule both drivers share, the sequence layouts, helpers
/// to shard a sequence and gather the result, and an in-process driver (a simulator of P devices,
/// for tests and for users without MPI). The MPI driver is in `distributed/mpi_ring.hpp`.
///
/// Each of P devices holds a query shard and a key/value shard with their global positions.
/// Keys, values and positions travel around the ring, packed into one message: at step `s`
/// device `r` holds the message that device `(r - s) mod P` packed, attends its queries to it
/// with the blockwise kernel and merges the partial result into its accumulator by log-sum-exp
/// (`merge_partial`); after P steps every query has seen every key. Masks and biases come from the
/// global positions inside the kernel; a rotation (RoPE) is applied once, with global positions,
/// to the local queries and to the keys as they are packed, and the kernel then runs with
/// `no_position`. Which query rows may see a message's keys is decided by the masking rule of
/// attention/mask.hpp, in exact int64 arithmetic, like the kernel's own tile skipping.
///
/// A device's work on one message is fixed by the message and the device's queries alone
/// (`detail::ring_worker::attend`): the queries are cut into blocks (at breaks in their
/// positions, then into about `ring_options::query_blocks` parts), the keys into runs of
/// consecutive positions, and each (query block, key run) pair is one attention call, on the rows
/// of the block that the mask lets see some key of the run, followed by one merge, in a fixed
/// order. The simulator and the MPI driver run that same function on byte-identical messages, so
/// they agree bit for bit; the MPI driver polls its transfers between query blocks, which is how
/// the next message moves while this one is computed.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/mask.hpp"
#include "posenc/attention/merge.hpp"
#include "posenc/attention/params.hpp"
#include "posenc/attention/plan.hpp"
#include "posenc/attention/workspace.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// How a sequence of `n` tokens (positions `0 .. n-1`) is split over the P devices of a ring.
enum class ring_layout {
  contiguous,  ///< device r holds `[r n / P, (r + 1) n / P)`: balanced for full attention
  zigzag,      ///< 2P chunks `[c n / 2P, (c + 1) n / 2P)`; device r holds chunks r and 2P-1-r: balanced for causal
};

/// Runtime knobs of ring attention. Every field has a default.
struct ring_options {
  /// Each device's queries are cut into about this many blocks (besides the cuts at breaks in
  /// their positions, and no smaller than 64 rows); each step attends block by block, and the MPI
  /// driver advances its transfers between blocks, so more blocks hide more of the transfer (Open
  /// MPI over shared memory moves a few fragments per call). Every query still meets each key
  /// once per step, so blocks cost only the kernel's per-call overhead; a block narrower than the
  /// kernel's query tile leaves a multi-threaded rank fewer work items. Part of the schedule: the
  /// simulator and the MPI driver must use the same value to agree bit for bit. >= 1.
  index_t query_blocks = 16;
};

/// A run of consecutive positions `[start, start + count)`.
struct position_run {
  position start = 0;
  index_t count = 0;
};

/// The positions device `rank` of `ranks` holds in `layout` for a sequence of `n` tokens at
/// positions `0 .. n-1`, as runs in increasing order: one run (contiguous), two (zigzag), none
/// when the shard is empty. Exact for every `n` up to INT64_MAX and every rank count (the chunk
/// boundaries `c n / parts` are computed without overflow). Throws `std::invalid_argument` for
/// `n < 0`, `ranks < 1`, `rank` outside `[0, ranks)` or an unknown layout. Allocates the list.
inline std::vector<position_run> ring_shard_runs(index_t n, int ranks, int rank, ring_layout layout) {
  detail::require(n >= 0, "ring n", n, "must be non-negative");
  detail::require(ranks >= 1, "ring ranks", ranks, "must be positive");
  detail::require(rank >= 0 && rank < ranks, "ring rank", rank,
                  "must be in [0, ranks) (ranks = " + detail::to_text(ranks) + ")");
  detail::require(layout == ring_layout::contiguous || layout == ring_layout::zigzag, "ring_layout",
                  static_cast<int>(layout), "unknown layout");
  // floor(part * n / parts) = part * (n / parts) + part * (n % parts) / parts: part * (n / parts)
  // <= n, and part, n % parts < parts <= 2^32, so their product fits in 64 unsigned bits.
  auto boundary = [n](index_t part, index_t parts) {
    const auto u = static_cast<std::uint64_t>(part) * static_cast<std::uint64_t>(n % parts) /
                   static_cast<std::uint64_t>(parts);
    return part * (n / parts) + static_cast<index_t>(u);
  };
  std::vector<position_run> out;
  auto append = [&](index_t part, index_t parts) {
    const index_t lo = boundary(part, parts), hi = boundary(part + 1, parts);
    if (hi > lo) out.push_back({static_cast<position>(lo), hi - lo});
  };
  if (layout == ring_layout::contiguous) {
    append(rank, ranks);
  } else {
    append(rank, 2 * index_t{ranks});
    append(2 * index_t{ranks} - 1 - rank, 2 * index_t{ranks});
  }
  return out;
}

/// The global positions device `rank` of `ranks` holds in `layout` for a sequence of `n` tokens
/// at positions `0 .. n-1`, in increasing order (the runs of `ring_shard_runs`, listed). Shards
/// differ in size by at most one token (contiguous) or two (zigzag); a shard is empty when `n` is
/// small. Throws as `ring_shard_runs`, and `std::length_error` or `std::bad_alloc` when the list
/// does not fit in memory. Allocates the returned list.
inline std::vector<position> ring_shard_positions(index_t n, int ranks, int rank, ring_layout layout) {
  const std::vector<position_run> runs = ring_shard_runs(n, ranks, rank, layout);
  index_t total = 0;
  for (const position_run& r : runs) total += r.count;
  std::vector<position> out;
  out.reserve(static_cast<std::size_t>(total));
  for (const position_run& r : runs)
    for (index_t i = 0; i < r.count; ++i) out.push_back(r.start + static_cast<position>(i));
  return out;
}

/// Copies the rows of `full` (`[n, cols]`, row `i` the token at position `i`) at `pos` into a new
/// `[pos.size(), cols]` matrix: a device's shard of a sequence. Precondition (`POSENC_ASSERT`):
/// every position is a row of `full`. Allocates the result.
template <matrix_argument M>
auto ring_take_rows(M&& full, positions pos) {
  const auto f = view_of(std::forward<M>(full));
  using S = std::remove_const_t<std::remove_pointer_t<decltype(f.data)>>;
  row_matrix<S> shard(pos.size(), f.cols);
  for (index_t i = 0; i < pos.size(); ++i) {
    POSENC_ASSERT(pos[i] >= 0 && pos[i] < f.rows, "ring_take_rows: position ", pos[i], " (entry ", i,
                  ") is not a row of the ", f.rows, "-row sequence");
    std::copy(f.row(pos[i]), f.row(pos[i]) + f.cols, shard.data() + i * f.cols);
  }
  return shard;
}

/// Writes row `i` of `shard` (`[pos.size(), cols]`) to row `pos[i]` of `full` (`[n, cols]`): the
/// inverse of `ring_take_rows`, for gathering a device's output. Does not allocate.
template <matrix_argument M, matrix_argument F>
void ring_put_rows(M&& shard, positions pos, F&& full) {
  const auto s = view_of(std::forward<M>(shard));
  const auto f = view_of(std::forward<F>(full));
  POSENC_ASSERT(s.rows == pos.size(), "ring_put_rows: ", pos.size(), " positions for ", s.rows, " shard rows");
  POSENC_ASSERT(s.cols == f.cols, "ring_put_rows: the shard has ", s.cols, " columns but the sequence ", f.cols);
  for (index_t i = 0; i < s.rows; ++i)
    POSENC_ASSERT(pos[i] >= 0 && pos[i] < f.rows, "ring_put_rows: position ", pos[i], " (entry ", i,
                  ") is not a row of the ", f.rows, "-row sequence");
  for (index_t i = 0; i < s.rows; ++i) {
    std::copy(s.row(i), s.row(i) + s.cols, f.row(pos[i]));
  }
}

namespace detail {

/// Rows `[row, row + count)` of a shard.
struct ring_piece {
  index_t row, count;
};

/// A run of positions longer than this many breaks is not cut at its breaks: positions with no
/// structure (a shuffled or packed list) would otherwise give one attention call per token.
inline constexpr index_t ring_max_runs = 16;

/// The shard's rows cut where positions stop increasing by one (at most `ring_max_runs` runs,
/// otherwise one run). A zigzag shard has two runs, so a causal mask skips whole calls.
inline std::vector<ring_piece> ring_runs(positions pos) {
  std::vector<ring_piece> runs;
  index_t start = 0;
  for (index_t i = 1; i <= pos.size(); ++i) {
    if (i == pos.size() || pos[i] != pos[i - 1] + 1) {
      runs.push_back({start, i - start});
      start = i;
      if (static_cast<index_t>(runs.size()) > ring_max_runs) return {{0, pos.size()}};
    }
  }
  return runs;
}

/// Whether positions increase by one from row to row.
inline bool ring_runs_consecutive(positions pos) {
  for (index_t i = 1; i < pos.size(); ++i)
    if (pos[i] != pos[i - 1] + 1) return false;
  return true;
}

/// Smallest query block: narrower blocks would pay the kernel's per-call cost for little work.
inline constexpr index_t ring_min_block = 64;

/// The query blocks of a device: its runs, each cut into blocks of
/// `max(ceil(rows / blocks), ring_min_block)` rows (the last block of a run may be shorter).
inline std::vector<ring_piece> ring_query_blocks(positions qpos, index_t blocks) {
  const index_t rows = qpos.size();
  const index_t per = std::max(ring_min_block, (rows + blocks - 1) / blocks);
  std::vector<ring_piece> out;
  for (const ring_piece r : ring_runs(qpos))
    for (index_t j = 0; j < r.count; j += per) out.push_back({r.row + j, std::min(per, r.count - j)});
  return out;
}

/// The rows of a query run (`qpos`) that may see some key in `k`, relative to the run: a
/// contiguous range when the run's positions are consecutive (the rows a causal mask or a window
/// leaves out of reach are then not computed at all), else the whole run or nothing. Decided by
/// `mask_rule::queries_for` in exact integer arithmetic.
inline ring_piece ring_visible_rows(const mask_rule& mask, positions qpos, bool consecutive, position_span k) {
  const index_t n = qpos.size();
  if (consecutive) {
    const position_span seeing = mask.queries_for(k.lo, k.hi);
    const index_t a = count_below(seeing.lo, qpos[0], n);
    const index_t b = count_upto(seeing.hi, qpos[0], n);
    return b > a ? ring_piece{a, b - a} : ring_piece{0, 0};
  }
  return mask.any_visible(bounds_of(qpos), k) ? ring_piece{0, n} : ring_piece{0, 0};
}

inline constexpr std::size_t ring_align = 64;
inline constexpr std::size_t ring_round(std::size_t n) { return (n + ring_align - 1) / ring_align * ring_align; }

/// The one message a device sends per step: its keys, values and their global positions.
///
///     [int64 rows, int64 k_cols, int64 v_cols, pad to 64]
///     [rows x int64 positions, pad to 64]
///     [rows x k_cols keys of S, pad to 64] [rows x v_cols values of S, pad to 64]
///
/// Every part starts 64-byte aligned and the whole message is a multiple of 64 bytes, so it
/// travels as a count of 64-byte blocks.
template <class S>
struct ring_message {
  static std::size_t bytes(index_t rows, index_t k_cols, index_t v_cols) {
    const auto r = static_cast<std::size_t>(rows);
    return ring_align + ring_round(r * sizeof(position)) +
           ring_round(r * static_cast<std::size_t>(k_cols) * sizeof(S)) +
           ring_round(r * static_cast<std::size_t>(v_cols) * sizeof(S));
  }

  /// A view of a message in `buf` (64-byte aligned).
  explicit ring_message(std::byte* buf) : base(buf) {
    std::int64_t h[3];
    std::memcpy(h, buf, sizeof h);
    rows = h[0], k_cols = h[1], v_cols = h[2];
  }

  std::byte* base;
  index_t rows = 0, k_cols = 0, v_cols = 0;

  std::size_t bytes() const { return bytes(rows, k_cols, v_cols); }
  position* pos() const { return reinterpret_cast<position*>(base + ring_align); }
  S* k() const {
    return reinterpret_cast<S*>(base + ring_align + ring_round(static_cast<std::size_t>(rows) * sizeof(position)));
  }
  S* v() const {
    return reinterpret_cast<S*>(reinterpret_cast<std::byte*>(k()) +
                                ring_round(static_cast<std::size_t>(rows * k_cols) * sizeof(S)));
  }
  positions kpos() const { return std::span<const position>(pos(), static_cast<std::size_t>(rows)); }
  strided_view<const S> keys() const { return {k(), rows, k_cols, k_cols}; }
  strided_view<const S> values() const { return {v(), rows, v_cols, v_cols}; }

  /// Packs `k`, `v` and `kpos` into `buf` (at least `bytes(rows, ...)` bytes, 64-byte aligned)
  /// and rotates the packed keys by their positions when `enc` is a rotation.
  template <class SK, class SV, class E>
  static ring_message pack(std::byte* buf, strided_view<SK> k, strided_view<SV> v, positions kpos, const E& enc) {
    POSENC_ASSERT(k.rows == kpos.size() && v.rows == k.rows, "ring attention: k has ", k.rows, " rows, v ", v.rows,
                  " and kpos ", kpos.size(), " positions");
    const std::int64_t h[3] = {k.rows, k.cols, v.cols};
    std::memset(buf, 0, ring_align);
    std::memcpy(buf, h, sizeof h);
    ring_message m(buf);
    // The padding travels too: zero it so a message's bytes depend on its contents alone.
    std::memset(buf + ring_align, 0, m.bytes() - ring_align);
    for (index_t i = 0; i < k.rows; ++i) {
      m.pos()[i] = kpos[i];
      std::copy(k.row(i), k.row(i) + k.cols, m.k() + i * k.cols);
      std::copy(v.row(i), v.row(i) + v.cols, m.v() + i * v.cols);
    }
    if constexpr (E::family == encoding_family::rotation) {
      if (m.rows > 0) enc.rotate(strided_view<S>(m.k(), m.rows, m.k_cols, m.k_cols), m.kpos());
    }
    return m;
  }
};

/// A 64-byte aligned byte buffer.
class ring_buffer {
 public:
  explicit ring_buffer(std::size_t n) : p_(static_cast<std::byte*>(::operator new (n, std::align_val_t{ring_align}))) {}
  std::byte* get() const { return p_.get(); }

 private:
  struct deleter {
    void operator()(std::byte* p) const { ::operator delete (p, std::align_val_t{ring_align}); }
  };
  std::unique_ptr<std::byte[], deleter> p_;
};

/// Checks one device's shards against the knobs before any work (`std::invalid_argument` for
/// the knobs and the encoder, `precondition_error` for the shapes): the same checks as
/// `attention`, made even when a shard is empty. `head_dim` is that of the first device checked
/// (0: none yet), so every device must use the same head size.
template <class E>
void ring_check_device(const E& enc, const attention_params& p, index_t q_rows, index_t q_cols, index_t n_qpos,
                       index_t o_rows, index_t o_cols, index_t k_rows, index_t k_cols, index_t v_rows,
                       index_t v_cols, index_t n_kpos, index_t& head_dim) {
  const attention_shape sh =
      check_attention(p, q_rows, q_cols, k_rows, k_cols, v_rows, v_cols, o_rows, o_cols, n_qpos, n_kpos);
  POSENC_ASSERT(head_dim == 0 || sh.head_dim == head_dim, "ring attention: a device has head_dim ", sh.head_dim,
                " (q columns / heads) but another has ", head_dim);
  head_dim = sh.head_dim;
  check_encoder_fits(enc, sh);
}

/// One device's side of the schedule: its queries (rotated once when the encoder rotates), their
/// positions, and the log-sum-exp accumulator. `attend` is the per-step function that both
/// drivers call; `finish` writes the output.
template <storage_scalar S, positional_encoding E>
class ring_worker {
 public:
  using C = compute_t<S>;

  /// Copies the query shard `q` (`[n_q, heads * d]`) and its positions, and rotates the copy when
  /// the encoder rotates. The shapes were checked (`ring_check_device`). Allocates
  /// O(n_q * heads * d).
  template <class SQ>
  ring_worker(strided_view<SQ> q, positions qpos, const E& enc, const attention_params& p, const ring_options& o)
      : enc_(enc), p_(p), q_(q.rows, q.cols), qpos_(static_cast<std::size_t>(qpos.size())) {
    require(o.query_blocks >= 1, "ring_options.query_blocks", o.query_blocks, "must be positive");
    check_params(p);
    mask_ = mask_rule_of(p);
    // Sinks join each row's softmax once, after the last merge (finish), not in every step.
    sinks_ = p.sinks;
    p_.sinks = {};
    for (index_t i = 0; i < q.rows; ++i) {
      std::copy(q.row(i), q.row(i) + q.cols, q_.data() + i * q.cols);
      qpos_[static_cast<std::size_t>(i)] = qpos[i];
    }
    if constexpr (E::family == encoding_family::rotation) {
      if (q.rows > 0) enc.rotate(q_, positions(qpos_));
    }
    blocks_ = ring_query_blocks(positions(qpos_), o.query_blocks);
    consecutive_ = ring_runs(positions(qpos_)).size() != 1 || ring_runs_consecutive(positions(qpos_));
    acc_ = row_matrix<C>::Zero(q.rows, q.cols);
    lse_ = row_matrix<C>::Constant(q.rows, p.heads, -std::numeric_limits<C>::infinity());
    index_t widest = 0;
    for (const ring_piece r : blocks_) widest = std::max(widest, r.count);
    part_.resize(widest, q.cols);
    part_lse_.resize(widest, p.heads);
  }

  /// Attends the queries to the message's keys and merges the result into the accumulator:
  /// for each query block in order, for each key run in order, one attention call and one merge
  /// on the block's rows that may see the run (none: no call). Calls `between()` after each block.
  template <class F>
  void attend(const ring_message<S>& m, F&& between) {
    const positions kpos = m.kpos();
    const positions qpos(qpos_);
    const std::vector<ring_piece> key_runs = ring_runs(kpos);
    for (const ring_piece block : blocks_) {
      for (const ring_piece kr : key_runs) {
        const positions kr_pos = kpos.subset(kr.row, kr.count);
        const ring_piece vis =
            ring_visible_rows(mask_, qpos.subset(block.row, block.count), consecutive_, bounds_of(kr_pos));
        if (vis.count == 0) continue;
        const ring_piece qr{block.row + vis.row, vis.count};
        auto part = part_.topRows(qr.count);
        auto part_lse = part_lse_.topRows(qr.count);
        // The queries and packed keys carry the rotation already; biases and masks act here.
        const auto& inner = [&]() -> const auto& {
          if constexpr (E::family == encoding_family::rotation) {
            return no_rotation_;
          } else {
            return enc_;
          }
        }();
        posenc::attention(q_.middleRows(qr.row, qr.count), m.keys().middle_rows(kr.row, kr.count),
                          m.values().middle_rows(kr.row, kr.count), part, qpos.subset(qr.row, qr.count), kr_pos, inner,
                          p_, part_lse, &ws_);
        merge_partial(acc_.middleRows(qr.row, qr.count), lse_.middleRows(qr.row, qr.count), part, part_lse);
      }
      between();
    }
  }

  /// Writes the merged output (`[n_q, heads * d]`, any storage type) and, unless `nullptr`, the
  /// log-sum-exp (`[n_q, heads]`).
  template <class SO, class L = std::nullptr_t>
  void finish(strided_view<SO> out, L&& lse = nullptr) const {
    POSENC_ASSERT(out.rows == acc_.rows() && out.cols == acc_.cols(), "ring attention: out is [", out.rows, ", ",
                  out.cols, "] but q is [", acc_.rows(), ", ", acc_.cols(), "]");
    const index_t heads = lse_.cols(), d = heads > 0 ? acc_.cols() / heads : 0;
    // The row's merged log-sum-exp with the sink, and the factor its output keeps.
    auto with_sink = [&](index_t i, index_t h, C& row_lse) {
      row_lse = lse_(i, h);
      if (sinks_.empty()) return C(1);
      const C z = static_cast<C>(sinks_[static_cast<std::size_t>(h)]);
      const C merged = row_lse;
      return sink_weight(merged, z, row_lse);
    };
    if constexpr (!std::is_null_pointer_v<std::remove_cvref_t<L>>) {
      auto lv = view_of(std::forward<L>(lse));
      POSENC_ASSERT(lv.rows == lse_.rows() && lv.cols == lse_.cols(), "ring attention: lse is [", lv.rows, ", ",
                    lv.cols, "] but must be [n_q, heads] = [", lse_.rows(), ", ", lse_.cols(), "]");
      for (index_t i = 0; i < lv.rows; ++i)
        for (index_t h = 0; h < lv.cols; ++h) {
          C value;
          with_sink(i, h, value);
          lv(i, h) = static_cast<std::remove_reference_t<decltype(lv(i, h))>>(value);
        }
    }
    for (index_t i = 0; i < out.rows; ++i)
      for (index_t h = 0; h < heads; ++h) {
        C unused;
        const C w = with_sink(i, h, unused);
        for (index_t c = h * d; c < (h + 1) * d; ++c) out(i, c) = static_cast<SO>(w * acc_(i, c));
      }
  }

  /// Bytes this worker holds: the query copy, the accumulator, one partial result and the
  /// kernel's workspace.
  std::size_t bytes() const {
    return static_cast<std::size_t>(q_.size()) * sizeof(S) +
           static_cast<std::size_t>(acc_.size() + lse_.size() + part_.size() + part_lse_.size()) * sizeof(C) +
           qpos_.size() * sizeof(position) + ws_.bytes();
  }

 private:
  const E& enc_;
  no_position<C> no_rotation_;
  attention_params p_;
  std::span<const float> sinks_;
  mask_rule mask_;
  row_matrix<S> q_;
  std::vector<position> qpos_;
  std::vector<ring_piece> blocks_;
  bool consecutive_ = true;  // every query block holds consecutive positions
  row_matrix<C> acc_, lse_, part_, part_lse_;
  attention_workspace ws_;
};

}  // namespace detail

/// One virtual device of the ring simulator: its query shard, its key/value shard, their global
/// positions, and where its output goes.
///
/// `q`, `out`: `[n_q, heads * d]`; `k`, `v`: `[n_kv, kv_heads * d]`, row-major, any row stride;
/// `qpos`/`kpos` one position per row. Shards may be empty and of any sizes. `lse`, optional
/// (empty: not written): `[n_q, heads]`, the log-sum-exp over all keys, which the backward
/// (`ring_attention_backward_simulate`) takes.
template <storage_scalar S, storage_scalar SO = S>
struct ring_device {
  strided_view<const S> q, k, v;
  positions qpos, kpos;
  strided_view<SO> out;
  strided_view<compute_t<S>> lse{};
};

/// Ring attention of P devices simulated in one process: the schedule of the MPI driver
/// (`mpi_ring::attention`), step by step, with the same results bit for bit for the same devices
/// and `ring_options`. The devices' outputs together equal `attention` over all queries and keys
/// within float rounding (the merges reassociate the softmax sums).
///
/// The encoder is applied by the ring: a rotation rotates copies of each device's queries and
/// keys once with their global positions (pass `no_position` for inputs rotated already); score
/// biases and masks use the global positions inside the kernel. Every device's shapes, the knobs
/// and the encoder are checked before any work, even for empty shards (`std::invalid_argument`,
/// `precondition_error`). Allocates, per device, its message (keys, values, positions), a copy
/// of its queries and an output accumulator: about the inputs' size once more.
template <storage_scalar S, storage_scalar SO, positional_encoding E>
void ring_attention_simulate(std::span<const ring_device<S, SO>> devices, const E& enc, const attention_params& p,
                             const ring_options& o = {}) {
  static_assert(E::family != encoding_family::additive_input,
                "posenc::ring_attention_simulate: additive-input encoders (sinusoidal) act on token embeddings "
                "before the Q/K/V projections; pass posenc::no_position here");
  detail::require(o.query_blocks >= 1, "ring_options.query_blocks", o.query_blocks, "must be positive");
  detail::check_params(p);
  index_t head_dim = 0;
  for (const auto& d : devices) {
    detail::ring_check_device(enc, p, d.q.rows, d.q.cols, d.qpos.size(), d.out.rows, d.out.cols, d.k.rows, d.k.cols,
                              d.v.rows, d.v.cols, d.kpos.size(), head_dim);
    POSENC_ASSERT((d.lse.data == nullptr && d.lse.rows == 0) || (d.lse.rows == d.q.rows && d.lse.cols == p.heads),
                  "ring attention: a device's lse is [", d.lse.rows, ", ", d.lse.cols, "] but must be [n_q, heads] = [",
                  d.q.rows, ", ", p.heads, "]");
  }
  const auto P = static_cast<index_t>(devices.size());
  std::vector<detail::ring_buffer> buffers;
  std::vector<detail::ring_message<S>> messages;
  std::vector<detail::ring_worker<S, E>> workers;
  buffers.reserve(static_cast<std::size_t>(P));
  messages.reserve(static_cast<std::size_t>(P));
  workers.reserve(static_cast<std::size_t>(P));
  for (const auto& d : devices) {
    buffers.emplace_back(detail::ring_message<S>::bytes(d.k.rows, d.k.cols, d.v.cols));
    messages.push_back(detail::ring_message<S>::pack(buffers.back().get(), d.k, d.v, d.kpos, enc));
    workers.emplace_back(d.q, d.qpos, enc, p, o);
  }
  for (index_t s = 0; s < P; ++s)
    for (index_t r = 0; r < P; ++r) workers[r].attend(messages[(r - s + P) % P], [] {});
  for (index_t r = 0; r < P; ++r) {
    if (devices[r].lse.data != nullptr || devices[r].lse.rows != 0) {
      workers[r].finish(devices[r].out, devices[r].lse);
    } else {
      workers[r].finish(devices[r].out);
    }
  }
}

/// Ring attention over a whole sequence (positions `0 .. n-1`) simulated with `ranks` devices in
/// `layout`: shards q, k and v, runs `ring_attention_simulate` and gathers the output into `out`.
/// Shapes as for `attention` with `n_q == n_kv == n`. Throws `std::invalid_argument` for
/// `ranks < 1`. Allocates the shards (the inputs' size) besides the simulator's memory.
template <matrix_argument Q, matrix_argument K, matrix_argument V, matrix_argument O, positional_encoding E>
void ring_attention_simulate(Q&& q, K&& k, V&& v, O&& out, int ranks, ring_layout layout, const E& enc,
                             const attention_params& p, const ring_options& o = {}) {
  const auto qv = view_of(std::forward<Q>(q));
  const auto kv = view_of(std::forward<K>(k));
  const auto vv = view_of(std::forward<V>(v));
  const auto ov = view_of(std::forward<O>(out));
  using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
  using SO = std::remove_pointer_t<decltype(ov.data)>;
  static_assert(!std::is_const_v<SO>, "posenc::ring_attention_simulate: out must be writable");
  POSENC_ASSERT(kv.rows == qv.rows && vv.rows == qv.rows && ov.rows == qv.rows, "ring_attention_simulate: q, k, v ",
                "and out have ", qv.rows, ", ", kv.rows, ", ", vv.rows, " and ", ov.rows,
                " rows; they must have one row per token");
  detail::require(ranks >= 1, "ring ranks", ranks, "must be positive");
  detail::require(o.query_blocks >= 1, "ring_options.query_blocks", o.query_blocks, "must be positive");
  {
    // The whole sequence's shapes, before it is cut into shards.
    index_t head_dim = 0;
    detail::ring_check_device(enc, p, qv.rows, qv.cols, qv.rows, ov.rows, ov.cols, kv.rows, kv.cols, vv.rows, vv.cols,
                              kv.rows, head_dim);
  }
  std::vector<std::vector<position>> pos;
  std::vector<row_matrix<S>> qs, ks, vs;
  std::vector<row_matrix<SO>> os;
  for (int r = 0; r < ranks; ++r) {
    pos.push_back(ring_shard_positions(qv.rows, ranks, r, layout));
    const positions pr(pos.back());
    qs.push_back(ring_take_rows(qv, pr));
    ks.push_back(ring_take_rows(kv, pr));
    vs.push_back(ring_take_rows(vv, pr));
    os.emplace_back(pr.size(), ov.cols);
  }
  std::vector<ring_device<S, SO>> devices;
  for (int r = 0; r < ranks; ++r) {
    const positions pr(pos[static_cast<std::size_t>(r)]);
    devices.push_back({view_of(std::as_const(qs[r])), view_of(std::as_const(ks[r])), view_of(std::as_const(vs[r])), pr,
                       pr, view_of(os[r])});
  }
  ring_attention_simulate(std::span<const ring_device<S, SO>>(devices), enc, p, o);
  for (int r = 0; r < ranks; ++r) ring_put_rows(os[r], positions(pos[static_cast<std::size_t>(r)]), ov);
}

}  // namespace posenc
