// RoPE frequency policies: exact values pinned by the published formulas and HF transformers, tables
// against formulas written here, the Hugging Face rope_scaling parser, and bad parameters.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "posenc/encoders/rope.hpp"

using Catch::Matchers::Contains;
using posenc::config_map;
using posenc::index_t;
using posenc::position;
using ld = long double;

namespace {

constexpr ld pi_l = 3.141592653589793238462643383279502884L;
// Tables are evaluated in long double and rounded to double once: within an ulp or two of a
// long double reference.
constexpr ld k_table_rel_tol = 4 * std::numeric_limits<double>::epsilon();

std::vector<ld> plain_inv(ld base, index_t r) {
  std::vector<ld> inv(static_cast<std::size_t>(r / 2));
  for (index_t i = 0; i < r / 2; ++i) inv[static_cast<std::size_t>(i)] = std::pow(base, -ld(2 * i) / ld(r));
  return inv;
}

// Checks every entry of `got` against `want` relatively; reports the worst index.
void check_table(std::span<const double> got, const std::vector<ld>& want) {
  REQUIRE(got.size() == want.size());
  ld worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const ld rel = std::abs(ld(got[i]) - want[i]) / want[i];
    if (rel > worst) worst = rel, at = i;
  }
  INFO("worst pair " << at << ": got " << got[at] << ", want " << double(want[at]) << ", relative error "
                     << double(worst));
  CHECK(worst <= k_table_rel_tol);
}

}  // namespace

TEST_CASE("YaRN correction range and magnitude (r = 128, base 1e4, L0 = 4096)", "[rope][yarn]") {
  const ld r = 128, base = 1e4L, l0 = 4096;
  // c(n) = r ln(L0 / (2 pi n)) / (2 ln base)
  auto c = [&](ld n) { return r * std::log(l0 / (2 * pi_l * n)) / (2 * std::log(base)); };
  const ld low = std::floor(c(32)), high = std::ceil(c(1));
  // By hand: c(32) = 128 ln(20.372) / 18.4207 = 20.944, c(1) = 128 ln(651.90) / 18.4207 = 45.027.
  CHECK(low == 20);
  CHECK(high == 46);
  const posenc::yarn_scaling y{.factor = 8, .original_max_position = 4096};
  const auto range = posenc::yarn_correction_range(y, 128, 1e4);
  CHECK(range.low == double(low));
  CHECK(range.high == double(high));
  // Without truncation the bounds are the raw correction dims.
  auto raw = y;
  raw.truncate = false;
  const auto raw_range = posenc::yarn_correction_range(raw, 128, 1e4);
  CHECK(std::abs(raw_range.low - double(c(32))) <= 1e-12);
  CHECK(std::abs(raw_range.high - double(c(1))) <= 1e-12);
  CHECK(raw_range.low == Approx(20.94448162).epsilon(1e-9));

  // Magnitude 0.1 ln s + 1; by hand 0.1 ln 4 + 1 = 1.138629436, ln 8 -> 1.207944154,
  // ln 16 -> 1.277258872, ln 32 -> 1.346573590.
  const double by_hand[] = {1.1386294361119891, 1.2079441541679836, 1.2772588722239782, 1.3465735902799727};
  const double scales[] = {4, 8, 16, 32};
  for (int k = 0; k < 4; ++k) {
    const double s = scales[k];
    const ld want = 0.1L * std::log(ld(s)) + 1;
    posenc::rope<float> rope({.head_dim = 128, .base = 1e4, .scaling = posenc::yarn_scaling{.factor = s}});
    INFO("s = " << s);
    CHECK(std::abs(rope.magnitude() - double(want)) <= 4e-16);
    CHECK(std::abs(posenc::yarn_magnitude({.factor = s}) - by_hand[k]) <= 1e-15);
  }
  CHECK(posenc::yarn_magnitude({.factor = 1}) == 1.0);
  CHECK(posenc::yarn_magnitude({.factor = 0.5}) == 1.0);
  // DeepSeek's pair: (0.1 m ln s + 1) / (0.1 m' ln s + 1); one of them alone is ignored, as in HF.
  const ld s40 = std::log(40.0L);
  CHECK(std::abs(posenc::yarn_magnitude({.factor = 40, .mscale = 0.707, .mscale_all_dim = 1}) -
                 double((0.1L * 0.707L * s40 + 1) / (0.1L * s40 + 1))) <= 1e-15);
  CHECK(posenc::yarn_magnitude({.factor = 40, .mscale = 1, .mscale_all_dim = 1}) == 1.0);
  CHECK(std::abs(posenc::yarn_magnitude({.factor = 40, .mscale = 0.707}) - double(0.1L * s40 + 1)) <= 1e-15);
}

TEST_CASE("YaRN table ramps between the kept and the interpolated frequencies", "[rope][yarn]") {
  const double s = 8;
  posenc::rope<double> rope(
      {.head_dim = 128, .base = 1e4, .scaling = posenc::yarn_scaling{.factor = s, .original_max_position = 4096}});
  CHECK(rope.name() == "rope-yarn");
  auto want = plain_inv(1e4L, 128);
  const ld low = 20, high = 46;  // pinned above
  for (std::size_t i = 0; i < want.size(); ++i) {
    const ld ramp = std::clamp((ld(i) - low) / (high - low), ld(0), ld(1));
    want[i] = want[i] / s * ramp + want[i] * (1 - ramp);
  }
  check_table(rope.inv_freq(), want);
  CHECK(rope.inv_freq()[20] == Approx(double(std::pow(1e4L, -40.0L / 128))).epsilon(1e-15));
  CHECK(rope.inv_freq()[46] == Approx(double(std::pow(1e4L, -92.0L / 128) / s)).epsilon(1e-15));

  // L0 = 6: c(1) = 128 ln(6 / 2 pi) / 18.42 = -0.32, so low = high = 0 and the ramp uses
  // high = 0.001: pair 0 is kept, every other pair interpolated.
  posenc::rope<double> tiny(
      {.head_dim = 16, .base = 1e4, .scaling = posenc::yarn_scaling{.factor = 4, .original_max_position = 6}});
  auto want_tiny = plain_inv(1e4L, 16);
  for (std::size_t i = 1; i < want_tiny.size(); ++i) want_tiny[i] /= 4;
  check_table(tiny.inv_freq(), want_tiny);
  // L0 = 4: c(1) = -1.16, high = -1 < low = 0: an empty range is an error.
  CHECK_THROWS_WITH(
      posenc::rope<float>(
          {.head_dim = 128, .base = 1e4, .scaling = posenc::yarn_scaling{.factor = 4, .original_max_position = 4}}),
      Contains("yarn_scaling.original_max_position = 4") && Contains("empty"));
}

TEST_CASE("Llama 3 table (r = 128, base 5e5, s = 8, low 1, high 4, L0 = 8192)", "[rope][llama3]") {
  const index_t r = 128;
  const ld base = 5e5L, s = 8, lo = 1, hi = 4, l0 = 8192;
  const auto plain = plain_inv(base, r);
  // The wavelength rule, pair by pair: keep below L0/high, divide above L0/low, blend between.
  int kept = 0, divided = 0, blended = 0;
  std::vector<ld> want(plain.size());
  for (std::size_t i = 0; i < plain.size(); ++i) {
    const ld w = 2 * pi_l / plain[i];
    if (w < l0 / hi) {
      ++kept;
      want[i] = plain[i];
    } else if (w > l0 / lo) {
      ++divided;
      want[i] = plain[i] / s;
    } else {
      ++blended;
      const ld t = (l0 / w - lo) / (hi - lo);
      want[i] = (1 - t) * plain[i] / s + t * plain[i];
    }
  }
  // By hand: w_i = 2 pi 5e5^(i/64) < 2048 iff i < 64 ln(2048 / 2 pi) / ln 5e5 = 28.22, so pairs
  // 0..28 are kept (29); w_i > 8192 iff i > 64 ln(8192 / 2 pi) / ln 5e5 = 34.98, so pairs 35..63
  // are divided (29); pairs 29..34 are blended (6).
  CHECK(kept == 29);
  CHECK(divided == 29);
  CHECK(blended == 6);

  posenc::rope<double> rope({.head_dim = r, .base = 5e5, .scaling = posenc::llama3_scaling{}});
  check_table(rope.inv_freq(), want);
  CHECK(rope.magnitude() == 1.0);
  // Classify the encoder's own table the same way.
  int k2 = 0, d2 = 0, b2 = 0;
  for (std::size_t i = 0; i < plain.size(); ++i) {
    const ld v = rope.inv_freq()[i];
    if (std::abs(v - plain[i]) <= k_table_rel_tol * plain[i]) {
      ++k2;
    } else if (std::abs(v - plain[i] / s) <= k_table_rel_tol * plain[i] / s) {
      ++d2;
    } else {
      CHECK((v > plain[i] / s && v < plain[i]));
      ++b2;
    }
  }
  CHECK(k2 == 29);
  CHECK(d2 == 29);
  CHECK(b2 == 6);
}

TEST_CASE("dynamic NTK base at s = 2, L0 = 4096, L = 8192", "[rope][ntk]") {
  const index_t r = 128;
  const ld want_base = 1e4L * std::pow(2.0L * 8192 / 4096 - (2 - 1), ld(r) / ld(r - 2));
  // By hand: 1e4 * 3^(128/126) = 1e4 * 3 * 3^(1/63) = 30527.7367...
  CHECK(std::abs(double(want_base) - 30527.7367488067) <= 1e-6);
  const posenc::dynamic_ntk_scaling d{.factor = 2, .original_max_position = 4096, .sequence_length = 8192};
  CHECK(std::abs(posenc::dynamic_ntk_base(d, r, 1e4) - double(want_base)) <= 1e-15 * double(want_base));
  posenc::rope<double> rope({.head_dim = r, .base = 1e4, .scaling = d});
  CHECK(rope.name() == "rope-dynamic-ntk");
  check_table(rope.inv_freq(), plain_inv(want_base, r));
  // At or below L0 (and for an unset length) the table is the plain one.
  for (position len : {0LL, 100LL, 4096LL}) {
    posenc::rope<double> short_seq(
        {.head_dim = r,
         .base = 1e4,
         .scaling = posenc::dynamic_ntk_scaling{.factor = 2, .original_max_position = 4096, .sequence_length = len}});
    check_table(short_seq.inv_freq(), plain_inv(1e4L, r));
  }
}

TEST_CASE("NTK-aware and linear tables", "[rope][ntk][linear]") {
  posenc::rope<double> ntk({.head_dim = 64, .base = 1e4, .scaling = posenc::ntk_aware_scaling{.alpha = 4}});
  const ld b = 1e4L * std::pow(4.0L, 64.0L / 62.0L);
  check_table(ntk.inv_freq(), plain_inv(b, 64));
  CHECK(posenc::ntk_aware_base({.alpha = 4}, 64, 1e4) == Approx(double(b)).epsilon(1e-15));
  posenc::rope<double> lin(
      {.head_dim = 64, .rotary_dim = 32, .base = 5e5, .scaling = posenc::linear_scaling{.factor = 4}});
  auto want = plain_inv(5e5L, 32);
  for (auto& v : want) v /= 4;
  check_table(lin.inv_freq(), want);
  posenc::rope<double> none({.head_dim = 6, .base = 100});
  check_table(none.inv_freq(), {1.0L, std::pow(100.0L, -1.0L / 3), std::pow(100.0L, -2.0L / 3)});
}

TEST_CASE("LongRoPE picks its list explicitly and scales by sqrt(1 + ln s / ln L0)", "[rope][longrope]") {
  const std::vector<double> short_f = {1.0, 1.5, 2.0, 4.0};
  const std::vector<double> long_f = {2.0, 3.0, 5.0, 8.0};
  auto table = [](const std::vector<double>& f) {
    auto inv = plain_inv(1e4L, 8);
    for (std::size_t i = 0; i < inv.size(); ++i) inv[i] /= f[i];
    return inv;
  };
  posenc::longrope_scaling l{.short_factor = short_f,
                             .long_factor = long_f,
                             .original_max_position = 4096,
                             .max_position = 131072,
                             .sequence_length = 4096};
  // s = 131072 / 4096 = 32; ln 32 / ln 4096 = 5/12, so the magnitude is sqrt(17/12) = 1.19023807...
  const double want_mag = std::sqrt(17.0 / 12.0);
  {
    posenc::rope<double> rope({.head_dim = 8, .base = 1e4, .scaling = l});
    CHECK(rope.name() == "rope-longrope");
    check_table(rope.inv_freq(), table(short_f));
    CHECK(std::abs(rope.magnitude() - want_mag) <= 1e-15);
  }
  l.sequence_length = 4097;
  check_table(posenc::rope<double>({.head_dim = 8, .base = 1e4, .scaling = l}).inv_freq(), table(long_f));
  l.sequence_length = 0;
  l.choice = posenc::longrope_choice::fixed_long;
  check_table(posenc::rope<double>({.head_dim = 8, .base = 1e4, .scaling = l}).inv_freq(), table(long_f));
  // The scale given directly instead of the two lengths.
  l.max_position = 0;
  l.factor = 32;
  CHECK(std::abs(posenc::longrope_magnitude(l) - want_mag) <= 1e-15);
  l.factor = 0;
  CHECK(posenc::longrope_magnitude(l) == 1.0);  // s unset: 1
  l.max_position = 2048;
  CHECK(posenc::longrope_magnitude(l) == 1.0);  // s = 0.5 <= 1
}

TEST_CASE("the magnitude multiplies cos and sin; attention_factor overrides it", "[rope]") {
  posenc::rope<double> yarn({.head_dim = 4, .base = 1e4, .scaling = posenc::yarn_scaling{.factor = 16}});
  posenc::rope<double> over(
      {.head_dim = 4, .base = 1e4, .scaling = posenc::yarn_scaling{.factor = 16}, .attention_factor = 1.5});
  CHECK(over.magnitude() == 1.5);
  const ld mag = 0.1L * std::log(16.0L) + 1;
  posenc::row_matrix<double> x(1, 4);
  x << 0.25, -0.5, 0.75, 1.0;
  auto y = x;
  auto z = x;
  yarn.rotate(y, posenc::arange(3, 1));
  over.rotate(z, posenc::arange(3, 1));
  const ld c = std::cos(3.0L), s = std::sin(3.0L);  // pair 0 has inv_freq 1 (kept by YaRN)
  CHECK(std::abs(y(0, 0) - double((0.25L * c - 0.75L * s) * mag)) <= 4e-16);
  CHECK(std::abs(y(0, 2) - double((0.75L * c + 0.25L * s) * mag)) <= 4e-16);
  CHECK(std::abs(z(0, 0) - double((0.25L * c - 0.75L * s) * 1.5L)) <= 4e-16);
}

TEST_CASE("Hugging Face rope_scaling dicts", "[rope][hf]") {
  SECTION("yarn, DeepSeek-V3 style, integers accepted") {
    const config_map m = {{"type", std::string("yarn")},
                          {"factor", std::int64_t{40}},
                          {"original_max_position_embeddings", std::int64_t{4096}},
                          {"beta_fast", std::int64_t{32}},
                          {"beta_slow", std::int64_t{1}},
                          {"mscale", 1.0},
                          {"mscale_all_dim", 1.0}};
    const auto s = posenc::rope_scaling_from_config(m);
    const auto& y = std::get<posenc::yarn_scaling>(s);
    CHECK(y.factor == 40);
    CHECK(y.original_max_position == 4096);
    CHECK(y.beta_fast == 32);
    CHECK(y.beta_slow == 1);
    CHECK(y.truncate);
    posenc::rope<float> rope({.head_dim = 64, .base = 1e4}, m);
    CHECK(rope.name() == "rope-yarn");
    CHECK(rope.magnitude() == 1.0);  // mscale / mscale_all_dim = 1
  }
  SECTION("yarn defaults, zero betas mean the defaults (HF's `or`), truncate") {
    const config_map m = {{"rope_type", std::string("yarn")},
                          {"factor", 4.0},
                          {"max_position_embeddings", std::int64_t{32768}},
                          {"beta_fast", std::int64_t{0}},
                          {"truncate", false}};
    const auto parsed = posenc::rope_scaling_from_config(m);
    const auto& y = std::get<posenc::yarn_scaling>(parsed);
    CHECK(y.original_max_position == 32768);
    CHECK(y.beta_fast == 32);
    CHECK(y.beta_slow == 1);
    CHECK_FALSE(y.truncate);
  }
  SECTION("llama3 (Llama 3.1 config), rope_theta and attention_factor") {
    const config_map m = {{"rope_type", std::string("llama3")},
                          {"factor", 8.0},
                          {"low_freq_factor", 1.0},
                          {"high_freq_factor", 4.0},
                          {"original_max_position_embeddings", std::int64_t{8192}},
                          {"rope_theta", 500000.0},
                          {"attention_factor", 1.25}};
    posenc::rope<double> rope({.head_dim = 128}, m);
    CHECK(rope.base() == 500000.0);
    CHECK(rope.magnitude() == 1.25);
    posenc::rope<double> direct({.head_dim = 128, .base = 5e5, .scaling = posenc::llama3_scaling{}});
    CHECK(std::equal(rope.inv_freq().begin(), rope.inv_freq().end(), direct.inv_freq().begin()));
  }
  SECTION("linear, ntk, dynamic, default") {
    CHECK(std::get<posenc::linear_scaling>(
              posenc::rope_scaling_from_config({{"type", std::string("linear")}, {"factor", std::int64_t{2}}}))
              .factor == 2);
    CHECK(std::get<posenc::ntk_aware_scaling>(
              posenc::rope_scaling_from_config({{"rope_type", std::string("ntk")}, {"factor", 3.0}}))
              .alpha == 3);
    const auto d = std::get<posenc::dynamic_ntk_scaling>(
        posenc::rope_scaling_from_config({{"rope_type", std::string("dynamic")},
                                          {"factor", 2.0},
                                          {"max_position_embeddings", std::int64_t{4096}},
                                          {"sequence_length", std::int64_t{8192}}}));
    CHECK(d.factor == 2);
    CHECK(d.original_max_position == 4096);
    CHECK(d.sequence_length == 8192);
    CHECK(std::holds_alternative<posenc::no_scaling>(
        posenc::rope_scaling_from_config({{"rope_type", std::string("default")}})));
  }
  SECTION("longrope, Phi-3 style") {
    const config_map m = {{"rope_type", std::string("longrope")},
                          {"short_factor", std::vector<double>{1, 1, 1, 1}},
                          {"long_factor", std::vector<double>{1, 2, 4, 8}},
                          {"original_max_position_embeddings", std::int64_t{4096}},
                          {"max_position_embeddings", std::int64_t{131072}},
                          {"choice", std::string("fixed_long")}};
    const auto parsed = posenc::rope_scaling_from_config(m);
    const auto& l = std::get<posenc::longrope_scaling>(parsed);
    CHECK(l.original_max_position == 4096);
    CHECK(l.max_position == 131072);
    CHECK(l.choice == posenc::longrope_choice::fixed_long);
    posenc::rope<double> rope({.head_dim = 8, .base = 1e4}, m);
    CHECK(std::abs(rope.magnitude() - std::sqrt(17.0 / 12.0)) <= 1e-15);
    CHECK(rope.inv_freq()[3] == Approx(double(std::pow(1e4L, -6.0L / 8) / 8)).epsilon(1e-15));
    // The wrong list length shows up once the rotary dim is known, named as in the dict.
    CHECK_THROWS_WITH(posenc::rope<double>({.head_dim = 16, .base = 1e4}, m),
                      Contains("rope_scaling.short_factor = 4 entries") && !Contains("longrope_scaling"));
  }
  SECTION("unknown type, missing and mistyped fields, out-of-range values") {
    auto from = [](const config_map& m) { return posenc::rope_scaling_from_config(m); };
    CHECK_THROWS_WITH(from({{"rope_type", std::string("su2")}, {"factor", 2.0}}),
                      Contains("rope_scaling.rope_type") && Contains("su2") && Contains("unknown"));
    CHECK_THROWS_WITH(from({{"factor", 2.0}}), Contains("rope_scaling.rope_type"));
    CHECK_THROWS_WITH(from({{"rope_type", std::int64_t{3}}}), Contains("rope_scaling.rope_type"));
    CHECK_THROWS_WITH(
        from({{"rope_type", std::string("yarn")}, {"original_max_position_embeddings", std::int64_t{4096}}}),
        Contains("rope_scaling.factor") && Contains("missing"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("yarn")}, {"factor", 4.0}}),
                      Contains("rope_scaling.original_max_position_embeddings"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("llama3")},
                            {"factor", 8.0},
                            {"high_freq_factor", 4.0},
                            {"original_max_position_embeddings", std::int64_t{8192}}}),
                      Contains("rope_scaling.low_freq_factor"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("longrope")},
                            {"long_factor", std::vector<double>{1.0}},
                            {"original_max_position_embeddings", std::int64_t{4096}}}),
                      Contains("rope_scaling.short_factor"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("linear")}, {"factor", std::string("8")}}),
                      Contains("rope_scaling.factor") && Contains("number"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("linear")}, {"factor", -2.0}}),
                      Contains("rope_scaling.factor = -2"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("linear")}, {"factor", 0.0}}),
                      Contains("rope_scaling.factor = 0"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("yarn")},
                            {"factor", 4.0},
                            {"original_max_position_embeddings", std::int64_t{4096}},
                            {"beta_fast", 1.0},
                            {"beta_slow", 2.0}}),
                      Contains("rope_scaling.beta_fast = 1"));
    CHECK_THROWS_WITH(
        from({{"rope_type", std::string("yarn")}, {"factor", 4.0}, {"original_max_position_embeddings", 4096.5}}),
        Contains("rope_scaling.original_max_position_embeddings") && Contains("whole"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("yarn")},
                            {"factor", 4.0},
                            {"original_max_position_embeddings", std::int64_t{0}}}),
                      Contains("rope_scaling.original_max_position_embeddings = 0"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("yarn")},
                            {"factor", 4.0},
                            {"max_position_embeddings", std::int64_t{4096}},
                            {"truncate", std::int64_t{1}}}),
                      Contains("rope_scaling.truncate"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("yarn")},
                            {"factor", 4.0},
                            {"max_position_embeddings", std::int64_t{4096}},
                            {"mscale", -1.0}}),
                      Contains("rope_scaling.mscale = -1"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("llama3")},
                            {"factor", 8.0},
                            {"low_freq_factor", 4.0},
                            {"high_freq_factor", 2.0},
                            {"original_max_position_embeddings", std::int64_t{8192}}}),
                      Contains("rope_scaling.high_freq_factor = 2"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("longrope")},
                            {"short_factor", 1.0},
                            {"long_factor", std::vector<double>{1.0}},
                            {"original_max_position_embeddings", std::int64_t{4096}}}),
                      Contains("rope_scaling.short_factor") && Contains("list"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("longrope")},
                            {"short_factor", std::vector<double>{1.0, 0.0}},
                            {"long_factor", std::vector<double>{1.0, 1.0}},
                            {"original_max_position_embeddings", std::int64_t{4096}}}),
                      Contains("rope_scaling.short_factor[1] = 0"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("longrope")},
                            {"short_factor", std::vector<double>{1.0}},
                            {"long_factor", std::vector<double>{1.0}},
                            {"original_max_position_embeddings", std::int64_t{4096}},
                            {"max_position_embeddings", std::int64_t{8192}},
                            {"factor", 4.0}}),
                      Contains("rope_scaling.factor = 4") && Contains("disagrees"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("default")}, {"attention_factor", -1.0}}),
                      Contains("rope_scaling.attention_factor = -1"));
    CHECK_THROWS_WITH(from({{"rope_type", std::string("default")}, {"rope_theta", 0.0}}),
                      Contains("rope_scaling.rope_theta = 0"));
    CHECK_THROWS_AS(from({{"rope_type", std::string("nope")}}), std::invalid_argument);
  }
}

TEST_CASE("frequency policies reject invalid parameters, naming them", "[rope][errors]") {
  using R = posenc::rope<float>;
  auto with = [](posenc::rope_scaling s, index_t rotary_dim = 0) {
    return R({.head_dim = 64, .rotary_dim = rotary_dim, .base = 1e4, .scaling = std::move(s)});
  };
  CHECK_THROWS_WITH(with(posenc::linear_scaling{.factor = 0}), Contains("linear_scaling.factor = 0"));
  CHECK_THROWS_WITH(with(posenc::linear_scaling{.factor = -1}), Contains("linear_scaling.factor = -1"));
  CHECK_THROWS_WITH(with(posenc::ntk_aware_scaling{.alpha = 0}), Contains("ntk_aware_scaling.alpha = 0"));
  CHECK_THROWS_WITH(with(posenc::ntk_aware_scaling{.alpha = 2}, 2), Contains("rope_params.rotary_dim = 2"));
  CHECK_THROWS_WITH(with(posenc::dynamic_ntk_scaling{.factor = 2}, 2), Contains("rope_params.rotary_dim = 2"));
  CHECK_THROWS_WITH(with(posenc::dynamic_ntk_scaling{.factor = 0}), Contains("dynamic_ntk_scaling.factor = 0"));
  CHECK_THROWS_WITH(with(posenc::dynamic_ntk_scaling{.factor = 2, .original_max_position = 0}),
                    Contains("dynamic_ntk_scaling.original_max_position = 0"));
  CHECK_THROWS_WITH(with(posenc::dynamic_ntk_scaling{.factor = 2, .sequence_length = -1}),
                    Contains("dynamic_ntk_scaling.sequence_length = -1"));
  CHECK_THROWS_WITH(with(posenc::yarn_scaling{.factor = 0}), Contains("yarn_scaling.factor = 0"));
  CHECK_THROWS_WITH(with(posenc::yarn_scaling{.factor = 4, .beta_fast = 1, .beta_slow = 1}),
                    Contains("yarn_scaling.beta_fast = 1") && Contains("beta_slow"));
  CHECK_THROWS_WITH(with(posenc::yarn_scaling{.factor = 4, .beta_fast = 0.5, .beta_slow = 1}),
                    Contains("yarn_scaling.beta_fast = 0.5"));
  CHECK_THROWS_WITH(with(posenc::yarn_scaling{.factor = 4, .beta_fast = 32, .beta_slow = 0}),
                    Contains("yarn_scaling.beta_slow = 0"));
  CHECK_THROWS_WITH(with(posenc::yarn_scaling{.factor = 4, .mscale_all_dim = -1}),
                    Contains("yarn_scaling.mscale_all_dim = -1"));
  CHECK_THROWS_WITH(R({.head_dim = 64, .base = 1.0, .scaling = posenc::yarn_scaling{.factor = 4}}),
                    Contains("rope_params.base = 1"));
  CHECK_THROWS_WITH(with(posenc::llama3_scaling{.factor = 8, .low_freq_factor = 4, .high_freq_factor = 3.5}),
                    Contains("llama3_scaling.high_freq_factor = 3.5") && Contains("low_freq_factor"));
  CHECK_THROWS_WITH(with(posenc::llama3_scaling{.factor = 8, .low_freq_factor = 4, .high_freq_factor = 1}),
                    Contains("llama3_scaling.high_freq_factor = 1"));
  CHECK_THROWS_WITH(with(posenc::llama3_scaling{.factor = 0}), Contains("llama3_scaling.factor = 0"));
  CHECK_THROWS_WITH(with(posenc::llama3_scaling{.low_freq_factor = 0}), Contains("llama3_scaling.low_freq_factor = 0"));
  const std::vector<double> ok(16, 1.0), short_list(15, 1.0);
  std::vector<double> bad = ok;
  bad[2] = 0;
  CHECK_THROWS_WITH(with(posenc::longrope_scaling{.short_factor = short_list, .long_factor = ok}, 32),
                    Contains("longrope_scaling.short_factor = 15 entries"));
  CHECK_THROWS_WITH(with(posenc::longrope_scaling{.short_factor = ok, .long_factor = short_list}, 32),
                    Contains("longrope_scaling.long_factor"));
  CHECK_THROWS_WITH(with(posenc::longrope_scaling{.short_factor = ok, .long_factor = bad}, 32),
                    Contains("longrope_scaling.long_factor[2] = 0"));
  CHECK_THROWS_WITH(
      with(posenc::longrope_scaling{.short_factor = ok, .long_factor = ok, .original_max_position = 1}, 32),
      Contains("longrope_scaling.original_max_position = 1"));
  CHECK_NOTHROW(with(posenc::longrope_scaling{.short_factor = ok, .long_factor = ok}, 32));
}
