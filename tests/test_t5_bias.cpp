// T5 bucketed relative bias: the bucket formula in both modes, the learned table, bias tiles.
#include <catch2/catch.hpp>

#include "support.hpp"
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <vector>

#include "posenc/encoders/t5_bias.hpp"
#include "posenc/simd.hpp"

using posenc::index_t;
using posenc::position;

static_assert(posenc::position_bias<posenc::t5_relative_bias<float>>);
static_assert(posenc::position_bias<posenc::t5_relative_bias<double>>);


namespace {

struct config {
  index_t buckets;
  position max_distance;
  bool bidirectional;
};

// Exponents of the prime factorisation of x >= 1.
std::map<position, int> factorise(position x) {
  std::map<position, int> f;
  for (position p = 2; p * p <= x; ++p)
    while (x % p == 0) ++f[p], x /= p;
  if (x > 1) ++f[x];
  return f;
}

// Whether ln(d / me) / ln(md / me) * N == n exactly: N (e_p(d) - e_p(me)) == n (e_p(md) - e_p(me))
// for every prime p.
bool exact_integer(position d, position me, position md, index_t N, index_t n) {
  auto fd = factorise(d), fm = factorise(me), fx = factorise(md);
  std::map<position, int> primes;
  for (auto* f : {&fd, &fm, &fx})
    for (auto [p, e] : *f) primes[p] = e;
  for (auto [p, unused] : primes)
    if (N * (fd[p] - fm[p]) != n * (fx[p] - fm[p])) return false;
  return true;
}

// The bucket range of a relative position (both halves of the buckets, or one half and a
// direction when bidirectional) and the distance bucketed within it (docs/t5_bias.md).
struct relative_split {
  index_t m, start;
  position d;
};
relative_split split_relative(position rel, const config& c) {
  if (c.bidirectional) return {c.buckets / 2, rel > 0 ? c.buckets / 2 : 0, rel < 0 ? -rel : rel};
  return {c.buckets, 0, rel < 0 ? -rel : 0};
}

// The bucket formula: the floor of the real value, evaluated with long double logarithms; where the
// value is within 1e-12 of an integer, whether it is exactly that integer is decided by prime
// factorisation (a rounded logarithm may land on either side of an exact integer).
index_t ref_bucket(position rel, const config& c) {
  const auto [m, start, d] = split_relative(rel, c);
  const index_t max_exact = m / 2;
  if (d < max_exact) return start + static_cast<index_t>(d);
  const long double me = static_cast<long double>(max_exact);
  const long double v = std::log(static_cast<long double>(d) / me) /
                        std::log(static_cast<long double>(c.max_distance) / me) * static_cast<long double>(m - max_exact);
  auto t = static_cast<index_t>(std::floor(v));
  const long double n = std::round(v);
  if (n >= 1 && std::fabs(v - n) < 1e-12L) {
    const auto ni = static_cast<index_t>(n);
    t = exact_integer(d, max_exact, c.max_distance, m - max_exact, ni) ? ni : (v < n ? ni - 1 : ni);
  }
  return start + std::min<index_t>(max_exact + t, m - 1);
}

// The same formula evaluated the way the PyTorch reference does it: float32 log of the float32
// quotient, divided by a double log rounded to float32, truncated toward zero.
index_t float32_bucket(position rel, const config& c) {
  const auto [m, start, d] = split_relative(rel, c);
  const index_t max_exact = m / 2;
  if (d < max_exact) return start + static_cast<index_t>(d);
  const float num = std::log(static_cast<float>(d) / static_cast<float>(max_exact));
  const float den = static_cast<float>(std::log(static_cast<double>(c.max_distance) / static_cast<double>(max_exact)));
  const float v = num / den * static_cast<float>(m - max_exact);
  return start + std::min<index_t>(max_exact + static_cast<index_t>(v), m - 1);
}

const std::vector<config> configs = {
    {32, 128, true},   {32, 128, false}, {64, 256, true},    {16, 50, true},   {10, 20, false}, {33, 128, true},
    {4, 3, true},      {2, 5, false},    {32, 1000000, true}, {128, 10000, false}, {24, 100, true},
    // Exact ties inside the logarithmic range (d = 8, 16, 64 for the first; 18, 36, 144 for the last).
    {18, 128, true},   {9, 128, false},  {20, 160, true},   {38, 288, true},
};

// Relative positions -200..200 plus far ones up to 2^40 on both sides.
std::vector<position> test_relatives() {
  std::vector<position> r;
  for (position x = -200; x <= 200; ++x) r.push_back(x);
  for (position x = 201; x < (position{1} << 41); x = x * 5 / 4 + 1) {
    r.push_back(x);
    r.push_back(-x);
  }
  return r;
}

template <class T>
posenc::row_matrix<T> random_table(std::mt19937_64& rng, index_t buckets, index_t heads) {
  std::uniform_real_distribution<double> u(-4, 4);
  posenc::row_matrix<T> t(buckets, heads);
  for (index_t b = 0; b < buckets; ++b)
    for (index_t h = 0; h < heads; ++h) t(b, h) = static_cast<T>(u(rng));
  return t;
}

std::vector<position> random_positions(std::mt19937_64& rng, index_t n, position base, position spread) {
  std::uniform_int_distribution<position> dist(-spread, spread);
  std::vector<position> p(static_cast<std::size_t>(n));
  for (auto& x : p) x = base + dist(rng);
  return p;
}

// A materialised zero table (a matrix argument must own memory, not be an expression).
template <class T>
posenc::row_matrix<T> zeros(index_t rows, index_t cols) {
  return posenc::row_matrix<T>::Zero(rows, cols);
}

template <class E>
long double tile_tol(long double ref) {
  return 2 * static_cast<long double>(std::numeric_limits<E>::epsilon()) * std::max<long double>(std::fabs(ref), 1);
}

// tile(i, j) == init(i, j) + table[ref_bucket(k[j] - q[i]), head] for every element.
template <class E, class T>
void check_tile(const posenc::t5_relative_bias<T>& enc, const posenc::row_matrix<T>& table, const config& c,
                index_t local_head, index_t global_head, posenc::positions q, posenc::positions k) {
  posenc::row_matrix<E> tile(q.size(), k.size());
  for (index_t i = 0; i < tile.rows(); ++i)
    for (index_t j = 0; j < tile.cols(); ++j) tile(i, j) = static_cast<E>(0.125 * static_cast<double>((3 * i + j) % 5));
  const posenc::row_matrix<E> init = tile;
  enc.add_bias_tile(tile, local_head, q, k);
  long double worst = 0;
  index_t wi = -1, wj = -1;
  for (index_t i = 0; i < tile.rows(); ++i)
    for (index_t j = 0; j < tile.cols(); ++j) {
      const long double ref = static_cast<long double>(init(i, j)) +
                              static_cast<long double>(table(ref_bucket(k[j] - q[i], c), global_head));
      const long double r = std::fabs(static_cast<long double>(tile(i, j)) - ref) / tile_tol<E>(ref);
      if (r > worst) worst = r, wi = i, wj = j;
    }
  INFO("worst element (" << wi << ", " << wj << "), error / tolerance = " << static_cast<double>(worst));
  CHECK(worst <= 1);
}

}  // namespace

TEST_CASE("t5 buckets: hand-derived values for the defaults", "[t5]") {
  using B = posenc::t5_relative_bias<float>;
  // Bidirectional, 32 buckets, max distance 128: 16 per side, max_exact 8, and for d >= 8 the
  // bucket is 8 + floor(2 log2(d / 8)) capped at 15; keys after the query add 16.
  const std::vector<std::pair<position, index_t>> bi = {
      {0, 0},    {-1, 1},   {1, 17},   {-7, 7},   {7, 23},   {-8, 8},    {-11, 8},   {-12, 9},
      {-16, 10}, {-22, 10}, {-23, 11}, {-32, 12}, {-45, 12}, {-46, 13},  {-64, 14},  {-90, 14},
      {-91, 15}, {-128, 15}, {-5000, 15}, {16, 26}, {90, 30}, {91, 31}, {128, 31}, {1 << 30, 31}};
  for (const auto& [rel, b] : bi) {
    INFO("rel = " << rel);
    CHECK(B::bucket(rel, 32, 128, true) == b);
  }
  // Causal: one side of 32, max_exact 16, bucket 16 + floor(16/3 log2(d / 16)) capped at 31;
  // keys after the query (rel > 0) all land in bucket 0.
  const std::vector<std::pair<position, index_t>> causal = {
      {5, 0},    {0, 0},    {-1, 1},   {-15, 15}, {-16, 16},  {-20, 17},
      {-32, 21}, {-64, 26}, {-100, 30}, {-127, 31}, {-128, 31}, {-100000, 31}};
  for (const auto& [rel, b] : causal) {
    INFO("rel = " << rel);
    CHECK(B::bucket(rel, 32, 128, false) == b);
  }
  // 18 buckets bidirectional, max distance 128: 9 per side, max_exact 4, and ln(d/4) / ln(32) * 5
  // = log2(d / 4) exactly, so d = 8, 16, 32, 64 sit exactly on buckets 5, 6, 7, 8; one less just
  // below. (A double evaluation gives 0.9999999999999999 at d = 8.)
  const std::vector<std::pair<position, index_t>> ties = {
      {-7, 4}, {-8, 5}, {-15, 5}, {-16, 6}, {-31, 6}, {-32, 7}, {-63, 7}, {-64, 8}, {-128, 8}, {8, 14}, {16, 15}};
  for (const auto& [rel, b] : ties) {
    INFO("rel = " << rel);
    CHECK(B::bucket(rel, 18, 128, true) == b);
  }
}

TEMPLATE_TEST_CASE("t5 buckets equal the formula in both modes", "[t5]", float, double) {
  std::mt19937_64 rng(1);
  const auto rels = test_relatives();
  for (const auto& c : configs) {
    const auto table = random_table<TestType>(rng, c.buckets, 3);
    posenc::t5_relative_bias<TestType> enc(
        {.num_heads = 3, .num_buckets = c.buckets, .max_distance = c.max_distance, .bidirectional = c.bidirectional},
        table);
    index_t mismatches = 0;
    for (position rel : rels) {
      const index_t ref = ref_bucket(rel, c);
      const index_t got_static = posenc::t5_relative_bias<TestType>::bucket(rel, c.buckets, c.max_distance, c.bidirectional);
      const index_t got = enc.bucket(rel);
      if (got_static != ref || got != ref) {
        if (++mismatches <= 5)
          FAIL_CHECK("buckets " << c.buckets << " max_distance " << c.max_distance << " bidirectional "
                                << c.bidirectional << " rel " << rel << ": reference " << ref << ", static "
                                << got_static << ", instance " << got);
      }
      CHECK(ref >= 0);
      CHECK(ref < c.buckets);
    }
    CHECK(mismatches == 0);
  }
}

TEST_CASE("t5 buckets for the defaults agree with a float32 evaluation", "[t5]") {
  // The PyTorch reference computes the logarithm in float32; for the default parameters that
  // choice changes no bucket.
  for (bool bidirectional : {true, false}) {
    const config c{32, 128, bidirectional};
    for (position rel = -300; rel <= 300; ++rel) {
      INFO("bidirectional " << bidirectional << " rel " << rel);
      CHECK(posenc::t5_relative_bias<float>::bucket(rel, 32, 128, bidirectional) == float32_bucket(rel, c));
    }
  }
}

TEMPLATE_TEST_CASE("t5 bias tiles equal the table lookup for arbitrary position sets", "[t5]", float, double) {
  std::mt19937_64 rng(3);
  const position big = position{1} << 40;
  for (const auto& c : configs) {
    const index_t heads = 6, offset = 2;
    const auto table = random_table<TestType>(rng, c.buckets, heads);
    posenc::t5_relative_bias<TestType> enc({.num_heads = heads,
                                            .num_buckets = c.buckets,
                                            .max_distance = c.max_distance,
                                            .bidirectional = c.bidirectional,
                                            .head_offset = offset},
                                           table);
    for (position q : {position{0}, -big, big + 9})
      for (position k : {position{0}, position{-90}, big, big + 3000}) {
        INFO("q " << q << " k " << k);
        CHECK(enc.bias(1, q, k) == static_cast<double>(table(ref_bucket(k - q, c), 3)));
      }
    for (position base : {position{0}, position{-700}, big}) {
      // Spreads around the saturation distance and far past it exercise every lookup segment.
      for (position spread : {position{40}, position{400}, position{100000}}) {
        const auto ql = random_positions(rng, 9, base, spread);
        const auto kl = random_positions(rng, 31, base, spread);
        const posenc::positions qs[] = {posenc::positions(ql), posenc::arange(base - spread / 2, 9)};
        const posenc::positions ks[] = {posenc::positions(kl), posenc::arange(base - spread, 31),
                                        posenc::arange(base - 15, 31)};
        for (const auto& q : qs)
          for (const auto& k : ks)
            for (index_t h : {0, 3}) {
              INFO("buckets " << c.buckets << " max_distance " << c.max_distance << " bidirectional "
                              << c.bidirectional << " base " << base << " spread " << spread << " head " << h
                              << " q range " << q.is_range() << " k range " << k.is_range());
              check_tile<float>(enc, table, c, h, h + offset, q, k);
              check_tile<double>(enc, table, c, h, h + offset, q, k);
            }
      }
    }
  }
}

TEMPLATE_TEST_CASE("t5 bias is shift-invariant and tiles use global positions", "[t5]", float, double) {
  std::mt19937_64 rng(5);
  for (bool bidirectional : {true, false}) {
    const auto table = random_table<TestType>(rng, 32, 4);
    posenc::t5_relative_bias<TestType> enc({.num_heads = 4, .bidirectional = bidirectional}, table);
    auto ql = random_positions(rng, 12, 0, 200);
    auto kl = random_positions(rng, 19, 0, 200);
    posenc::row_matrix<float> t0 = posenc::row_matrix<float>::Zero(12, 19);
    enc.add_bias_tile(t0, 1, posenc::positions(ql), posenc::positions(kl));
    for (position shift : {position{1}, position{-333}, (position{1} << 40) - 7}) {
      auto qs = ql, ks = kl;
      for (auto& x : qs) x += shift;
      for (auto& x : ks) x += shift;
      posenc::row_matrix<float> t1 = posenc::row_matrix<float>::Zero(12, 19);
      enc.add_bias_tile(t1, 1, posenc::positions(qs), posenc::positions(ks));
      CHECK(t1 == t0);
      posenc::row_matrix<float> r0 = posenc::row_matrix<float>::Zero(12, 19), r1 = r0;
      enc.add_bias_tile(r0, 1, posenc::arange(100, 12), posenc::arange(0, 19));
      enc.add_bias_tile(r1, 1, posenc::arange(100 + shift, 12), posenc::arange(shift, 19));
      CHECK(r1 == r0);
    }
    // Tiles of a 300 x 300 problem (past the saturation distance) are blocks of the full matrix.
    const index_t n = 300;
    posenc::row_matrix<double> full = posenc::row_matrix<double>::Zero(n, n);
    enc.add_bias_tile(full, 2, posenc::arange(-50, n), posenc::arange(-50, n));
    for (index_t r0 : {0, 64, 250})
      for (index_t c0 : {0, 128, 290}) {
        const index_t rows = std::min<index_t>(50, n - r0), cols = std::min<index_t>(64, n - c0);
        posenc::row_matrix<double> tile = posenc::row_matrix<double>::Zero(rows, cols);
        enc.add_bias_tile(tile, 2, posenc::arange(-50 + r0, rows), posenc::arange(-50 + c0, cols));
        CHECK(tile == full.block(r0, c0, rows, cols));
      }
  }
}

TEST_CASE("t5 strided tiles leave the padding untouched", "[t5]") {
  posenc::row_matrix<float> table = posenc::row_matrix<float>::Zero(32, 2);
  for (index_t b = 0; b < 32; ++b) table(b, 1) = static_cast<float>(b);  // head 1's bias is its bucket
  posenc::t5_relative_bias<float> enc({.num_heads = 2}, table);
  const double pad = -99.0;
  posenc::row_matrix<double> buf = posenc::row_matrix<double>::Constant(5, 40, pad);
  auto block = buf.block(1, 3, 4, 30);
  block.setZero();
  enc.add_bias_tile(block, 1, posenc::arange(60, 4), posenc::arange(40, 30));
  for (index_t i = 0; i < 5; ++i)
    for (index_t j = 0; j < 40; ++j) {
      INFO("(" << i << ", " << j << ")");
      const bool inside = i >= 1 && j >= 3 && j < 33;
      if (inside) {
        CHECK(buf(i, j) == static_cast<double>(ref_bucket((40 + j - 3) - (60 + i - 1), {32, 128, true})));
      } else {
        CHECK(buf(i, j) == pad);
      }
    }
}

TEST_CASE("t5 rejects invalid parameters, naming them", "[t5]") {
  using B = posenc::t5_relative_bias<double>;
  const posenc::row_matrix<double> t32 = zeros<double>(32, 8);
  CHECK_INVALID(B({.num_buckets = 3, .bidirectional = true}, zeros<double>(3, 8)),
                "num_buckets = 3");
  CHECK_INVALID(B({.num_buckets = 1, .bidirectional = false}, zeros<double>(1, 8)),
                "num_buckets = 1");
  CHECK_NOTHROW(B({.num_buckets = 2, .max_distance = 2, .bidirectional = false}, zeros<double>(2, 8)));
  // max_exact is 8 for 32 bidirectional buckets, 16 for 32 causal ones.
  CHECK_INVALID(B({.max_distance = 8}, t32), "max_distance = 8");
  CHECK_NOTHROW(B({.max_distance = 9}, t32));
  CHECK_INVALID(B({.max_distance = 16, .bidirectional = false}, t32), "max_distance = 16");
  CHECK_INVALID(B({.num_heads = 0}, zeros<double>(32, 0)), "num_heads = 0");
  CHECK_INVALID(B({.head_offset = -1}, t32), "head_offset = -1");
  CHECK_INVALID(B({.head_offset = 8}, t32), "head_offset = 8");
  CHECK_INVALID(B({}, zeros<double>(31, 8)), "table.rows = 31");
  CHECK_INVALID(B({}, zeros<double>(32, 7)), "table.cols = 7");
  CHECK_INVALID(B::bucket(0, 3, 128, true), "num_buckets");
  CHECK_INVALID(B::bucket(0, 32, 0, true), "max_distance");
}

TEST_CASE("t5 hot-path preconditions", "[t5]") {
  posenc::t5_relative_bias<float> enc({.num_heads = 8, .head_offset = 6}, zeros<float>(32, 8));
  posenc::row_matrix<float> tile(3, 5);
  CHECK_THROWS_AS(enc.add_bias_tile(tile, 0, posenc::arange(0, 2), posenc::arange(0, 5)), posenc::precondition_error);
  CHECK_THROWS_AS(enc.add_bias_tile(tile, 0, posenc::arange(0, 3), posenc::arange(0, 4)), posenc::precondition_error);
  CHECK_THROWS_AS(enc.add_bias_tile(tile, 2, posenc::arange(0, 3), posenc::arange(0, 5)), posenc::precondition_error);
  CHECK_THROWS_AS(enc.bias(-1, 0, 0), posenc::precondition_error);
  CHECK_NOTHROW(enc.add_bias_tile(tile, 1, posenc::arange(0, 3), posenc::arange(0, 5)));
}

TEST_CASE("t5: every SIMD level's float tile path gives the bits of the lookup", "[t5][simd]") {
  // Element (i, j) of a float tile gets float(table[bucket(k_j - q_i), head]) added: the table
  // entry rounded once to float, then the float sum. Rows that share a table of biases (4 or more
  // within a spread of 1024 - n positions, keys in chunks of 512), rows that do not (fewer, or
  // scattered), unsorted query lists, 900 rows (two tables), keys near, far (2^40) and at the ends
  // of the int64 range (where distances pass 2^62 and rows go one by one), a lookup window that
  // saturates and one that does not (64 buckets to distance 20000 saturate at 12808, past the
  // 4096-entry window), float and double tables: every SIMD level gives the same bits.
  const float sentinel = 777.0f;
  constexpr position top = std::numeric_limits<position>::max(), bottom = std::numeric_limits<position>::min();
  struct tile_case {
    std::vector<position> q;  // empty: the range [q0, q0 + rows)
    position q0;
    index_t rows;
  };
  std::mt19937_64 rng(17);
  const std::vector<position> unsorted = random_positions(rng, 50, 1000, 60);
  const std::vector<position> scattered = {5, 1000000, 6, 7, 8, 9, 2000000, 3, 4, 1000001, -70000, 12};
  const std::vector<tile_case> cases = {{{}, 1000, 5},      {{}, 1000, 3},      {{}, 1000, 40},
                                        {{}, 0, 900},       {unsorted, 0, 50},  {scattered, 0, 12},
                                        {{}, top - 1000, 40}, {{}, bottom + 7, 6}};
  struct table_case {
    config c;
    bool double_table;
  };
  for (const table_case& tc : {table_case{{32, 128, true}, false}, table_case{{32, 128, true}, true},
                               table_case{{9, 128, false}, false}, table_case{{64, 20000, true}, false}}) {
    const config& c = tc.c;
    const index_t heads = 4, h = 2;
    const auto table_d = random_table<double>(rng, c.buckets, heads);
    const posenc::row_matrix<float> table_f = table_d.cast<float>();
    const posenc::t5_bias_params params{.num_heads = heads, .num_buckets = c.buckets, .max_distance = c.max_distance,
                                        .bidirectional = c.bidirectional};
    const posenc::t5_relative_bias<float> enc_f(params, table_f);
    const posenc::t5_relative_bias<double> enc_d(params, table_d);
    // The expected addend of every relative position within max_distance; past it the bucket is the
    // last of its side (ln(d / me) / ln(md / me) >= 1), that of +-max_distance.
    std::vector<float> addend(static_cast<std::size_t>(2 * c.max_distance + 1));
    for (position r = -c.max_distance; r <= c.max_distance; ++r) {
      // The float table holds float(entry): either way one rounding of the double entry.
      addend[static_cast<std::size_t>(r + c.max_distance)] = static_cast<float>(table_d(ref_bucket(r, c), h));
    }
    auto expected = [&](position q, position k) {
      const std::uint64_t d = k >= q ? static_cast<std::uint64_t>(k) - static_cast<std::uint64_t>(q)
                                     : static_cast<std::uint64_t>(q) - static_cast<std::uint64_t>(k);
      const position r = d >= static_cast<std::uint64_t>(c.max_distance) ? c.max_distance : static_cast<position>(d);
      return addend[static_cast<std::size_t>((k >= q ? r : -r) + c.max_distance)];
    };
    for (const auto level : posenc::detail::available_simd_levels()) {
      const posenc::detail::scoped_simd_cap cap(level);
      for (const tile_case& tc2 : cases) {
        const posenc::positions q = tc2.q.empty() ? posenc::arange(tc2.q0, tc2.rows) : posenc::positions(tc2.q);
        const index_t rows = q.size();
        for (index_t n : {1, 3, 8, 16, 17, 130, 511, 513, 1100}) {
          if (rows > 100 && n != 130 && n != 513) continue;  // 900 rows: two table groups either way
          for (position k0 : {position{990}, position{1010}, position{1} << 40, top - 1200, bottom + 3}) {
            if (rows > 100 && k0 != 990) continue;
            posenc::row_matrix<float> tile = posenc::row_matrix<float>::Constant(rows, n + 3, sentinel);
            for (index_t i = 0; i < rows; ++i)
              for (index_t j = 0; j < n; ++j) tile(i, j) = 0.25f * static_cast<float>((i - j) % 13);
            const posenc::row_matrix<float> before = tile;
            const auto k = posenc::arange(k0, n);
            if (tc.double_table) {
              enc_d.add_bias_tile(tile.leftCols(n), h, q, k);
            } else {
              enc_f.add_bias_tile(tile.leftCols(n), h, q, k);
            }
            index_t bad = 0, first_i = -1, first_j = -1;
            for (index_t i = 0; i < rows; ++i) {
              for (index_t j = 0; j < n; ++j)
                if (tile(i, j) != before(i, j) + expected(q[i], k0 + j) && bad++ == 0) first_i = i, first_j = j;
              for (index_t j = n; j < n + 3; ++j)
                if (tile(i, j) != sentinel && bad++ == 0) first_i = i, first_j = j;
            }
            INFO("level " << posenc::simd_level_name(level) << ", buckets " << c.buckets << ", max_distance "
                          << c.max_distance << ", double table " << tc.double_table << ", rows " << rows
                          << " from " << q[0] << " (range " << q.is_range() << "), n " << n << ", k0 " << k0
                          << ", first wrong element (" << first_i << ", " << first_j << ")");
            CHECK(bad == 0);
          }
        }
      }
    }
  }
}
