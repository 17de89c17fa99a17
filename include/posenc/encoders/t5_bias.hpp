// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/t5_bias.hpp
/// T5 bucketed relative position bias (Raffel et al. 2020), as in Mesh TensorFlow and Hugging Face
/// transformers' `_relative_position_bucket`.
///
/// The relative position `rel = kpos - qpos` is mapped to one of `num_buckets` buckets, and each
/// head adds the learned scalar `table[bucket, head]` to its logits. With `m = num_buckets`:
///
///     bidirectional:  m = m / 2 (floor); offset = (rel > 0 ? m : 0); d = |rel|
///     causal:         offset = 0;                                    d = max(-rel, 0)
///     max_exact = m / 2 (floor)
///     bucket = offset + d                                                    if d < max_exact
///     bucket = offset + min(max_exact + floor(ln(d / max_exact) / ln(max_distance / max_exact)
///                                             * (m - max_exact)),  m - 1)     otherwise
///
/// So near distances get one bucket each, far ones share logarithmically wider buckets, and every
/// distance from about `max_distance` on shares the last bucket of its side. With the defaults (32
/// buckets, max distance 128, bidirectional) keys before or at the query use buckets 0..15 and keys
/// after it 16..31; distances 0..7 are exact, 8..10 share bucket 8, ..., 91 and beyond share 15.
///
/// The floor is that of the real number. The logarithms are evaluated in double as written above
/// (the reference implementations use float32; for the default parameters every distance lands in
/// the same bucket either way), except at exact ties: when the real value is exactly an integer
/// (18 buckets, max distance 128, d = 8: ln 2 / ln 32 * 5 = 1), a floating-point evaluation may
/// come out just below it and lose a bucket, so a value within 1e-9 of an integer is decided in
/// integer arithmetic (is `(d / max_exact)^(m - max_exact) == (max_distance / max_exact)^n`?).
///
/// Positions are global int64, any values: `kpos - qpos` is taken saturated to int64 (a distance
/// past `INT64_MAX` lies in the last bucket of its side either way), so buckets are exact for every
/// pair of positions.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/concepts.hpp"
#include "posenc/detail/bias_table.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/detail/position_math.hpp"
#include "posenc/types.hpp"

namespace posenc {
namespace detail {

// z^e, or -1 when it exceeds int64 (z >= 1, e >= 1).
inline position t5_checked_pow(position z, index_t e) {
  position r = 1;
  for (index_t i = 0; i < e; ++i) {
    if (r > std::numeric_limits<position>::max() / z) return -1;
    r *= z;
  }
  return r;
}

// The integer z with z^b == v, or -1 when there is none (v >= 1, b >= 1).
inline position t5_exact_root(position v, index_t b) {
  if (b == 1) return v;
  const auto guess = static_cast<position>(std::llround(std::pow(static_cast<double>(v), 1.0 / static_cast<double>(b))));
  for (position z = std::max<position>(guess - 1, 1); z <= guess + 1; ++z)
    if (t5_checked_pow(z, b) == v) return z;
  return -1;
}

// Whether (d / me)^N == (md / me)^n exactly, for positive integers. With g = gcd(N, n) this is
// (d / me)^a == (md / me)^b for coprime a = N / g, b = n / g, and for fractions in lowest terms
// p1/q1, p2/q2 that holds iff p1 = z^b, p2 = z^a and q1 = w^b, q2 = w^a for integers z, w.
inline bool t5_exact_tie(position d, position me, position md, index_t N, index_t n) {
  const index_t g = std::gcd(N, n), a = N / g, b = n / g;
  const position g1 = std::gcd(d, me), g2 = std::gcd(md, me);
  const position p1 = d / g1, q1 = me / g1, p2 = md / g2, q2 = me / g2;
  const position z = t5_exact_root(p1, b), w = t5_exact_root(q1, b);
  return z > 0 && w > 0 && t5_checked_pow(z, a) == p2 && t5_checked_pow(w, a) == q2;
}

}  // namespace detail

/// Runtime knobs of `t5_relative_bias`. Every field has a default (T5's).
struct t5_bias_params {
  index_t num_heads = 8;        ///< total (global) head count: the table's column count; > 0
  index_t num_buckets = 32;     ///< the table's row count; >= 4 bidirectional, >= 2 causal
  position max_distance = 128;  ///< distance from which on the last bucket is used; > max_exact
  bool bidirectional = true;    ///< true: encoder self-attention (half the buckets per side); false: decoder
  index_t head_offset = 0;      ///< global index of this shard's local head 0; in [0, num_heads)
};

/// T5 relative position bias with a learned `[num_buckets, num_heads]` table; see the file comment.
///
/// `T` (float or double) is the type the table is stored in. The constructor copies the table (so
/// the caller's buffer may go away) and precomputes a bucket lookup table over the distances below
/// saturation (at most 4097 entries per side), so tiles cost a lookup, not a logarithm, per element;
/// distances past saturation clamp onto the end entries, so list positions need no branch either.
///
/// Immutable after construction; safe to share across threads. Only the constructor allocates.
template <class T>
class t5_relative_bias {
  static_assert(std::same_as<T, float> || std::same_as<T, double>,
                "posenc::t5_relative_bias<T>: T must be float or double");

 public:
  using scalar_type = T;
  static constexpr encoding_family family = encoding_family::score_bias;

  /// Validates the parameters and the table's shape (throws `std::invalid_argument` naming the
  /// field) and copies `table`, a row-major `[num_buckets, num_heads]` matrix whose storage type
  /// suits `T` (`storage_for<S, T>`): row `b` holds every global head's bias for bucket `b`.
  /// Allocates the copy and the lookup tables.
  template <matrix_argument M>
  t5_relative_bias(const t5_bias_params& p, M&& table) : params_(p) {
    validate(p.num_buckets, p.max_distance, p.bidirectional);
    detail::require(p.num_heads > 0, "t5_bias_params.num_heads", p.num_heads, "must be positive");
    detail::require(p.head_offset >= 0, "t5_bias_params.head_offset", p.head_offset, "must be non-negative");
    detail::require(p.head_offset < p.num_heads, "t5_bias_params.head_offset", p.head_offset,
                    "must be less than num_heads (" + detail::to_text(p.num_heads) + ")");
    auto v = view_of(std::forward<M>(table));
    using S = std::remove_const_t<std::remove_pointer_t<decltype(v.data)>>;
    static_assert(storage_for<S, T>, "t5_relative_bias: the table's storage type does not suit T");
    detail::require(v.rows == p.num_buckets, "t5 table.rows", v.rows,
                    "must equal num_buckets (" + detail::to_text(p.num_buckets) + ")");
    detail::require(v.cols == p.num_heads, "t5 table.cols", v.cols,
                    "must equal num_heads (" + detail::to_text(p.num_heads) + ")");
    // Stored head-major, so a tile's lookups for one head stay in one short contiguous array.
    table_.resize(static_cast<std::size_t>(p.num_heads * p.num_buckets));
    for (index_t b = 0; b < p.num_buckets; ++b)
      for (index_t h = 0; h < p.num_heads; ++h) table_[h * p.num_buckets + b] = static_cast<T>(v(b, h));

    half_ = p.bidirectional ? p.num_buckets / 2 : p.num_buckets;
    max_exact_ = half_ / 2;
    // thresholds_[t - 1] = smallest distance whose bucket within its half is max_exact + t. Found
    // by bisection on the formula itself (monotone in d), so the fast path and `bucket()` agree.
    for (index_t t = 1; max_exact_ + t <= half_ - 1; ++t) {
      position lo = max_exact_, hi = p.max_distance;  // offset(lo) = 0 < t <= offset(hi)
      while (hi - lo > 1) {
        const position mid = lo + (hi - lo) / 2;
        (in_half(mid, half_, max_exact_, p.max_distance) >= max_exact_ + t ? hi : lo) = mid;
      }
      thresholds_.push_back(hi);
    }
    saturation_ = thresholds_.empty() ? static_cast<position>(max_exact_) : thresholds_.back();
    reach_ = std::min<position>(saturation_, lookup_cap);
    // One more entry on each side: when saturated, it stands for every farther distance too.
    near_.resize(static_cast<std::size_t>(2 * reach_ + 3));
    for (position r = -reach_ - 1; r <= reach_ + 1; ++r)
      near_[r + reach_ + 1] = static_cast<std::int32_t>(bucket_slow(r));
  }

  /// "t5_relative_bias".
  std::string_view name() const { return "t5_relative_bias"; }

  /// The parameters this encoder was built with.
  const t5_bias_params& params() const { return params_; }

  /// The bucket of `relative = kpos - qpos` by the formula in the file comment. Throws
  /// `std::invalid_argument` for parameters that make the formula meaningless (`num_buckets` too
  /// small for `max_exact >= 1`, `max_distance <= max_exact`).
  static index_t bucket(position relative, index_t num_buckets, position max_distance, bool bidirectional) {
    validate(num_buckets, max_distance, bidirectional);
    const index_t half = bidirectional ? num_buckets / 2 : num_buckets;
    const index_t offset = bidirectional && relative > 0 ? half : 0;
    const position d = bidirectional ? distance(relative) : (relative < 0 ? distance(relative) : 0);
    return offset + in_half(d, half, half / 2, max_distance);
  }

  /// The bucket of `relative = kpos - qpos` under this encoder's parameters (lookup, no logarithm).
  index_t bucket(position relative) const {
    if (relative >= -reach_ && relative <= reach_) return near_[relative + reach_ + 1];
    return far_bucket(relative);
  }

  /// The bias of local head `local_head` (global head `local_head + head_offset`) for a query at
  /// `q` and a key at `k`: `table[bucket(k - q), head]`, for any int64 `q` and `k`.
  double bias(index_t local_head, position q, position k) const {
    return static_cast<double>(head_table(local_head)[bucket(detail::saturating_difference(k, q))]);
  }

  /// `tile(i, j) += bias(local_head, q[i], k[j])` for a `[q.size(), k.size()]` tile of float or
  /// double logits (row-major, any row stride; elements past `cols` in a row are not touched).
  /// Positions are global. Does not allocate.
  template <matrix_argument Tile>
  void add_bias_tile(Tile&& tile, index_t local_head, positions q, positions k) const {
    auto t = view_of(std::forward<Tile>(tile));
    using E = std::remove_pointer_t<decltype(t.data)>;
    static_assert(!std::is_const_v<E>, "t5_relative_bias::add_bias_tile: the tile must be writable");
    static_assert(std::same_as<E, float> || std::same_as<E, double>,
                  "t5_relative_bias::add_bias_tile: logits tiles hold float or double");
    POSENC_ASSERT(t.rows == q.size() && t.cols == k.size(),
                  "t5_relative_bias::add_bias_tile: the tile is [", t.rows, ", ", t.cols, "] but there are ",
                  q.size(), " query and ", k.size(), " key positions");
    const T* bias_h = head_table(local_head);
    if constexpr (std::same_as<E, float>) {
      if (k.is_range() && t.cols > 0) {
        // Rows share tables of biases (detail/bias_table.hpp) where every relative position they
        // meet lies within 2^62 (so k - q and its offsets are plain int64 arithmetic).
        constexpr std::uint64_t close = std::uint64_t{1} << 62;
        detail::add_bias_by_table(
            t, q, k.start(), detail::select_add_row_kernel(),
            [](position lo, position hi, position kf, position kl) {
              return detail::position_distance(kf, hi) < close && detail::position_distance(kl, lo) < close;
            },
            [&](float* table, index_t span, position hi, position kf) { fill_table(table, span, kf - hi, bias_h); },
            [&](index_t i, index_t j0, index_t nc, position kf) {
              add_row(t.row(i) + j0, nc, q[i], positions::range(kf, nc), bias_h);
            });
        return;
      }
    }
    for (index_t i = 0; i < t.rows; ++i) add_row(t.row(i), t.cols, q[i], k, bias_h);
  }

 private:
  // row[j] += table entry of the bucket of k[j] - qi, j < n (the row path of add_bias_tile).
  template <class E>
  void add_row(E* row, index_t n, position qi, positions k, const T* bias_h) const {
    const std::int32_t* near_mid = near_.data() + reach_ + 1;  // near_mid[r] for r in [-reach_-1, reach_+1]
    const position lim = reach_ + 1;
    if (reach_ != saturation_) {
      for (index_t j = 0; j < n; ++j) row[j] += static_cast<E>(bias_h[bucket(detail::saturating_difference(k[j], qi))]);
    } else if (k.is_range() && detail::difference_fits(k.start(), qi)) {
      // rel = r0 + j runs through three segments: all beyond -reach_ (one bucket), the lookup
      // window, all beyond +reach_ (one bucket). The bounds -lim - r0 and lim - r0 may pass the
      // int64 range; saturated, they still clamp to the same column.
      const position r0 = k.start() - qi;
      const index_t j1 = static_cast<index_t>(std::clamp<position>(detail::saturating_difference(-reach_, r0), 0, n));
      const index_t j2 = static_cast<index_t>(std::clamp<position>(detail::saturating_difference(lim, r0), j1, n));
      const E below = static_cast<E>(bias_h[near_mid[-lim]]);
      const E above = static_cast<E>(bias_h[near_mid[lim]]);
      for (index_t j = 0; j < j1; ++j) row[j] += below;
      for (index_t j = j1; j < j2; ++j) row[j] += static_cast<E>(bias_h[near_mid[r0 + j]]);
      for (index_t j = j2; j < n; ++j) row[j] += above;
    } else {
      // Every distance past saturation shares the end entries: a clamp, no branch.
      for (index_t j = 0; j < n; ++j)
        row[j] += static_cast<E>(
            bias_h[near_mid[std::clamp<position>(detail::saturating_difference(k[j], qi), -lim, lim)]]);
    }
  }

  // table[v] = float(bias_h[bucket(r0 + v)]) for v < span, |r0| < 2^62 (a shared table of
  // add_bias_tile). When saturated, the same three segments as add_row: one entry below the lookup
  // window, the window, one entry above it.
  void fill_table(float* table, index_t span, position r0, const T* bias_h) const {
    if (reach_ != saturation_) {
      for (index_t v = 0; v < span; ++v) table[v] = static_cast<float>(bias_h[bucket(r0 + static_cast<position>(v))]);
      return;
    }
    const std::int32_t* near_mid = near_.data() + reach_ + 1;
    const position lim = reach_ + 1;
    const index_t v1 = static_cast<index_t>(std::clamp<position>(-reach_ - r0, 0, span));
    const index_t v2 = static_cast<index_t>(std::clamp<position>(lim - r0, v1, span));
    std::fill(table, table + v1, static_cast<float>(bias_h[near_mid[-lim]]));
    for (index_t v = v1; v < v2; ++v) table[v] = static_cast<float>(bias_h[near_mid[r0 + v]]);
    std::fill(table + v2, table + span, static_cast<float>(bias_h[near_mid[lim]]));
  }

  static constexpr position lookup_cap = 4096;

  static void validate(index_t num_buckets, position max_distance, bool bidirectional) {
    if (bidirectional) {
      detail::require(num_buckets >= 4, "t5_bias_params.num_buckets", num_buckets,
                      "bidirectional buckets need num_buckets >= 4 (max_exact = num_buckets / 4 must be >= 1)");
    } else {
      detail::require(num_buckets >= 2, "t5_bias_params.num_buckets", num_buckets,
                      "causal buckets need num_buckets >= 2 (max_exact = num_buckets / 2 must be >= 1)");
    }
    const index_t max_exact = (bidirectional ? num_buckets / 2 : num_buckets) / 2;
    detail::require(max_distance > max_exact, "t5_bias_params.max_distance", max_distance,
                    "must exceed max_exact (" + detail::to_text(max_exact) + ")");
  }

  // |relative|, with INT64_MIN taken as INT64_MAX (negating it would overflow; both lie past any
  // max_distance, so they share the last bucket of their side).
  static position distance(position relative) {
    if (relative >= 0) return relative;
    return relative == std::numeric_limits<position>::min() ? std::numeric_limits<position>::max() : -relative;
  }

  // Bucket within one half for a distance d >= 0.
  static index_t in_half(position d, index_t half, index_t max_exact, position max_distance) {
    if (d < max_exact) return static_cast<index_t>(d);
    const index_t wide = half - max_exact;  // buckets for the logarithmic range
    const double me = static_cast<double>(max_exact);
    const double v = std::log(static_cast<double>(d) / me) / std::log(static_cast<double>(max_distance) / me) *
                     static_cast<double>(wide);
    if (!(v < static_cast<double>(wide - 1))) return half - 1;  // saturated (also keeps the cast in range)
    auto t = static_cast<index_t>(v);                          // v >= 0: truncation is the floor
    const double n = std::round(v);
    if (n >= 1 && std::abs(v - n) < 1e-9) {
      // Near an integer: decide exactly whether the real value is that integer.
      const auto ni = static_cast<index_t>(n);
      t = detail::t5_exact_tie(d, max_exact, max_distance, wide, ni) ? ni : (v < n ? ni - 1 : ni);
    }
    return std::min(max_exact + t, half - 1);
  }

  index_t bucket_slow(position relative) const {
    return bucket(relative, params_.num_buckets, params_.max_distance, params_.bidirectional);
  }

  // Bucket for |relative| > reach_, from the thresholds (no logarithm).
  index_t far_bucket(position relative) const {
    const index_t offset = params_.bidirectional && relative > 0 ? half_ : 0;
    const position d = params_.bidirectional ? distance(relative) : (relative < 0 ? distance(relative) : 0);
    if (d < max_exact_) return offset + static_cast<index_t>(d);
    const auto above = std::upper_bound(thresholds_.begin(), thresholds_.end(), d) - thresholds_.begin();
    return offset + max_exact_ + static_cast<index_t>(above);
  }

  const T* head_table(index_t local_head) const {
    POSENC_ASSERT(local_head >= 0 && local_head + params_.head_offset < params_.num_heads,
                  "t5_relative_bias: local head ", local_head, " is outside the encoder's heads (head_offset = ",
                  params_.head_offset, ", num_heads = ", params_.num_heads, ")");
    return table_.data() + (local_head + params_.head_offset) * params_.num_buckets;
  }

  t5_bias_params params_;
  std::vector<T> table_;  // [num_heads][num_buckets]
  index_t half_ = 0;
  index_t max_exact_ = 0;
  std::vector<position> thresholds_;
  position saturation_ = 0;  // smallest distance in the last bucket of its half
  position reach_ = 0;       // near_ covers rel in [-reach_ - 1, reach_ + 1]
  std::vector<std::int32_t> near_;
};

}  // namespace posenc
