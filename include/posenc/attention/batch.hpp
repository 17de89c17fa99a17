// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/batch.hpp
/// The engine step: many sequences in one call, over packed keys or a paged KV cache.
///
/// Queries of a batch are packed one sequence after another, FlashAttention's varlen layout:
/// sequence `b` owns query rows `[cu_q[b], cu_q[b + 1])` of `q`, `out` and `lse`, with one int64
/// position per row. Each sequence attends only to its own keys, under the call's causal mask and
/// window (by positions), so prefill chunks and decode tokens mix freely in one call.
///
/// - `attention_varlen`: keys packed the same way (`cu_k`), with their positions: one call equals
///   a call of `attention` per sequence. The encoder acts on q and k, as in `attention`.
/// - `paged_attention`: keys and values in an engine's paged cache (`paged_kv`): pages of
///   `page_size` rows, a block table per sequence, a length per sequence. A key's position is its
///   index in its sequence, or the position the cache stores for its row. A contiguous cache is a
///   cache of one page per sequence.
/// - `paged_append`: writes a step's new keys and values into the cache, rotated with their
///   positions when the cache holds rotated keys.
///
/// Work items are (sequence, kv heads, query tile, key chunk): long sequences with few queries
/// (decode) split their keys into chunks merged by log-sum-exp in a fixed order, so a batch of
/// unequal lengths keeps every worker busy, and the result is the same bits for any executor.
/// Pages a sequence's block table does not reach (past its length) are never read.

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/params.hpp"
#include "posenc/attention/plan.hpp"
#include "posenc/attention/workspace.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// What the keys in a paged cache are. It has no default: a cache whose keys are rotated must not
/// be rotated again, and a cache of raw keys must be, so every cache says which it holds.
enum class cached_keys {
  unspecified,  ///< not said: refused with a rotation encoder
  rotated,      ///< rotated with their positions when appended (`paged_append` with the rope):
                ///< attention then rotates only the queries. What engines usually keep.
  raw,          ///< as the projection gave them: attention rotates queries and keys with their
                ///< positions. For caches whose positions change (a rolling cache with sink
                ///< tokens, positions inside the cache) or whose frequencies change with the
                ///< length (dynamic NTK).
};

/// An engine's paged KV cache, borrowed: nothing is copied.
///
/// `k`, `v`: `[num_pages * page_size, kv_heads * head_dim]` row-major (any row stride); page `p`
/// is rows `[p * page_size, (p + 1) * page_size)`. Sequence `b`'s key `j` (its `j`-th token) is in
/// page `block_table[b * pages_per_sequence + j / page_size]`, row `j % page_size` of it; the
/// sequence has `lengths[b]` tokens, counting those `paged_append` writes in this step. `S` is
/// float, double, `Eigen::bfloat16` or `Eigen::half`, const for a cache only read.
template <class S>
struct paged_kv {
  strided_view<S> k, v;
  index_t page_size = 0;                       ///< rows per page, >= 1
  std::span<const std::int32_t> block_table;   ///< `[sequences, pages_per_sequence]`, row-major
  index_t pages_per_sequence = 0;              ///< the block table's row length
  std::span<const std::int32_t> lengths;       ///< tokens of each sequence, this step's included
  std::span<const position> positions{};       ///< position of each K/V row; empty: a token's index in its sequence
  cached_keys keys = cached_keys::unspecified;  ///< what the key rows hold

  /// A read-only view of the same cache.
  template <class U = S>
    requires(!std::is_const_v<U>)
  operator paged_kv<const U>() const {
    return {k, v, page_size, block_table, pages_per_sequence, lengths, positions, keys};
  }
};

namespace detail {

/// Checks FlashAttention-style cumulative lengths: `cu.size() == sequences + 1`, `cu[0] == 0`,
/// non-decreasing, `cu.back() == rows`. Throws `precondition_error`.
inline void check_cumulative(std::span<const std::int32_t> cu, index_t sequences, index_t rows, const char* call,
                             const char* name) {
  POSENC_ASSERT(static_cast<index_t>(cu.size()) == sequences + 1, call, ": ", name, " has ", cu.size(),
                " entries but the batch has ", sequences, " sequences (", sequences + 1, " are needed)");
  POSENC_ASSERT(cu.empty() || cu[0] == 0, call, ": ", name, "[0] = ", cu.empty() ? 0 : cu[0], " must be 0");
  for (std::size_t b = 1; b < cu.size(); ++b)
    POSENC_ASSERT(cu[b] >= cu[b - 1], call, ": ", name, " must not decrease, but ", name, "[", b, "] = ", cu[b],
                  " < ", name, "[", b - 1, "] = ", cu[b - 1]);
  POSENC_ASSERT(cu.empty() || cu.back() == rows, call, ": ", name, "[", cu.size() - 1, "] = ", cu.back(), " but there are ",
                rows, " rows");
}

/// Checks a paged cache for `sequences` sequences of kv width `kv_cols` (precondition_error and
/// std::invalid_argument), every page a sequence reaches included; returns the number of pages.
template <class S>
index_t check_paged(const paged_kv<S>& c, index_t sequences, index_t kv_cols, const char* call) {
  require(c.page_size >= 1, "paged_kv.page_size", c.page_size, "must be >= 1");
  require(c.pages_per_sequence >= 0, "paged_kv.pages_per_sequence", c.pages_per_sequence, "must be >= 0");
  require(c.keys == cached_keys::unspecified || c.keys == cached_keys::rotated || c.keys == cached_keys::raw,
          "paged_kv.keys", static_cast<int>(c.keys), "unknown cached_keys value");
  POSENC_ASSERT(c.k.rows == c.v.rows, call, ": the cache's k has ", c.k.rows, " rows but v has ", c.v.rows);
  POSENC_ASSERT(c.k.rows % c.page_size == 0, call, ": the cache has ", c.k.rows, " rows, not a whole number of pages of ",
                c.page_size);
  POSENC_ASSERT(c.k.cols == kv_cols && c.v.cols == kv_cols, call, ": the cache's k and v have ", c.k.cols, " and ",
                c.v.cols, " columns but kv_heads * head_dim = ", kv_cols);
  POSENC_ASSERT(c.positions.empty() || static_cast<index_t>(c.positions.size()) == c.k.rows, call,
                ": paged_kv.positions has ", c.positions.size(), " entries but the cache has ", c.k.rows, " rows");
  POSENC_ASSERT(static_cast<index_t>(c.lengths.size()) == sequences, call, ": paged_kv.lengths has ",
                c.lengths.size(), " entries for ", sequences, " sequences");
  const index_t capacity = c.pages_per_sequence * c.page_size;
  POSENC_ASSERT(static_cast<index_t>(c.block_table.size()) >= sequences * c.pages_per_sequence, call,
                ": the block table has ", c.block_table.size(), " entries but ", sequences, " sequences x ",
                c.pages_per_sequence, " pages = ", sequences * c.pages_per_sequence, " are needed");
  const index_t pages = c.k.rows / c.page_size;
  for (index_t b = 0; b < sequences; ++b) {
    const index_t len = c.lengths[static_cast<std::size_t>(b)];
    POSENC_ASSERT(len >= 0 && len <= capacity, call, ": paged_kv.lengths[", b, "] = ", len, " is outside [0, ",
                  capacity, "] (pages_per_sequence * page_size)");
    for (index_t blk = 0; blk * c.page_size < len; ++blk) {
      const std::int32_t page = c.block_table[static_cast<std::size_t>(b * c.pages_per_sequence + blk)];
      POSENC_ASSERT(page >= 0 && page < pages, call, ": block_table[", b, "][", blk, "] = ", page,
                    " is not a page of the cache (", pages, " pages)");
    }
  }
  return pages;
}

/// The keys of sequence `b` of a paged cache.
template <class S>
key_map paged_keys(const paged_kv<S>& c, index_t b) {
  key_map m;
  m.pages = c.block_table.data() + b * c.pages_per_sequence;
  m.page_size = c.page_size;
  m.kpos = arange(0, c.lengths[static_cast<std::size_t>(b)]);
  m.row_positions = c.positions.empty() ? nullptr : c.positions.data();
  return m;
}

}  // namespace detail

/// Attention of a batch of sequences with queries and keys packed one sequence after another
/// (FlashAttention's varlen layout): sequence `b` attends its queries, rows `[cu_q[b], cu_q[b+1])`
/// of `q`, to its keys, rows `[cu_k[b], cu_k[b+1])` of `k` and `v`, and only to them. The same
/// result as one `attention` call per sequence, to float rounding.
///
/// \param q, out  `[total_q, heads * d]`; \param k, v  `[total_k, kv_heads * d]` (any row strides).
/// \param cu_q, cu_k  `sequences + 1` cumulative row counts each, from 0 (int32, as FlashAttention).
/// \param qpos, kpos  one position per row of q and of k (per sequence, as that sequence numbers them).
/// \param enc, p, lse, ws  as for `attention` (the encoder acts on q and k; `lse` is `[total_q, heads]`).
/// Throws before any work for invalid knobs, shapes or lengths. With a reused workspace large
/// enough for the batch, allocates nothing.
template <class Q, class K, class V, class O, positional_encoding E, class L = std::nullptr_t>
void attention_varlen(Q&& q, K&& k, V&& v, O&& out, std::span<const std::int32_t> cu_q,
                      std::span<const std::int32_t> cu_k, positions qpos, positions kpos, const E& enc,
                      const attention_params& p, L&& lse = nullptr, attention_workspace* ws = nullptr) {
  static_assert(E::family != encoding_family::additive_input,
                "posenc::attention_varlen: additive-input encoders (sinusoidal) act on token embeddings before the "
                "Q/K/V projections; pass posenc::no_position here");
  const auto qv = view_of(std::forward<Q>(q));
  const auto kv = view_of(std::forward<K>(k));
  const auto vv = view_of(std::forward<V>(v));
  const auto ov = view_of(std::forward<O>(out));
  using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
  using C = compute_t<S>;
  static_assert(!std::is_const_v<std::remove_pointer_t<decltype(ov.data)>>, "posenc::attention_varlen: out must be writable");
  static_assert(std::same_as<typename E::scalar_type, C> || E::family == encoding_family::none,
                "posenc::attention_varlen: the encoder's scalar_type must be the compute type of q/k/v");
  const auto sh = detail::check_attention(p, qv.rows, qv.cols, kv.rows, kv.cols, vv.rows, vv.cols, ov.rows, ov.cols,
                                          qpos.size(), kpos.size());
  const auto lse_view = detail::lse_view_of(std::forward<L>(lse), sh);
  detail::check_encoder_fits(enc, sh);
  POSENC_ASSERT(!cu_q.empty(), "attention_varlen: cu_q is empty; a batch of B sequences has B + 1 entries");
  const auto seqs = static_cast<index_t>(cu_q.size()) - 1;
  detail::check_cumulative(cu_q, seqs, qv.rows, "attention_varlen", "cu_q");
  detail::check_cumulative(cu_k, seqs, kv.rows, "attention_varlen", "cu_k");
  if (sh.n_q == 0) return;

  const auto sizes = [&](index_t b) {
    const auto i = static_cast<std::size_t>(b);
    return std::pair{index_t{cu_q[i + 1] - cu_q[i]}, index_t{cu_k[i + 1] - cu_k[i]}};
  };
  const auto seq_of = [&](index_t b) {
    const auto i = static_cast<std::size_t>(b);
    const index_t k0 = cu_k[i], n_kv = cu_k[i + 1] - cu_k[i];
    return detail::batch_seq{qpos.subset(cu_q[i], cu_q[i + 1] - cu_q[i]), n_kv,
                             detail::key_map{.first = k0, .kpos = kpos.subset(k0, n_kv)}};
  };
  const detail::attention_plan pl = detail::plan_batch<C>(sh, p, enc, seqs, sizes);
  attention_workspace local;
  std::byte* const memory = (ws ? *ws : local).reserve(pl.workspace_bytes);
  detail::seq_plan* const plans = detail::plans_in(memory, pl);
  detail::plan_batch<C>(sh, p, enc, seqs, sizes, plans);
  const index_t d = sh.head_dim;
  detail::run_batch<C>(detail::head_rows_of(qv, d), detail::head_rows_of(kv, d), detail::head_rows_of(vv, d),
                       detail::head_rows_of(ov, d), detail::lse_rows(lse_view), pl, plans, reinterpret_cast<C*>(memory),
                       p, enc, true, seq_of);
}

/// Attention of a batch of sequences whose keys and values are in a paged cache: sequence `b`
/// attends its queries, rows `[cu_q[b], cu_q[b+1])` of `q`, to the `cache.lengths[b]` tokens of its
/// cache, and only to them.
///
/// \param q, out  `[total_q, heads * d]`, any row stride; the queries of each sequence at the
///                positions `qpos` gives (usually the slots `paged_append` wrote them to).
/// \param cache   the cache (`paged_kv`); every page the block table reaches below a sequence's
///                length is checked to exist; no other page is read.
/// \param enc     applied by the call to the queries; to the cached keys too when the cache holds
///                raw keys (`cached_keys::raw`), never when it holds rotated ones. A rotation
///                encoder with `cached_keys::unspecified` is refused.
/// \param p, lse, ws  as for `attention` (`lse` is `[total_q, heads]`).
/// Throws before any work for invalid knobs, shapes, lengths, block tables or page indices. With
/// a reused workspace large enough for the batch, allocates nothing.
template <class Q, class SC, class O, positional_encoding E, class L = std::nullptr_t>
void paged_attention(Q&& q, const paged_kv<SC>& cache, O&& out, std::span<const std::int32_t> cu_q, positions qpos,
                     const E& enc, const attention_params& p, L&& lse = nullptr, attention_workspace* ws = nullptr) {
  static_assert(E::family != encoding_family::additive_input,
                "posenc::paged_attention: additive-input encoders (sinusoidal) act on token embeddings before the "
                "Q/K/V projections; pass posenc::no_position here");
  const auto qv = view_of(std::forward<Q>(q));
  const auto ov = view_of(std::forward<O>(out));
  using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
  using C = compute_t<S>;
  static_assert(!std::is_const_v<std::remove_pointer_t<decltype(ov.data)>>, "posenc::paged_attention: out must be writable");
  static_assert(std::same_as<typename E::scalar_type, C> || E::family == encoding_family::none,
                "posenc::paged_attention: the encoder's scalar_type must be the compute type of q and the cache");
  static_assert(std::same_as<compute_t<std::remove_const_t<SC>>, C>,
                "posenc::paged_attention: q and the cache must compute in the same type (float for float, bf16 and "
                "fp16; double for double)");
  constexpr bool rotation = E::family == encoding_family::rotation;
  if constexpr (rotation)
    detail::require(cache.keys != cached_keys::unspecified, "paged_kv.keys", "unspecified",
                    "say whether the cache holds keys rotated when appended (cached_keys::rotated) or raw keys "
                    "(cached_keys::raw): a rotation encoder must act once on every key");
  POSENC_ASSERT(!cu_q.empty(), "paged_attention: cu_q is empty; a batch of B sequences has B + 1 entries");
  const auto seqs = static_cast<index_t>(cu_q.size()) - 1;
  // The shape checks of attention, with the cache's rows as keys.
  const index_t kvh = detail::check_params(p);
  const auto sh0 = detail::check_attention(p, qv.rows, qv.cols, 0, kvh * (qv.cols / std::max<index_t>(p.heads, 1)), 0,
                                           kvh * (qv.cols / std::max<index_t>(p.heads, 1)), ov.rows, ov.cols,
                                           qpos.size(), 0);
  detail::check_paged(cache, seqs, sh0.kv_heads * sh0.head_dim, "paged_attention");
  detail::check_cumulative(cu_q, seqs, qv.rows, "paged_attention", "cu_q");
  detail::attention_shape sh = sh0;
  for (const std::int32_t len : cache.lengths) sh.n_kv = std::max<index_t>(sh.n_kv, len);
  const auto lse_view = detail::lse_view_of(std::forward<L>(lse), sh);
  detail::check_encoder_fits(enc, sh);
  if (sh.n_q == 0) return;

  const strided_view<const std::remove_const_t<SC>> kc(cache.k), vc(cache.v);
  const auto sizes = [&](index_t b) {
    const auto i = static_cast<std::size_t>(b);
    return std::pair{index_t{cu_q[i + 1] - cu_q[i]}, index_t{cache.lengths[i]}};
  };
  const auto seq_of = [&](index_t b) {
    const auto i = static_cast<std::size_t>(b);
    return detail::batch_seq{qpos.subset(cu_q[i], cu_q[i + 1] - cu_q[i]), cache.lengths[i],
                             detail::paged_keys(cache, b)};
  };
  const detail::attention_plan pl = detail::plan_batch<C>(sh, p, enc, seqs, sizes);
  attention_workspace local;
  std::byte* const memory = (ws ? *ws : local).reserve(pl.workspace_bytes);
  detail::seq_plan* const plans = detail::plans_in(memory, pl);
  detail::plan_batch<C>(sh, p, enc, seqs, sizes, plans);
  const index_t d = sh.head_dim;
  detail::run_batch<C>(detail::head_rows_of(qv, d), detail::head_rows_of(kc, d), detail::head_rows_of(vc, d),
                       detail::head_rows_of(ov, d), detail::lse_rows(lse_view), pl, plans, reinterpret_cast<C*>(memory),
                       p, enc, cache.keys == cached_keys::raw, seq_of);
}

/// Writes a step's new keys and values into a paged cache: row `i` of sequence `b`'s new rows
/// (`[cu_new[b], cu_new[b+1])` of `k_new` and `v_new`) goes to that sequence's token
/// `cache.lengths[b] - n_b + i` (the lengths count this step's tokens). When the cache holds
/// rotated keys (`cached_keys::rotated`) and `enc` is a rotation, the keys are rotated with the
/// token's position (the cache's `positions` for its row, or its index in the sequence) and then
/// rounded once to the cache's type; otherwise they are stored as given. Values are stored as
/// given. `k_new`, `v_new`: `[total_new, kv_heads * d]`, any storage that converts.
///
/// Throws before writing anything for invalid shapes, lengths shorter than the new rows, or a
/// rotation encoder with `cached_keys::unspecified`. Allocates only a workspace for the rotation
/// of at most 64 rows (none with a reused `ws` large enough). Tokens must not share a cache row.
template <class SC, class K, class V, positional_encoding E>
void paged_append(const paged_kv<SC>& cache, K&& k_new, V&& v_new, std::span<const std::int32_t> cu_new, const E& enc,
                  attention_workspace* ws = nullptr) {
  static_assert(!std::is_const_v<SC>, "posenc::paged_append: the cache must be writable (paged_kv<T>, not <const T>)");
  const auto kn = view_of(std::forward<K>(k_new));
  const auto vn = view_of(std::forward<V>(v_new));
  using C = compute_t<SC>;
  constexpr bool rotation = E::family == encoding_family::rotation;
  static_assert(E::family == encoding_family::none || rotation || E::family == encoding_family::score_bias,
                "posenc::paged_append: additive-input encoders act before the projections");
  if constexpr (rotation) {
    static_assert(std::same_as<typename E::scalar_type, C>, "posenc::paged_append: the rope's type must be the "
                                                            "compute type of the cache");
    detail::require(cache.keys != cached_keys::unspecified, "paged_kv.keys", "unspecified",
                    "say whether the cache holds keys rotated when appended (cached_keys::rotated) or raw keys "
                    "(cached_keys::raw): a rotation encoder must act once on every key");
  }
  POSENC_ASSERT(!cu_new.empty(), "paged_append: cu_new is empty; a batch of B sequences has B + 1 entries");
  const auto seqs = static_cast<index_t>(cu_new.size()) - 1;
  detail::check_paged(cache, seqs, cache.k.cols, "paged_append");
  POSENC_ASSERT(kn.cols == cache.k.cols && vn.cols == cache.v.cols, "paged_append: k_new and v_new have ", kn.cols,
                " and ", vn.cols, " columns but the cache has ", cache.k.cols);
  POSENC_ASSERT(vn.rows == kn.rows, "paged_append: k_new has ", kn.rows, " rows but v_new has ", vn.rows);
  detail::check_cumulative(cu_new, seqs, kn.rows, "paged_append", "cu_new");
  for (index_t b = 0; b < seqs; ++b) {
    const auto i = static_cast<std::size_t>(b);
    POSENC_ASSERT(cu_new[i + 1] - cu_new[i] <= cache.lengths[i], "paged_append: sequence ", b, " appends ",
                  cu_new[i + 1] - cu_new[i], " tokens but its length is ", cache.lengths[i],
                  " (lengths count this step's tokens)");
  }
  if constexpr (rotation) {
    if (cache.keys == cached_keys::rotated)
      POSENC_ASSERT(enc.head_dim() > 0 && cache.k.cols % enc.head_dim() == 0, "paged_append: the cache has ",
                    cache.k.cols, " columns, not a multiple of the rope's head_dim = ", enc.head_dim());
  }

  constexpr index_t chunk = 64;
  const bool rotate = rotation && cache.keys == cached_keys::rotated;
  attention_workspace local;
  C* scratch = nullptr;
  auto* scratch_pos = static_cast<position*>(nullptr);
  if (rotate) {
    const auto values = static_cast<std::size_t>(chunk * cache.k.cols);
    std::byte* memory = (ws ? *ws : local).reserve(values * sizeof(C) + chunk * sizeof(position));
    scratch = reinterpret_cast<C*>(memory);
    scratch_pos = reinterpret_cast<position*>(memory + values * sizeof(C));
  }
  for (index_t b = 0; b < seqs; ++b) {
    const auto i = static_cast<std::size_t>(b);
    const index_t first_new = cu_new[i], n = cu_new[i + 1] - cu_new[i];
    const detail::key_map keys = detail::paged_keys(cache, b);
    const index_t slot0 = cache.lengths[i] - n;
    for (index_t t0 = 0; t0 < n;) {
      // A run of consecutive cache rows, at most `chunk` long.
      const index_t run = std::min(chunk, keys.run(slot0 + t0, n - t0));
      const index_t row = keys.row(slot0 + t0);
      for (index_t t = 0; t < run; ++t)
        for (index_t c = 0; c < cache.v.cols; ++c) cache.v(row + t, c) = static_cast<SC>(vn(first_new + t0 + t, c));
      if (rotate) {
        if constexpr (rotation) {
          for (index_t t = 0; t < run; ++t) {
            scratch_pos[t] = cache.positions.empty() ? static_cast<position>(slot0 + t0 + t)
                                                      : cache.positions[static_cast<std::size_t>(row + t)];
            for (index_t c = 0; c < cache.k.cols; ++c)
              scratch[t * cache.k.cols + c] = static_cast<C>(kn(first_new + t0 + t, c));
          }
          enc.rotate(strided_view<C>(scratch, run, cache.k.cols, cache.k.cols),
                     positions(std::span<const position>(scratch_pos, static_cast<std::size_t>(run))));
          for (index_t t = 0; t < run; ++t)
            for (index_t c = 0; c < cache.k.cols; ++c)
              cache.k(row + t, c) = static_cast<SC>(scratch[t * cache.k.cols + c]);
        }
      } else {
        for (index_t t = 0; t < run; ++t)
          for (index_t c = 0; c < cache.k.cols; ++c) cache.k(row + t, c) = static_cast<SC>(kn(first_new + t0 + t, c));
      }
      t0 += run;
    }
  }
}

}  // namespace posenc
