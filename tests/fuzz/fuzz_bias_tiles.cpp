// libFuzzer target: score-bias tiles (ALiBi, T5 buckets, Shaw relative keys and value weights)
// with arbitrary parameters, tile shapes, strides, heads and positions (ranges and lists),
// against the formulas (docs/alibi.md, t5_bias.md, shaw.md) evaluated here independently, element by element.
//
// A finding: a crash or sanitizer report; an element that differs from the formula (ALiBi: the
// correctly rounded `-slope (q - k)`; T5: the table entry of the formula's bucket, either
// neighbour accepted where the formula's real value is within 1e-9 of an integer; Shaw: the
// exact clipped index); an element past a row's end changed; a wrong head not reported.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "fuzz_common.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"

namespace {

using posenc::index_t;
using posenc::position;
using posenc_fuzz::fail;

struct tile_case {
  index_t rows = 0, cols = 0, pad = 0;
  std::vector<position> q, k;
  bool q_range = true, k_range = true;
  std::uint32_t seed = 0;
};

tile_case read_tile(posenc_fuzz::reader& in, position limit) {
  tile_case t;
  t.rows = in.in_range<index_t>(0, 12);
  t.cols = in.in_range<index_t>(0, 300);
  t.pad = in.in_range<index_t>(0, 3);
  const position qb = in.position_value(limit), kb = in.flag() ? qb + in.in_range<position>(-400, 400)
                                                               : in.position_value(limit);
  t.q_range = in.flag(), t.k_range = in.flag();
  for (index_t i = 0; i < t.rows; ++i) t.q.push_back(t.q_range ? qb + i : qb + in.in_range<position>(-300, 300));
  for (index_t j = 0; j < t.cols; ++j) t.k.push_back(t.k_range ? kb + j : kb + in.in_range<position>(-300, 300));
  t.seed = static_cast<std::uint32_t>(in.bits(4));
  return t;
}

posenc::positions positions_of(const std::vector<position>& v, bool range) {
  return range && !v.empty() ? posenc::arange(v[0], static_cast<index_t>(v.size())) : posenc::positions(v);
}

template <class E>
posenc::row_matrix<E> random_tile(const tile_case& t, std::mt19937& rng) {
  std::normal_distribution<double> n(0, 4);
  posenc::row_matrix<E> m(t.rows, t.cols + t.pad);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<E>(n(rng));
  return m;
}

template <class E>
posenc::strided_view<E> cols_view(posenc::row_matrix<E>& m, index_t cols) {
  return {m.data(), m.rows(), cols, m.cols()};
}

template <class E>
void check_padding(const posenc::row_matrix<E>& before, const posenc::row_matrix<E>& after, index_t cols,
                   const char* who) {
  for (index_t i = 0; i < before.rows(); ++i)
    for (index_t j = cols; j < before.cols(); ++j)
      if (!(before(i, j) == after(i, j))) fail("%s wrote past the end of row %td", who, i);
}

// ---- ALiBi -----------------------------------------------------------------------------------

long double alibi_slope(index_t n, index_t h, long double max_bias) {
  index_t c = 1;
  while (c <= n / 2) c *= 2;
  if (h < c) return std::exp2(-max_bias * static_cast<long double>(h + 1) / static_cast<long double>(c));
  return std::exp2(-max_bias * static_cast<long double>(2 * (h - c) + 1) / static_cast<long double>(2 * c));
}

template <class E>
void alibi_case(posenc_fuzz::reader& in) {
  const index_t n = in.in_range<index_t>(1, 200);
  const posenc::alibi_params p{.num_heads = n,
                               .head_offset = in.in_range<index_t>(0, n - 1),
                               .form = in.flag() ? posenc::alibi_form::symmetric : posenc::alibi_form::causal,
                               .max_bias = in.flag() ? 8.0 : in.uniform(0.01, 64)};
  const posenc::alibi<float> enc(p);
  const index_t local = in.in_range<index_t>(0, n - p.head_offset);  // n - offset: out of range
  const tile_case t = read_tile(in, position{1} << 51);
  std::mt19937 rng(t.seed);
  auto tile = random_tile<E>(t, rng);
  const auto before = tile;
  const auto qp = positions_of(t.q, t.q_range), kp = positions_of(t.k, t.k_range);
  if (local + p.head_offset >= n) {
    try {
      enc.add_bias_tile(cols_view(tile, t.cols), local, qp, kp);
      fail("alibi: head %td past num_heads %td - head_offset %td accepted", local, n, p.head_offset);
    } catch (const posenc::precondition_error&) {
    }
    return;
  }
  enc.add_bias_tile(cols_view(tile, t.cols), local, qp, kp);
  const long double slope = alibi_slope(n, local + p.head_offset, p.max_bias);
  // The library evaluates exp2 of a double exponent x: relative error about (|x| ln 2 + 1) eps.
  const long double slope_tol = (std::abs(std::log2(slope)) * 0.7L + 2) * 0x1p-52L * slope;
  if (std::abs(static_cast<long double>(enc.slope(local)) - slope) > slope_tol)
    fail("alibi slope of head %td of %td: %.17g, formula %.17Lg", local + p.head_offset, n, enc.slope(local), slope);
  for (index_t i = 0; i < t.rows; ++i)
    for (index_t j = 0; j < t.cols; ++j) {
      long double dist = static_cast<long double>(t.q[i] - t.k[j]);
      if (p.form == posenc::alibi_form::symmetric) dist = std::abs(dist);
      // The library rounds -slope * dist once from double: allow the slope's double rounding.
      const long double want = -static_cast<long double>(enc.slope(local)) * dist;
      const E bias = static_cast<E>(want);
      const E expect = before(i, j) + bias;
      const double tol = 2 * std::numeric_limits<E>::epsilon() * (std::abs(double(bias)) + std::abs(double(before(i, j))));
      if (!(std::abs(double(tile(i, j)) - double(expect)) <= tol))
        fail("alibi tile (%td, %td), q %lld k %lld: %.9g, formula %.9g", i, j, (long long)t.q[i], (long long)t.k[j],
             double(tile(i, j)), double(expect));
    }
  check_padding(before, tile, t.cols, "alibi");
}

// ---- T5 --------------------------------------------------------------------------------------

// The buckets the formula allows for rel = k - q: one, or two where the real value is an integer
// within rounding.
void t5_buckets(position rel, index_t buckets, position max_distance, bool bidirectional, index_t out[2]) {
  index_t m = buckets, offset = 0;
  long double dist;
  if (bidirectional) {
    m /= 2;
    if (rel > 0) offset = m;
    dist = std::abs(static_cast<long double>(rel));
  } else {
    dist = rel < 0 ? -static_cast<long double>(rel) : 0.0L;
  }
  const index_t max_exact = m / 2;
  if (dist < max_exact) {
    out[0] = out[1] = offset + static_cast<index_t>(dist);
    return;
  }
  const long double v = std::log(dist / max_exact) / std::log(static_cast<long double>(max_distance) / max_exact) *
                        static_cast<long double>(m - max_exact);
  auto bucket_of = [&](long double x) {
    const long double f = std::floor(x);
    const long double b = std::min<long double>(static_cast<long double>(max_exact) + f, static_cast<long double>(m - 1));
    return offset + static_cast<index_t>(b);
  };
  out[0] = bucket_of(v);
  out[1] = std::abs(v - std::round(v)) < 1e-9L ? bucket_of(std::round(v) - (v < std::round(v) ? 0 : 1)) : out[0];
}

template <class E>
void t5_case(posenc_fuzz::reader& in) {
  const bool bidirectional = in.flag();
  const index_t buckets = in.in_range<index_t>(bidirectional ? 4 : 2, 300);
  const index_t heads = in.in_range<index_t>(1, 6);
  const index_t max_exact = (bidirectional ? buckets / 2 : buckets) / 2;
  const position max_distance =
      in.flag() ? max_exact + in.in_range<position>(1, 4000) : max_exact + 1 + static_cast<position>(in.byte() % 8);
  const posenc::t5_bias_params p{.num_heads = heads,
                                 .num_buckets = buckets,
                                 .max_distance = max_distance,
                                 .bidirectional = bidirectional,
                                 .head_offset = in.in_range<index_t>(0, heads - 1)};
  const index_t local = in.in_range<index_t>(0, heads - 1 - p.head_offset);
  std::mt19937 rng(static_cast<std::uint32_t>(in.bits(4)));
  std::normal_distribution<double> n(0, 3);
  posenc::row_matrix<float> table(buckets, heads);
  for (index_t i = 0; i < table.size(); ++i) table.data()[i] = static_cast<float>(n(rng));
  const posenc::t5_relative_bias<float> enc(p, table);
  const tile_case t = read_tile(in, position{1} << 61);
  auto tile = random_tile<E>(t, rng);
  const auto before = tile;
  enc.add_bias_tile(cols_view(tile, t.cols), local, positions_of(t.q, t.q_range), positions_of(t.k, t.k_range));
  const index_t h = local + p.head_offset;
  for (index_t i = 0; i < t.rows; ++i)
    for (index_t j = 0; j < t.cols; ++j) {
      index_t b[2];
      t5_buckets(t.k[j] - t.q[i], buckets, max_distance, bidirectional, b);
      const E got = tile(i, j);
      if (!(got == before(i, j) + static_cast<E>(table(b[0], h)) || got == before(i, j) + static_cast<E>(table(b[1], h))))
        fail("t5 tile (%td, %td), rel %lld: %.9g, formula's bucket %td (or %td) gives %.9g", i, j,
             (long long)(t.k[j] - t.q[i]), double(got), b[0], b[1], double(before(i, j) + static_cast<E>(table(b[0], h))));
      const index_t sb = enc.bucket(t.k[j] - t.q[i]);
      if (sb != b[0] && sb != b[1]) fail("t5 bucket(%lld) = %td, formula %td", (long long)(t.k[j] - t.q[i]), sb, b[0]);
    }
  check_padding(before, tile, t.cols, "t5");
}

// ---- Shaw ------------------------------------------------------------------------------------

template <class E>
void shaw_case(posenc_fuzz::reader& in) {
  const index_t d = in.in_range<index_t>(1, 8), kk = in.in_range<index_t>(0, 40);
  std::mt19937 rng(static_cast<std::uint32_t>(in.bits(4)));
  std::normal_distribution<double> n(0, 1);
  posenc::row_matrix<float> ak(2 * kk + 1, d), av(2 * kk + 1, d);
  for (index_t i = 0; i < ak.size(); ++i) ak.data()[i] = static_cast<float>(n(rng)), av.data()[i] = static_cast<float>(n(rng));
  const posenc::shaw_relative<float> enc({.head_dim = d, .max_relative_position = kk}, ak, av);
  const tile_case t = read_tile(in, position{1} << 61);
  auto tile = random_tile<E>(t, rng);
  const auto before = tile;
  posenc::row_matrix<E> g(t.rows, 2 * kk + 1);
  for (index_t i = 0; i < g.size(); ++i) g.data()[i] = static_cast<E>(n(rng));
  const auto qp = positions_of(t.q, t.q_range), kp = positions_of(t.k, t.k_range);
  enc.add_bias_tile(cols_view(tile, t.cols), g, qp, kp);
  // Unnormalised probabilities, some exactly zero, and the value weights they add up to.
  auto probs = random_tile<E>(t, rng);
  for (index_t i = 0; i < probs.size(); ++i) probs.data()[i] = probs.data()[i] < E(0) ? E(0) : probs.data()[i];
  posenc::row_matrix<E> w = posenc::row_matrix<E>::Zero(t.rows, 2 * kk + 1);
  enc.accumulate_value_weights(cols_view(probs, t.cols), qp, kp, w);
  posenc::row_matrix<double> w_ref = posenc::row_matrix<double>::Zero(t.rows, 2 * kk + 1);
  posenc::row_matrix<double> w_abs = posenc::row_matrix<double>::Zero(t.rows, 2 * kk + 1);
  for (index_t i = 0; i < t.rows; ++i)
    for (index_t j = 0; j < t.cols; ++j) {
      const long double rel = static_cast<long double>(t.k[j]) - static_cast<long double>(t.q[i]);
      const index_t r = static_cast<index_t>(std::clamp<long double>(rel, -kk, kk)) + kk;
      if (!(tile(i, j) == before(i, j) + g(i, r)))
        fail("shaw tile (%td, %td), rel %.0Lf: %.9g, expected %.9g", i, j, rel, double(tile(i, j)),
             double(before(i, j) + g(i, r)));
      w_ref(i, r) += double(probs(i, j));
      w_abs(i, r) += std::abs(double(probs(i, j)));
    }
  for (index_t i = 0; i < w.size(); ++i)
    if (!(std::abs(double(w.data()[i]) - w_ref.data()[i]) <=
          double(t.cols + 2) * std::numeric_limits<E>::epsilon() * w_abs.data()[i]))
      fail("shaw value weight %td: %.9g, expected %.9g", i, double(w.data()[i]), w_ref.data()[i]);
  check_padding(before, tile, t.cols, "shaw");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  posenc_fuzz::reader in(data, size);
  const int which = in.byte() % 6;
  switch (which) {
    case 0: alibi_case<float>(in); break;
    case 1: alibi_case<double>(in); break;
    case 2: t5_case<float>(in); break;
    case 3: t5_case<double>(in); break;
    case 4: shaw_case<float>(in); break;
    default: shaw_case<double>(in); break;
  }
  return 0;
}
