// The naive attention oracle against a long double formula, and the log-sum-exp merge.
#include <catch2/catch.hpp>

#include "support.hpp"
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "posenc/attention/merge.hpp"
#include "posenc/attention/reference.hpp"

using posenc::index_t;
using posenc::position;

namespace {

template <class T>
constexpr double eps = std::numeric_limits<T>::epsilon();

template <class T>
posenc::row_matrix<T> random_matrix(index_t r, index_t c, unsigned seed, double amp = 1.0) {
  return posenc_test::random_normal<T>(r, c, seed, amp);
}

struct formula_result {
  std::vector<long double> out;  // [n_q, heads * d]
  std::vector<long double> lse;  // [n_q, heads]
};

// Softmax attention written from its definition, one query at a time, in long double.
template <class T>
formula_result formula(const posenc::row_matrix<T>& q, const posenc::row_matrix<T>& k, const posenc::row_matrix<T>& v,
                       const std::vector<position>& qp, const std::vector<position>& kp, index_t heads,
                       index_t kv_heads, bool causal, position left, position right) {
  const index_t nq = q.rows(), nk = k.rows(), d = q.cols() / heads;
  formula_result r{std::vector<long double>(static_cast<std::size_t>(nq * heads * d), 0.0L),
                   std::vector<long double>(static_cast<std::size_t>(nq * heads))};
  const long double scale = 1.0L / std::sqrt(static_cast<long double>(d));
  for (index_t h = 0; h < heads; ++h) {
    const index_t g = h * kv_heads / heads;
    for (index_t i = 0; i < nq; ++i) {
      std::vector<long double> s;
      std::vector<index_t> idx;
      for (index_t j = 0; j < nk; ++j) {
        const position a = qp[static_cast<std::size_t>(i)], b = kp[static_cast<std::size_t>(j)];
        if (causal && b > a) continue;
        if (left >= 0 && b < a - left) continue;
        if (right >= 0 && b > a + right) continue;
        long double dot = 0;
        for (index_t c = 0; c < d; ++c) dot += static_cast<long double>(q(i, h * d + c)) * k(j, g * d + c);
        s.push_back(dot * scale);
        idx.push_back(j);
      }
      auto& l = r.lse[static_cast<std::size_t>(i * heads + h)];
      if (s.empty()) {
        l = -std::numeric_limits<long double>::infinity();
        continue;
      }
      long double m = s[0], sum = 0;
      for (auto x : s) m = std::max(m, x);
      for (auto x : s) sum += std::exp(x - m);
      l = m + std::log(sum);
      for (std::size_t t = 0; t < s.size(); ++t) {
        const long double w = std::exp(s[t] - l);
        for (index_t c = 0; c < d; ++c)
          r.out[static_cast<std::size_t>(i * heads * d + h * d + c)] += w * v(idx[t], g * d + c);
      }
    }
  }
  return r;
}

}  // namespace

TEMPLATE_TEST_CASE("reference attention equals the softmax formula", "[attention][reference]", float, double) {
  using T = TestType;
  const index_t d = 8;
  struct config {
    index_t heads, kv_heads, nq, nk;
    bool causal;
    position left, right;
    position q0;
  };
  // GQA 4/2 and MQA 4/1, causal bottom-right (queries at the end of a longer cache), windows.
  const config configs[] = {{2, 2, 5, 9, false, -1, -1, 0},  {4, 2, 7, 7, true, -1, -1, 0},
                            {4, 1, 3, 20, true, -1, -1, 17}, {2, 1, 9, 9, false, 2, 1, 0},
                            {2, 2, 9, 9, true, 3, -1, 0},    {2, 2, 4, 6, true, -1, -1, -10}};
  for (const auto& cf : configs) {
    auto q = random_matrix<T>(cf.nq, cf.heads * d, 1);
    auto k = random_matrix<T>(cf.nk, cf.kv_heads * d, 2);
    auto v = random_matrix<T>(cf.nk, cf.kv_heads * d, 3);
    std::vector<position> qp(static_cast<std::size_t>(cf.nq)), kp(static_cast<std::size_t>(cf.nk));
    for (index_t i = 0; i < cf.nq; ++i) qp[static_cast<std::size_t>(i)] = cf.q0 + i;
    for (index_t j = 0; j < cf.nk; ++j) kp[static_cast<std::size_t>(j)] = j;
    posenc::row_matrix<T> out(cf.nq, cf.heads * d);
    posenc::row_matrix<T> lse(cf.nq, cf.heads);
    posenc::attention_reference(q, k, v, out, qp, kp, posenc::no_position<T>{},
                                {.heads = cf.heads,
                                 .kv_heads = cf.kv_heads,
                                 .causal = cf.causal,
                                 .window_left = cf.left,
                                 .window_right = cf.right},
                                lse);
    auto ref = formula(q, k, v, qp, kp, cf.heads, cf.kv_heads, cf.causal, cf.left, cf.right);
    const double tol = 64 * eps<T>;
    double worst = 0;
    index_t wi = -1;
    for (index_t i = 0; i < out.size(); ++i) {
      const double e = std::abs(static_cast<double>(out.data()[i]) - static_cast<double>(ref.out[static_cast<std::size_t>(i)]));
      if (e > worst) worst = e, wi = i;
    }
    INFO("heads " << cf.heads << "/" << cf.kv_heads << " causal " << cf.causal << " worst " << worst << " at " << wi);
    CHECK(worst <= tol);
    for (index_t i = 0; i < lse.size(); ++i) {
      const long double r = ref.lse[static_cast<std::size_t>(i)];
      if (std::isinf(r)) {
        CHECK(std::isinf(lse.data()[i]));
        CHECK(lse.data()[i] < 0);
      } else {
        CHECK(std::abs(static_cast<double>(lse.data()[i]) - static_cast<double>(r)) <= tol * std::max(1.0, std::abs(double(r))));
      }
    }
  }
}

TEMPLATE_TEST_CASE("a fully masked row gives zeros and lse = -inf", "[attention][reference]", float, double) {
  using T = TestType;
  auto q = random_matrix<T>(3, 4, 1);
  auto k = random_matrix<T>(2, 4, 2);
  auto v = random_matrix<T>(2, 4, 3);
  posenc::row_matrix<T> out(3, 4), lse(3, 1);
  // Query 0 sits before every key: nothing visible under causal masking.
  std::vector<position> qp{0, 10, 11}, kp{5, 10};
  posenc::attention_reference(q, k, v, out, qp, kp, posenc::no_position<T>{}, {.causal = true}, lse);
  for (index_t c = 0; c < 4; ++c) CHECK(out(0, c) == T(0));
  CHECK(lse(0, 0) == -std::numeric_limits<T>::infinity());
  CHECK(std::isfinite(lse(1, 0)));
  CHECK(out.allFinite());
}

TEMPLATE_TEST_CASE("merging two halves by log-sum-exp equals attention over all keys", "[attention][merge]", float,
                   double) {
  using T = TestType;
  const index_t heads = 2, d = 8, nq = 6, nk = 13;
  auto q = random_matrix<T>(nq, heads * d, 4, 2.0);
  auto k = random_matrix<T>(nk, heads * d, 5, 2.0);
  auto v = random_matrix<T>(nk, heads * d, 6);
  const posenc::attention_params p{.heads = heads, .causal = true};
  std::vector<position> qp{0, 2, 4, 6, 8, 12}, kp(static_cast<std::size_t>(nk));
  for (index_t j = 0; j < nk; ++j) kp[static_cast<std::size_t>(j)] = j;

  posenc::row_matrix<T> whole(nq, heads * d), lw(nq, heads);
  posenc::attention_reference(q, k, v, whole, qp, kp, posenc::no_position<T>{}, p, lw);

  for (index_t split : {0, 1, 5, 12, 13}) {
    posenc::row_matrix<T> a(nq, heads * d), la(nq, heads), b(nq, heads * d), lb(nq, heads);
    std::vector<position> ka(kp.begin(), kp.begin() + split), kb(kp.begin() + split, kp.end());
    posenc::attention_reference(q, k.topRows(split), v.topRows(split), a, qp, ka, posenc::no_position<T>{}, p, la);
    posenc::attention_reference(q, k.bottomRows(nk - split), v.bottomRows(nk - split), b, qp, kb,
                                posenc::no_position<T>{}, p, lb);
    posenc::merge_partial(a, la, b, lb);
    INFO("split " << split);
    CHECK((a - whole).cwiseAbs().maxCoeff() <= 32 * eps<T>);
    for (index_t i = 0; i < nq; ++i)
      for (index_t h = 0; h < heads; ++h) CHECK(std::abs(la(i, h) - lw(i, h)) <= 32 * eps<T> * std::max(T(1), std::abs(lw(i, h))));
  }
}

TEST_CASE("merge of two empty sides stays zero and -inf, never NaN", "[attention][merge]") {
  const float inf = std::numeric_limits<float>::infinity();
  posenc::row_matrix<float> a(1, 2), b(1, 2), la(1, 1), lb(1, 1);
  a << 1, 2;
  b << std::nanf(""), inf;  // garbage on a side that has no keys must not leak
  la << -inf;
  lb << -inf;
  posenc::merge_partial(a, la, b, lb);
  CHECK(a(0, 0) == 0);
  CHECK(a(0, 1) == 0);
  CHECK(la(0, 0) == -inf);
  posenc::row_matrix<float> c(1, 2), lc(1, 1);
  c << 3, 4;
  lc << 0.5f;
  b << std::nanf(""), inf;
  lb << -inf;
  posenc::merge_partial(c, lc, b, lb);
  CHECK(c(0, 0) == 3);
  CHECK(c(0, 1) == 4);
  CHECK(lc(0, 0) == 0.5f);
}

TEST_CASE("attention rejects bad head counts and shapes", "[attention][errors]") {
  using Catch::Matchers::Contains;
  auto q = random_matrix<float>(2, 8, 1);
  auto k = random_matrix<float>(2, 8, 2);
  posenc::row_matrix<float> out(2, 8);
  const auto pos = posenc::arange(0, 2);
  const posenc::no_position<float> none;
  CHECK_THROWS_WITH(posenc::attention_reference(q, k, k, out, pos, pos, none, {.heads = 0}),
                    Contains("attention_params.heads = 0"));
  CHECK_THROWS_WITH(posenc::attention_reference(q, k, k, out, pos, pos, none, {.heads = 4, .kv_heads = 3}),
                    Contains("attention_params.kv_heads = 3"));
  CHECK_THROWS_WITH(posenc::attention_reference(q, k, k, out, pos, pos, none, {.heads = 2, .window_left = -2}),
                    Contains("attention_params.window_left = -2"));
  CHECK_THROWS_AS(posenc::attention_reference(q, k, k, out, pos, pos, none, {.heads = 3}), posenc::precondition_error);
  CHECK_THROWS_AS(posenc::attention_reference(q, k, k, out, posenc::arange(0, 1), pos, none, {.heads = 2}),
                  posenc::precondition_error);
  auto k4 = random_matrix<float>(2, 4, 3);
  CHECK_THROWS_AS(posenc::attention_reference(q, k4, k4, out, pos, pos, none, {.heads = 2}), posenc::precondition_error);
}
