// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/plan.hpp
/// The plan of one blockwise attention call: tile sizes, work items, key chunks and the bytes of
/// workspace, computed once from the validated shapes, the knobs and the encoder. `attention`
/// runs it and `attention_workspace_bytes` reports it, so the two cannot drift apart. Every size
/// is computed with overflow checks: a combination of head_dim, tiles and workers whose workspace
/// does not fit in memory's address space is an `std::invalid_argument`, never a wrapped size.

#include <algorithm>
#include <cstddef>
#include <limits>
#include <string>

#include "posenc/attention/params.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/executor.hpp"
#include "posenc/types.hpp"

namespace posenc {
namespace detail {

inline constexpr index_t default_q_tile = 512;
/// Query rows per strip of a tile: the strip's logits against a key tile (48 x 128 floats, 24 KiB)
/// stay in L1 from QK^T through the softmax to PV. A multiple of the AVX-512 and AVX2 register
/// blocks (8 and 6 rows).
inline constexpr index_t strip_rows = 48;
inline constexpr index_t default_k_tile = 128;
/// At most this many rows per tile (decode: a few tokens times the GQA group) use the in-place
/// key and value paths.
inline constexpr index_t few_query_rows = 8;
/// Decode (at most this many query tokens, few rows per tile) splits the keys into at most
/// `max_key_chunks` chunks of at least `min_key_chunk` keys, merged by log-sum-exp, and carries
/// every kv head in one work item: both cores then stream whole rows of K and V, where one kv
/// head per core would read half of every row each.
inline constexpr index_t decode_max_tokens = 16;
inline constexpr index_t max_key_chunks = 16;
inline constexpr index_t min_key_chunk = 4096;

/// A rotation encoder that offers a bounded-memory tile rotator (RoPE): the kernel rotates every
/// key tile once per query tile, too often for per-element double cos/sin.
template <class E>
concept has_tile_rotator = requires(const E& e) { e.tile_rotator(); };

/// Scratch values per thread of the encoder's tile rotator, 0 without one.
template <class E>
index_t rotator_scratch(const E& enc) {
  if constexpr (has_tile_rotator<E>) {
    return 4 * (enc.rotary_dim() / 2);
  } else {
    (void)enc;
    return 0;
  }
}

/// Extra columns a score-bias encoder needs per query row (Shaw's relative terms), 0 otherwise.
template <class E>
index_t relative_columns(const E& enc) {
  if constexpr (relative_key_value<E>) {
    return enc.num_relative();
  } else {
    (void)enc;
    return 0;
  }
}

/// Checks that the encoder fits the call, before any work item runs: a per-head encoder (ALiBi,
/// T5) must cover local heads 0..heads-1 from its `head_offset`, and an encoder that acts on head
/// vectors (RoPE, Shaw) must have the call's head_dim. Throws `std::invalid_argument`.
template <class E>
void check_encoder_fits(const E& enc, const attention_shape& sh) {
  if constexpr (requires { enc.params().num_heads; enc.params().head_offset; }) {
    const auto& ep = enc.params();
    if (sh.heads > ep.num_heads - ep.head_offset)
      invalid("attention_params.heads", sh.heads,
              "more heads than the encoder " + std::string(enc.name()) + " covers (num_heads = " +
                  to_text(ep.num_heads) + ", head_offset = " + to_text(ep.head_offset) + ")");
  }
  if constexpr (requires { enc.head_dim(); }) {
    if (enc.head_dim() != sh.head_dim)
      invalid("attention head_dim (q columns / heads)", sh.head_dim,
              "the encoder " + std::string(enc.name()) + " has head_dim = " + to_text(enc.head_dim()));
  }
}

/// Non-negative index arithmetic that remembers an overflow instead of wrapping.
struct checked_index {
  bool overflow = false;
  index_t mul(index_t a, index_t b) {
    if (a != 0 && b > std::numeric_limits<index_t>::max() / a) overflow = true;
    return overflow ? 0 : a * b;
  }
  index_t add(index_t a, index_t b) {
    if (b > std::numeric_limits<index_t>::max() - a) overflow = true;
    return overflow ? 0 : a + b;
  }
  /// `n` rounded up to a multiple of `m` (> 0).
  index_t round_up(index_t n, index_t m) { return mul((n / m) + (n % m != 0), m); }
};

/// Offsets, in elements of the compute type, of the per-worker tile buffers (see
/// detail/attention_kernels.hpp for their layouts).
struct tile_plan {
  index_t bq = 0, bk = 0, d = 0, r = 0, nrot = 0, sets = 1;
  index_t ldkt = 0, dpad = 0;  // key tile width rounded up to 32; head_dim rounded up to 16
  index_t strip = 0;           // query rows per strip: QK^T, softmax and PV of a strip share one logit block
  index_t q = 0, krows = 0, kt = 0, v = 0, s = 0, acc = 0, m = 0, l = 0, alpha = 0, terms = 0, w = 0, rot = 0;
  index_t per_thread = 0;
  bool overflow = false;  // some size does not fit in index_t; the other fields are then meaningless

  /// `sets`: kv heads a work item carries at once (the query state is held for each).
  tile_plan(index_t bq_, index_t bk_, index_t d_, index_t r_, index_t nrot_, index_t sets_ = 1)
      : bq(bq_), bk(bk_), d(d_), r(r_), nrot(nrot_), sets(sets_) {
    checked_index c;
    ldkt = c.round_up(bk, 32);
    dpad = c.round_up(d, 16);
    strip = std::min(bq, strip_rows);
    // Each buffer starts on a 64-byte boundary for float and double alike.
    auto buf = [&](index_t& at, index_t& o, index_t count, index_t n) {
      at = o;
      o = c.add(o, c.mul(count, c.round_up(n, 16)));
    };
    index_t o = 0;
    buf(q, o, sets, c.mul(bq, d));
    buf(krows, o, 1, c.mul(bk, d));
    buf(kt, o, 1, c.mul(d, ldkt));
    buf(v, o, 1, c.mul(bk, dpad));
    buf(s, o, 1, c.mul(strip, ldkt));
    buf(acc, o, sets, c.mul(bq, dpad));
    buf(m, o, sets, bq);
    buf(l, o, sets, bq);
    buf(alpha, o, 1, bq);
    buf(terms, o, sets, c.mul(bq, r));
    buf(w, o, sets, c.mul(bq, r));
    buf(rot, o, 1, nrot);
    per_thread = o;
    overflow = c.overflow;
  }
};

/// Everything one blockwise attention call does, decided before it starts.
struct attention_plan {
  attention_shape sh;
  executor* ex = nullptr;
  int workers = 1;          ///< workers used, at most one per work item
  index_t tq = 0;           ///< query tokens per work item
  bool decode = false;      ///< every kv head in one item, keys split into chunks
  index_t sets = 1;         ///< kv heads per item
  index_t chunks = 1;       ///< key chunks per (head set, query tile), merged by log-sum-exp
  index_t chunk_keys = 0;   ///< keys per chunk (a multiple of the key tile)
  index_t q_tiles = 0;      ///< query tiles
  index_t head_sets = 0;    ///< kv_heads / sets
  index_t items = 0;        ///< head_sets * q_tiles * chunks
  tile_plan tiles{0, 0, 0, 0, 0};
  index_t partial_stride = 0;      ///< compute values per (item, kv head) partial result
  index_t partial_size = 0;        ///< compute values of all partial results
  std::size_t workspace_bytes = 0;  ///< the workspace the call reserves
};

/// Query tokens per work item. The query heads that share a kv head are stacked into one tile
/// (GQA/MQA), so each key and value tile is read once for all of them: a tile holds about
/// `q_tile` rows, `tokens * group`. Made smaller with the default tile size when there would be
/// fewer than two items per worker (short prompts, few heads), so every core gets work. Smaller
/// tiles change no result: each row's arithmetic is the same in any tile.
inline index_t balanced_tokens(const attention_params& p, index_t group, index_t n_q, index_t kv_heads, int workers) {
  const index_t q_tile = p.q_tile > 0 ? p.q_tile : default_q_tile;
  index_t tq = std::min(std::max<index_t>(1, q_tile / group), std::max<index_t>(n_q, 1));
  if (p.q_tile == 0 && n_q > 0) {
    const index_t want_tiles = (2 * index_t{workers} + kv_heads - 1) / kv_heads;
    const index_t floor_tokens = std::max<index_t>(1, strip_rows / group);
    tq = std::min(tq, std::max(floor_tokens, (n_q + want_tiles - 1) / want_tiles));
  }
  return tq;
}

/// The plan of a call of shape `sh` with storage compute type `C` and encoder `enc`. Throws
/// `std::invalid_argument` when its workspace would not fit in `std::size_t`.
template <class C, class E>
attention_plan make_plan(const attention_shape& sh, const attention_params& p, const E& enc) {
  attention_plan pl;
  pl.sh = sh;
  const workers_of w(p.executor, p.threads);
  pl.ex = w.ex;
  const index_t group = sh.group;
  pl.tq = balanced_tokens(p, group, sh.n_q, sh.kv_heads, w.count);
  // Decode: all kv heads in one work item and the keys split into chunks (see decode_max_tokens).
  pl.decode = !relative_key_value<E> && sh.n_q <= decode_max_tokens && pl.tq * group <= few_query_rows &&
              sh.n_kv >= 2 * min_key_chunk;
  pl.sets = pl.decode ? sh.kv_heads : 1;
  // A key tile never exceeds the keys: a large k_tile means "all keys in one tile", and sizes
  // its buffers by the keys, not by the number asked for.
  const index_t k_tile = std::min(p.k_tile > 0 ? p.k_tile : default_k_tile, std::max<index_t>(sh.n_kv, 1));
  pl.tiles = tile_plan(pl.tq * group, k_tile, sh.head_dim, relative_columns(enc), rotator_scratch(enc), pl.sets);
  pl.chunks = pl.decode ? std::min(max_key_chunks, sh.n_kv / min_key_chunk) : index_t{1};
  // Chunk boundaries on key-tile boundaries, the same for every worker count.
  const index_t bk = pl.tiles.bk;
  pl.chunk_keys = ((sh.n_kv + pl.chunks - 1) / pl.chunks + bk - 1) / bk * bk;
  pl.q_tiles = sh.n_q == 0 ? 0 : (sh.n_q + pl.tq - 1) / pl.tq;
  pl.head_sets = sh.kv_heads / pl.sets;
  checked_index c;
  pl.items = c.mul(c.mul(pl.head_sets, pl.q_tiles), pl.chunks);
  pl.workers = static_cast<int>(std::clamp<index_t>(pl.items, 1, w.count));
  // Partial results of the chunks, merged at the end: per item and kv head, the unnormalised
  // output rows, their running max and sum.
  pl.partial_stride = c.mul(pl.tiles.bq, c.add(pl.tiles.dpad, 2));
  pl.partial_size = pl.chunks > 1 ? c.mul(c.mul(pl.items, pl.sets), pl.partial_stride) : 0;
  const index_t values = c.add(c.mul(pl.tiles.per_thread, pl.workers), pl.partial_size);
  const index_t limit = static_cast<index_t>(std::min<std::size_t>(std::numeric_limits<index_t>::max(),
                                                                   std::numeric_limits<std::size_t>::max())) /
                        static_cast<index_t>(sizeof(C));
  if (pl.tiles.overflow || c.overflow || values > limit)
    invalid("attention head_dim", sh.head_dim,
            "the workspace of this call overflows the address space (query tile of " + to_text(pl.tiles.bq) +
                " rows, key tile of " + to_text(pl.tiles.bk) + " rows, " + to_text(pl.workers) + " workers)");
  pl.workspace_bytes = static_cast<std::size_t>(values) * sizeof(C);
  return pl;
}

}  // namespace detail

/// Bytes of workspace `attention` reserves for a call with these knobs, `n_q` queries, `n_kv`
/// keys and head size `head_dim` in storage `S` with encoder `enc`: the plan the call itself runs,
/// so the two always agree. It grows with the tile sizes, head_dim and workers, and, for decode
/// (at most 16 query tokens against at least 8192 keys), by the partial results of at most 16 key
/// chunks; never with the sequence length otherwise. Throws `std::invalid_argument` for invalid
/// knobs (as `attention`), a `head_dim <= 0`, or a workspace that would not fit in memory.
template <storage_scalar S, positional_encoding E>
std::size_t attention_workspace_bytes(const attention_params& p, index_t n_q, index_t n_kv, index_t head_dim,
                                      const E& enc) {
  const index_t kvh = detail::check_params(p);
  detail::require(n_q >= 0, "attention_workspace_bytes n_q", n_q, "must be >= 0");
  detail::require(n_kv >= 0, "attention_workspace_bytes n_kv", n_kv, "must be >= 0");
  detail::require(head_dim > 0, "attention_workspace_bytes head_dim", head_dim, "must be > 0");
  const detail::attention_shape sh{n_q,      n_kv, p.heads, kvh, head_dim, p.heads / kvh, 1.0,
                                   detail::mask_rule{p.causal, p.window_left, p.window_right}};
  if (n_q == 0) return 0;
  return detail::make_plan<compute_t<S>>(sh, p, enc).workspace_bytes;
}

}  // namespace posenc
