// libFuzzer target: every encoder built from arbitrary parameters (zeros, negatives, NaN,
// infinities, denormals, int64 extremes, unknown enum values, lists of any length).
//
// A construction either succeeds or throws `std::invalid_argument` reading
// "posenc: <param> = <value>: <what>"; an enum field holding a value outside its enumerators must
// throw. A constructed encoder must then work: RoPE has finite positive frequencies and a
// magnitude that is a normal positive value of its type T (rope<float>: [FLT_MIN, FLT_MAX], so
// zeros rotate to zeros, never NaN), keeps norms, and rope<float> refuses only what lies outside
// float's range (naming attention_factor or the scaling); ALiBi slopes lie in [0, 1] and its bias
// for any two int64 positions is -slope times their exact distance rounded once; T5 buckets lie in
// [0, num_buckets) for every relative position, int64 extremes included; sinusoidal values lie in
// [-1, 1]; Shaw's relative index lies in [0, 2K]. Sizes stay small enough to allocate (a head_dim
// of 2^40 is valid and would ask for terabytes); `std::length_error` from an absurd size is
// accepted where noted.
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <variant>
#include <vector>

#include "fuzz_common.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/sinusoidal.hpp"
#include "posenc/encoders/t5_bias.hpp"

namespace {

using posenc::index_t;
using posenc::position;
using posenc_fuzz::fail;
using posenc_fuzz::reader;

__extension__ typedef __int128 int128;

constexpr position int_min = std::numeric_limits<position>::min();
constexpr position int_max = std::numeric_limits<position>::max();

/// A size or count: usually small, sometimes an extreme that validation must catch.
index_t size_value(reader& in, index_t small_max) {
  switch (in.byte() % 8) {
    case 0: return 0;
    case 1: return -1;
    case 2: return int_min;
    case 3: return in.in_range<index_t>(-8, 8);
    default: return in.in_range<index_t>(-2, small_max);
  }
}

/// An int64 field such as a context length: anything.
position length_value(reader& in) {
  switch (in.byte() % 6) {
    case 0: return int_max;
    case 1: return int_min;
    case 2: return in.in_range<position>(-4, 70000);
    case 3: return position{1} << in.in_range(0, 62);
    default: return static_cast<position>(in.bits(8));
  }
}

std::vector<double> factor_list(reader& in, index_t want) {
  const index_t n = in.flag() ? want : in.in_range<index_t>(0, 70);
  std::vector<double> f(static_cast<std::size_t>(std::max<index_t>(n, 0)));
  const bool raw = in.flag();
  for (auto& v : f) v = raw ? in.parameter() : in.uniform(0.5, 40);
  return f;
}

posenc::rope_scaling scaling_value(reader& in, index_t rotary_dim) {
  switch (in.byte() % 7) {
    case 1: return posenc::linear_scaling{.factor = in.parameter()};
    case 2: return posenc::ntk_aware_scaling{.alpha = in.parameter()};
    case 3:
      return posenc::dynamic_ntk_scaling{
          .factor = in.parameter(), .original_max_position = length_value(in), .sequence_length = length_value(in)};
    case 4:
      return posenc::yarn_scaling{.factor = in.parameter(),
                                  .original_max_position = length_value(in),
                                  .beta_fast = in.parameter(),
                                  .beta_slow = in.parameter(),
                                  .mscale = in.flag() ? 0.0 : in.parameter(),
                                  .mscale_all_dim = in.flag() ? 0.0 : in.parameter(),
                                  .truncate = in.flag()};
    case 5:
      return posenc::llama3_scaling{.factor = in.parameter(),
                                    .low_freq_factor = in.parameter(),
                                    .high_freq_factor = in.parameter(),
                                    .original_max_position = length_value(in)};
    case 6: {
      posenc::longrope_scaling l;
      l.short_factor = factor_list(in, rotary_dim / 2);
      l.long_factor = factor_list(in, rotary_dim / 2);
      l.original_max_position = length_value(in);
      l.max_position = in.flag() ? 0 : length_value(in);
      l.choice = static_cast<posenc::longrope_choice>(in.byte() % 3);
      l.sequence_length = length_value(in);
      l.factor = in.flag() ? 0.0 : in.parameter();
      return l;
    }
    default: return posenc::no_scaling{};
  }
}

/// Runs `build`; an `std::invalid_argument` must carry the usual message. With `must_throw` (an
/// enum out of range), success is a finding.
template <class F>
void expect_valid_or_invalid(F&& build, bool must_throw = false, const char* what = "") {
  try {
    build();
  } catch (const std::invalid_argument& e) {
    posenc_fuzz::check_invalid_message(e);
    return;
  }
  if (must_throw) fail("%s: an enum value out of range was accepted", what);
}

/// Whether `m` is a normal positive value of T.
template <class T>
bool normal_in(double m) {
  return m >= static_cast<double>(std::numeric_limits<T>::min()) &&
         m <= static_cast<double>(std::numeric_limits<T>::max());
}

/// rope<float> from parameters rope<double> accepted with magnitude `mag_double` (or refused,
/// `mag_double` NaN): it is refused exactly when that magnitude is no normal float, naming the
/// attention factor or the scaling, and when built, zeros rotate to zeros and rows stay finite.
void rope_float_case(const posenc::rope_params& p, double mag_double) {
  bool built = false;
  try {
    const posenc::rope<float> r(p);
    built = true;
    const double mag = r.magnitude();
    if (!normal_in<float>(mag)) fail("rope<float> built with magnitude %.17g", mag);
    const position pos[] = {0, 1, int_max, int_min};
    posenc::row_matrix<float> zeros = posenc::row_matrix<float>::Zero(4, p.head_dim);
    r.rotate(zeros, posenc::positions(pos));
    if (!zeros.isZero(0)) fail("rope<float> with magnitude %.9g rotated zeros to non-zeros", mag);
    // A pair's norm times the magnitude stays below 1/16: no rotated value may overflow.
    const float x = static_cast<float>(std::ldexp(1.0, -4) / std::sqrt(2.0) / std::max(mag, 1.0));
    posenc::row_matrix<float> small = posenc::row_matrix<float>::Constant(4, p.head_dim, x);
    r.rotate(small, posenc::positions(pos));
    if (!small.allFinite()) fail("rope<float> with magnitude %.9g gave a non-finite rotation", mag);
  } catch (const std::invalid_argument& e) {
    posenc_fuzz::check_invalid_message(e);
    const std::string_view m = e.what();
    const bool names_magnitude = m.find("rope_params.attention_factor") != std::string_view::npos ||
                                 m.find("magnitude") != std::string_view::npos;
    if (!std::isnan(mag_double) && !(names_magnitude && !normal_in<float>(mag_double)))
      fail("rope<float> refused what rope<double> accepted (magnitude %.17g): \"%s\"", mag_double, e.what());
  }
  if (built && std::isnan(mag_double)) fail("rope<float> accepted what rope<double> refused");
}

void rope_case(reader& in) {
  posenc::rope_params p;
  p.head_dim = size_value(in, 520);
  p.rotary_dim = in.flag() ? 0 : size_value(in, 520);
  p.layout = static_cast<posenc::rope_layout>(in.byte() % 3);
  p.base = in.flag() ? 10000.0 : in.parameter();
  p.scaling = scaling_value(in, p.rotary_dim > 0 ? p.rotary_dim : p.head_dim);
  if (in.flag()) p.attention_factor = in.parameter();
  const position pos[] = {0, -1, 1, in.position_value(int_max), int_max, int_min};
  const bool bad_enum = (p.layout != posenc::rope_layout::half_split && p.layout != posenc::rope_layout::interleaved) ||
                        (std::holds_alternative<posenc::longrope_scaling>(p.scaling) &&
                         static_cast<int>(std::get<posenc::longrope_scaling>(p.scaling).choice) > 1);
  double mag_double = std::numeric_limits<double>::quiet_NaN();
  expect_valid_or_invalid(
      [&] {
        const posenc::rope<double> r(p);
        const double mag = r.magnitude();
        mag_double = mag;
        if (!normal_in<double>(mag)) fail("rope built with magnitude %.17g, not a normal double", mag);
        for (double f : r.inv_freq())
          if (!(std::isfinite(f) && f > 0)) fail("rope built with inverse frequency %.17g", f);
        posenc::row_matrix<double> x = posenc::row_matrix<double>::Constant(6, p.head_dim, 0.5);
        r.rotate(x, posenc::positions(pos));
        const double want = 0.5 * std::sqrt(static_cast<double>(r.rotary_dim())) * mag;
        for (index_t i = 0; i < 6; ++i) {
          const double got = x.row(i).head(r.rotary_dim()).stableNorm();  // no overflow for huge magnitudes
          if (want > 1e-290 && want < 1e300 && !(std::abs(got - want) <= 1e-12 * want))
            fail("rope row at position %lld: rotary norm %.17g, expected %.17g", (long long)pos[i], got, want);
        }
      },
      bad_enum, "rope_params");
  if (p.head_dim <= 520) rope_float_case(p, mag_double);
}

void alibi_case(reader& in) {
  posenc::alibi_params p;
  p.num_heads = in.byte() % 16 == 0 ? int_max - in.in_range<index_t>(0, 3) : size_value(in, 300);
  p.head_offset = size_value(in, 300);
  p.form = static_cast<posenc::alibi_form>(in.byte() % 3);
  p.max_bias = in.flag() ? 8.0 : in.parameter();
  const bool bad_enum = p.form != posenc::alibi_form::causal && p.form != posenc::alibi_form::symmetric;
  try {
    const posenc::alibi<float> a(p);
    if (bad_enum) fail("alibi_params.form: an enum value out of range was accepted");
    for (index_t h = 0; h + p.head_offset < p.num_heads && h < 400; ++h) {
      const double s = a.slope(h);
      if (!(s >= 0 && s <= 1)) fail("alibi slope %td of %td heads = %.17g", h, p.num_heads, s);
      // Any two int64 positions: the exact distance, rounded once to double, times the slope.
      const position q = in.flag() ? static_cast<position>(in.bits(8)) : in.position_value(int_max);
      const position k = in.flag() ? static_cast<position>(in.bits(8)) : in.position_value(int_max);
      int128 d = static_cast<int128>(q) - k;
      if (p.form == posenc::alibi_form::symmetric && d < 0) d = -d;
      const double want = -(s * static_cast<double>(d));
      const double b = a.bias(h, q, k);
      if (!(b == want)) fail("alibi bias(q %lld, k %lld) = %.17g, formula %.17g", (long long)q, (long long)k, b, want);
    }
  } catch (const std::invalid_argument& e) {
    posenc_fuzz::check_invalid_message(e);
  } catch (const std::length_error&) {
    if (p.num_heads < (index_t{1} << 40)) fail("alibi: length_error for %td heads", p.num_heads);
  }
}

void t5_case(reader& in) {
  posenc::t5_bias_params p;
  p.num_heads = size_value(in, 12);
  p.num_buckets = size_value(in, 400);
  p.max_distance = length_value(in);
  p.bidirectional = in.flag();
  p.head_offset = size_value(in, 12);
  const index_t rows = in.flag() ? p.num_buckets : in.in_range<index_t>(0, 8);
  const index_t cols = in.flag() ? p.num_heads : in.in_range<index_t>(0, 8);
  posenc::row_matrix<float> table = posenc::row_matrix<float>::Constant(std::clamp<index_t>(rows, 0, 400),
                                                                        std::clamp<index_t>(cols, 0, 12), 1.0f);
  const position rel[] = {0, 1, -1, int_max, int_min, int_min + 1, p.max_distance, p.max_distance > int_min ? -p.max_distance : 0,
                          in.position_value(int_max), static_cast<position>(in.bits(8))};
  expect_valid_or_invalid([&] {
    const posenc::t5_relative_bias<float> t(p, table);
    for (position r : rel) {
      const index_t b = t.bucket(r);
      if (b < 0 || b >= p.num_buckets) fail("t5 bucket(%lld) = %td of %td", (long long)r, b, p.num_buckets);
      const index_t slow = posenc::t5_relative_bias<float>::bucket(r, p.num_buckets, p.max_distance, p.bidirectional);
      if (slow != b) fail("t5 bucket(%lld): lookup %td, formula %td", (long long)r, b, slow);
    }
  });
}

void sinusoidal_case(reader& in) {
  posenc::sinusoidal_params p;
  p.dim = size_value(in, 600);
  p.base = in.flag() ? 10000.0 : in.parameter();
  p.layout = static_cast<posenc::sinusoidal_layout>(in.byte() % 3);
  p.shifted_denominator = in.flag();
  p.position_offset = length_value(in);
  const position pos[] = {0, int_max, int_min, in.position_value(int_max)};
  const bool bad_enum =
      p.layout != posenc::sinusoidal_layout::interleaved && p.layout != posenc::sinusoidal_layout::concatenated;
  expect_valid_or_invalid(
      [&] {
        const posenc::sinusoidal<float> s(p);
        const auto table = s.table(posenc::positions(pos));
        for (index_t i = 0; i < table.size(); ++i)
          if (!(std::abs(table.data()[i]) <= 1.0f)) fail("sinusoidal value %.9g", double(table.data()[i]));
        // Column 0 is sin((p + offset) * 1): the exact sum rounded once.
        for (index_t i = 0; i < table.rows(); ++i) {
          const double angle = static_cast<double>(static_cast<int128>(pos[i]) + p.position_offset);
          if (!(table(i, 0) == static_cast<float>(std::sin(angle))))
            fail("sinusoidal (%lld + offset %lld): %.9g, formula %.9g", (long long)pos[i], (long long)p.position_offset,
                 double(table(i, 0)), std::sin(angle));
        }
      },
      bad_enum, "sinusoidal_params.layout");
}

void shaw_case(reader& in) {
  posenc::shaw_params p;
  p.head_dim = size_value(in, 16);
  p.max_relative_position = in.byte() % 8 == 0 ? int_max - in.in_range<index_t>(0, 2) : size_value(in, 40);
  const index_t rows = std::clamp<index_t>(in.flag() ? 2 * std::clamp<index_t>(p.max_relative_position, 0, 40) + 1
                                                     : in.in_range<index_t>(0, 9),
                                           0, 81);
  const index_t cols = std::clamp<index_t>(in.flag() ? p.head_dim : in.in_range<index_t>(0, 9), 0, 16);
  const posenc::row_matrix<float> table = posenc::row_matrix<float>::Constant(rows, cols, 0.25f);
  expect_valid_or_invalid([&] {
    const posenc::shaw_relative<float> s(p, table, table);
    const position q = in.position_value(position{1} << 61), k = in.position_value(position{1} << 61);
    const index_t r = s.relative_index(q, k);
    if (r < 0 || r > 2 * p.max_relative_position) fail("shaw relative_index = %td", r);
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reader in(data, size);
  switch (in.byte() % 5) {
    case 0: rope_case(in); break;
    case 1: alibi_case(in); break;
    case 2: t5_case(in); break;
    case 3: sinusoidal_case(in); break;
    default: shaw_case(in); break;
  }
  return 0;
}
