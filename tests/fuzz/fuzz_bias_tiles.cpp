// libFuzzer target: score-bias tiles (ALiBi, T5 buckets, Shaw relative keys and value weights)
// with arbitrary parameters, tile shapes, strides, heads and positions (ranges and lists),
// against the formulas (docs/alibi.md, t5_bias.md, shaw.md) evaluated here independently, element by element.
//
// Positions take any int64 value, and a quarter of the cases put queries and keys at or near
// INT64_MIN and INT64_MAX (both at one extreme, or one at each), so `k - q` passes the int64
// range; the formulas are evaluated with the exact difference in 128-bit integers.
//
// A finding: a crash or sanitizer report; an element that differs from the formula (ALiBi: the
// bits of `-slope * d`, `d` the exact `q - k` rounded once to double; T5: the table entry of the
// formula's bucket, either neighbour accepted where the formula's real value is within 1e-9 of an
// integer; Shaw: the exact clipped index); an element past a row's end changed; a wrong head not
// reported.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

__extension__ typedef __int128 int128;

constexpr position pmin = std::numeric_limits<position>::min();
constexpr position pmax = std::numeric_limits<position>::max();

/// `a + b` saturated to int64.
position add_sat(position a, position b) {
  const int128 v = static_cast<int128>(a) + b;
  return v > pmax ? pmax : (v < pmin ? pmin : static_cast<position>(v));
}

/// `a - b` exactly.
int128 diff128(position a, position b) { return static_cast<int128>(a) - static_cast<int128>(b); }

/// `v` saturated to int64.
position sat128(int128 v) { return v > pmax ? pmax : (v < pmin ? pmin : static_cast<position>(v)); }

tile_case read_tile(posenc_fuzz::reader& in, position limit) {
  tile_case t;
  t.rows = in.in_range<index_t>(0, 12);
  t.cols = in.in_range<index_t>(0, 300);
  t.pad = in.in_range<index_t>(0, 3);
  position qb = in.position_value(limit);
  position kb = in.flag() ? add_sat(qb, in.in_range<position>(-400, 400)) : in.position_value(limit);
  t.q_range = in.flag(), t.k_range = in.flag();
  std::vector<position> dq, dk;
  for (index_t i = 0; i < t.rows; ++i) dq.push_back(t.q_range ? i : in.in_range<position>(-300, 300));
  for (index_t j = 0; j < t.cols; ++j) dk.push_back(t.k_range ? j : in.in_range<position>(-300, 300));
  t.seed = static_cast<std::uint32_t>(in.bits(4));
  // Read last, so that older inputs (which end before it) keep their meaning: move the blocks to
  // the int64 extremes, the distance from the limit up to 600.
  const auto near_max = [&] { return pmax - in.in_range<position>(0, 600); };
  const auto near_min = [&] { return pmin + in.in_range<position>(0, 600); };
  switch (in.byte() % 8) {
    case 1:
      qb = near_max(), kb = near_min();
      break;
    case 2:
      qb = near_min(), kb = near_max();
      break;
    case 3:
      qb = near_max(), kb = near_max();
      break;
    case 4:
      qb = near_min(), kb = near_min();
      break;
    default:
      break;
  }
  // A range must end by INT64_MAX.
  if (t.q_range && t.rows > 0) qb = std::min(qb, pmax - (t.rows - 1));
  if (t.k_range && t.cols > 0) kb = std::min(kb, pmax - (t.cols - 1));
  for (index_t i = 0; i < t.rows; ++i) t.q.push_back(add_sat(qb, dq[static_cast<std::size_t>(i)]));
  for (index_t j = 0; j < t.cols; ++j) t.k.push_back(add_sat(kb, dk[static_cast<std::size_t>(j)]));
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
  const tile_case t = read_tile(in, pmax);
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
  // The slope was checked against the formula above; with it, each element is determined: the
  // exact distance rounded once to double, times the slope, rounded to E, added to the logit.
  const double slope_d = enc.slope(local);
  for (index_t i = 0; i < t.rows; ++i)
    for (index_t j = 0; j < t.cols; ++j) {
      int128 d = diff128(t.q[i], t.k[j]);
      if (p.form == posenc::alibi_form::symmetric && d < 0) d = -d;
      const double bias = -(slope_d * static_cast<double>(d));
      const E expect = before(i, j) + static_cast<E>(bias);
      if (!(tile(i, j) == expect))
        fail("alibi tile (%td, %td), q %lld k %lld: %.17g, formula %.17g", i, j, (long long)t.q[i], (long long)t.k[j],
             double(tile(i, j)), double(expect));
      if (!(enc.bias(local, t.q[i], t.k[j]) == bias))
        fail("alibi bias(q %lld, k %lld) = %.17g, formula %.17g", (long long)t.q[i], (long long)t.k[j],
             enc.bias(local, t.q[i], t.k[j]), bias);
    }
  check_padding(before, tile, t.cols, "alibi");
}

// ---- T5 --------------------------------------------------------------------------------------

// The buckets the formula allows for rel = k - q: one, or two where the real value is an integer
// within rounding.
void t5_buckets(int128 rel, index_t buckets, position max_distance, bool bidirectional, index_t out[2]) {
  index_t m = buckets, offset = 0;
  long double dist;  // exact: |rel| < 2^64 fits the 64-bit significand
  if (bidirectional) {
    m /= 2;
    if (rel > 0) offset = m;
    dist = static_cast<long double>(rel < 0 ? -rel : rel);
  } else {
    dist = rel < 0 ? static_cast<long double>(-rel) : 0.0L;
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
  const tile_case t = read_tile(in, pmax);
  auto tile = random_tile<E>(t, rng);
  const auto before = tile;
  enc.add_bias_tile(cols_view(tile, t.cols), local, positions_of(t.q, t.q_range), positions_of(t.k, t.k_range));
  const index_t h = local + p.head_offset;
  for (index_t i = 0; i < t.rows; ++i)
    for (index_t j = 0; j < t.cols; ++j) {
      index_t b[2];
      const int128 rel = diff128(t.k[j], t.q[i]);
      t5_buckets(rel, buckets, max_distance, bidirectional, b);
      const E got = tile(i, j);
      if (!(got == before(i, j) + static_cast<E>(table(b[0], h)) || got == before(i, j) + static_cast<E>(table(b[1], h))))
        fail("t5 tile (%td, %td), q %lld k %lld: %.9g, formula's bucket %td (or %td) gives %.9g", i, j,
             (long long)t.q[i], (long long)t.k[j], double(got), b[0], b[1],
             double(before(i, j) + static_cast<E>(table(b[0], h))));
      // A relative position past int64 saturates into the bucket of the true one.
      const index_t sb = enc.bucket(sat128(rel));
      if (sb != b[0] && sb != b[1]) fail("t5 bucket(%lld) = %td, formula %td", (long long)sat128(rel), sb, b[0]);
      const double tb = enc.bias(local, t.q[i], t.k[j]);
      if (!(tb == static_cast<double>(table(b[0], h)) || tb == static_cast<double>(table(b[1], h))))
        fail("t5 bias(q %lld, k %lld) = %.9g, formula's bucket %td", (long long)t.q[i], (long long)t.k[j], tb, b[0]);
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
  const tile_case t = read_tile(in, pmax);
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
      const int128 rel = diff128(t.k[j], t.q[i]);
      const index_t r = static_cast<index_t>(rel < -kk ? -kk : (rel > kk ? kk : rel)) + kk;
      if (!(tile(i, j) == before(i, j) + g(i, r)))
        fail("shaw tile (%td, %td), q %lld k %lld: %.9g, expected %.9g", i, j, (long long)t.q[i], (long long)t.k[j],
             double(tile(i, j)), double(before(i, j) + g(i, r)));
      if (enc.relative_index(t.q[i], t.k[j]) != r)
        fail("shaw relative_index(q %lld, k %lld) = %td, expected %td", (long long)t.q[i], (long long)t.k[j],
             enc.relative_index(t.q[i], t.k[j]), r);
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
