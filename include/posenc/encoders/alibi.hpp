// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/alibi.hpp
/// ALiBi, attention with linear biases (Press, Smith and Lewis 2022, "Train Short, Test Long").
///
/// Every head adds a penalty proportional to the distance between query and key to its logits:
///
///     causal:     b(h, q, k) = -slope_h * (q - k)
///     symmetric:  b(h, q, k) = -slope_h * |q - k|
///
/// The slopes are a geometric sequence fixed by the total head count `n` (BLOOM, MPT, ggml):
/// for `n` a power of two, `slope_h = 2^(-max_bias * (h + 1) / n)` with `max_bias = 8`. Otherwise
/// take the `c` slopes of the largest power of two `c < n`, then the slopes of `2c` at indices
/// 0, 2, 4, ... until `n` are taken, i.e. `2^(-max_bias * (2i + 1) / (2c))` for `i < n - c`.
///   8 heads: 1/2, 1/4, ..., 1/256.
///   12 heads: those eight, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
///
/// Slopes belong to the *global* head index: a process that holds heads `[o, o + n_local)` of a
/// tensor-parallel model sets `num_heads` to the model's head count and `head_offset = o`, and its
/// local head `h` gets the slope of global head `o + h`. (Computing slopes from the local head
/// count is a bug seen in the wild: it silently changes every head's slope.)
///
/// The causal form gives future keys (`k > q`) a positive bias; masking them is the attention
/// kernel's job, not the bias's.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/concepts.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/detail/alibi_kernels.hpp"
#include "posenc/detail/bias_table.hpp"
#include "posenc/detail/cpu.hpp"
#include "posenc/detail/position_math.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Which distance ALiBi penalises.
enum class alibi_form {
  causal,     ///< `-slope * (qpos - kpos)` (decoder models: BLOOM, MPT)
  symmetric,  ///< `-slope * |qpos - kpos|` (encoders, bidirectional attention)
};

/// Runtime knobs of `alibi`. Every field has a default.
struct alibi_params {
  index_t num_heads = 8;                 ///< total (global) head count the slopes are computed for; > 0
  index_t head_offset = 0;               ///< global index of this shard's local head 0; in [0, num_heads)
  alibi_form form = alibi_form::causal;  ///< which distance is penalised
  double max_bias = 8.0;                 ///< exponent scale of the slope rule (8 in the paper, BLOOM, MPT); > 0
};

/// ALiBi linear distance bias; see the file comment for the formula and the slope rule.
///
/// `T` (float or double) is the encoder's arithmetic type for the concept. Slopes are stored in
/// double. Every bias is `-slope * d` in double, where `d` is the exact distance `qpos - kpos` (for
/// any two int64 positions, up to `2^64 - 1`) rounded once to double, and the bias is then rounded
/// to the tile's element type; so a float tile and a double tile hold the roundings of the same
/// number, and distances up to 2^53 enter exactly.
///
/// Immutable after construction; safe to share across threads. Only the constructor allocates.
template <class T>
class alibi {
  static_assert(std::same_as<T, float> || std::same_as<T, double>, "posenc::alibi<T>: T must be float or double");

 public:
  using scalar_type = T;
  static constexpr encoding_family family = encoding_family::score_bias;

  /// Validates the parameters (throws `std::invalid_argument` naming the offending field) and
  /// precomputes the slopes of all `num_heads` global heads. Allocates `num_heads` doubles.
  explicit alibi(const alibi_params& p = {}) : params_(p) {
    check(p);
    slopes_ = slopes(p.num_heads, p.max_bias);
  }

  /// Slopes given instead of the rule (learned slopes, or a model's own): `given` holds the slopes
  /// of all `num_heads` global heads, each finite; they are copied and `max_bias` is not used.
  /// Throws `std::invalid_argument` naming the field. Allocates `num_heads` doubles.
  alibi(const alibi_params& p, std::span<const double> given) : params_(p) {
    check(p);
    detail::require(static_cast<index_t>(given.size()) == p.num_heads, "alibi slopes.size()",
                    static_cast<index_t>(given.size()), "must equal num_heads (" + detail::to_text(p.num_heads) + ")");
    for (std::size_t h = 0; h < given.size(); ++h)
      detail::require(std::isfinite(given[h]), "alibi slopes[" + std::to_string(h) + "]", given[h], "must be finite");
    slopes_.assign(given.begin(), given.end());
  }

  /// "alibi".
  std::string_view name() const { return "alibi"; }

  /// The parameters this encoder was built with.
  const alibi_params& params() const { return params_; }

  /// The slopes of `num_heads` heads by the rule in the file comment (global heads 0 .. n-1).
  /// Throws `std::invalid_argument` for `num_heads <= 0` or `max_bias <= 0` (or not finite).
  /// Allocates the returned vector.
  static std::vector<double> slopes(index_t num_heads, double max_bias = 8.0) {
    detail::require(num_heads > 0, "alibi_params.num_heads", num_heads, "must be positive");
    detail::require(std::isfinite(max_bias) && max_bias > 0, "alibi_params.max_bias", max_bias,
                    "must be positive and finite");
    index_t c = 1;
    while (c <= num_heads / 2) c *= 2;  // largest power of two <= num_heads (c * 2 could overflow)
    std::vector<double> s(static_cast<std::size_t>(num_heads));
    // Exponents -max_bias * m / c are exact for max_bias = 8 and c a power of two, so the common
    // slopes (1/2 ... 1/256) come out exact.
    for (index_t h = 0; h < c; ++h) s[h] = std::exp2(-max_bias * static_cast<double>(h + 1) / static_cast<double>(c));
    for (index_t i = 0; c + i < num_heads; ++i)
      s[c + i] = std::exp2(-max_bias * static_cast<double>(2 * i + 1) / static_cast<double>(2 * c));
    return s;
  }

  /// The slopes of all `num_heads` global heads this encoder uses (by the rule, or as given).
  std::span<const double> global_slopes() const { return slopes_; }

  /// Slope of local head `local_head`, i.e. of global head `local_head + head_offset`.
  /// Precondition: `0 <= local_head` and `local_head + head_offset < num_heads`.
  double slope(index_t local_head) const {
    POSENC_ASSERT(local_head >= 0 && local_head + params_.head_offset < params_.num_heads,
                  "alibi: local head ", local_head, " is outside the encoder's heads (head_offset = ",
                  params_.head_offset, ", num_heads = ", params_.num_heads, ")");
    return slopes_[local_head + params_.head_offset];
  }

  /// The bias of local head `local_head` for a query at `q` and a key at `k`, in double.
  double bias(index_t local_head, position q, position k) const {
    const double d = detail::position_difference(q, k);
    return -slope(local_head) * (params_.form == alibi_form::symmetric ? std::abs(d) : d);
  }

  /// `tile(i, j) += bias(local_head, q[i], k[j])` for a `[q.size(), k.size()]` tile of float or
  /// double logits (row-major, any row stride; elements past `cols` in a row are not touched).
  /// Positions are global: a tile of a larger problem equals the matching block of the full bias
  /// matrix. Does not allocate.
  template <matrix_argument Tile>
  void add_bias_tile(Tile&& tile, index_t local_head, positions q, positions k) const {
    auto t = view_of(std::forward<Tile>(tile));
    using E = std::remove_pointer_t<decltype(t.data)>;
    static_assert(!std::is_const_v<E>, "alibi::add_bias_tile: the tile must be writable");
    static_assert(std::same_as<E, float> || std::same_as<E, double>,
                  "alibi::add_bias_tile: logits tiles hold float or double");
    POSENC_ASSERT(t.rows == q.size() && t.cols == k.size(),
                  "alibi::add_bias_tile: the tile is [", t.rows, ", ", t.cols, "] but there are ", q.size(),
                  " query and ", k.size(), " key positions");
    const double neg_slope = -slope(local_head);
    const bool symmetric = params_.form == alibi_form::symmetric;
    const index_t n = t.cols;
    if (n == 0) return;
    // The float row kernel of the SIMD level in use, chosen once per call.
    const detail::alibi_row_kernel bias_row = std::same_as<E, float> ? detail::select_alibi_row_kernel() : nullptr;
    if constexpr (std::same_as<E, float>) {
      if (k.is_range()) {
        // Rows share tables of biases (detail/bias_table.hpp) where every distance they meet is
        // exact in double, so a table entry is the product the row kernel would compute.
        detail::add_bias_by_table(
            t, q, k.start(), detail::select_add_row_kernel(),
            [](position lo, position hi, position kf, position kl) {
              return exact_in_double(lo, kl) && exact_in_double(hi, kf);
            },
            [&](float* table, index_t span, position hi, position kf) {
              // -0.0f + x is x for every x, zeros included: the table holds the roundings themselves.
              std::fill(table, table + span, -0.0f);
              bias_row(table, span, neg_slope, static_cast<double>(hi - kf), symmetric);
            },
            [&](index_t i, index_t j0, index_t nc, position kf) {
              add_row_key_by_key(t.row(i) + j0, nc, q[i], positions::range(kf, nc), neg_slope, symmetric, bias_row);
            });
        return;
      }
    }
    for (index_t i = 0; i < t.rows; ++i) add_row_key_by_key(t.row(i), n, q[i], k, neg_slope, symmetric, bias_row);
  }

 private:
  // Distances up to 2^53 are exact in double.
  static bool exact_in_double(position a, position b) {
    return detail::position_distance(a, b) <= (std::uint64_t{1} << 53);
  }

  // row[j] += bias of query qi and key k[j], j < n: the float row kernel where the keys are a
  // range within 2^53 of qi (q - k[j] = (qi - k0) - j, monotone in j, every term and difference
  // exact in double), else key by key.
  template <class E>
  static void add_row_key_by_key(E* row, index_t n, position qi, positions k, double neg_slope, bool symmetric,
                                 detail::alibi_row_kernel bias_row) {
    if (k.is_range() && exact_in_double(qi, k.start()) && exact_in_double(qi, k[n - 1])) {
      const double d0 = static_cast<double>(qi - k.start());
      if constexpr (std::same_as<E, float>) {
        bias_row(row, n, neg_slope, d0, symmetric);
      } else {
        detail::alibi_row_portable(row, n, neg_slope, d0, symmetric);
      }
    } else if (symmetric) {
      for (index_t j = 0; j < n; ++j)
        row[j] += static_cast<E>(neg_slope * static_cast<double>(detail::position_distance(qi, k[j])));
    } else {
      for (index_t j = 0; j < n; ++j) row[j] += static_cast<E>(neg_slope * detail::position_difference(qi, k[j]));
    }
  }

  static void check(const alibi_params& p) {
    detail::require(p.num_heads > 0, "alibi_params.num_heads", p.num_heads, "must be positive");
    detail::require(p.head_offset >= 0, "alibi_params.head_offset", p.head_offset, "must be non-negative");
    detail::require(p.head_offset < p.num_heads, "alibi_params.head_offset", p.head_offset,
                    "must be less than num_heads (" + detail::to_text(p.num_heads) + ")");
    detail::require(p.form == alibi_form::causal || p.form == alibi_form::symmetric, "alibi_params.form",
                    static_cast<int>(p.form), "unknown alibi_form");
  }

  alibi_params params_;
  std::vector<double> slopes_;
};

}  // namespace posenc
