// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/mask.hpp
/// The visibility rule of every attention path, in one place: which keys a query sees under a
/// causal mask, a sliding window and chunked attention, decided in exact int64 arithmetic for any
/// positions.
///
/// Key `k` is visible to query `q` when
///
///     causal:         k <= q
///     window_left:    k >= q - window_left     (-1: unbounded)
///     window_right:   k <= q + window_right    (-1: unbounded; moot under causal)
///     chunk:          floor(k / chunk) == floor(q / chunk)   (0: no chunks; Llama 4's
///                     `attention_chunk_size`: a token sees only the keys of its own chunk)
///
///     chunk = 4, causal (x: visible)    k: 0 1 2 3 | 4 5 6 7
///                                    q = 5:  . . . . | x x . .
///
/// For a query these bounds are one interval of key positions, `keys_for(q)` (the chunk is an
/// interval that contains `q`, and so is the window); for a set of keys `[klo, khi]` the queries
/// that see at least one of them are one interval, `queries_for`. Both bounds grow with the
/// position (a chunk's first and last position do too), which makes tile tests (`any_visible`,
/// `all_visible`) two comparisons, so tiles outside every query's chunk are skipped like tiles
/// outside a window. A bound past the int64 range is clamped to it: every int64 position lies inside
/// the clamped bound exactly when it lies inside the true one, so nothing is rounded (a test in
/// double drops keys beyond 2^53) and nothing overflows. The blockwise kernel, its tile skipping,
/// the naive reference and ring attention's choice of query rows all call these functions.

#include <algorithm>
#include <cstdint>
#include <limits>

#include "posenc/types.hpp"

namespace posenc::detail {

inline constexpr position position_min = std::numeric_limits<position>::min();
inline constexpr position position_max = std::numeric_limits<position>::max();

/// `a - b`, clamped to the int64 range.
constexpr position sat_sub(position a, position b) {
  if (b > 0 && a < position_min + b) return position_min;
  if (b < 0 && a > position_max + b) return position_max;
  return a - b;
}

/// `a + b`, clamped to the int64 range.
constexpr position sat_add(position a, position b) {
  if (b > 0 && a > position_max - b) return position_max;
  if (b < 0 && a < position_min - b) return position_min;
  return a + b;
}

/// How many of the positions `start, start + 1, ..., start + n - 1` are below `x`.
constexpr index_t count_below(position x, position start, index_t n) {
  if (x <= start) return 0;
  const std::uint64_t d = static_cast<std::uint64_t>(x) - static_cast<std::uint64_t>(start);
  return d >= static_cast<std::uint64_t>(n) ? n : static_cast<index_t>(d);
}

/// How many of the positions `start, ..., start + n - 1` are at most `x`.
constexpr index_t count_upto(position x, position start, index_t n) {
  if (x < start) return 0;
  const std::uint64_t d = static_cast<std::uint64_t>(x) - static_cast<std::uint64_t>(start);
  return d >= static_cast<std::uint64_t>(n) ? n : static_cast<index_t>(d) + 1;
}

/// The closed interval `[lo, hi]` of positions (empty when `lo > hi`).
struct position_span {
  position lo, hi;
};

/// Smallest and largest position of a non-empty set (O(1) for a range).
inline position_span bounds_of(positions p) {
  if (p.is_range()) return {p.start(), p.start() + (static_cast<position>(p.size()) - 1)};  // fits: see positions
  position lo = p[0], hi = p[0];
  for (index_t i = 1; i < p.size(); ++i) lo = std::min(lo, p[i]), hi = std::max(hi, p[i]);
  return {lo, hi};
}

/// The positions `[lo, hi]` of the chunk of `chunk > 0` positions that holds `p`: `lo` is `p`
/// rounded down to a multiple of `chunk` (toward -inf for negative positions), both clamped to the
/// int64 range (the clamped chunk holds the same int64 positions).
constexpr position_span chunk_of(position p, position chunk) {
  position r = p % chunk;
  if (r < 0) r += chunk;
  return {sat_sub(p, r), sat_add(p, (chunk - 1) - r)};
}

/// The masking rule of one attention call: causal, the sliding window (-1 = unbounded side) and
/// the chunk size (0 = none). Built from `attention_params` by `mask_rule_of` (params.hpp).
struct mask_rule {
  bool causal = false;
  position left = -1;
  position right = -1;
  position chunk = 0;

  /// Keys visible to the query at `q`: the interval `[lo, hi]`, never empty (it holds `q`).
  constexpr position_span keys_for(position q) const {
    position lo = left >= 0 ? sat_sub(q, left) : position_min;
    position hi = causal ? q : position_max;
    if (right >= 0) hi = std::min(hi, sat_add(q, right));
    if (chunk > 0) {
      const position_span c = chunk_of(q, chunk);
      lo = std::max(lo, c.lo);
      hi = std::min(hi, c.hi);
    }
    return {lo, hi};
  }

  /// Queries that see at least one key of `[klo, khi]` (`klo <= khi`): an interval.
  constexpr position_span queries_for(position klo, position khi) const {
    // q sees k  <=>  k - reach_right <= q <= k + left, with reach_right = 0 under causal.
    const position reach_right = causal ? 0 : right;
    position lo = reach_right >= 0 ? sat_sub(klo, reach_right) : position_min;
    position hi = left >= 0 ? sat_add(khi, left) : position_max;
    if (chunk > 0) {
      // And q shares a chunk with some key of [klo, khi]. The three intervals (the window's
      // queries, the chunks of [klo, khi], and for each such q its own chunk and window, which
      // both hold q) meet pairwise, so on a line they meet in a common key: the bound is exact.
      lo = std::max(lo, chunk_of(klo, chunk).lo);
      hi = std::min(hi, chunk_of(khi, chunk).hi);
    }
    return {lo, hi};
  }

  /// The key at `k` is visible to the query at `q`.
  constexpr bool visible(position q, position k) const {
    const position_span s = keys_for(q);
    return k >= s.lo && k <= s.hi;
  }

  /// Some key of `k` may be visible to some query of `q` (false: the pair can be skipped).
  constexpr bool any_visible(position_span q, position_span k) const {
    return keys_for(q.lo).lo <= k.hi && keys_for(q.hi).hi >= k.lo;
  }

  /// Every key of `k` is visible to every query of `q` (true: no element needs masking).
  constexpr bool all_visible(position_span q, position_span k) const {
    return keys_for(q.hi).lo <= k.lo && keys_for(q.lo).hi >= k.hi;
  }

  /// Sets `row[j]` to -inf for each key `kp[j]` the query at `q` does not see. For a key range
  /// the visible keys are one run of the row, found with `count_below` / `count_upto`.
  template <class C>
  void mask_row(position q, positions kp, C* row) const {
    constexpr C neg_inf = -std::numeric_limits<C>::infinity();
    const index_t n = kp.size();
    const position_span s = keys_for(q);
    if (kp.is_range()) {
      const index_t a = count_below(s.lo, kp.start(), n);
      const index_t b = std::max(a, count_upto(s.hi, kp.start(), n));
      std::fill(row, row + a, neg_inf);
      std::fill(row + b, row + n, neg_inf);
      return;
    }
    for (index_t j = 0; j < n; ++j)
      if (kp[j] < s.lo || kp[j] > s.hi) row[j] = neg_inf;
  }
};

}  // namespace posenc::detail
