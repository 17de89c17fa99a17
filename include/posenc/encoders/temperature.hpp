// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/temperature.hpp
/// Position-dependent query temperature (Llama 4's `attn_temperature_tuning` on its layers without
/// position encoding): the query of the token at position `p` is multiplied by
///
///     t(p) = ln(floor((p + 1) / floor_scale) + 1) * attn_scale + 1
///
/// so `t = 1` for the first `floor_scale - 1` positions and it grows by `attn_scale * ln 2` at
/// position `floor_scale - 1`, and logarithmically after. Positions are int64 and the floor is
/// taken in integer arithmetic (exact for every position); `t` is evaluated in double and each
/// query element is multiplied in double and rounded once to its storage type.
///
/// Apply it to the queries before attention (the logits of row `i` scale by `t(qpos[i])`); it is
/// not an encoder of its own: the layer has no position encoding (`no_position`).

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <utility>

#include "posenc/config.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Parameters of the query temperature (Llama 4's `floor_scale`, `attn_scale`).
struct query_temperature_params {
  position floor_scale = 8192;  ///< positions per step of the floor, `> 0`
  double attn_scale = 0.1;      ///< growth per e-fold of `floor((p + 1) / floor_scale) + 1`, finite, `>= 0`
};

/// The query temperature `t(p)` of temperature.hpp. Construction throws `std::invalid_argument`
/// naming the field for `floor_scale <= 0` or an `attn_scale` that is negative, not finite, or so
/// large (above about 4e306) that a factor would overflow.
/// Immutable; `scale_queries` allocates nothing.
class query_temperature {
 public:
  explicit query_temperature(const query_temperature_params& p) : p_(p) {
    detail::require(p.floor_scale > 0, "query_temperature_params.floor_scale", p.floor_scale, "must be > 0");
    // t(p) <= ln(2^63) attn_scale + 1 (about 43.7 attn_scale + 1) must be finite for every position.
    detail::require(std::isfinite(p.attn_scale) && p.attn_scale >= 0 && std::isfinite(44.0 * p.attn_scale + 1.0),
                    "query_temperature_params.attn_scale", p.attn_scale,
                    "must be finite, >= 0 and small enough that every factor is finite");
  }

  const query_temperature_params& params() const { return p_; }

  /// `t(p)` for a position `p >= 0` (a negative position has no temperature: `precondition_error`).
  double factor(position p) const {
    POSENC_ASSERT(p >= 0, "query_temperature::factor: position ", p, " is negative");
    // floor((p + 1) / f) in 64-bit unsigned arithmetic: p + 1 <= 2^63 fits there (in int64 it
    // overflows at the largest position, where floor_scale = 1 gives 2^63 steps).
    const auto steps = (static_cast<std::uint64_t>(p) + 1) / static_cast<std::uint64_t>(p_.floor_scale);
    return std::log(static_cast<double>(steps) + 1.0) * p_.attn_scale + 1.0;
  }

  /// Multiplies row `i` of `q` (`[tokens, heads * head_dim]`, row-major, any row stride, float,
  /// double, bf16 or fp16) by `t(pos[i])`, in place. Throws `precondition_error`, before touching
  /// `q`, unless `pos.size() == rows` and every position is `>= 0`. No allocation.
  template <matrix_argument M>
  void scale_queries(M&& q, positions pos) const {
    auto v = view_of(std::forward<M>(q));
    using S = std::remove_pointer_t<decltype(v.data)>;
    static_assert(!std::is_const_v<S>,
                  "posenc::query_temperature::scale_queries: q is scaled in place and must be mutable");
    POSENC_ASSERT(pos.size() == v.rows, "query_temperature::scale_queries: ", pos.size(), " positions for ", v.rows,
                  " rows (one per row is needed)");
    for (index_t i = 0; i < v.rows; ++i)
      POSENC_ASSERT(pos[i] >= 0, "query_temperature::scale_queries: position ", pos[i], " (row ", i, ") is negative");
    for (index_t i = 0; i < v.rows; ++i) {
      const double t = factor(pos[i]);
      S* row = v.row(i);
      for (index_t j = 0; j < v.cols; ++j) row[j] = static_cast<S>(static_cast<double>(row[j]) * t);
    }
  }

 private:
  query_temperature_params p_;
};

}  // namespace posenc
