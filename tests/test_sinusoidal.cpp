// Sinusoidal absolute encoding against a long double reference written from Vaswani et al.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "posenc/encoders/sinusoidal.hpp"

using posenc::index_t;
using posenc::position;

namespace {

template <class T>
constexpr double eps = std::numeric_limits<T>::epsilon();

// The formula, written out per layout: PE[p, 2i] = sin(p / base^(2i/dim)) in the paper.
long double reference(position p, index_t dim, index_t col, long double base, bool concatenated, bool shifted) {
  const index_t half = dim / 2;
  const index_t i = concatenated ? col % half : col / 2;
  const bool is_sin = concatenated ? col < half : col % 2 == 0;
  // Vaswani's exponent 2i/dim is i/half; the shifted variant divides by half - 1.
  const long double expo = static_cast<long double>(i) / static_cast<long double>(shifted ? half - 1 : half);
  const long double angle = static_cast<long double>(p) / std::pow(base, expo);
  return is_sin ? std::sin(angle) : std::cos(angle);
}

struct worst {
  double err = 0;
  index_t row = -1, col = -1;
};

template <class M, class F>
worst max_error(const M& got, F ref) {
  worst w;
  for (index_t r = 0; r < got.rows(); ++r)
    for (index_t c = 0; c < got.cols(); ++c) {
      const double e = std::abs(static_cast<double>(got(r, c)) - static_cast<double>(ref(r, c)));
      if (e > w.err) w = {e, r, c};
    }
  return w;
}

}  // namespace

TEMPLATE_TEST_CASE("sinusoidal table matches the formula in both layouts", "[sinusoidal]", float, double) {
  using T = TestType;
  // cos/sin of a double angle are rounded once to T: half an ulp, plus the angle's own rounding
  // (a few ulp of the frequency times a position up to 1e6).
  const double tol = 2 * eps<T> + 1e6 * 8 * eps<double>;
  for (auto layout : {posenc::sinusoidal_layout::interleaved, posenc::sinusoidal_layout::concatenated}) {
    for (bool shifted : {false, true}) {
      for (index_t dim : {4, 6, 64, 510}) {
        const posenc::sinusoidal<T> enc({.dim = dim, .base = 10000.0, .layout = layout, .shifted_denominator = shifted});
        std::vector<position> pos{0, 1, 2, 17, 1000, 65535, 999999, -5};
        auto tab = enc.table(pos);
        REQUIRE(tab.rows() == static_cast<index_t>(pos.size()));
        REQUIRE(tab.cols() == dim);
        const bool concat = layout == posenc::sinusoidal_layout::concatenated;
        auto w = max_error(tab, [&](index_t r, index_t c) {
          return reference(pos[static_cast<std::size_t>(r)], dim, c, 10000.0L, concat, shifted);
        });
        INFO("dim " << dim << " concat " << concat << " shifted " << shifted << " worst at (" << w.row << ", " << w.col
                    << ")");
        CHECK(w.err <= tol);
      }
    }
  }
}

TEST_CASE("sinusoidal: position 0 is [0 1 0 1 ...] and position 1 starts sin(1), cos(1)", "[sinusoidal]") {
  const posenc::sinusoidal<double> enc({.dim = 8});
  auto t = enc.table(posenc::arange(0, 2));
  for (index_t c = 0; c < 8; ++c) CHECK(t(0, c) == (c % 2 == 0 ? 0.0 : 1.0));
  CHECK(t(1, 0) == Approx(0.8414709848078965).epsilon(1e-15));
  CHECK(t(1, 1) == Approx(0.5403023058681398).epsilon(1e-15));
  // Last frequency of dim 8 is 10000^(-3/4) = 0.001.
  CHECK(t(1, 6) == Approx(std::sin(0.001)).epsilon(1e-14));
}

TEMPLATE_TEST_CASE("sinusoidal layouts are a permutation of each other", "[sinusoidal]", float, double) {
  using T = TestType;
  const index_t dim = 32;
  const posenc::sinusoidal<T> a({.dim = dim, .layout = posenc::sinusoidal_layout::interleaved});
  const posenc::sinusoidal<T> b({.dim = dim, .layout = posenc::sinusoidal_layout::concatenated});
  auto ta = a.table(posenc::arange(-3, 50));
  auto tb = b.table(posenc::arange(-3, 50));
  for (index_t r = 0; r < ta.rows(); ++r)
    for (index_t i = 0; i < dim / 2; ++i) {
      CHECK(ta(r, 2 * i) == tb(r, i));
      CHECK(ta(r, 2 * i + 1) == tb(r, dim / 2 + i));
    }
}

TEMPLATE_TEST_CASE("sinusoidal add_to works in place on a strided block and honours the offset", "[sinusoidal]", float,
                   double) {
  using T = TestType;
  const index_t dim = 16, tokens = 5, wide = 40;
  const position offset = 2;  // fairseq-style: positions counted from padding_idx + 1
  const posenc::sinusoidal<T> enc({.dim = dim, .layout = posenc::sinusoidal_layout::concatenated,
                                   .shifted_denominator = true, .position_offset = offset});
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(-1, 1);
  posenc::row_matrix<T> buf(tokens, wide);
  for (index_t r = 0; r < tokens; ++r)
    for (index_t c = 0; c < wide; ++c) buf(r, c) = static_cast<T>(u(rng));
  const posenc::row_matrix<T> before = buf;
  std::vector<position> pos{5, 0, 123456789, 9, 3};
  enc.add_to(buf.block(0, 10, tokens, dim), pos);

  auto w = max_error(buf.block(0, 10, tokens, dim), [&](index_t r, index_t c) {
    return static_cast<long double>(before(r, 10 + c)) +
           reference(pos[static_cast<std::size_t>(r)] + offset, dim, c, 10000.0L, true, true);
  });
  INFO("worst at (" << w.row << ", " << w.col << ")");
  CHECK(w.err <= 4 * eps<T> + 1.3e8 * 8 * eps<double>);
  for (index_t r = 0; r < tokens; ++r)
    for (index_t c = 0; c < wide; ++c)
      if (c < 10 || c >= 10 + dim) CHECK(buf(r, c) == before(r, c));
}

TEMPLATE_TEST_CASE("sinusoidal with bf16 and fp16 storage computes in float", "[sinusoidal]", Eigen::bfloat16,
                   Eigen::half) {
  using S = TestType;
  const index_t dim = 64;
  const posenc::sinusoidal<float> enc({.dim = dim});
  posenc::row_matrix<S> x(3, dim);
  posenc::row_matrix<float> xf(3, dim);
  for (index_t r = 0; r < 3; ++r)
    for (index_t c = 0; c < dim; ++c) {
      x(r, c) = S(0.25f * static_cast<float>(c % 5));
      xf(r, c) = static_cast<float>(x(r, c));
    }
  std::vector<position> pos{0, 7, 4000};
  enc.add_to(x, pos);
  enc.add_to(xf, pos);
  // One rounding of a value of magnitude <= 2 to the storage type.
  const double ulp = std::same_as<S, Eigen::bfloat16> ? 1.0 / 128 : 1.0 / 1024;
  for (index_t r = 0; r < 3; ++r)
    for (index_t c = 0; c < dim; ++c) CHECK(std::abs(static_cast<double>(x(r, c)) - xf(r, c)) <= ulp);
}

TEST_CASE("sinusoidal rejects bad parameters naming them", "[sinusoidal][errors]") {
  using Catch::Matchers::Contains;
  using enc = posenc::sinusoidal<float>;
  CHECK_THROWS_WITH(enc({.dim = 0}), Contains("sinusoidal_params.dim = 0"));
  CHECK_THROWS_WITH(enc({.dim = 7}), Contains("sinusoidal_params.dim = 7") && Contains("even"));
  CHECK_THROWS_WITH(enc({.dim = 8, .base = 0}), Contains("sinusoidal_params.base = 0"));
  CHECK_THROWS_WITH(enc({.dim = 8, .base = -2}), Contains("sinusoidal_params.base = -2"));
  CHECK_THROWS_WITH(enc({.dim = 8, .base = std::numeric_limits<double>::infinity()}),
                    Contains("sinusoidal_params.base"));
  CHECK_THROWS_WITH(enc({.dim = 2, .shifted_denominator = true}), Contains("sinusoidal_params.dim = 2"));
  CHECK_THROWS_AS(enc({.dim = 7}), std::invalid_argument);
}

TEST_CASE("sinusoidal shape mismatches are assertions", "[sinusoidal][errors]") {
  const posenc::sinusoidal<float> enc({.dim = 8});
  posenc::row_matrix<float> x = posenc::row_matrix<float>::Zero(4, 10);
  CHECK_THROWS_AS(enc.add_to(x, posenc::arange(0, 4)), posenc::precondition_error);
  posenc::row_matrix<float> y = posenc::row_matrix<float>::Zero(4, 8);
  CHECK_THROWS_AS(enc.add_to(y, posenc::arange(0, 3)), posenc::precondition_error);
  CHECK_NOTHROW(enc.add_to(y, posenc::arange(0, 4)));
}

TEST_CASE("sinusoidal satisfies additive_input", "[sinusoidal][concepts]") {
  static_assert(posenc::additive_input<posenc::sinusoidal<float>>);
  static_assert(posenc::additive_input<posenc::sinusoidal<double>>);
  static_assert(!posenc::rotation<posenc::sinusoidal<float>>);
  static_assert(!posenc::score_bias<posenc::sinusoidal<float>>);
  CHECK(posenc::sinusoidal<float>({.dim = 4}).name() == "sinusoidal");
}
