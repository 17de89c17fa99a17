// Numerical extremes and degenerate shapes across the library: positions near 2^31 and
// negative, logits of magnitude 1e4, NaN and Inf inputs (docs/numerics.md states the policy),
// head_dim from 1 to 512, n = 0, a single key, every row masked; and the regression tests of
// what the fuzzers (tests/fuzz) found.
#include <catch2/catch.hpp>

#include "support.hpp"
#include <cmath>
#include <cstring>
#include <algorithm>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/merge.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/hf_config.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/sinusoidal.hpp"
#include "posenc/encoders/t5_bias.hpp"

using posenc::index_t;
using posenc::position;
template <class S>
using mat = posenc::row_matrix<S>;

namespace {

template <class T>
constexpr double eps = std::numeric_limits<T>::epsilon();
constexpr position two31 = position{1} << 31;

// Bound on |blockwise - exact| for one attention output element computed in T: each logit
// carries at most `k_logit_ulps (d + 8) eps` of the largest |logit| (dot products, scaling,
// rotation, bias), which moves a softmax average by at most about twice that times max|v|; the
// sums over keys and dims add `(n_kv + d) eps max|v|`.
constexpr double k_logit_ulps = 2;

template <class T>
double output_bound(double max_logit, index_t d, index_t n_kv, double max_v) {
  const double logit_err = k_logit_ulps * static_cast<double>(d + 8) * eps<T> * std::max(max_logit, 1.0);
  return (2.5 * logit_err + static_cast<double>(n_kv + d + 16) * eps<T>) * max_v;
}

// Worst |a - b| over two matrices; names the element when it exceeds `tol` (NaN counts).
template <class A>
void check_close(const mat<A>& a, const mat<double>& b, double tol, const std::string& what) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  index_t at = 0;
  const double worst = posenc_test::max_abs_diff(a, b, &at);
  INFO(what << ": worst element (" << (b.cols() ? at / b.cols() : 0) << ", " << (b.cols() ? at % b.cols() : 0)
            << ") got " << (a.size() ? double(a.data()[at]) : 0.0) << ", want " << (b.size() ? b.data()[at] : 0.0)
            << ", tolerance " << tol);
  CHECK(worst <= tol);
}

// The largest |scale * q_i . k_j| (before any rotation, which keeps norms) over one head.
double max_logit(const mat<double>& q, const mat<double>& k, double scale) {
  double m = 0;
  for (index_t i = 0; i < q.rows(); ++i) m = std::max(m, q.row(i).norm());
  double mk = 0;
  for (index_t j = 0; j < k.rows(); ++j) mk = std::max(mk, k.row(j).norm());
  return m * mk * scale;
}

// Blockwise attention in T and the reference in double on the same values, one head.
template <class T, class E, class ED>
void blockwise_vs_double(const mat<T>& q, const mat<T>& k, const mat<T>& v, posenc::positions qp,
                         posenc::positions kp, const E& enc, const ED& enc_d, const posenc::attention_params& p,
                         double bias_max, const std::string& what) {
  mat<T> out(q.rows(), q.cols()), lse(q.rows(), p.heads);
  posenc::attention(q, k, v, out, qp, kp, enc, p, lse);
  const mat<double> qd = q.template cast<double>(), kd = k.template cast<double>(), vd = v.template cast<double>();
  mat<double> ref(q.rows(), q.cols()), ref_lse(q.rows(), p.heads);
  posenc::attention_reference(qd, kd, vd, ref, qp, kp, enc_d, p, ref_lse);
  const index_t d = q.cols() / p.heads;
  const double ml = max_logit(qd, kd, 1.0 / std::sqrt(double(d))) + bias_max;
  const double vmax = v.size() ? vd.cwiseAbs().maxCoeff() : 0.0;
  REQUIRE(out.allFinite());
  check_close(out, ref, output_bound<T>(ml, d, k.rows(), vmax), what + " output");
  check_close(lse, ref_lse,
              2 * k_logit_ulps * static_cast<double>(d + 8) * eps<T> * std::max(ml, 1.0) +
                  static_cast<double>(k.rows() + 16) * eps<T>,
              what + " lse");
}

}  // namespace

// ---- positions near 2^31 and negative --------------------------------------------------------

TEMPLATE_TEST_CASE("attention at positions near 2^31 and negative equals the double reference there",
                   "[edges][positions]", float, double) {
  using T = TestType;
  const index_t n = 40, d = 32;
  const auto q = posenc_test::random_normal<T>(n, d, 1), k = posenc_test::random_normal<T>(n, d, 2),
             v = posenc_test::random_normal<T>(n, d, 3);
  const posenc::rope<T> rope({.head_dim = d});
  const posenc::rope<double> rope_d({.head_dim = d});
  const posenc::alibi<T> alibi({.num_heads = 1});
  const posenc::alibi<double> alibi_d({.num_heads = 1});
  const posenc::attention_params p{.heads = 1, .causal = true, .q_tile = 16, .k_tile = 8, .threads = 1};
  for (const position p0 : {two31 - 20, two31, -two31 - 7, position{-1000}, -(position{1} << 40)}) {
    INFO("first position " << p0);
    blockwise_vs_double(q, k, v, posenc::arange(p0, n), posenc::arange(p0, n), rope, rope_d, p, 0, "rope");
    // ALiBi's bias depends on q - k only: at most 39 * 1/2 here.
    blockwise_vs_double(q, k, v, posenc::arange(p0, n), posenc::arange(p0, n), alibi, alibi_d, p, 20, "alibi");
  }
}

TEST_CASE("attention with ALiBi and T5 does not change when every position shifts by 2^31 or below zero",
          "[edges][positions]") {
  const index_t n = 33, d = 16;
  const auto q = posenc_test::random_normal<float>(n, d, 4), k = posenc_test::random_normal<float>(n, d, 5),
             v = posenc_test::random_normal<float>(n, d, 6);
  const posenc::alibi<float> alibi({.num_heads = 1, .form = posenc::alibi_form::symmetric});
  const posenc::t5_relative_bias<float> t5({.num_heads = 1}, posenc_test::random_normal<float>(32, 1, 7));
  const posenc::attention_params p{.heads = 1, .window_left = 9, .q_tile = 8, .k_tile = 8, .threads = 1};
  auto run = [&](const auto& enc, position shift) {
    mat<float> out(n, d);
    posenc::attention(q, k, v, out, posenc::arange(shift, n), posenc::arange(shift - 5, n), enc, p);
    return out;
  };
  for (const position shift : {two31, -two31, two31 * 1000 + 3}) {
    INFO("shift " << shift);
    // The biases are exact functions of q - k (int64), so the logits, and the outputs, are equal.
    CHECK(run(alibi, shift) == run(alibi, 0));
    CHECK(run(t5, shift) == run(t5, 0));
  }
}

TEMPLATE_TEST_CASE("rope: a negative position undoes the positive one", "[edges][positions][rope]", float, double) {
  using T = TestType;
  const posenc::rope<T> rope({.head_dim = 64, .base = 500000});
  const auto x = posenc_test::random_normal<T>(4, 64, 8);
  const std::vector<position> fwd = {1, two31 - 1, two31, 123456789}, back = {-1, -(two31 - 1), -two31, -123456789};
  mat<T> y = x;
  rope.rotate(y, posenc::positions(fwd));
  rope.rotate(y, posenc::positions(back));
  // Two rotations, each a few eps per element of the pair's size.
  check_close(y, mat<double>(x.template cast<double>()), 16 * eps<T> * x.cwiseAbs().maxCoeff(), "R(-p) R(p) x");
}

TEST_CASE("sliding windows at positions past 2^53 mask exactly (fuzzer finding 1)", "[edges][positions]") {
  // The tile tests compared positions in double, which rounds them past 2^53: a query at -2^61
  // with a window of 2 took a tile of keys at -2^61 - 8 .. -2^61 + 7 as wholly visible.
  const index_t n = 16, d = 4;
  const auto q = posenc_test::random_normal<double>(3, d, 21), k = posenc_test::random_normal<double>(n, d, 22),
             v = posenc_test::random_normal<double>(n, d, 23);
  const posenc::attention_params p{.heads = 1, .window_left = 2, .window_right = 2, .threads = 1};
  for (const position base : {-(position{1} << 61), position{1} << 61, (position{1} << 53) + 1,
                              std::numeric_limits<position>::max() - 20}) {
    INFO("query positions from " << base);
    mat<double> out(3, d), ref(3, d);
    posenc::attention(q, k, v, out, posenc::arange(base, 3), posenc::arange(base - 8, n), posenc::no_position<double>{},
                      p);
    // Independent: each query averages exactly the keys with |q - k| <= 2 (offsets 6..10 of 16).
    for (index_t i = 0; i < 3; ++i) {
      const index_t first = 6 + i, last = 10 + i;
      std::vector<double> w;
      double wsum = 0, wmax = -1e300;
      for (index_t j = first; j <= last; ++j) wmax = std::max(wmax, q.row(i).dot(k.row(j)) / 2.0);
      for (index_t j = first; j <= last; ++j) wsum += w.emplace_back(std::exp(q.row(i).dot(k.row(j)) / 2.0 - wmax));
      for (index_t c = 0; c < d; ++c) {
        double x = 0;
        for (index_t j = first; j <= last; ++j) x += w[std::size_t(j - first)] * v(j, c);
        ref(i, c) = x / wsum;
      }
    }
    check_close(out, ref, 1e-12, "windowed output");
  }
}

TEST_CASE("masks at the int64 extremes: windows whose bounds overflow, queries far from their keys",
          "[edges][positions]") {
  // Key ranges are masked by an interval computed with overflow checks; these cases put each
  // bound past INT64_MAX or INT64_MIN. The reference tests every key on its own.
  constexpr position big = std::numeric_limits<position>::max(), small = std::numeric_limits<position>::min();
  const index_t n = 16, d = 4;
  const auto q = posenc_test::random_normal<double>(2, d, 29), k = posenc_test::random_normal<double>(n, d, 30),
             v = posenc_test::random_normal<double>(n, d, 31);
  struct mask_case {
    position q0, k0, left, right;
    bool causal;
  };
  for (const mask_case& c : {mask_case{10, 0, 2, big, false}, mask_case{10, 0, big, 3, false},
                             mask_case{big - 1, small, 5, -1, true}, mask_case{small, big - n, -1, 4, false},
                             mask_case{small + 3, small, 2, 2, false}, mask_case{big - 3, big - n, big, big, true}}) {
    INFO("queries from " << c.q0 << ", keys from " << c.k0 << ", window (" << c.left << ", " << c.right << ")"
                         << (c.causal ? ", causal" : ""));
    const posenc::attention_params p{.heads = 1, .causal = c.causal, .window_left = c.left, .window_right = c.right,
                                     .k_tile = 8, .threads = 1};
    mat<double> out(2, d), ref(2, d), lse(2, 1), ref_lse(2, 1);
    posenc::attention(q, k, v, out, posenc::arange(c.q0, 2), posenc::arange(c.k0, n), posenc::no_position<double>{}, p,
                      lse);
    posenc::attention_reference(q, k, v, ref, posenc::arange(c.q0, 2), posenc::arange(c.k0, n),
                                posenc::no_position<double>{}, p, ref_lse);
    check_close(out, ref, 1e-12, "output");
    for (index_t i = 0; i < 2; ++i) CHECK((lse(i, 0) == ref_lse(i, 0) || std::abs(lse(i, 0) - ref_lse(i, 0)) < 1e-12));
  }
}

TEST_CASE("an encoder that does not fit the call is an error before any thread starts (fuzzer finding 3)",
          "[edges][errors]") {
  using Catch::Matchers::Contains;
  const index_t n = 64, d = 8;
  const auto q = posenc_test::random_normal<float>(n, 4 * d, 24), k = posenc_test::random_normal<float>(n, 4 * d, 25);
  mat<float> out(n, 4 * d);
  const posenc::attention_params p{.heads = 4, .q_tile = 16, .threads = 2};
  const auto pos = posenc::arange(0, n);
  // Checked before the work starts, so no worker ever sees a bad encoder.
  CHECK_THROWS_WITH(posenc::attention(q, k, k, out, pos, pos, posenc::alibi<float>({.num_heads = 2}), p),
                    Contains("attention_params.heads = 4") && Contains("num_heads = 2"));
  CHECK_THROWS_WITH(posenc::attention(q, k, k, out, pos, pos, posenc::alibi<float>({.num_heads = 8, .head_offset = 6}), p),
                    Contains("attention_params.heads = 4") && Contains("head_offset = 6"));
  CHECK_THROWS_WITH(
      posenc::attention(q, k, k, out, pos, pos,
                        posenc::t5_relative_bias<float>({.num_heads = 3}, posenc_test::random_normal<float>(32, 3, 26)), p),
      Contains("attention_params.heads = 4") && Contains("num_heads = 3"));
  CHECK_THROWS_WITH(posenc::attention(q, k, k, out, pos, pos, posenc::rope<float>({.head_dim = 16}), p),
                    Contains("head_dim") && Contains("= 8") && Contains("head_dim = 16"));
  const posenc::shaw_relative<float> shaw({.head_dim = 4, .max_relative_position = 2},
                                          posenc_test::random_normal<float>(5, 4, 27),
                                          posenc_test::random_normal<float>(5, 4, 28));
  CHECK_THROWS_AS(posenc::attention(q, k, k, out, pos, pos, shaw, p), std::invalid_argument);
  // A shard of the heads (tensor parallelism): heads 4..7 of 8.
  CHECK_NOTHROW(posenc::attention(q, k, k, out, pos, pos, posenc::alibi<float>({.num_heads = 8, .head_offset = 4}), p));
}

// ---- large logits ----------------------------------------------------------------------------

TEMPLATE_TEST_CASE("logits of magnitude 1e4 do not overflow the online softmax", "[edges][softmax]", float, double) {
  using T = TestType;
  const index_t d = 64;
  // |logit| above 1e4: q and k rows of norm ~ 280, times 1/8.
  for (const index_t n_kv : {index_t{300}, index_t{8200}}) {  // tiled prefill; decode with key chunks
    const index_t n_q = n_kv > 1000 ? 2 : 70;
    INFO("n_kv " << n_kv);
    mat<T> q = posenc_test::random_normal<T>(n_q, d, 9, 35.0), k = posenc_test::random_normal<T>(n_kv, d, 10, 35.0);
    const auto v = posenc_test::random_normal<T>(n_kv, d, 11);
    // The largest logits late in the keys, and early: the running max jumps both ways.
    k.row(n_kv - 1) = q.row(0) * T(1.2);
    k.row(3) = q.row(n_q - 1) * T(1.1);
    const double ml = max_logit(q.template cast<double>(), k.template cast<double>(), 0.125);
    REQUIRE(ml > 1e4);
    blockwise_vs_double(q, k, v, posenc::arange(0, n_q), posenc::arange(0, n_kv), posenc::no_position<T>{},
                        posenc::no_position<double>{}, {.heads = 1, .k_tile = 64}, 0, "large logits");
  }
}

// ---- NaN and Inf -----------------------------------------------------------------------------

namespace {

// Attention with one NaN or Inf planted in query row 20, or in key or value 40 (causal, tiles of
// 16 rows and 16 keys), next to the clean run. `check_bad_rows` also asks that the rows that read
// the bad value come out non-finite (the NaN policy, tested below on every kernel path).
template <class T>
void non_finite_inputs(bool check_bad_rows) {
  const index_t n = 64, d = 16;
  const auto q = posenc_test::random_normal<T>(n, d, 12), k = posenc_test::random_normal<T>(n, d, 13),
             v = posenc_test::random_normal<T>(n, d, 14);
  const posenc::attention_params p{.heads = 1, .causal = true, .q_tile = 16, .k_tile = 16, .threads = 2};
  auto run = [&](const mat<T>& qq, const mat<T>& kk, const mat<T>& vv, mat<T>& lse) {
    mat<T> out(n, d);
    posenc::attention(qq, kk, vv, out, posenc::arange(0, n), posenc::arange(0, n), posenc::no_position<T>{}, p, lse);
    return out;
  };
  mat<T> clean_lse(n, 1), lse(n, 1);
  const mat<T> clean = run(q, k, v, clean_lse);
  for (const T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
    INFO("bad value " << bad);
    // Query row 20: every other row keeps its clean bits.
    mat<T> qb = q;
    qb(20, 3) = bad;
    const mat<T> a = run(qb, k, v, lse);
    for (index_t i = 0; i < n; ++i) {
      INFO("row " << i);
      if (i != 20) {
        CHECK(a.row(i) == clean.row(i));
        CHECK(lse(i, 0) == clean_lse(i, 0));
      } else if (check_bad_rows) {
        CHECK_FALSE(a.row(i).allFinite());
      }
    }
    // Key or value 40: the rows whose query tiles end before key 40's tile [32, 48) starts never
    // read it and keep their bits; the rows that see key 40 (causal: rows >= 40) read it.
    for (const bool in_value : {false, true}) {
      mat<T> kb = k, vb = v;
      (in_value ? vb : kb)(40, 5) = bad;
      const mat<T> b = run(q, kb, vb, lse);
      for (index_t i = 0; i < n; ++i) {
        INFO((in_value ? "value" : "key") << ", row " << i);
        if (i < 32) CHECK(b.row(i) == clean.row(i));
        // An infinite key gives a logit of +inf (the row turns NaN) or -inf (the key gets weight
        // 0, as if masked), by the sign of the query's component: only NaN is sure to show.
        if (i >= 40 && check_bad_rows && (in_value || std::isnan(bad))) CHECK_FALSE(b.row(i).allFinite());
      }
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("NaN or Inf in q, k or v: no crash, and rows that never read it keep their bits",
                   "[edges][nan]", float, double) {
  non_finite_inputs<TestType>(false);
}

// The NaN policy of docs/numerics.md, on every kernel path: a row that reads a NaN (in its
// query, or in a key or value it sees) comes out NaN, never zeros or a silently dropped key. Fuzzer
// finding 4 was that paths disagreed: the row maximum skipped NaN, so a NaN query row looked fully
// masked, and the AVX-512 exp turned NaN into 0.
TEMPLATE_TEST_CASE("NaN or Inf that a row reads makes that row non-finite", "[edges][nan]", float, double) {
  using posenc::detail::simd_level;
  for (const simd_level level : posenc::detail::available_simd_levels()) {
    const posenc::detail::scoped_simd_cap cap(level);
    INFO("kernels: " << posenc::detail::kernels_for<float>().name);
    non_finite_inputs<TestType>(true);
  }
}

TEMPLATE_TEST_CASE("rope: a NaN stays in its own pair", "[edges][nan][rope]", float, double) {
  using T = TestType;
  const posenc::rope<T> rope({.head_dim = 8, .rotary_dim = 6});
  mat<T> x = posenc_test::random_normal<T>(1, 8, 15), clean = x;
  x(0, 1) = std::numeric_limits<T>::quiet_NaN();  // half-split: pair (1, 4)
  rope.rotate(x, posenc::arange(two31, 1));
  rope.rotate(clean, posenc::arange(two31, 1));
  for (index_t c = 0; c < 8; ++c) {
    INFO("dim " << c);
    if (c == 1 || c == 4) {
      CHECK(std::isnan(x(0, c)));
    } else {
      CHECK(x(0, c) == clean(0, c));
    }
  }
}

// ---- head_dim from 1 to 512 ------------------------------------------------------------------

namespace {

template <class T>
void head_dim_case(index_t d) {
  INFO("head_dim " << d);
  const index_t n_q = 9, n_kv = 37;
  const auto q = posenc_test::random_normal<T>(n_q, 2 * d, unsigned(d)), k = posenc_test::random_normal<T>(n_kv, d, 1000u + unsigned(d)),
             v = posenc_test::random_normal<T>(n_kv, d, 2000u + unsigned(d));
  const posenc::attention_params p{.heads = 2, .kv_heads = 1, .causal = true, .q_tile = 8, .k_tile = 16, .threads = 1};
  const posenc::positions qp = posenc::arange(n_kv - n_q, n_q), kp = posenc::arange(0, n_kv);
  blockwise_vs_double(q, k, v, qp, kp, posenc::no_position<T>{}, posenc::no_position<double>{}, p, 0, "plain");
  if (d >= 2) {
    const posenc::rope_params rp{.head_dim = d, .rotary_dim = d / 2 * 2};
    blockwise_vs_double(q, k, v, qp, kp, posenc::rope<T>(rp), posenc::rope<double>(rp), p, 0, "rope");
  }
  // Decode: two tokens at the end of a cache long enough for key chunks, keys read in place.
  const auto kl = posenc_test::random_normal<T>(8200, d, 3000u + unsigned(d)),
             vl = posenc_test::random_normal<T>(8200, d, 4000u + unsigned(d));
  blockwise_vs_double(mat<T>(q.topRows(2)), kl, vl, posenc::arange(8198, 2), posenc::arange(0, 8200),
                      posenc::no_position<T>{}, posenc::no_position<double>{}, {.heads = 2, .kv_heads = 1, .causal = true},
                      0, "decode");
}

// Every size up to 72 (all SIMD tails), then the usual ones and their neighbours up to 512.
// Sizes with d % 64 in [49, 63] (fuzzer finding 2: the AVX-512 PV kernel dropped the last 49-63
// columns after the blocks of 64) are among them.
std::vector<index_t> head_dims() {
  std::vector<index_t> out;
  for (index_t d = 1; d <= 72; ++d) out.push_back(d);
  for (index_t d : {95, 96, 97, 120, 127, 128, 129, 255, 256, 257, 511, 512}) out.push_back(d);
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("blockwise equals the reference for every head_dim from 1 to 72 and up to 512",
                   "[edges][head_dim]", float, double) {
  for (index_t d : head_dims()) head_dim_case<TestType>(d);
}

// ---- n = 0, a single key, every row masked ---------------------------------------------------

TEMPLATE_TEST_CASE("n = 0 is a no-op everywhere", "[edges][empty]", float, double) {
  using T = TestType;
  const index_t d = 8;
  const mat<T> none(0, d), keys = posenc_test::random_normal<T>(5, d, 16);
  mat<T> out(0, d), lse(0, 1);
  const posenc::attention_params p{.heads = 1, .causal = true};
  // No queries (with and without keys), through both attention functions.
  posenc::attention(none, keys, keys, out, posenc::arange(0, 0), posenc::arange(0, 5), posenc::no_position<T>{}, p, lse);
  posenc::attention(none, none, none, out, posenc::arange(0, 0), posenc::arange(0, 0), posenc::no_position<T>{}, p);
  posenc::attention_reference(none, none, none, out, posenc::arange(0, 0), posenc::arange(0, 0),
                              posenc::no_position<T>{}, p);
  // Queries but no keys: every row sees nothing, so zeros and lse = -inf.
  const auto q = posenc_test::random_normal<T>(3, d, 17);
  mat<T> o3 = mat<T>::Constant(3, d, T(7)), l3(3, 1);
  posenc::attention(q, none, none, o3, posenc::arange(0, 3), posenc::arange(0, 0), posenc::no_position<T>{}, p, l3);
  CHECK(o3.isZero(0));
  CHECK((l3.array() == -std::numeric_limits<T>::infinity()).all());
  // Encoders on empty matrices and empty position sets.
  const posenc::rope<T> rope({.head_dim = d});
  mat<T> empty_rows(0, 2 * d), no_cols(3, 0);
  rope.rotate(empty_rows, posenc::arange(0, 0));
  rope.rotate(no_cols, posenc::arange(0, 3));
  rope.rotate(empty_rows, posenc::arange(5, 0), rope.make_cache(5, 0));
  const auto rot = rope.tile_rotator();
  std::vector<T> scratch(static_cast<std::size_t>(rot.scratch_size()));
  mat<T> empty_tile(0, d);
  rot.rotate(posenc::view_of(empty_tile), posenc::arange(0, 0), scratch.data());
  const posenc::sinusoidal<T> sin({.dim = d});
  sin.add_to(mat<T>(0, d), posenc::arange(0, 0));
  CHECK(sin.table(posenc::arange(0, 0)).rows() == 0);
  mat<T> tile0(0, 0), tile_q(3, 0), tile_k(0, 4);
  const posenc::alibi<T> alibi({.num_heads = 1});
  const mat<T> t5_table = mat<T>::Zero(32, 1), shaw_table = mat<T>::Zero(5, d);
  const posenc::t5_relative_bias<T> t5({.num_heads = 1}, t5_table);
  for (auto* t : {&tile0, &tile_q, &tile_k}) {
    const auto qp = posenc::arange(0, t->rows()), kp = posenc::arange(0, t->cols());
    alibi.add_bias_tile(*t, 0, qp, kp);
    t5.add_bias_tile(*t, 0, qp, kp);
  }
  const posenc::shaw_relative<T> shaw({.head_dim = d, .max_relative_position = 2}, shaw_table, shaw_table);
  mat<T> g0(0, 5);
  shaw.query_terms(mat<T>(0, d), g0);
  shaw.add_bias_tile(tile_k, g0, posenc::arange(0, 0), posenc::arange(0, 4));
  shaw.accumulate_value_weights(tile_k, posenc::arange(0, 0), posenc::arange(0, 4), g0);
  shaw.add_value_term(g0, mat<T>(0, d));
  mat<T> oa(0, d), la(0, 1);
  posenc::merge_partial(oa, la, mat<T>(0, d), mat<T>(0, 1));
}

TEMPLATE_TEST_CASE("a single key: the output is its value, the lse its logit", "[edges][single]", float, double) {
  using T = TestType;
  const index_t d = 24;
  const auto q = posenc_test::random_normal<T>(5, 2 * d, 18), k = posenc_test::random_normal<T>(1, 2 * d, 19),
             v = posenc_test::random_normal<T>(1, 2 * d, 20);
  const posenc::alibi<T> alibi({.num_heads = 2});
  mat<T> out(5, 2 * d), lse(5, 2);
  // Queries at positions 0..4 and the key at 2: rows 0 and 1 see nothing (causal).
  posenc::attention(q, k, v, out, posenc::arange(0, 5), posenc::arange(2, 1), alibi,
                    {.heads = 2, .causal = true, .threads = 1}, lse);
  for (index_t i = 0; i < 5; ++i)
    for (index_t h = 0; h < 2; ++h) {
      INFO("row " << i << " head " << h);
      if (i < 2) {
        CHECK(out.row(i).segment(h * d, d).isZero(0));
        CHECK(lse(i, h) == -std::numeric_limits<T>::infinity());
        continue;
      }
      // Weight exp(0) / exp(0) = 1 exactly: the value's own bits.
      CHECK(out.row(i).segment(h * d, d) == v.row(0).segment(h * d, d));
      const double logit = q.row(i).segment(h * d, d).template cast<double>().dot(
                               k.row(0).segment(h * d, d).template cast<double>()) /
                               std::sqrt(double(d)) +
                           alibi.bias(h, i, 2);
      CHECK(std::abs(double(lse(i, h)) - logit) <= 4 * (d + 8) * eps<T> * (1 + std::abs(logit)));
    }
}

TEMPLATE_TEST_CASE("every row masked: zeros and lse = -inf, never NaN", "[edges][masked]", float, double) {
  using T = TestType;
  const index_t d = 16;
  const auto q = posenc_test::random_normal<T>(20, d, 21);
  const posenc::rope<T> rope({.head_dim = d});
  for (const index_t n_kv : {index_t{40}, index_t{8300}}) {  // tiled; decode with key chunks
    const index_t n_q = n_kv > 1000 ? 3 : 20;
    const auto k = posenc_test::random_normal<T>(n_kv, d, 22), v = posenc_test::random_normal<T>(n_kv, d, 23);
    const mat<T> qn = q.topRows(n_q);
    // Causal with every key after every query; and a window that excludes every key.
    const std::vector<std::pair<posenc::attention_params, position>> cases = {
        {{.heads = 1, .causal = true, .k_tile = 16}, 100},
        {{.heads = 1, .window_left = 3, .window_right = 3, .k_tile = 16}, 100},
        {{.heads = 1, .window_left = 0, .window_right = 0}, -50}};
    for (const auto& [p, k0] : cases) {
      INFO("n_kv " << n_kv << ", first key " << k0 << ", window " << p.window_left);
      mat<T> out = mat<T>::Constant(n_q, d, T(3)), lse(n_q, 1);
      posenc::attention(qn, k, v, out, posenc::arange(n_kv > 1000 ? 0 : 50, n_q), posenc::arange(n_kv > 1000 ? 100 : k0, n_kv),
                        rope, p, lse);
      CHECK(out.isZero(0));
      CHECK((lse.array() == -std::numeric_limits<T>::infinity()).all());
      mat<T> ref = mat<T>::Constant(n_q, d, T(3)), ref_lse(n_q, 1);
      posenc::attention_reference(qn, k, v, ref, posenc::arange(n_kv > 1000 ? 0 : 50, n_q),
                                  posenc::arange(n_kv > 1000 ? 100 : k0, n_kv), rope, p, ref_lse);
      CHECK(ref.isZero(0));
    }
  }
}

// ---- regressions from the fuzzers -------------------------------------------------------------

TEST_CASE("fuzz regressions: parameters that overflowed or produced NaN are refused", "[edges][fuzz]") {
  constexpr index_t big = std::numeric_limits<index_t>::max();
  // alibi: finding the largest power of two <= num_heads doubled past int64 (UB) before the
  // allocation failed; now the allocation's length_error is all that is left.
  CHECK_THROWS_AS(posenc::alibi<float>::slopes(big), std::length_error);
  CHECK(posenc::alibi<float>::slopes(3).size() == 3);
  // shaw: 2K + 1 table rows overflowed for K near 2^63.
  const mat<float> table = mat<float>::Zero(3, 4);
  CHECK_INVALID(posenc::shaw_relative<float>({.head_dim = 4, .max_relative_position = big}, table, table),
                "shaw_params.max_relative_position");
  // sinusoidal: a base far below 1 gave infinite frequencies, so NaN embeddings.
  CHECK_INVALID(posenc::sinusoidal<float>({.dim = 8, .base = 1e-300, .shifted_denominator = true}),
                "sinusoidal_params.base");
  // rope: frequencies whose angle overflows at large positions gave NaN rotations.
  CHECK_INVALID(posenc::rope<float>({.head_dim = 512, .base = 1e-300}), "rope_params.base");
  // rope: a YaRN mscale so large that the magnitude overflowed gave inf and NaN rotations.
  CHECK_INVALID(posenc::rope<float>({.head_dim = 8,
                                     .scaling = posenc::yarn_scaling{.factor = 1e10, .mscale = 1e308, .mscale_all_dim = 1}}),
                "rope_params.scaling = yarn");
  // The neighbours of those limits still work.
  CHECK(posenc::sinusoidal<float>({.dim = 8, .base = 1e-3}).frequencies().size() == 4);
  CHECK(posenc::rope<float>({.head_dim = 8, .base = 1e-3}).magnitude() == 1.0);
}

TEST_CASE("a position range that would run past INT64_MAX is a caller bug", "[edges][positions]") {
  constexpr position hi = std::numeric_limits<position>::max();
  CHECK(posenc::arange(hi, 1)[0] == hi);
  CHECK(posenc::arange(hi - 9, 10)[9] == hi);
  CHECK(posenc::arange(hi, 0).empty());
  CHECK_THROWS_AS(posenc::arange(hi - 9, 11), posenc::precondition_error);
  CHECK_THROWS_AS(posenc::arange(hi, 2), posenc::precondition_error);
}

TEST_CASE("fuzz regression: T5 buckets of the int64 extremes", "[edges][fuzz][t5]") {
  constexpr position lo = std::numeric_limits<position>::min(), hi = std::numeric_limits<position>::max();
  // -INT64_MIN overflowed (UB); both extremes lie past max_distance, in the last bucket of their side.
  const mat<float> table = mat<float>::Zero(32, 1);
  const posenc::t5_relative_bias<float> bi({.num_heads = 1}, table);
  const posenc::t5_relative_bias<float> causal({.num_heads = 1, .bidirectional = false}, table);
  CHECK(bi.bucket(lo) == 15);
  CHECK(bi.bucket(hi) == 31);
  CHECK(causal.bucket(lo) == 31);
  CHECK(causal.bucket(hi) == 0);
  CHECK(posenc::t5_relative_bias<float>::bucket(lo, 32, 128, true) == 15);
  CHECK(posenc::t5_relative_bias<float>::bucket(lo, 32, 128, false) == 31);
}

TEST_CASE("fuzz regression: control bytes in a config string are escaped in the error", "[edges][fuzz][hf]") {
  const posenc::config_map m = {{"rope_type", std::string("yarn\0\x01", 6)}};
  // A NUL used to end the message early (what() is a C string), losing the explanation.
  CHECK_THROWS_WITH(posenc::rope_scaling_from_config(m),
                    "posenc: rope_scaling.rope_type = \"yarn\\x00\\x01\": unknown type (known: default, linear, ntk, "
                    "dynamic, yarn, llama3, longrope)");
}
