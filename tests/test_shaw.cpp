// Shaw et al. relative keys and values: the four blockwise steps, composed by an online softmax over
// any key-tile split, reproduce the formula computed directly.
#include <catch2/catch.hpp>

#include "support.hpp"
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "posenc/encoders/shaw.hpp"

using posenc::index_t;
using posenc::position;
template <class T>
using mat = posenc::row_matrix<T>;

static_assert(posenc::relative_key_value<posenc::shaw_relative<float>>);
static_assert(posenc::relative_key_value<posenc::shaw_relative<double>>);
static_assert(!posenc::position_bias<posenc::shaw_relative<float>>);


namespace {

template <class T>
constexpr double eps = std::numeric_limits<T>::epsilon();

// Attention output of order 1 through a softmax of logits of order 1: errors of a few dozen
// roundings of the arithmetic type, relative to max(|ref|, 1).
template <class T>
constexpr double out_tol = 16 * eps<T>;

template <class T>
mat<T> random_matrix(std::mt19937_64& rng, index_t rows, index_t cols) {
  std::uniform_real_distribution<double> u(-1, 1);
  mat<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) m(i, j) = static_cast<T>(u(rng));
  return m;
}

index_t ref_index(position q, position k, index_t K) {
  const position r = k - q;
  return static_cast<index_t>((r < -K ? -K : r > K ? K : r) + K);
}

// e_ij = q_i.(k_j + aK[clip(kpos_j - qpos_i)]) / sqrt(d); out_i = sum_j a_ij (v_j + aV[...]),
// directly, in double, over the keys visible to each query (all, or kpos <= qpos when causal).
template <class T>
mat<double> reference(const mat<T>& q, const mat<T>& k, const mat<T>& v, const mat<T>& ak, const mat<T>& av,
                      posenc::positions qp, posenc::positions kp, index_t K, bool causal) {
  const index_t d = q.cols();
  mat<double> out = mat<double>::Zero(q.rows(), d);
  for (index_t i = 0; i < q.rows(); ++i) {
    std::vector<double> e(static_cast<std::size_t>(k.rows()), -std::numeric_limits<double>::infinity());
    double mx = -std::numeric_limits<double>::infinity();
    for (index_t j = 0; j < k.rows(); ++j) {
      if (causal && kp[j] > qp[i]) continue;
      const index_t r = ref_index(qp[i], kp[j], K);
      double s = 0;
      for (index_t c = 0; c < d; ++c) s += double(q(i, c)) * (double(k(j, c)) + double(ak(r, c)));
      e[j] = s / std::sqrt(double(d));
      mx = std::max(mx, e[j]);
    }
    double sum = 0;
    for (auto& x : e) sum += (x = std::exp(x - mx));
    for (index_t j = 0; j < k.rows(); ++j) {
      const index_t r = ref_index(qp[i], kp[j], K);
      for (index_t c = 0; c < d; ++c) out(i, c) += e[j] / sum * (double(v(j, c)) + double(av(r, c)));
    }
  }
  return out;
}

// A minimal blockwise kernel: online softmax over key tiles of the given sizes, in T, using the
// encoder's four steps exactly as its header documents.
template <class T>
mat<T> blockwise(const posenc::shaw_relative<T>& enc, const mat<T>& q, const mat<T>& k, const mat<T>& v,
                 posenc::positions qp, posenc::positions kp, const std::vector<index_t>& tiles, bool causal) {
  const index_t nq = q.rows(), d = q.cols(), nr = enc.num_relative();
  const T tau = T(1) / std::sqrt(T(d));
  mat<T> g(nq, nr);
  enc.query_terms(q, g);
  std::vector<T> m(static_cast<std::size_t>(nq), -std::numeric_limits<T>::infinity()), l(m.size(), 0);
  mat<T> acc = mat<T>::Zero(nq, d), w = mat<T>::Zero(nq, nr);
  index_t j0 = 0;
  for (index_t nk : tiles) {
    const auto kt = kp.subset(j0, nk);
    mat<T> s = q * k.middleRows(j0, nk).transpose();
    enc.add_bias_tile(s, g, qp, kt);
    mat<T> p(nq, nk);
    for (index_t i = 0; i < nq; ++i) {
      T mx = m[i];
      for (index_t j = 0; j < nk; ++j) {
        s(i, j) = causal && kt[j] > qp[i] ? -std::numeric_limits<T>::infinity() : s(i, j) * tau;
        mx = std::max(mx, s(i, j));
      }
      const T alpha = mx == -std::numeric_limits<T>::infinity() ? T(1) : std::exp(m[i] - mx);
      T rowsum = 0;
      for (index_t j = 0; j < nk; ++j) rowsum += (p(i, j) = s(i, j) == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(s(i, j) - mx));
      l[i] = alpha * l[i] + rowsum;
      acc.row(i) *= alpha;
      w.row(i) *= alpha;
      m[i] = mx;
    }
    acc += p * v.middleRows(j0, nk);
    enc.accumulate_value_weights(p, qp, kt, w);
    j0 += nk;
  }
  REQUIRE(j0 == k.rows());
  enc.add_value_term(w, acc);
  for (index_t i = 0; i < nq; ++i) acc.row(i) /= l[i];
  return acc;
}

template <class T>
void check_close(const mat<T>& got, const mat<double>& ref, double tol) {
  double worst = 0;
  index_t wi = -1, wj = -1;
  for (index_t i = 0; i < ref.rows(); ++i)
    for (index_t j = 0; j < ref.cols(); ++j) {
      const double r = std::abs(double(got(i, j)) - ref(i, j)) / (tol * std::max(std::abs(ref(i, j)), 1.0));
      if (!(r <= worst)) worst = r, wi = i, wj = j;
    }
  INFO("worst element (" << wi << ", " << wj << "), error / tolerance = " << worst);
  CHECK(worst <= 1);
}

}  // namespace

TEST_CASE("shaw relative index comes from positions and is clipped", "[shaw]") {
  const index_t K = 3, d = 2;
  const mat<float> t = mat<float>::Zero(2 * K + 1, d);
  posenc::shaw_relative<float> enc({.head_dim = d, .max_relative_position = K}, t, t);
  CHECK(enc.num_relative() == 7);
  const position big = position{1} << 40;
  for (position q : {position{0}, position{-9}, big})
    for (position off : {-100, -4, -3, -1, 0, 1, 2, 3, 4, 1000}) {
      INFO("q " << q << " k - q " << off);
      CHECK(enc.relative_index(q, q + off) == ref_index(q, q + off, K));
    }
  CHECK(enc.relative_index(10, 8) == 1);
  CHECK(enc.relative_index(10, 13) == 6);
  CHECK(enc.relative_index(10, 2) == 0);
}

TEMPLATE_TEST_CASE("shaw query terms are dot products with the key table", "[shaw]", float, double) {
  std::mt19937_64 rng(11);
  const index_t d = 24, K = 4;
  const auto ak = random_matrix<TestType>(rng, 2 * K + 1, d);
  posenc::shaw_relative<TestType> enc({.head_dim = d, .max_relative_position = K}, ak, ak);
  // q is one head's column block of a wider [tokens, heads * d] matrix.
  const auto qkv = random_matrix<TestType>(rng, 5, 3 * d);
  mat<double> g(5, 2 * K + 1);
  enc.query_terms(qkv.middleCols(d, d), g);
  mat<double> ref(5, 2 * K + 1);
  for (index_t i = 0; i < 5; ++i)
    for (index_t r = 0; r < 2 * K + 1; ++r) {
      double s = 0;
      for (index_t c = 0; c < d; ++c) s += double(qkv(i, d + c)) * double(ak(r, c));
      ref(i, r) = s;
    }
  check_close(g, ref, static_cast<double>(d) * eps<TestType>);
}

TEST_CASE("shaw query terms accept bf16 queries in a float encoder", "[shaw]") {
  std::mt19937_64 rng(12);
  const index_t d = 8, K = 2;
  const auto ak = random_matrix<float>(rng, 2 * K + 1, d);
  posenc::shaw_relative<float> enc({.head_dim = d, .max_relative_position = K}, ak, ak);
  const auto qf = random_matrix<float>(rng, 3, d);
  const mat<Eigen::bfloat16> q = qf.cast<Eigen::bfloat16>();
  mat<float> g(3, 2 * K + 1);
  enc.query_terms(q, g);
  mat<double> ref(3, 2 * K + 1);
  for (index_t i = 0; i < 3; ++i)
    for (index_t r = 0; r < 2 * K + 1; ++r) {
      double s = 0;
      for (index_t c = 0; c < d; ++c) s += double(static_cast<float>(q(i, c))) * double(ak(r, c));
      ref(i, r) = s;
    }
  check_close(g, ref, static_cast<double>(d) * eps<float>);
}

TEMPLATE_TEST_CASE("shaw blockwise steps under an online softmax reproduce the formula", "[shaw]", float, double) {
  std::mt19937_64 rng(2024);
  const index_t d = 16, nq = 7, nk = 37;
  const position big = position{1} << 40;
  const std::vector<std::vector<index_t>> splits = {{37}, {1, 36}, {5, 5, 5, 5, 5, 5, 7}, {13, 1, 2, 21},
                                                    std::vector<index_t>(37, 1)};
  for (index_t K : {0, 2, 5, 60}) {
    const auto ak = random_matrix<TestType>(rng, 2 * K + 1, d);
    const auto av = random_matrix<TestType>(rng, 2 * K + 1, d);
    posenc::shaw_relative<TestType> enc({.head_dim = d, .max_relative_position = K}, ak, av);
    const auto q = random_matrix<TestType>(rng, nq, d);
    const auto k = random_matrix<TestType>(rng, nk, d);
    const auto v = random_matrix<TestType>(rng, nk, d);
    for (position base : {position{0}, position{-500}, big}) {
      // Unsorted, non-contiguous lists (distances both inside and beyond the clip) and ranges.
      std::uniform_int_distribution<position> spread(-20, 20);
      std::vector<position> ql(nq), kl(nk);
      for (auto& x : ql) x = base + spread(rng);
      for (auto& x : kl) x = base + spread(rng);
      const posenc::positions qs[] = {posenc::positions(ql), posenc::arange(base + 3, nq)};
      const posenc::positions ks[] = {posenc::positions(kl), posenc::arange(base - 15, nk)};
      for (const auto& qp : qs)
        for (const auto& kp : ks) {
          const auto ref = reference(q, k, v, ak, av, qp, kp, K, false);
          for (const auto& split : splits) {
            INFO("K " << K << " base " << base << " q range " << qp.is_range() << " k range " << kp.is_range()
                      << " tiles " << split.size());
            check_close(blockwise(enc, q, k, v, qp, kp, split, false), ref, out_tol<TestType>);
          }
        }
      // Causal masking, bottom-right aligned: the queries are the last nq of the keys.
      const auto qc = posenc::arange(base + nk - nq, nq), kc = posenc::arange(base, nk);
      const auto refc = reference(q, k, v, ak, av, qc, kc, K, true);
      for (const auto& split : splits) {
        INFO("causal K " << K << " base " << base << " tiles " << split.size());
        check_close(blockwise(enc, q, k, v, qc, kc, split, true), refc, out_tol<TestType>);
      }
    }
  }
}

TEMPLATE_TEST_CASE("shaw steps are shift-invariant", "[shaw]", float, double) {
  std::mt19937_64 rng(5);
  const index_t d = 4, K = 3, nq = 6, nk = 15;
  const auto ak = random_matrix<TestType>(rng, 2 * K + 1, d);
  posenc::shaw_relative<TestType> enc({.head_dim = d, .max_relative_position = K}, ak, ak);
  const auto g = random_matrix<float>(rng, nq, 2 * K + 1);
  const auto p = random_matrix<float>(rng, nq, nk);
  std::uniform_int_distribution<position> spread(-8, 8);
  std::vector<position> ql(nq), kl(nk);
  for (auto& x : ql) x = spread(rng);
  for (auto& x : kl) x = spread(rng);
  mat<float> t0 = mat<float>::Zero(nq, nk), w0 = mat<float>::Zero(nq, 2 * K + 1);
  enc.add_bias_tile(t0, g, posenc::positions(ql), posenc::positions(kl));
  enc.accumulate_value_weights(p, posenc::positions(ql), posenc::positions(kl), w0);
  for (position shift : {position{1}, position{-77}, (position{1} << 40) + 1}) {
    auto qs = ql, ks = kl;
    for (auto& x : qs) x += shift;
    for (auto& x : ks) x += shift;
    mat<float> t1 = mat<float>::Zero(nq, nk), w1 = mat<float>::Zero(nq, 2 * K + 1);
    enc.add_bias_tile(t1, g, posenc::positions(qs), posenc::positions(ks));
    enc.accumulate_value_weights(p, posenc::positions(qs), posenc::positions(ks), w1);
    CHECK(t1 == t0);
    CHECK(w1 == w0);
  }
}

TEST_CASE("shaw near value weights: every column but the far-left one, as the full step", "[shaw]") {
  std::mt19937_64 rng(6);
  const index_t d = 4, K = 3, nq = 6, nk = 40;
  const auto ak = random_matrix<float>(rng, 2 * K + 1, d);
  posenc::shaw_relative<float> enc({.head_dim = d, .max_relative_position = K}, ak, ak);
  const auto p = random_matrix<float>(rng, nq, nk);
  std::vector<position> ql(nq), kl(nk);
  for (index_t i = 0; i < nq; ++i) ql[i] = 10 + 5 * i;
  for (index_t j = 0; j < nk; ++j) kl[j] = (j * 13) % 41;
  const posenc::positions q(ql);
  for (const posenc::positions k : {posenc::arange(0, nk), posenc::positions(kl)}) {  // a range, scattered
    mat<float> full = mat<float>::Constant(nq, 2 * K + 1, 0.5f), near = full;
    enc.accumulate_value_weights(p, q, k, full);
    enc.accumulate_near_value_weights(p, q, k, near);
    CHECK(near.rightCols(2 * K) == full.rightCols(2 * K));
    // Column 0 by hand: the keys at least K before the query.
    for (index_t i = 0; i < nq; ++i) {
      double far = 0.5;
      for (index_t j = 0; j < nk; ++j) far += k[j] - q[i] <= -K ? p(i, j) : 0.0;
      CHECK(full(i, 0) == Approx(far).margin(1e-5));
    }
  }
  // A zero term adds nothing: the tile keeps its bits, a -0 included.
  mat<float> tile = random_matrix<float>(rng, nq, nk), g = mat<float>::Zero(nq, 2 * K + 1);
  tile(0, 0) = -0.0f;
  const mat<float> before = tile;
  enc.add_bias_tile(tile, g, q, posenc::arange(0, nk));
  CHECK(std::memcmp(tile.data(), before.data(), sizeof(float) * static_cast<std::size_t>(tile.size())) == 0);
}

TEST_CASE("shaw strided tiles leave the padding untouched", "[shaw]") {
  const index_t d = 2, K = 1;
  const mat<double> t = mat<double>::Ones(3, d);
  posenc::shaw_relative<double> enc({.head_dim = d, .max_relative_position = K}, t, t);
  mat<float> g(2, 3);
  g << 1, 2, 3, 10, 20, 30;
  mat<float> buf = mat<float>::Constant(3, 9, -5.0f);
  auto block = buf.block(0, 2, 2, 5);
  block.setZero();
  enc.add_bias_tile(block, g, posenc::arange(3, 2), posenc::arange(1, 5));  // k - q from -2 .. 2
  const mat<float> expect = (mat<float>(2, 5) << 1, 1, 2, 3, 3, 10, 10, 10, 20, 30).finished();
  CHECK(buf.block(0, 2, 2, 5) == expect);
  CHECK(buf.block(0, 0, 3, 2).isConstant(-5.0f));
  CHECK(buf.block(0, 7, 3, 2).isConstant(-5.0f));
  CHECK(buf.row(2).isConstant(-5.0f));
}

TEST_CASE("shaw rejects invalid parameters and table shapes, naming them", "[shaw]") {
  using S = posenc::shaw_relative<float>;
  const mat<float> t5x4 = mat<float>::Zero(5, 4), t5x3 = mat<float>::Zero(5, 3), t4x4 = mat<float>::Zero(4, 4);
  CHECK_INVALID(S({.head_dim = 4, .max_relative_position = -1}, t5x4, t5x4), "max_relative_position = -1");
  CHECK_INVALID(S({.head_dim = 0, .max_relative_position = 2}, t5x4, t5x4), "head_dim = 0");
  CHECK_INVALID(S({.head_dim = 4, .max_relative_position = 2}, t4x4, t5x4), "aK.rows = 4");
  CHECK_INVALID(S({.head_dim = 4, .max_relative_position = 2}, t5x4, t5x3), "aV.cols = 3");
  CHECK_INVALID(S({.head_dim = 4, .max_relative_position = 2}, t5x3, t5x4), "aK.cols = 3");
  CHECK_NOTHROW(S({.head_dim = 4, .max_relative_position = 2}, t5x4, t5x4));
}

TEST_CASE("shaw hot-path preconditions", "[shaw]") {
  const mat<float> t = mat<float>::Zero(5, 4);
  posenc::shaw_relative<float> enc({.head_dim = 4, .max_relative_position = 2}, t, t);
  const auto qp = posenc::arange(0, 3), kp = posenc::arange(0, 6);
  auto z = [](posenc::index_t r, posenc::index_t c) { return mat<float>(mat<float>::Zero(r, c)); };
  mat<float> q = z(3, 4), q_bad = z(3, 5), g = z(3, 5), g_bad = z(3, 4), tile = z(3, 6), tile_bad = z(3, 7),
             w = z(3, 5), w_bad = z(2, 5), out = z(3, 4), out_bad = z(3, 3);
  CHECK_THROWS_AS(enc.query_terms(q_bad, g), posenc::precondition_error);
  CHECK_THROWS_AS(enc.query_terms(q, g_bad), posenc::precondition_error);
  CHECK_THROWS_AS(enc.add_bias_tile(tile_bad, g, qp, kp), posenc::precondition_error);
  CHECK_THROWS_AS(enc.add_bias_tile(tile, g_bad, qp, kp), posenc::precondition_error);
  CHECK_THROWS_AS(enc.accumulate_value_weights(tile, qp, kp, w_bad), posenc::precondition_error);
  CHECK_THROWS_AS(enc.accumulate_value_weights(tile_bad, qp, kp, w), posenc::precondition_error);
  CHECK_THROWS_AS(enc.add_value_term(w, out_bad), posenc::precondition_error);
  CHECK_THROWS_AS(enc.add_value_term(g_bad, out), posenc::precondition_error);
}
