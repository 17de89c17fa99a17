// ALiBi: the slope rule for any head count, global heads, and bias tiles against the formula.
#include <catch2/catch.hpp>

#include "support.hpp"
#include <cmath>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "posenc/encoders/alibi.hpp"
#include "posenc/simd.hpp"

using posenc::index_t;
using posenc::position;

static_assert(posenc::position_bias<posenc::alibi<float>>);
static_assert(posenc::position_bias<posenc::alibi<double>>);
static_assert(!posenc::relative_key_value<posenc::alibi<float>>);


namespace {

template <class E>
constexpr long double eps = std::numeric_limits<E>::epsilon();

// A bias is one double product rounded to the tile type: a couple of ulps of the tile type.
template <class E>
long double tile_tol(long double ref) {
  return 2 * eps<E> * std::max<long double>(std::fabs(ref), 1);
}

// Hand-derived slopes as exponents of two (the paper's rule, written out, not computed by a rule).
const std::vector<long double> exp_1 = {-8};
const std::vector<long double> exp_8 = {-1, -2, -3, -4, -5, -6, -7, -8};
const std::vector<long double> exp_12 = {-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5};
const std::vector<long double> exp_16 = {-0.5, -1,  -1.5, -2,  -2.5, -3,  -3.5, -4,
                                         -4.5, -5,  -5.5, -6,  -6.5, -7,  -7.5, -8};
// 20 heads: the 16 above, then every other slope of 32 heads (2^(-k/4), k = 1, 3, 5, 7).
const std::vector<long double> exp_20 = {-0.5, -1,   -1.5, -2,   -2.5, -3,   -3.5, -4,   -4.5, -5,
                                         -5.5, -6,   -6.5, -7,   -7.5, -8,   -0.25, -0.75, -1.25, -1.75};
// 6 heads: 4 heads' slopes 2^-2 .. 2^-8, then 8 heads' slopes at indices 0 and 2: 2^-1, 2^-3.
const std::vector<long double> exp_6 = {-2, -4, -6, -8, -1, -3};

long double pow2(long double e) { return std::pow(2.0L, e); }

// Reference bias in long double from the formula, with the slope from the hand-written table.
long double ref_bias(long double slope, posenc::alibi_form form, position q, position k) {
  const long double d = static_cast<long double>(q) - static_cast<long double>(k);
  return -slope * (form == posenc::alibi_form::symmetric ? std::fabs(d) : d);
}

std::vector<position> random_positions(std::mt19937_64& rng, index_t n, position base, position spread) {
  std::uniform_int_distribution<position> dist(-spread, spread);
  std::vector<position> p(static_cast<std::size_t>(n));
  for (auto& x : p) x = base + dist(rng);
  return p;
}

// tile(i, j) == init(i, j) + ref for every element, reporting the worst one.
template <class E, class Enc>
void check_tile(const Enc& enc, index_t h, long double slope, posenc::alibi_form form, posenc::positions q,
                posenc::positions k) {
  posenc::row_matrix<E> tile(q.size(), k.size());
  for (index_t i = 0; i < tile.rows(); ++i)
    for (index_t j = 0; j < tile.cols(); ++j) tile(i, j) = static_cast<E>(0.25 * static_cast<double>((i + 2 * j) % 7));
  const posenc::row_matrix<E> init = tile;
  enc.add_bias_tile(tile, h, q, k);
  long double worst = 0;
  index_t wi = -1, wj = -1;
  for (index_t i = 0; i < tile.rows(); ++i)
    for (index_t j = 0; j < tile.cols(); ++j) {
      const long double ref = static_cast<long double>(init(i, j)) + ref_bias(slope, form, q[i], k[j]);
      const long double r = std::fabs(static_cast<long double>(tile(i, j)) - ref) / tile_tol<E>(ref);
      if (r > worst) worst = r, wi = i, wj = j;
    }
  INFO("worst element (" << wi << ", " << wj << "), error / tolerance = " << static_cast<double>(worst));
  CHECK(worst <= 1);
}

}  // namespace

TEST_CASE("alibi slopes follow the power-of-two rule for any head count", "[alibi]") {
  const std::vector<std::pair<index_t, const std::vector<long double>*>> cases = {
      {1, &exp_1}, {6, &exp_6}, {8, &exp_8}, {12, &exp_12}, {16, &exp_16}, {20, &exp_20}};
  for (const auto& [n, exps] : cases) {
    const auto s = posenc::alibi<double>::slopes(n);
    REQUIRE(static_cast<index_t>(s.size()) == n);
    for (index_t h = 0; h < n; ++h) {
      const long double ref = pow2((*exps)[h]);
      INFO(n << " heads, head " << h);
      CHECK(std::fabs(s[h] - ref) <= 2 * eps<double> * ref);
    }
  }
  // max_bias scales every exponent: 8 heads with max_bias 16 -> 2^(-2(h+1)).
  const auto s16 = posenc::alibi<float>::slopes(8, 16.0);
  for (index_t h = 0; h < 8; ++h) CHECK(std::fabs(s16[h] - pow2(-2.0L * (h + 1))) <= 2 * eps<double> * s16[h]);
}

TEMPLATE_TEST_CASE("alibi slopes come from the global head index", "[alibi]", float, double) {
  // Four shards of five heads of a 20-head model: each shard's local head h is global 5r + h.
  for (index_t shard = 0; shard < 4; ++shard) {
    posenc::alibi<TestType> a({.num_heads = 20, .head_offset = 5 * shard});
    for (index_t h = 0; h < 5; ++h) {
      const long double ref = pow2(exp_20[5 * shard + h]);
      INFO("shard " << shard << " local head " << h);
      CHECK(std::fabs(a.slope(h) - ref) <= 2 * eps<double> * ref);
      CHECK(std::fabs(a.bias(h, 10, 3) - (-7 * ref)) <= 8 * eps<double> * ref);
    }
  }
  // Tiles of a sharded head use the global slope too.
  posenc::alibi<TestType> a({.num_heads = 12, .head_offset = 7});
  check_tile<float>(a, 3, pow2(exp_12[10]), posenc::alibi_form::causal, posenc::arange(100, 9), posenc::arange(90, 13));
}

TEMPLATE_TEST_CASE("alibi bias tiles equal the formula for arbitrary position sets", "[alibi]", float, double) {
  std::mt19937_64 rng(42);
  const position big = position{1} << 40;
  for (auto form : {posenc::alibi_form::causal, posenc::alibi_form::symmetric}) {
    posenc::alibi<TestType> a({.num_heads = 12, .form = form});
    // Scalar bias, including positions near 2^40 and negative ones.
    for (position q : {position{0}, position{5}, -big, big + 17})
      for (position k : {position{0}, position{-3}, big, big + 20}) {
        const long double ref = ref_bias(pow2(exp_12[9]), form, q, k);
        CHECK(std::fabs(a.bias(9, q, k) - ref) <= tile_tol<double>(ref));
      }
    // Unsorted, non-contiguous, negative and large explicit lists; ranges; mixes of the two.
    for (position base : {position{0}, position{-1000}, big}) {
      const auto ql = random_positions(rng, 13, base, 500);
      const auto kl = random_positions(rng, 29, base, 500);
      const posenc::positions qs[] = {posenc::positions(ql), posenc::arange(base + 3, 13)};
      const posenc::positions ks[] = {posenc::positions(kl), posenc::arange(base - 10, 29)};
      for (const auto& q : qs)
        for (const auto& k : ks)
          for (index_t h : {0, 5, 11}) {
            INFO("form " << static_cast<int>(form) << " base " << base << " head " << h << " q range "
                         << q.is_range() << " k range " << k.is_range());
            check_tile<float>(a, h, pow2(exp_12[h]), form, q, k);
            check_tile<double>(a, h, pow2(exp_12[h]), form, q, k);
          }
    }
  }
}

TEMPLATE_TEST_CASE("alibi bias is shift-invariant and tiles use global positions", "[alibi]", float, double) {
  std::mt19937_64 rng(7);
  for (auto form : {posenc::alibi_form::causal, posenc::alibi_form::symmetric}) {
    posenc::alibi<TestType> a({.num_heads = 8, .form = form});
    // Shifting every position by the same constant changes nothing, bit for bit: biases come
    // from exact integer distances.
    auto ql = random_positions(rng, 11, 0, 300);
    auto kl = random_positions(rng, 17, 0, 300);
    posenc::row_matrix<float> t0 = posenc::row_matrix<float>::Zero(11, 17);
    a.add_bias_tile(t0, 2, posenc::positions(ql), posenc::positions(kl));
    for (position shift : {position{1}, position{-777}, (position{1} << 40) + 3}) {
      auto qs = ql, ks = kl;
      for (auto& x : qs) x += shift;
      for (auto& x : ks) x += shift;
      posenc::row_matrix<float> t1 = posenc::row_matrix<float>::Zero(11, 17);
      a.add_bias_tile(t1, 2, posenc::positions(qs), posenc::positions(ks));
      CHECK(t1 == t0);
      posenc::row_matrix<float> r0 = posenc::row_matrix<float>::Zero(11, 17), r1 = r0;
      a.add_bias_tile(r0, 2, posenc::arange(50, 11), posenc::arange(40, 17));
      a.add_bias_tile(r1, 2, posenc::arange(50 + shift, 11), posenc::arange(40 + shift, 17));
      CHECK(r1 == r0);
    }
    // A tile of a larger problem is the matching block of the full matrix.
    const index_t n = 40;
    posenc::row_matrix<double> full = posenc::row_matrix<double>::Zero(n, n);
    a.add_bias_tile(full, 5, posenc::arange(1000, n), posenc::arange(1000, n));
    for (index_t r0 : {0, 8, 33})
      for (index_t c0 : {0, 16, 31}) {
        const index_t rows = std::min<index_t>(7, n - r0), cols = std::min<index_t>(9, n - c0);
        posenc::row_matrix<double> tile = posenc::row_matrix<double>::Zero(rows, cols);
        a.add_bias_tile(tile, 5, posenc::arange(1000 + r0, rows), posenc::arange(1000 + c0, cols));
        CHECK(tile == full.block(r0, c0, rows, cols));
        // The same block addressed through explicit lists.
        std::vector<position> qp, kp;
        for (index_t i = 0; i < rows; ++i) qp.push_back(1000 + r0 + i);
        for (index_t j = 0; j < cols; ++j) kp.push_back(1000 + c0 + j);
        posenc::row_matrix<double> lt = posenc::row_matrix<double>::Zero(rows, cols);
        a.add_bias_tile(lt, 5, posenc::positions(qp), posenc::positions(kp));
        CHECK(lt == full.block(r0, c0, rows, cols));
      }
  }
}

TEST_CASE("alibi strided tiles leave the padding untouched", "[alibi]") {
  posenc::alibi<float> a({.num_heads = 4});  // slopes 2^-2, 2^-4, 2^-6, 2^-8
  const float pad = 1234.5f;
  posenc::row_matrix<float> buf = posenc::row_matrix<float>::Constant(6, 11, pad);
  posenc::strided_view<float> tile(buf.data() + 1, 5, 8, 11);  // rows 0..4, columns 1..8
  for (index_t i = 0; i < 5; ++i)
    for (index_t j = 0; j < 8; ++j) tile(i, j) = 0;
  a.add_bias_tile(tile, 1, posenc::arange(20, 5), posenc::arange(15, 8));
  for (index_t i = 0; i < 6; ++i)
    for (index_t j = 0; j < 11; ++j) {
      const bool inside = i < 5 && j >= 1 && j <= 8;
      INFO("(" << i << ", " << j << ")");
      if (inside) {
        CHECK(buf(i, j) == static_cast<float>(-0.0625L * static_cast<long double>(20 + i - (15 + j - 1))));
      } else {
        CHECK(buf(i, j) == pad);
      }
    }
  // The same through an Eigen block of a wider matrix.
  posenc::row_matrix<double> wide = posenc::row_matrix<double>::Constant(4, 9, 7.0);
  a.add_bias_tile(wide.block(0, 0, 4, 5), 0, posenc::arange(3, 4), posenc::arange(0, 5));
  CHECK(wide.block(0, 5, 4, 4).isConstant(7.0));
  CHECK(wide(3, 0) == 7.0 - 0.25 * 6);  // head 0 of 4: slope 2^-2
}

TEST_CASE("alibi rejects invalid parameters, naming them", "[alibi]") {
  using A = posenc::alibi<float>;
  CHECK_INVALID(A({.num_heads = 0}), "num_heads = 0");
  CHECK_INVALID(A({.num_heads = -3}), "num_heads");
  CHECK_INVALID(A({.num_heads = 8, .head_offset = -1}), "head_offset = -1");
  CHECK_INVALID(A({.num_heads = 8, .head_offset = 8}), "head_offset = 8");
  CHECK_INVALID(A({.max_bias = 0}), "max_bias");
  CHECK_INVALID(A::slopes(0), "num_heads");
  CHECK_NOTHROW(A({.num_heads = 8, .head_offset = 7}));
}

TEMPLATE_TEST_CASE("alibi with given slopes uses them for every global head", "[alibi]", float, double) {
  const std::vector<double> given = {0.75, -0.5, 2.0, 1e-3};  // learned slopes need not follow the rule
  const posenc::alibi<TestType> a({.num_heads = 4, .head_offset = 1}, given);
  CHECK(std::vector<double>(a.global_slopes().begin(), a.global_slopes().end()) == given);
  for (posenc::index_t h = 0; h < 3; ++h) {
    CHECK(a.slope(h) == given[h + 1]);
    CHECK(a.bias(h, 9, 2) == -given[h + 1] * 7.0);
  }
  posenc::row_matrix<TestType> tile = posenc::row_matrix<TestType>::Zero(2, 3);
  a.add_bias_tile(tile, 2, posenc::arange(5, 2), posenc::arange(3, 3));
  for (posenc::index_t i = 0; i < 2; ++i)
    for (posenc::index_t j = 0; j < 3; ++j)
      CHECK(tile(i, j) == static_cast<TestType>(-1e-3 * static_cast<double>(2 + i - j)));
  const posenc::alibi<TestType> symmetric({.num_heads = 4, .form = posenc::alibi_form::symmetric}, given);
  CHECK(symmetric.bias(1, 2, 9) == 3.5);  // -slope * |2 - 9| with slope -0.5
  using A = posenc::alibi<TestType>;
  const std::vector<double> three = {1.0, 2.0, 3.0}, bad = {1.0, std::nan(""), 1.0, 1.0};
  CHECK_INVALID(A({.num_heads = 4}, three), "slopes.size() = 3: must equal num_heads (4)");
  CHECK_INVALID(A({.num_heads = 4}, bad), "slopes[1] = nan");
  CHECK_INVALID(A({.num_heads = 4, .head_offset = 4}, given), "head_offset = 4");
  const A rule({.num_heads = 4});
  CHECK(std::vector<double>(rule.global_slopes().begin(), rule.global_slopes().end()) == A::slopes(4));
}

TEST_CASE("alibi hot-path preconditions", "[alibi]") {
  posenc::alibi<double> a({.num_heads = 8, .head_offset = 4});
  posenc::row_matrix<float> tile(3, 5);
  CHECK_THROWS_AS(a.add_bias_tile(tile, 0, posenc::arange(0, 4), posenc::arange(0, 5)), posenc::precondition_error);
  CHECK_THROWS_AS(a.add_bias_tile(tile, 0, posenc::arange(0, 3), posenc::arange(0, 6)), posenc::precondition_error);
  CHECK_THROWS_AS(a.add_bias_tile(tile, 4, posenc::arange(0, 3), posenc::arange(0, 5)), posenc::precondition_error);
  CHECK_THROWS_AS(a.add_bias_tile(tile, -1, posenc::arange(0, 3), posenc::arange(0, 5)), posenc::precondition_error);
  CHECK_THROWS_AS(a.bias(4, 0, 0), posenc::precondition_error);
  CHECK_THROWS_AS(a.slope(-1), posenc::precondition_error);
  CHECK_NOTHROW(a.add_bias_tile(tile, 3, posenc::arange(0, 3), posenc::arange(0, 5)));
}

TEST_CASE("alibi: every SIMD level's tile path gives the bits of the formula", "[alibi][simd]") {
  // Row j of a float tile gets float(-slope * (q - k_j)) (or of |q - k_j|) added: the product in
  // double, rounded once to float, then the float sum. Lengths around the widths 2, 4 and 8 (the
  // double lanes of NEON, AVX2 and AVX-512) and 16 (float lanes); key ranges before, around and
  // after the queries, and far away (2^40); columns past the tile keep their bits. Rows that share
  // a table of biases (4 or more within a spread of 1024 - n positions, keys in chunks of 512),
  // rows that do not (fewer, or scattered), unsorted query lists, and a slope that is not a power
  // of two (head 9 of 12: 2^-1.5) all give the same bits.
  const float sentinel = 777.0f;
  struct tile_case {
    std::vector<position> q;  // empty: the range [q0, q0 + rows)
    position q0;
    index_t rows;
  };
  std::mt19937_64 rng(11);
  std::vector<position> unsorted = random_positions(rng, 50, 1000, 60);
  std::vector<position> scattered = {5, 1000000, 6, 7, 8, 9, 2000000, 3, 4, 1000001, -70000, 12};
  const std::vector<tile_case> cases = {
      {{}, 1000, 5}, {{}, 1000, 3}, {{}, 1000, 40}, {{}, 0, 900}, {unsorted, 0, 50}, {scattered, 0, 12}};
  for (const auto level : posenc::detail::available_simd_levels()) {
    const posenc::detail::scoped_simd_cap cap(level);
    for (auto form : {posenc::alibi_form::causal, posenc::alibi_form::symmetric}) {
      const posenc::alibi<float> enc({.num_heads = 12, .form = form});
      // Heads 7 and 9 of 12: 2^(-8 (h + 1) / 8) for h < 8, then 2^(-8 (2i + 1) / 16) for i = h - 8.
      for (const auto& [h, slope] : {std::pair<index_t, double>{7, std::exp2(-8.0)}, {9, std::exp2(-1.5)}}) {
        for (const tile_case& c : cases) {
          const posenc::positions q = c.q.empty() ? posenc::arange(c.q0, c.rows) : posenc::positions(c.q);
          const index_t rows = q.size();
          for (index_t n : {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 130, 511, 512, 513, 1100}) {
            if (rows > 100 && n != 130 && n != 513) continue;  // 900 rows: two table groups either way
            for (position k0 : {position{990}, position{1002}, position{1010}, position{1} << 40}) {
              posenc::row_matrix<float> tile = posenc::row_matrix<float>::Constant(rows, n + 3, sentinel);
              for (index_t i = 0; i < rows; ++i)
                for (index_t j = 0; j < n; ++j) tile(i, j) = 0.25f * static_cast<float>((i - j) % 13);
              const posenc::row_matrix<float> before = tile;
              const auto k = posenc::arange(k0, n);
              enc.add_bias_tile(tile.leftCols(n), h, q, k);
              index_t bad = 0, first_i = -1, first_j = -1;
              for (index_t i = 0; i < rows; ++i) {
                for (index_t j = 0; j < n; ++j) {
                  const double dist = static_cast<double>(q[i] - (k0 + j));
                  const double b = -slope * (form == posenc::alibi_form::symmetric ? std::abs(dist) : dist);
                  if (tile(i, j) != before(i, j) + static_cast<float>(b) && bad++ == 0) first_i = i, first_j = j;
                }
                for (index_t j = n; j < n + 3; ++j)
                  if (tile(i, j) != sentinel && bad++ == 0) first_i = i, first_j = j;
              }
              INFO("level " << posenc::simd_level_name(level) << ", form " << static_cast<int>(form) << ", head " << h
                            << ", rows " << rows << " (range " << q.is_range() << "), n " << n << ", k0 " << k0
                            << ", first wrong element (" << first_i << ", " << first_j << ")");
              CHECK(bad == 0);
            }
          }
        }
      }
    }
  }
}
