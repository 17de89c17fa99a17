// Helpers for the hidden setup and checks of documentation snippets (tests/snippets/README.md).
// Included by every generated C++ snippet after the snippet's own #include lines.
//
// It uses the standard library and Eigen only, and names nothing of posenc, so a snippet that
// forgets a posenc header still fails to compile. Its naive attention is written from the
// formula, independently of posenc, for checks that compare a snippet's output with it.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <vector>

namespace snippet {

using index = Eigen::Index;
template <class S = float>
using matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A `[rows, cols]` row-major matrix of standard normal values drawn from `seed`.
template <class S = float>
matrix<S> random(index rows, index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  matrix<S> m(rows, cols);
  for (index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(normal(rng));
  return m;
}

/// `rows` random values, for buffers a snippet reads as if they came from a checkpoint.
inline std::vector<float> random_buffer(index rows, unsigned seed) {
  const matrix<float> m = random<float>(rows, 1, seed);
  return {m.data(), m.data() + m.size()};
}

/// Largest absolute elementwise difference of two matrices of the same shape (infinity when the
/// shapes differ or an element is not finite).
template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (index i = 0; i < a.rows(); ++i)
    for (index j = 0; j < a.cols(); ++j) {
      const double d = std::abs(static_cast<double>(a(i, j)) - static_cast<double>(b(i, j)));
      if (!(d <= worst)) worst = std::isnan(d) ? std::numeric_limits<double>::infinity() : d;
    }
  return worst;
}

/// Naive softmax attention in double, from the formula: for query head h (kv head
/// `h / (heads / kv_heads)`), `s_ij = scale q_i . k_j + bias(h, i, j)` over the keys that
/// `visible(i, j)` allows, `out_i = sum_j softmax_j(s_ij) (v_j + value_term(i, j))`.
/// `bias(h, i, j)` and `value_term(i, j, c)` take row indices; nullptr means none. Shaw's
/// key term goes into `bias` as `scale q_i . aK[r(i, j)]`.
struct naive_options {
  index heads = 1, kv_heads = 0;
  double scale = 0;  // 0: 1/sqrt(head_dim)
  std::function<bool(index, index)> visible = nullptr;
  std::function<double(index, index, index)> bias = nullptr;
  std::function<double(index, index, index)> value_term = nullptr;
};

template <class Q, class K, class V>
matrix<double> naive_attention(const Q& q, const K& k, const V& v, const naive_options& o) {
  const index heads = o.heads, kv_heads = o.kv_heads ? o.kv_heads : o.heads, d = q.cols() / heads;
  const double scale = o.scale != 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(d));
  matrix<double> out = matrix<double>::Zero(q.rows(), q.cols());
  std::vector<double> s(static_cast<std::size_t>(k.rows()));
  for (index h = 0; h < heads; ++h) {
    const index g = h / (heads / kv_heads);
    for (index i = 0; i < q.rows(); ++i) {
      double mx = -std::numeric_limits<double>::infinity();
      for (index j = 0; j < k.rows(); ++j) {
        double& sj = s[static_cast<std::size_t>(j)];
        if (o.visible && !o.visible(i, j)) {
          sj = -std::numeric_limits<double>::infinity();
          continue;
        }
        sj = 0;
        for (index c = 0; c < d; ++c) sj += static_cast<double>(q(i, h * d + c)) * static_cast<double>(k(j, g * d + c));
        sj = sj * scale + (o.bias ? o.bias(h, i, j) : 0.0);
        mx = std::max(mx, sj);
      }
      if (mx == -std::numeric_limits<double>::infinity()) continue;  // no visible key: zeros
      double sum = 0;
      for (double& sj : s) sum += (sj = std::exp(sj - mx));
      for (index j = 0; j < k.rows(); ++j) {
        const double a = s[static_cast<std::size_t>(j)] / sum;
        if (a == 0) continue;
        for (index c = 0; c < d; ++c)
          out(i, h * d + c) +=
              a * (static_cast<double>(v(j, g * d + c)) + (o.value_term ? o.value_term(i, j, c) : 0.0));
      }
    }
  }
  return out;
}

[[noreturn]] inline void fail(const char* file, int line, const char* what) {
  std::fprintf(stderr, "%s:%d: snippet check failed: %s\n", file, line, what);
  std::exit(1);
}

}  // namespace snippet

/// Checks a condition in a snippet's hidden code; prints the Markdown file and line on failure.
#define SNIPPET_CHECK(cond) ((cond) ? void(0) : ::snippet::fail(__FILE__, __LINE__, #cond))
/// Checks `|a - b| <= tol` elementwise for matrices (scalars: use SNIPPET_CHECK); prints the error.
#define SNIPPET_CHECK_CLOSE(a, b, tol)                                                                          \
  do {                                                                                                          \
    const double snippet_err_ = ::snippet::max_abs_diff((a), (b));                                              \
    std::printf("%s:%d: largest difference %.3g (tolerance %.3g)\n", __FILE__, __LINE__, snippet_err_,         \
                static_cast<double>(tol));                                                                      \
    if (!(snippet_err_ <= (tol))) ::snippet::fail(__FILE__, __LINE__, "|" #a " - " #b "| <= " #tol);            \
  } while (false)
