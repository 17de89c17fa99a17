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
#include <utility>

#include "posenc/attention/params.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/executor.hpp"
#include "posenc/types.hpp"

namespace posenc {
namespace detail {

/// Query rows per tile (about: tokens times the GQA group) and keys per tile. A key tile is packed
/// (and rotated, and its values gathered) once per query tile, so larger tiles spend less on that;
/// a strip's logits against a key tile (48 x 256 floats, 48 KiB) stay in L1 or L2 through the
/// softmax to PV. Prefill, 8 heads, d = 64 and 128, n = 4k-16k, Zen 5, 2 threads, best of 8
/// interleaved: 1024 x 256 ran 4-8% faster than 512 x 128 with the AVX-512 kernels (445 against
/// 422 GFLOP/s, causal 8k, d = 128) and 1-3% with the AVX2 kernels; 1024 x 128 and 512 x 256 fell
/// between. Strips of 24 rows ran as 48, of 32 rows 2-4% slower.
inline constexpr index_t default_q_tile = 1024;
inline constexpr index_t default_k_tile = 256;
/// Query rows per strip of a tile: QK^T, the softmax and PV of a strip share one block of logits.
/// A multiple of the AVX-512 and AVX2 register blocks (8 and 6 rows).
inline constexpr index_t strip_rows = 48;
/// At most this many rows per tile (decode: a few tokens times the GQA group) use the in-place
/// key and value paths.
inline constexpr index_t few_query_rows = 8;
/// Tiles of at most this many rows (decode: a few tokens times the GQA group) read keys and values
/// in place with the few-row kernels, every kv head of the work item in turn on each block of keys.
inline constexpr index_t decode_rows = 16;
/// Decode reads keys and values in blocks of at most this many consecutive rows (less at a page's
/// end), every kv head of the work item on a block before the next, and requests the next block's
/// rows while it computes on this one.
inline constexpr index_t decode_block = 16;
/// How many keys ahead decode requests the keys and values of storage type `S` (in the kernels, one
/// row as they read another, at the row the block table gives: pages are not consecutive). Values
/// are requested further ahead than keys: P V spends fewer cycles per row. Measured on Zen 5, one
/// thread, 16 sequences of 512-32k keys, GQA 32/8, d = 128: fp32 decode 57 -> 47 ms against the
/// distances in rows of the kernels themselves (which fell off a page's end), pages of 16 rows
/// 90 -> 64 ms; bf16 pages of 16 rows 75 -> 37 ms.
template <class S>
inline constexpr index_t decode_prefetch_keys = sizeof(S) >= 4 ? 16 : 64;
template <class S>
inline constexpr index_t decode_prefetch_values = sizeof(S) >= 4 ? 64 : 128;
/// Decode (at most this many query tokens: one, or a few of speculative decoding) carries every kv
/// head in one work item, which reads each key and value once for all the query rows of every
/// head, the heads of a key tile one after the other, and splits the keys into
/// at most `max_key_chunks` chunks of at least `min_key_chunk` keys, merged by log-sum-exp, so the
/// workers share a long cache.
inline constexpr index_t decode_max_tokens = 16;
inline constexpr index_t max_key_chunks = 16;
inline constexpr index_t min_key_chunk = 1024;

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

/// Columns of the forward kernel's per-row Shaw workspace (terms and weights): the `2K + 1`
/// relative columns and one more, the row's logit shift (see `tile_worker::load_queries`).
template <class E>
index_t forward_relative_columns(const E& enc) {
  const index_t r = relative_columns(enc);
  if (r == 0) return 0;
  detail::require(r < std::numeric_limits<index_t>::max(), "shaw_params.max_relative_position",
                  (r - 1) / 2, "is too large for the attention workspace");
  return r + 1;
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
  index_t ones = 0;  // few_query_rows ones: the rescale factor of a tile's later blocks (decode)
  index_t kpos = 0;  // a key tile's positions (int64, two values' room each) when they are gathered
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
    // Decode (few rows) keeps the logits and rescale factors of every kv head of the item.
    const index_t logit_sets = bq <= decode_rows ? sets : 1;
    buf(s, o, logit_sets, c.mul(strip, ldkt));
    buf(acc, o, sets, c.mul(bq, dpad));
    buf(m, o, sets, bq);
    buf(l, o, sets, bq);
    buf(alpha, o, logit_sets, bq);
    buf(ones, o, 1, decode_rows);
    buf(terms, o, sets, c.mul(bq, r));
    buf(w, o, sets, c.mul(bq, r));
    buf(rot, o, 1, nrot);
    buf(kpos, o, 1, c.mul(2, bk));
    per_thread = o;
    overflow = c.overflow;
  }
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

/// One sequence of a call, as the plan sees it: `nq` query tokens (rows `[q0, q0 + nq)` of the
/// packed queries) against `n_kv` keys.
struct seq_plan {
  index_t q0 = 0, nq = 0, n_kv = 0;
  index_t tq = 0;          ///< query tokens per work item
  bool decode = false;     ///< every kv head in one item, keys split into chunks
  index_t sets = 1;        ///< kv heads per item
  index_t chunks = 1;      ///< key chunks per (head set, query tile), merged by log-sum-exp
  index_t bk = 0;          ///< key tile rows
  index_t chunk_keys = 0;  ///< keys per chunk (a multiple of the key tile)
  index_t q_tiles = 0;     ///< query tiles
  index_t head_sets = 0;   ///< kv_heads / sets
  index_t items = 0;       ///< head_sets * q_tiles * chunks
  index_t item0 = 0;       ///< the first of its items among the call's (non-decreasing over sequences)
  index_t partial0 = 0;    ///< where its chunks' partial results start (chunked sequences)
  index_t unit0 = 0;       ///< the first of its merge units (head set, query tile) among the call's; a
                           ///< sequence without key chunks has none, and the next one's unit0

  // Unit u (a head set and a query tile; its items are u * chunks + chunk) takes the query tiles
  // from the last: under a causal mask a later tile sees more keys, and the workers, which take
  // items in order, finish together when the longest items come first.
  index_t tile_of_unit(index_t u) const { return q_tiles - 1 - u / head_sets; }  ///< query tile of unit u
  index_t set_of_unit(index_t u) const { return u % head_sets; }                 ///< head set of unit u
};

/// Everything one blockwise attention call does, decided before it starts: per-sequence plans
/// (stored in the workspace, after the per-worker tile buffers and the partial results) and the
/// sizes they add up to.
struct attention_plan {
  attention_shape sh;
  executor* ex = nullptr;
  int workers = 1;                  ///< workers used, at most one per work item
  index_t seqs = 0;                 ///< sequences
  index_t bk = 0;                   ///< key tile rows (at most the longest sequence's keys)
  index_t per_thread = 0;           ///< compute values of one worker's tile buffers (the largest sequence's)
  index_t items = 0;                ///< work items of all sequences
  index_t units = 0;                ///< merge units of the chunked sequences
  index_t partial_size = 0;         ///< compute values of all partial results
  std::size_t plans_offset = 0;     ///< byte offset of the `seq_plan` array in the workspace
  std::size_t workspace_bytes = 0;  ///< the workspace the call reserves
};

/// The per-worker tile buffers of sequence `sp`.
inline tile_plan tiles_of(const seq_plan& sp, const attention_plan& pl, index_t r, index_t nrot) {
  return tile_plan(sp.tq * pl.sh.group, sp.bk, pl.sh.head_dim, r, nrot, sp.sets);
}

/// The values of one (item, kv head) partial result of sequence `sp`: unnormalised output rows,
/// their running max and sum.
inline index_t partial_stride_of(const tile_plan& t) { return t.bq * (t.dpad + 2); }

/// The plan of a call of `seqs` sequences, whose sizes `size_of(b)` gives as `{nq, n_kv}`, with
/// storage compute type `C` and encoder `enc`. Writes each sequence's plan to `plans[b]` unless
/// `plans` is null (a first pass that only sizes the workspace). Throws `std::invalid_argument`
/// when the workspace would not fit in `std::size_t`.
template <class C, class E, class SizeOf>
attention_plan plan_batch(const attention_shape& sh, const attention_params& p, const E& enc, index_t seqs,
                          SizeOf&& size_of, seq_plan* plans = nullptr) {
  attention_plan pl;
  pl.sh = sh;
  pl.seqs = seqs;
  const workers_of w(p.executor, p.threads);
  pl.ex = w.ex;
  const index_t group = sh.group;
  index_t longest = 1;
  for (index_t b = 0; b < seqs; ++b) longest = std::max(longest, size_of(b).second);
  // A key tile never exceeds the keys: a large k_tile means "all keys in one tile", and sizes
  // its buffers by the keys, not by the number asked for.
  pl.bk = std::min(p.k_tile > 0 ? p.k_tile : default_k_tile, longest);
  const index_t r = forward_relative_columns(enc), nrot = rotator_scratch(enc);
  checked_index c;
  bool tiles_overflow = false;
  index_t q0 = 0;
  for (index_t b = 0; b < seqs; ++b) {
    seq_plan sp;
    const auto [nq, n_kv] = size_of(b);
    sp.q0 = q0, sp.nq = nq, sp.n_kv = n_kv;
    q0 = c.add(q0, nq);
    if (nq > 0) {
      // One sequence shares out its query tiles so that every worker gets some; a batch has
      // its sequences for that.
      if (seqs == 1) {
        sp.tq = balanced_tokens(p, group, nq, sh.kv_heads, w.count);
      } else {
        const index_t q_tile = p.q_tile > 0 ? p.q_tile : default_q_tile;
        sp.tq = std::min(std::max<index_t>(1, q_tile / group), nq);
      }
      // Decode: all kv heads in one work item and the keys split into chunks (see decode_max_tokens).
      sp.decode = !relative_key_value<E> && nq <= decode_max_tokens;
      sp.sets = sp.decode ? sh.kv_heads : 1;
      sp.chunks = sp.decode ? std::clamp(n_kv / min_key_chunk, index_t{1}, max_key_chunks) : index_t{1};
      // Chunk boundaries on key-tile boundaries, the same for every worker count.
      sp.bk = pl.bk;
      sp.chunk_keys = ((n_kv + sp.chunks - 1) / sp.chunks + sp.bk - 1) / sp.bk * sp.bk;
      sp.q_tiles = (nq + sp.tq - 1) / sp.tq;
      sp.head_sets = sh.kv_heads / sp.sets;
      sp.items = c.mul(c.mul(sp.head_sets, sp.q_tiles), sp.chunks);
      const tile_plan t = tiles_of(sp, pl, r, nrot);
      tiles_overflow = tiles_overflow || t.overflow;
      pl.per_thread = std::max(pl.per_thread, t.per_thread);
      sp.item0 = pl.items;
      pl.items = c.add(pl.items, sp.items);
      sp.unit0 = pl.units;
      if (sp.chunks > 1) {
        sp.partial0 = pl.partial_size;
        pl.partial_size = c.add(pl.partial_size, c.mul(c.mul(sp.items, sp.sets), partial_stride_of(t)));
        pl.units = c.add(pl.units, sp.head_sets * sp.q_tiles);
      }
    } else {
      sp.item0 = pl.items;
      sp.unit0 = pl.units;
    }
    if (plans) plans[b] = sp;
  }
  pl.workers = static_cast<int>(std::clamp<index_t>(pl.items, 1, w.count));
  const index_t values = c.add(c.mul(pl.per_thread, pl.workers), pl.partial_size);
  // The plans follow the values, 64-byte aligned like every buffer.
  const auto limit = static_cast<index_t>(std::numeric_limits<index_t>::max() / 2);
  const index_t value_bytes = c.mul(values, static_cast<index_t>(sizeof(C)));
  const index_t plans_bytes = c.mul(seqs, static_cast<index_t>(sizeof(seq_plan)));
  const index_t total = c.add(c.round_up(value_bytes, 64), plans_bytes);
  if (tiles_overflow || c.overflow || total > limit)
    invalid("attention head_dim", sh.head_dim,
            "the workspace of this call overflows the address space (key tile of " + to_text(pl.bk) + " rows, " +
                to_text(pl.workers) + " workers, " + to_text(seqs) + " sequences)");
  pl.plans_offset = static_cast<std::size_t>(c.round_up(value_bytes, 64));
  pl.workspace_bytes = static_cast<std::size_t>(total);
  return pl;
}

}  // namespace detail

/// Bytes of workspace `attention` reserves for a call with these knobs, `n_q` queries, `n_kv`
/// keys and head size `head_dim` in storage `S` with encoder `enc`: the plan the call itself runs,
/// so the two always agree. It grows with the tile sizes, head_dim and workers, and, for decode
/// (at most 16 query tokens, a few rows per tile), by the partial results of at most 16 key
/// chunks; never with the sequence length otherwise. Throws `std::invalid_argument` for invalid
/// knobs (as `attention`), a `head_dim <= 0`, or a workspace that would not fit in memory.
/// `batch`: the items of a call on `heads_view`s (sequences of `n_q` queries and `n_kv` keys each).
template <storage_scalar S, positional_encoding E>
std::size_t attention_workspace_bytes(const attention_params& p, index_t n_q, index_t n_kv, index_t head_dim,
                                      const E& enc, index_t batch = 1) {
  const index_t kvh = detail::check_params(p);
  detail::require(n_q >= 0, "attention_workspace_bytes n_q", n_q, "must be >= 0");
  detail::require(n_kv >= 0, "attention_workspace_bytes n_kv", n_kv, "must be >= 0");
  detail::require(head_dim > 0, "attention_workspace_bytes head_dim", head_dim, "must be > 0");
  detail::require(batch >= 0, "attention_workspace_bytes batch", batch, "must be >= 0");
  const detail::attention_shape sh{n_q,      n_kv, p.heads, kvh, head_dim, p.heads / kvh, 1.0,
                                   detail::mask_rule_of(p)};
  if (n_q == 0 || batch == 0) return 0;
  return detail::plan_batch<compute_t<S>>(sh, p, enc, batch, [&](index_t) { return std::pair{n_q, n_kv}; })
      .workspace_bytes;
}

}  // namespace posenc
