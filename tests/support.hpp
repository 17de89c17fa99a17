// Helpers shared by the test files (all linked into one executable).
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <stdexcept>

#include "posenc/types.hpp"

/// The call throws std::invalid_argument whose message names the parameter (contains `text`).
#define CHECK_INVALID(expr, text)                   \
  do {                                              \
    CHECK_THROWS_AS(expr, std::invalid_argument);   \
    CHECK_THROWS_WITH(expr, Catch::Contains(text)); \
  } while (false)

namespace posenc_test {

/// A `[rows, cols]` matrix of normal samples with standard deviation `amp`, the same for a seed.
template <class T>
posenc::row_matrix<T> random_normal(posenc::index_t rows, posenc::index_t cols, unsigned seed, double amp = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0, amp);
  posenc::row_matrix<T> m(rows, cols);
  for (posenc::index_t i = 0; i < rows; ++i)
    for (posenc::index_t j = 0; j < cols; ++j) m(i, j) = static_cast<T>(n(rng));
  return m;
}

/// The largest |got - ref| over two matrices of one shape, and in `*where` the flat index of that
/// element; a NaN difference counts as the largest.
template <class T>
double max_abs_diff(const posenc::row_matrix<T>& got, const posenc::row_matrix<double>& ref, posenc::index_t* where) {
  double worst = 0;
  for (posenc::index_t i = 0; i < got.size(); ++i) {
    const double e = std::abs(static_cast<double>(got.data()[i]) - ref.data()[i]);
    if (e > worst || std::isnan(e)) worst = e, *where = i;
  }
  return worst;
}

}  // namespace posenc_test
