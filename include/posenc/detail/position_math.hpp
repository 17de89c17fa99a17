// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/position_math.hpp
/// Internal: sums and differences of two int64 positions without overflow. The difference of two
/// positions needs 65 bits (`INT64_MAX - INT64_MIN = 2^64 - 1`), so encoders never form it in
/// int64: a bias takes its correctly rounded double, a clipped index or bucket its value saturated
/// to int64, and a tile's column bounds the saturated difference clamped to the tile.
/// Portable C++ (unsigned arithmetic, no compiler builtins, no 128-bit type).

#include <cstdint>
#include <limits>

#include "posenc/types.hpp"

namespace posenc::detail {

/// `|a - b|`, exact: the distance of any two int64 values fits in uint64.
constexpr std::uint64_t position_distance(position a, position b) {
  return a >= b ? static_cast<std::uint64_t>(a) - static_cast<std::uint64_t>(b)
                : static_cast<std::uint64_t>(b) - static_cast<std::uint64_t>(a);
}

/// `a - b` rounded once to double (round to nearest even), for any int64 `a`, `b`: exact while
/// `|a - b| <= 2^53`.
constexpr double position_difference(position a, position b) {
  const double d = static_cast<double>(position_distance(a, b));
  return a >= b ? d : -d;
}

/// `a - b` when it fits in int64, else `INT64_MAX` or `INT64_MIN` by its sign.
constexpr position saturating_difference(position a, position b) {
  constexpr position hi = std::numeric_limits<position>::max(), lo = std::numeric_limits<position>::min();
  if (b < 0 && a > hi + b) return hi;  // hi + b does not overflow for b < 0
  if (b > 0 && a < lo + b) return lo;  // nor lo + b for b > 0
  return a - b;
}

/// Whether `a - b` fits in int64.
constexpr bool difference_fits(position a, position b) {
  return b < 0 ? a <= std::numeric_limits<position>::max() + b : a >= std::numeric_limits<position>::min() + b;
}

/// `a + b` rounded once to double, for any int64 `a`, `b` (the exact sum lies in [-2^64, 2^64 - 2]).
constexpr double position_sum(position a, position b) {
  constexpr position hi = std::numeric_limits<position>::max(), lo = std::numeric_limits<position>::min();
  if (b > 0 ? a <= hi - b : a >= lo - b) return static_cast<double>(a + b);  // fits: one rounding
  // Both have the sign of the sum; their magnitudes add exactly in uint64, except 2^63 + 2^63.
  const bool negative = a < 0;
  const std::uint64_t ma = negative ? 0 - static_cast<std::uint64_t>(a) : static_cast<std::uint64_t>(a);
  const std::uint64_t mb = negative ? 0 - static_cast<std::uint64_t>(b) : static_cast<std::uint64_t>(b);
  const std::uint64_t m = ma + mb;                            // wraps to 0 only for 2^64
  const double d = m == 0 ? 0x1p64 : static_cast<double>(m);  // uint64 -> double rounds once
  return negative ? -d : d;
}

}  // namespace posenc::detail
