// Hostile inputs to the encoders: positions at and near the int64 extremes in every bias path
// (`bias()`, tiles with key ranges and key lists, AVX-512 and portable), sinusoidal offsets that
// pass the int64 range, RoPE magnitudes outside the encoder's type, enum values cast out of
// range, and the field names of errors from Hugging Face LongRoPE dicts.
//
// References are evaluated here from the formulas, with the exact position difference in 128-bit
// integers, never by calling the code under test.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "posenc/detail/cpu.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/hf_config.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/sinusoidal.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::position;

namespace {

__extension__ typedef __int128 int128;

constexpr position pmin = std::numeric_limits<position>::min();
constexpr position pmax = std::numeric_limits<position>::max();
constexpr position two53 = position{1} << 53;

/// `a - b` exactly.
int128 diff128(position a, position b) { return static_cast<int128>(a) - static_cast<int128>(b); }

/// `v` clamped to `[lo, hi]`.
position clamp128(int128 v, position lo, position hi) { return v < lo ? lo : (v > hi ? hi : static_cast<position>(v)); }

/// Query positions: both extremes, their neighbours, both sides of 2^53 and of zero.
const std::vector<position> hostile_queries = {pmin, pmin + 1,  pmin + 7, -two53 - 3, -1,  0,
                                               1,    two53 + 3, pmax - 7, pmax - 1,   pmax};

/// Key blocks as (start, count): at each extreme, around zero, straddling 2^53 and -2^53.
struct key_block {
  position start;
  index_t count;
};
const std::vector<key_block> hostile_keys = {{pmin, 9}, {-4, 9}, {two53 - 4, 9}, {-two53 - 4, 9}, {pmax - 8, 9}};

std::vector<position> block_list(const key_block& b) {
  std::vector<position> v;
  for (index_t j = 0; j < b.count; ++j) v.push_back(b.start + j);
  return v;
}

/// The SIMD levels this machine can run (each tile path is taken under each).
std::vector<posenc::detail::simd_level> levels() {
  const auto all = posenc::detail::available_simd_levels();
  return {all.begin(), all.end()};
}

}  // namespace

// ---- 7. Position differences outside int64 ----------------------------------------------------

TEMPLATE_TEST_CASE("alibi: biases of any int64 pair are -slope times the exact distance rounded once",
                   "[hostile][alibi][positions]", float, double) {
  using E = TestType;
  // 8 heads: slope_h = 2^-(h+1), exact, so -slope * d is exact in double and the reference is
  // the distance rounded once to double, scaled, then rounded to E.
  const index_t heads = 8;
  for (const auto form : {posenc::alibi_form::causal, posenc::alibi_form::symmetric}) {
    const posenc::alibi<E> enc({.num_heads = heads, .form = form});
    const bool symmetric = form == posenc::alibi_form::symmetric;
    const auto expect = [&](index_t h, position q, position k) {
      const int128 d = diff128(q, k);
      const double dist = static_cast<double>(symmetric && d < 0 ? -d : d);  // rounded once
      return -std::ldexp(1.0, -static_cast<int>(h + 1)) * dist;
    };
    for (index_t h : {index_t{0}, index_t{7}}) {
      for (position q : hostile_queries)
        for (const key_block& b : hostile_keys)
          for (position k : block_list(b)) {
            INFO("head " << h << ", q " << q << ", k " << k << (symmetric ? ", symmetric" : ", causal"));
            CHECK(enc.bias(h, q, k) == expect(h, q, k));
          }
      CHECK(enc.bias(h, pmax, pmin) == -std::ldexp(1.0, -static_cast<int>(h + 1)) * 0x1p64);
      CHECK(enc.bias(h, pmin, pmax) == (symmetric ? -1.0 : 1.0) * std::ldexp(1.0, -static_cast<int>(h + 1)) * 0x1p64);
      for (const auto level : levels()) {
        const posenc::detail::scoped_simd_cap cap(level);
        for (const key_block& b : hostile_keys) {
          const std::vector<position> keys = block_list(b);
          for (const bool range : {true, false}) {
            const posenc::positions kp = range ? posenc::arange(b.start, b.count) : posenc::positions(keys);
            posenc::row_matrix<E> tile =
                posenc::row_matrix<E>::Zero(static_cast<index_t>(hostile_queries.size()), b.count);
            enc.add_bias_tile(tile, h, posenc::positions(hostile_queries), kp);
            for (index_t i = 0; i < tile.rows(); ++i)
              for (index_t j = 0; j < tile.cols(); ++j) {
                INFO("head " << h << ", q " << hostile_queries[i] << ", k " << keys[j] << (range ? " (range" : " (list")
                             << (symmetric ? ", symmetric)" : ", causal)") << ", level " << static_cast<int>(level));
                CHECK(tile(i, j) == static_cast<E>(expect(h, hostile_queries[i], keys[j])));
              }
          }
        }
      }
    }
  }
}

namespace {

/// T5's bucket of `rel = k - q` from the formula (docs/t5_bias.md), with the distance exact in
/// long double (64-bit significand: every |rel| < 2^64 is exact).
index_t t5_bucket_ref(int128 rel, index_t buckets, position max_distance, bool bidirectional) {
  index_t m = buckets, offset = 0;
  int128 d;
  if (bidirectional) {
    m /= 2;
    if (rel > 0) offset = m;
    d = rel < 0 ? -rel : rel;
  } else {
    d = rel < 0 ? -rel : 0;
  }
  const index_t max_exact = m / 2;
  if (d < max_exact) return offset + static_cast<index_t>(d);
  const long double me = static_cast<long double>(max_exact);
  const long double v = std::log(static_cast<long double>(d) / me) /
                        std::log(static_cast<long double>(max_distance) / me) * static_cast<long double>(m - max_exact);
  return offset + std::min<index_t>(max_exact + static_cast<index_t>(std::floor(v)), m - 1);
}

}  // namespace

TEMPLATE_TEST_CASE("t5: buckets of any int64 pair, in bias() and in both tile paths", "[hostile][t5][positions]", float,
                   double) {
  using E = TestType;
  // 32 buckets / 128 (the lookup window covers every unsaturated distance: the three-segment
  // range path) and 32 buckets / 10^6 (saturation past the lookup window: the per-key path).
  struct t5_case {
    index_t buckets;
    position max_distance;
    bool bidirectional;
  };
  for (const t5_case c :
       {t5_case{32, 128, true}, t5_case{32, 128, false}, t5_case{32, 1000000, true}, t5_case{12, 20, false}}) {
    const index_t heads = 2;
    posenc::row_matrix<float> table(c.buckets, heads);
    for (index_t b = 0; b < c.buckets; ++b)
      for (index_t h = 0; h < heads; ++h) table(b, h) = static_cast<float>(b + 100 * h);  // entry names its bucket
    const posenc::t5_relative_bias<float> enc({.num_heads = heads,
                                               .num_buckets = c.buckets,
                                               .max_distance = c.max_distance,
                                               .bidirectional = c.bidirectional},
                                              table);
    const index_t h = 1;
    const auto expect = [&](position q, position k) {
      return static_cast<double>(t5_bucket_ref(diff128(k, q), c.buckets, c.max_distance, c.bidirectional) + 100 * h);
    };
    for (position q : hostile_queries)
      for (const key_block& b : hostile_keys)
        for (position k : block_list(b)) {
          INFO("buckets " << c.buckets << ", max_distance " << c.max_distance << ", q " << q << ", k " << k);
          CHECK(enc.bias(h, q, k) == expect(q, k));
        }
    for (const key_block& b : hostile_keys) {
      const std::vector<position> keys = block_list(b);
      for (const bool range : {true, false}) {
        const posenc::positions kp = range ? posenc::arange(b.start, b.count) : posenc::positions(keys);
        posenc::row_matrix<E> tile = posenc::row_matrix<E>::Zero(static_cast<index_t>(hostile_queries.size()), b.count);
        enc.add_bias_tile(tile, h, posenc::positions(hostile_queries), kp);
        for (index_t i = 0; i < tile.rows(); ++i)
          for (index_t j = 0; j < tile.cols(); ++j) {
            INFO("buckets " << c.buckets << ", max_distance " << c.max_distance << ", q " << hostile_queries[i]
                            << ", k " << keys[j] << (range ? " (range)" : " (list)"));
            CHECK(static_cast<double>(tile(i, j)) == expect(hostile_queries[i], keys[j]));
          }
      }
    }
  }
}

TEMPLATE_TEST_CASE("shaw: clipped indices of any int64 pair, in relative_index and both tile paths",
                   "[hostile][shaw][positions]", float, double) {
  using E = TestType;
  const index_t d = 2;
  for (const index_t kk : {index_t{0}, index_t{3}, index_t{40}}) {
    const posenc::row_matrix<float> tab = posenc::row_matrix<float>::Zero(2 * kk + 1, d);
    const posenc::shaw_relative<float> enc({.head_dim = d, .max_relative_position = kk}, tab, tab);
    const auto expect = [&](position q, position k) { return clamp128(diff128(k, q), -kk, kk) + kk; };
    for (position q : hostile_queries)
      for (const key_block& b : hostile_keys)
        for (position k : block_list(b)) {
          INFO("K " << kk << ", q " << q << ", k " << k);
          CHECK(enc.relative_index(q, k) == expect(q, k));
        }
    const index_t nq = static_cast<index_t>(hostile_queries.size());
    // G(i, r) = r + 1000 i names its row and column; probabilities 2^j make every sum exact.
    posenc::row_matrix<E> g(nq, 2 * kk + 1);
    for (index_t i = 0; i < nq; ++i)
      for (index_t r = 0; r <= 2 * kk; ++r) g(i, r) = static_cast<E>(r + 1000 * i);
    for (const key_block& b : hostile_keys) {
      const std::vector<position> keys = block_list(b);
      posenc::row_matrix<E> p(nq, b.count);
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < b.count; ++j) p(i, j) = static_cast<E>(std::ldexp(1.0, static_cast<int>(j)));
      for (const bool range : {true, false}) {
        const posenc::positions kp = range ? posenc::arange(b.start, b.count) : posenc::positions(keys);
        posenc::row_matrix<E> tile = posenc::row_matrix<E>::Zero(nq, b.count);
        posenc::row_matrix<E> w = posenc::row_matrix<E>::Zero(nq, 2 * kk + 1);
        enc.add_bias_tile(tile, g, posenc::positions(hostile_queries), kp);
        enc.accumulate_value_weights(p, posenc::positions(hostile_queries), kp, w);
        posenc::row_matrix<E> w_ref = posenc::row_matrix<E>::Zero(nq, 2 * kk + 1);
        for (index_t i = 0; i < nq; ++i)
          for (index_t j = 0; j < b.count; ++j) {
            const position r = expect(hostile_queries[i], keys[j]);
            INFO("K " << kk << ", q " << hostile_queries[i] << ", k " << keys[j] << (range ? " (range)" : " (list)"));
            CHECK(tile(i, j) == g(i, r));
            w_ref(i, r) += p(i, j);
          }
        for (index_t i = 0; i < nq; ++i)
          for (index_t r = 0; r <= 2 * kk; ++r) {
            INFO("K " << kk << ", q " << hostile_queries[i] << ", keys from " << b.start << ", weight of row " << r
                      << (range ? " (range)" : " (list)"));
            CHECK(w(i, r) == w_ref(i, r));
          }
      }
    }
  }
}

TEMPLATE_TEST_CASE("sinusoidal: position + position_offset is the exact sum rounded once, for any int64 values",
                   "[hostile][sinusoidal][positions]", float, double) {
  using T = TestType;
  // Column 0 and 1 are sin and cos of (p + offset) * f_0 with f_0 = base^0 = 1: the reference
  // needs no frequency, only the exact sum rounded once to double.
  struct sum_case {
    position p, offset;
  };
  const std::vector<sum_case> cases = {
      {two53 + 1, 1},                        // 2^53 + 2: rounding p first would lose the 2
      {pmax, (position{1} << 62) + 1026},    // past INT64_MAX; two roundings land one spacing low
      {pmin, pmin},                          // -2^64
      {pmin, -1},                            // just below INT64_MIN
      {pmax, pmax},                          // 2^64 - 2
      {pmin + 5, pmax},                      // fits: 4
      {-(position{1} << 62) - 1025, pmin}};  // below INT64_MIN, mirrored
  for (const auto layout : {posenc::sinusoidal_layout::interleaved, posenc::sinusoidal_layout::concatenated}) {
    for (const sum_case& c : cases) {
      const posenc::sinusoidal<T> enc({.dim = 8, .layout = layout, .position_offset = c.offset});
      const position pos[] = {c.p};
      const auto row = enc.table(posenc::positions(pos));
      const double angle = static_cast<double>(static_cast<int128>(c.p) + c.offset);
      const index_t cos_col = layout == posenc::sinusoidal_layout::interleaved ? 1 : 4;
      INFO("p " << c.p << ", offset " << c.offset);
      CHECK(row(0, 0) == static_cast<T>(std::sin(angle)));
      CHECK(row(0, cos_col) == static_cast<T>(std::cos(angle)));
    }
  }
}

// ---- 8. Parameters that overflow the encoder's type, enums out of range ------------------------

TEST_CASE("rope<float>: a magnitude outside [FLT_MIN, FLT_MAX] is refused, naming its source",
          "[hostile][rope][params]") {
  using Catch::Matchers::Contains;
  const posenc::rope_params base{.head_dim = 8};
  auto with_factor = [&](double f) {
    posenc::rope_params p = base;
    p.attention_factor = f;
    return p;
  };
  for (const double bad :
       {1e39, std::nextafter(static_cast<double>(std::numeric_limits<float>::max()), 1e300), 1e-39,
        static_cast<double>(std::numeric_limits<float>::denorm_min()), std::numeric_limits<double>::infinity(),
        std::numeric_limits<double>::quiet_NaN(), 0.0, -1.0}) {
    INFO("attention_factor " << bad);
    CHECK_INVALID(posenc::rope<float>(with_factor(bad)), "rope_params.attention_factor");
  }
  // YaRN: (0.1 * 1e308 * ln 4 + 1) / (0.1 * ln 4 + 1) is about 1.2e307, finite in double only.
  const posenc::rope_params yarn_huge{
      .head_dim = 8, .scaling = posenc::yarn_scaling{.factor = 4, .mscale = 1e308, .mscale_all_dim = 1}};
  CHECK_THROWS_WITH(posenc::rope<float>(yarn_huge), Contains("rope_params.scaling = yarn") && Contains("magnitude"));
  CHECK_NOTHROW(posenc::rope<double>(yarn_huge));
  // ... and (0.1 ln s + 1) / (0.1 * 1e39 * ln s + 1) is about 1e-39: below FLT_MIN.
  const posenc::rope_params yarn_tiny{
      .head_dim = 8, .scaling = posenc::yarn_scaling{.factor = 4, .mscale = 1, .mscale_all_dim = 1e39}};
  CHECK_THROWS_WITH(posenc::rope<float>(yarn_tiny), Contains("rope_params.scaling = yarn") && Contains("magnitude"));
  CHECK_NOTHROW(posenc::rope<double>(yarn_tiny));

  // The limits themselves are accepted, and cos/sin times the magnitude stay finite: zeros stay
  // zero (an infinite product would make them NaN), small values stay finite.
  for (const double edge : {static_cast<double>(std::numeric_limits<float>::max()),
                            static_cast<double>(std::numeric_limits<float>::min())}) {
    INFO("attention_factor " << edge);
    const posenc::rope<float> r(with_factor(edge));
    posenc::row_matrix<float> zeros = posenc::row_matrix<float>::Zero(4, 8);
    posenc::row_matrix<float> small = posenc::row_matrix<float>::Constant(4, 8, 1e-30f);
    const position pos[] = {0, 3, 1000003, pmax};
    r.rotate(zeros, posenc::positions(pos));
    r.rotate(small, posenc::positions(pos));
    CHECK(zeros.isZero(0));
    CHECK(small.allFinite());
    const auto cache = r.make_cache(0, 16);
    for (position p = 0; p < 16; ++p)
      for (index_t k = 0; k < 4; ++k) CHECK((std::isfinite(cache.cos(p, k)) && std::isfinite(cache.sin(p, k))));
  }
}

TEST_CASE("rope<double>: a magnitude outside [DBL_MIN, DBL_MAX] is refused, naming its source",
          "[hostile][rope][params]") {
  using Catch::Matchers::Contains;
  auto with_factor = [](double f) { return posenc::rope_params{.head_dim = 8, .attention_factor = f}; };
  for (const double bad : {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN(),
                           std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::min() / 2}) {
    INFO("attention_factor " << bad);
    CHECK_INVALID(posenc::rope<double>(with_factor(bad)), "rope_params.attention_factor");
  }
  for (const double edge : {std::numeric_limits<double>::max(), std::numeric_limits<double>::min(), 1e39}) {
    INFO("attention_factor " << edge);
    const posenc::rope<double> r(with_factor(edge));
    posenc::row_matrix<double> zeros = posenc::row_matrix<double>::Zero(2, 8);
    const position pos[] = {5, pmin};
    r.rotate(zeros, posenc::positions(pos));
    CHECK(zeros.isZero(0));
  }
  // 0.1 * DBL_MAX * ln(e^20) overflows: an infinite YaRN magnitude; 3 / (0.1 * 1e308 * 20) is
  // below DBL_MIN.
  const double s = std::exp(20.0);
  CHECK_THROWS_WITH(
      posenc::rope<double>(
          {.head_dim = 8, .scaling = posenc::yarn_scaling{.factor = s, .mscale = 1.7e308, .mscale_all_dim = 1}}),
      Contains("rope_params.scaling = yarn") && Contains("magnitude of inf"));
  CHECK_THROWS_WITH(
      posenc::rope<double>(
          {.head_dim = 8, .scaling = posenc::yarn_scaling{.factor = s, .mscale = 1, .mscale_all_dim = 1e308}}),
      Contains("rope_params.scaling = yarn") && Contains("magnitude"));
}

TEST_CASE("enum values cast out of range are refused, naming the field", "[hostile][params][enums]") {
  for (const int bad : {2, -1, 1000}) {
    INFO("enum value " << bad);
    posenc::longrope_scaling l{.short_factor = {1, 1, 1, 1}, .long_factor = {2, 2, 2, 2}};
    l.choice = static_cast<posenc::longrope_choice>(bad);
    CHECK_INVALID(posenc::rope<float>({.head_dim = 8, .scaling = l}), "longrope_scaling.choice");
    CHECK_INVALID(posenc::longrope_magnitude(l), "longrope_scaling.choice");
    CHECK_INVALID(posenc::sinusoidal<float>({.dim = 8, .layout = static_cast<posenc::sinusoidal_layout>(bad)}),
                  "sinusoidal_params.layout");
    CHECK_INVALID(posenc::rope<float>({.head_dim = 8, .layout = static_cast<posenc::rope_layout>(bad)}),
                  "rope_params.layout");
    CHECK_INVALID(posenc::alibi<float>({.form = static_cast<posenc::alibi_form>(bad)}), "alibi_params.form");
  }
}

// ---- 10. Hugging Face LongRoPE errors name the dict's fields -----------------------------------

TEST_CASE("HF LongRoPE dicts: errors name rope_scaling.<field>", "[hostile][hf][longrope]") {
  using Catch::Matchers::Contains;
  using Catch::Matchers::StartsWith;
  const auto dict = [](std::vector<double> s, std::vector<double> l) {
    return posenc::config_map{{"rope_type", std::string("longrope")},
                              {"short_factor", std::move(s)},
                              {"long_factor", std::move(l)},
                              {"original_max_position_embeddings", std::int64_t{4096}}};
  };
  const posenc::rope_params p{.head_dim = 8};  // 4 pairs
  const std::vector<double> four = {1, 1.5, 2, 3};
  // Lists of the wrong length (the check needs the rotary dim, so it runs with the params).
  CHECK_THROWS_WITH(posenc::rope<float>(p, dict({1, 1, 1}, four)),
                    StartsWith("posenc: rope_scaling.short_factor = 3 entries") && Contains("rotary_dim/2 = 4"));
  CHECK_THROWS_WITH(posenc::rope_params_from_config(p, dict(four, {1, 1, 1, 1, 1})),
                    StartsWith("posenc: rope_scaling.long_factor = 5 entries") && Contains("rotary_dim/2 = 4"));
  CHECK_THROWS_WITH(posenc::rope<double>({.head_dim = 16, .rotary_dim = 4}, dict(four, four)),
                    StartsWith("posenc: rope_scaling.short_factor = 4 entries") && Contains("rotary_dim/2 = 2"));
  // Entries, and every other field.
  CHECK_THROWS_WITH(posenc::rope<float>(p, dict({1, 1, 1, -1}, four)),
                    StartsWith("posenc: rope_scaling.short_factor[3] = -1"));
  CHECK_THROWS_WITH(posenc::rope<float>(p, dict(four, {1, 0, 1, 1})),
                    StartsWith("posenc: rope_scaling.long_factor[1] = 0"));
  auto m = dict(four, four);
  m["original_max_position_embeddings"] = std::int64_t{1};
  CHECK_THROWS_WITH(posenc::rope<float>(p, m), StartsWith("posenc: rope_scaling.original_max_position_embeddings = 1"));
  m = dict(four, four);
  m["max_position_embeddings"] = std::int64_t{-5};
  CHECK_THROWS_WITH(posenc::rope<float>(p, m), StartsWith("posenc: rope_scaling.max_position_embeddings = -5"));
  m = dict(four, four);
  m["sequence_length"] = std::int64_t{-1};
  CHECK_THROWS_WITH(posenc::rope<float>(p, m), StartsWith("posenc: rope_scaling.sequence_length = -1"));
  m = dict(four, four);
  m["factor"] = -2.0;
  CHECK_THROWS_WITH(posenc::rope<float>(p, m), StartsWith("posenc: rope_scaling.factor = -2"));
  m = dict(four, four);
  m["choice"] = std::string("sometimes");
  CHECK_THROWS_WITH(posenc::rope<float>(p, m), StartsWith("posenc: rope_scaling.choice = \"sometimes\""));
  // Without an original length the dict's max_position_embeddings stands in for it: an error
  // names the field the dict has.
  m = dict(four, four);
  m.erase("original_max_position_embeddings");
  m["max_position_embeddings"] = std::int64_t{1};
  CHECK_THROWS_WITH(posenc::rope<float>(p, m), StartsWith("posenc: rope_scaling.max_position_embeddings = 1"));
  for (const char* type : {"yarn", "dynamic"}) {
    INFO(type);
    const posenc::config_map y = {
        {"rope_type", std::string(type)}, {"factor", 2.0}, {"max_position_embeddings", std::int64_t{0}}};
    CHECK_THROWS_WITH(posenc::rope<float>(p, y), StartsWith("posenc: rope_scaling.max_position_embeddings = 0"));
  }
  // A dict that fits builds.
  CHECK_NOTHROW(posenc::rope<float>(p, dict(four, four)));
}
