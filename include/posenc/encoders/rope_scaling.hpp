// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/rope_scaling.hpp
/// Frequency policies of RoPE: how a context-extension method changes the inverse-frequency
/// table `inv_freq[i] = base^(-2i/r)` (`i < r/2`, `r` the rotary dimension) and the magnitude
/// that multiplies cos and sin. Each policy is a plain aggregate with a default for every field;
/// `rope_scaling` is the variant `rope_params` holds.
///
/// | policy                | table                                                     | magnitude                   |
/// |-----------------------|-----------------------------------------------------------|-----------------------------|
/// | `no_scaling`          | `base^(-2i/r)`                                            | 1                           |
/// | `linear_scaling`      | `inv / s` (positions `pos / s`)                            | 1                           |
/// | `ntk_aware_scaling`   | base becomes `base * alpha^(r/(r-2))`                      | 1                           |
/// | `dynamic_ntk_scaling` | base becomes `base * (s L/L0 - (s-1))^(r/(r-2))` if `L > L0` | 1                         |
/// | `yarn_scaling`        | ramp between `inv` and `inv / s` over a pair range         | `0.1 ln s + 1`              |
/// | `llama3_scaling`      | keep / divide / blend by wavelength                        | 1                           |
/// | `longrope_scaling`    | `1 / (f_i base^(2i/r))`, short or long factor list         | `sqrt(1 + ln s / ln L0)`    |
///
/// The formulas follow the Hugging Face transformers conventions (`modeling_rope_utils.py`);
/// docs/rope_scaling.md states them. Tables are evaluated in `long double`, so angles stay accurate for
/// positions far past 2^24 (see `rope`).

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/cpu.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Plain RoPE (Su et al. 2021): `inv_freq[i] = base^(-2i/r)`.
struct no_scaling {};

/// Linear position interpolation (Chen et al. 2023): `inv_freq / factor`, the same as rotating
/// by `pos / factor`. HF `rope_type = "linear"`.
struct linear_scaling {
  double factor = 1.0;  ///< `s > 0`; a model trained on `L0` tokens reads `s * L0`
};

/// NTK-aware scaling (bloc97, 2023): the base becomes `base * alpha^(r/(r-2))`, stretching low
/// frequencies more than high ones. Needs `r > 2`. HF `rope_type = "ntk"` (its `factor` is `alpha`).
struct ntk_aware_scaling {
  double alpha = 1.0;  ///< `> 0`
};

/// Dynamic NTK scaling (emozilla, 2023): for a sequence of `L > L0` tokens the base becomes
/// `base * (s L / L0 - (s - 1))^(r/(r-2))`; for `L <= L0` the table is the plain one.
///
/// The table depends on `sequence_length`, which is explicit: a `rope` built for one length keeps
/// its table, and keys already rotated and cached with it go stale if the caller rebuilds the
/// encoder for a longer sequence. HF `rope_type = "dynamic"`.
struct dynamic_ntk_scaling {
  double factor = 1.0;                    ///< `s > 0`
  position original_max_position = 2048;  ///< `L0 > 0`, the trained context length
  position sequence_length = 0;           ///< `L >= 0` the table is for; `L <= L0` (and 0) means the plain table
};

/// YaRN (Peng et al. 2023): pairs that turn fewer than `beta_slow` times over `L0` tokens are
/// interpolated (`inv / s`), pairs that turn more than `beta_fast` times are kept, and a linear
/// ramp blends the pairs between. With `c(n) = r ln(L0 / (2 pi n)) / (2 ln base)`:
/// `low = floor(c(beta_fast))`, `high = ceil(c(beta_slow))` (no rounding when `truncate` is false),
/// clamped to `[0, r - 1]`, `high += 0.001` if they are equal;
/// `ramp_i = clamp((i - low) / (high - low), 0, 1)`, `inv_i = (inv_i / s) ramp_i + inv_i (1 - ramp_i)`.
/// Magnitude: `0.1 ln s + 1` (1 for `s <= 1`); when both `mscale` and `mscale_all_dim` are set
/// (non-zero), `(0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1)` (DeepSeek-V2/V3), as HF does.
/// Needs `base > 1` and a non-empty range after clamping (`low <= high`). HF `rope_type = "yarn"`.
struct yarn_scaling {
  double factor = 1.0;                    ///< `s > 0`
  position original_max_position = 4096;  ///< `L0 > 0`
  double beta_fast = 32;                  ///< `> beta_slow`
  double beta_slow = 1;                   ///< `> 0`
  double mscale = 0;                      ///< `>= 0`; 0 = unset, as in HF
  double mscale_all_dim = 0;              ///< `>= 0`; 0 = unset, as in HF
  bool truncate = true;                   ///< floor/ceil the correction range (HF default)
};

/// Llama 3.1 scaling: with wavelength `w_i = 2 pi / inv_i`, keep `inv_i` when
/// `w_i < L0 / high_freq_factor`, use `inv_i / factor` when `w_i > L0 / low_freq_factor`, else blend
/// with `t = (L0 / w_i - low) / (high - low)`: `(1 - t) inv_i / factor + t inv_i`.
/// HF `rope_type = "llama3"`. Equal band factors (Llama 4 Scout: low = high = 1) leave no band to
/// blend: `inv_i / factor` above `L0 / low`, `inv_i` at or below it.
struct llama3_scaling {
  double factor = 8;                      ///< `> 0`
  double low_freq_factor = 1;             ///< `> 0`
  double high_freq_factor = 4;            ///< `>= low_freq_factor`
  position original_max_position = 8192;  ///< `L0 > 0`
};

/// How LongRoPE picks between its short and long factor lists.
enum class longrope_choice {
  /// The long list when `sequence_length > original_max_position`, else the short list (HF's
  /// behaviour). Keys rotated and cached with the short list go stale when a longer sequence
  /// makes the caller rebuild the encoder with the long list.
  per_length,
  /// Always the long list, whatever the length: cached keys never go stale.
  fixed_long,
};

/// LongRoPE (Ding et al. 2024; Phi-3): `inv_i = 1 / (f_i base^(2i/r))` with per-pair factors `f`
/// (`r/2` entries, each `> 0`) from the short or the long list, chosen by `choice`.
/// Magnitude `sqrt(1 + ln s / ln L0)` (1 for `s <= 1`), where the scale `s` is `factor` when set,
/// else `max_position / original_max_position` when `max_position` is set, else 1.
/// HF `rope_type = "longrope"`.
struct longrope_scaling {
  std::vector<double> short_factor;       ///< `r/2` factors for short sequences
  std::vector<double> long_factor;        ///< `r/2` factors for long sequences
  position original_max_position = 4096;  ///< `L0 > 1`
  position max_position = 0;              ///< extended context length; 0 = unset
  longrope_choice choice = longrope_choice::per_length;
  position sequence_length = 0;  ///< the length the table is for (`per_length`); `>= 0`
  double factor = 0;             ///< the scale `s`, if given directly; 0 = unset. Must agree with
                                 ///< `max_position / original_max_position` when both are set
};

/// One frequency policy. `no_scaling` is plain RoPE.
using rope_scaling = std::variant<no_scaling, linear_scaling, ntk_aware_scaling, dynamic_ntk_scaling, yarn_scaling,
                                  llama3_scaling, longrope_scaling>;

/// Which dimensions of a head form the rotated pairs (`r` = rotary dim, `c`/`s` = cos/sin of
/// pair `i`'s angle):
///
///     half_split  (GPT-NeoX, LLaMA): pairs (i, i + r/2)  cos [c0 c1 .. | c0 c1 ..]  sin [s0 s1 .. | s0 s1 ..]
///     interleaved (GPT-J, RoFormer): pairs (2i, 2i + 1)  cos [c0 c0 c1 c1 ..]       sin [s0 s0 s1 s1 ..]
///
/// The two agree after permuting the head's first `r` dimensions (interleaved dim `2i` is
/// half-split dim `i`, `2i + 1` is `i + r/2`).
enum class rope_layout {
  half_split,   ///< `[c c s s]`: pair `i` is `(i, i + r/2)`
  interleaved,  ///< `[c s c s]`: pair `i` is `(2i, 2i + 1)`
};

/// Parameters of a `rope`. Every field has a default; designated initializers read like the
/// paper: `posenc::rope<float> r({.head_dim = 128, .base = 5e5, .scaling = posenc::llama3_scaling{}});`
struct rope_params {
  index_t head_dim = 128;                        ///< dims per head, `> 0`
  index_t rotary_dim = 0;                        ///< `r`: rotated dims per head, even, `<= head_dim`; 0 = head_dim.
                                                 ///< Dims `[r, head_dim)` pass through (partial rotary)
  rope_layout layout = rope_layout::half_split;  ///< which dims pair up
  double base = 10000.0;                         ///< `theta` of `inv_freq[i] = base^(-2i/r)`, `> 0`
  rope_scaling scaling = no_scaling{};           ///< the frequency policy
  std::optional<double> attention_factor = {};   ///< if set (`> 0`), overrides the policy's magnitude
};

/// The YaRN pair range: pairs below `low` are kept, pairs above `high` are interpolated.
struct yarn_correction {
  double low = 0;
  double high = 0;
};

namespace detail {

/// Names a field in error messages: `yarn_scaling.beta_fast` for the C++ aggregates,
/// `rope_scaling.beta_fast` (HF names) when the values came from a config dict.
struct field_namer {
  bool hf = false;
  std::string operator()(std::string_view aggregate, std::string_view ours, std::string_view theirs) const {
    return hf ? "rope_scaling." + std::string(theirs) : std::string(aggregate) + "." + std::string(ours);
  }
};

inline bool positive_finite(double v) { return std::isfinite(v) && v > 0; }

inline void validate_policy(const no_scaling&, field_namer) {}

inline void validate_policy(const linear_scaling& s, field_namer n) {
  require(positive_finite(s.factor), n("linear_scaling", "factor", "factor"), s.factor, "must be finite and > 0");
}

inline void validate_policy(const ntk_aware_scaling& s, field_namer n) {
  require(positive_finite(s.alpha), n("ntk_aware_scaling", "alpha", "factor"), s.alpha, "must be finite and > 0");
}

inline void validate_policy(const dynamic_ntk_scaling& s, field_namer n) {
  const char* a = "dynamic_ntk_scaling";
  require(positive_finite(s.factor), n(a, "factor", "factor"), s.factor, "must be finite and > 0");
  require(s.original_max_position > 0, n(a, "original_max_position", "original_max_position_embeddings"),
          s.original_max_position, "must be > 0");
  require(s.sequence_length >= 0, n(a, "sequence_length", "sequence_length"), s.sequence_length, "must be >= 0");
}

inline void validate_policy(const yarn_scaling& s, field_namer n) {
  const char* a = "yarn_scaling";
  require(positive_finite(s.factor), n(a, "factor", "factor"), s.factor, "must be finite and > 0");
  require(s.original_max_position > 0, n(a, "original_max_position", "original_max_position_embeddings"),
          s.original_max_position, "must be > 0");
  require(positive_finite(s.beta_slow), n(a, "beta_slow", "beta_slow"), s.beta_slow, "must be finite and > 0");
  require(std::isfinite(s.beta_fast) && s.beta_fast > s.beta_slow, n(a, "beta_fast", "beta_fast"), s.beta_fast,
          "must be finite and > beta_slow = " + to_text(s.beta_slow));
  require(std::isfinite(s.mscale) && s.mscale >= 0, n(a, "mscale", "mscale"), s.mscale, "must be finite and >= 0");
  require(std::isfinite(s.mscale_all_dim) && s.mscale_all_dim >= 0, n(a, "mscale_all_dim", "mscale_all_dim"),
          s.mscale_all_dim, "must be finite and >= 0");
}

inline void validate_policy(const llama3_scaling& s, field_namer n) {
  const char* a = "llama3_scaling";
  require(positive_finite(s.factor), n(a, "factor", "factor"), s.factor, "must be finite and > 0");
  require(positive_finite(s.low_freq_factor), n(a, "low_freq_factor", "low_freq_factor"), s.low_freq_factor,
          "must be finite and > 0");
  require(std::isfinite(s.high_freq_factor) && s.high_freq_factor >= s.low_freq_factor,
          n(a, "high_freq_factor", "high_freq_factor"), s.high_freq_factor,
          "must be finite and >= low_freq_factor = " + to_text(s.low_freq_factor));
  require(s.original_max_position > 0, n(a, "original_max_position", "original_max_position_embeddings"),
          s.original_max_position, "must be > 0");
}

inline void validate_factor_list(const std::vector<double>& f, const std::string& name) {
  for (std::size_t i = 0; i < f.size(); ++i) {
    require(positive_finite(f[i]), name + "[" + std::to_string(i) + "]", f[i], "must be finite and > 0");
  }
}

inline void validate_policy(const longrope_scaling& s, field_namer n) {
  const char* a = "longrope_scaling";
  validate_factor_list(s.short_factor, n(a, "short_factor", "short_factor"));
  validate_factor_list(s.long_factor, n(a, "long_factor", "long_factor"));
  require(s.original_max_position > 1, n(a, "original_max_position", "original_max_position_embeddings"),
          s.original_max_position, "must be > 1");
  require(s.max_position >= 0, n(a, "max_position", "max_position_embeddings"), s.max_position, "must be >= 0");
  require(s.sequence_length >= 0, n(a, "sequence_length", "sequence_length"), s.sequence_length, "must be >= 0");
  require(std::isfinite(s.factor) && s.factor >= 0, n(a, "factor", "factor"), s.factor,
          "must be finite and > 0 (or 0 for unset)");
  require(s.choice == longrope_choice::per_length || s.choice == longrope_choice::fixed_long, n(a, "choice", "choice"),
          static_cast<int>(s.choice), "unknown longrope_choice");
  if (s.factor > 0 && s.max_position > 0) {
    const double implied = double(s.max_position) / double(s.original_max_position);
    require(std::abs(s.factor - implied) <= 1e-12 * implied, n(a, "factor", "factor"), s.factor,
            "disagrees with max_position / original_max_position = " + to_text(implied));
  }
}

/// Rejects values of a policy that make its formula meaningless; `n` picks the field names.
inline void validate_policy(const rope_scaling& s, field_namer n = {}) {
  std::visit([&](const auto& p) { validate_policy(p, n); }, s);
}

/// YaRN's `get_mscale`: `0.1 m ln s + 1`, or 1 for `s <= 1`.
POSENC_STRICT_FP inline double yarn_get_mscale(double s, double m) {
  POSENC_STRICT_FP_BODY
  return s <= 1 ? 1.0 : 0.1 * m * std::log(s) + 1.0;
}

}  // namespace detail

/// The YaRN correction range `[low, high]` (pair indices) for rotary dimension `rotary_dim` and
/// `base`: `c(n) = r ln(L0 / (2 pi n)) / (2 ln base)`, `low = floor(c(beta_fast))`,
/// `high = ceil(c(beta_slow))` (unrounded when `!s.truncate`), clamped to `[0, r - 1]`. The ramp's
/// `+0.001` for `low == high` is not applied here. Evaluated in double, like HF.
/// Throws `std::invalid_argument` for invalid parameters.
POSENC_STRICT_FP inline yarn_correction yarn_correction_range(const yarn_scaling& s, index_t rotary_dim, double base) {
  POSENC_STRICT_FP_BODY
  detail::validate_policy(s, {});
  detail::require(rotary_dim > 0, "rotary_dim", rotary_dim, "must be > 0");
  detail::require(std::isfinite(base) && base > 1, "rope_params.base", base, "YaRN needs a finite base > 1");
  const double r = double(rotary_dim);
  const double pi = 3.14159265358979323846;
  const double l0 = double(s.original_max_position);
  const double log_base = std::log(base);
  double low = r * std::log(l0 / (s.beta_fast * 2 * pi)) / (2 * log_base);
  double high = r * std::log(l0 / (s.beta_slow * 2 * pi)) / (2 * log_base);
  if (s.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  return {std::max(low, 0.0), std::min(high, r - 1)};
}

/// YaRN's magnitude (multiplies cos and sin): `0.1 ln s + 1` (1 for `s <= 1`), or
/// `(0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1)` when both are set.
POSENC_STRICT_FP inline double yarn_magnitude(const yarn_scaling& s) {
  POSENC_STRICT_FP_BODY
  detail::validate_policy(s, {});
  if (s.mscale != 0 && s.mscale_all_dim != 0) {
    return detail::yarn_get_mscale(s.factor, s.mscale) / detail::yarn_get_mscale(s.factor, s.mscale_all_dim);
  }
  return detail::yarn_get_mscale(s.factor, 1.0);
}

/// The scale `s` of a LongRoPE policy: `factor` if set, else `max_position / original_max_position`
/// if `max_position` is set, else 1.
inline double longrope_scale(const longrope_scaling& s) {
  if (s.factor > 0) return s.factor;
  if (s.max_position > 0) return double(s.max_position) / double(s.original_max_position);
  return 1.0;
}

/// LongRoPE's magnitude: `sqrt(1 + ln s / ln L0)`, 1 for `s <= 1`.
POSENC_STRICT_FP inline double longrope_magnitude(const longrope_scaling& s) {
  POSENC_STRICT_FP_BODY
  detail::validate_policy(s, {});
  const double scale = longrope_scale(s);
  if (scale <= 1) return 1.0;
  return std::sqrt(1 + std::log(scale) / std::log(double(s.original_max_position)));
}

/// The base dynamic NTK uses for `s.sequence_length`: `base * (s L / L0 - (s - 1))^(r/(r-2))` when
/// `L > L0`, else `base`. Needs `rotary_dim > 2`.
POSENC_STRICT_FP inline double dynamic_ntk_base(const dynamic_ntk_scaling& s, index_t rotary_dim, double base) {
  POSENC_STRICT_FP_BODY
  detail::validate_policy(s, {});
  detail::require(rotary_dim > 2, "rope_params.rotary_dim", rotary_dim,
                  "dynamic NTK's exponent r/(r-2) needs rotary_dim > 2");
  if (s.sequence_length <= s.original_max_position) return base;
  const long double r = static_cast<long double>(rotary_dim);
  const long double f = s.factor;
  const long double ratio =
      f * static_cast<long double>(s.sequence_length) / static_cast<long double>(s.original_max_position) - (f - 1);
  return static_cast<double>(base * std::pow(ratio, r / (r - 2)));
}

/// The base NTK-aware scaling uses: `base * alpha^(r/(r-2))`. Needs `rotary_dim > 2`.
POSENC_STRICT_FP inline double ntk_aware_base(const ntk_aware_scaling& s, index_t rotary_dim, double base) {
  POSENC_STRICT_FP_BODY
  detail::validate_policy(s, {});
  detail::require(rotary_dim > 2, "rope_params.rotary_dim", rotary_dim,
                  "NTK-aware exponent r/(r-2) needs rotary_dim > 2");
  const long double r = static_cast<long double>(rotary_dim);
  return static_cast<double>(base * std::pow(static_cast<long double>(s.alpha), r / (r - 2)));
}

/// The short name of a policy, for reports: "none", "linear", "ntk", "dynamic-ntk", "yarn",
/// "llama3", "longrope".
inline std::string_view scaling_name(const rope_scaling& s) {
  constexpr std::string_view names[] = {"none", "linear", "ntk", "dynamic-ntk", "yarn", "llama3", "longrope"};
  return names[s.index()];
}

namespace detail {

/// The frequency table of a policy, in long double, and its magnitude.
struct rope_frequencies {
  std::vector<long double> inv;  ///< r/2 entries
  double magnitude = 1.0;
};

/// The plain table `base^(-2i/r)`, `i < r/2`, in long double.
POSENC_STRICT_FP inline std::vector<long double> plain_table(long double base, index_t r) {
  POSENC_STRICT_FP_BODY
  std::vector<long double> inv(static_cast<std::size_t>(r / 2));
  for (index_t i = 0; i < r / 2; ++i) {
    inv[static_cast<std::size_t>(i)] = std::pow(base, -static_cast<long double>(2 * i) / static_cast<long double>(r));
  }
  return inv;
}

// One function per policy (not a generic lambda: g++'s optimize attribute, which keeps FMA
// contraction out, does not reach into lambdas).

inline rope_frequencies policy_table(const no_scaling&, index_t r, double base) { return {plain_table(base, r), 1.0}; }

POSENC_STRICT_FP inline rope_frequencies policy_table(const linear_scaling& p, index_t r, double base) {
  POSENC_STRICT_FP_BODY
  rope_frequencies out{plain_table(base, r), 1.0};
  for (auto& v : out.inv) v /= static_cast<long double>(p.factor);
  return out;
}

POSENC_STRICT_FP inline rope_frequencies policy_table(const ntk_aware_scaling& p, index_t r, double base) {
  POSENC_STRICT_FP_BODY
  require(r > 2, "rope_params.rotary_dim", r, "NTK-aware exponent r/(r-2) needs rotary_dim > 2");
  const long double rr = static_cast<long double>(r);
  return {plain_table(base * std::pow(static_cast<long double>(p.alpha), rr / (rr - 2)), r), 1.0};
}

POSENC_STRICT_FP inline rope_frequencies policy_table(const dynamic_ntk_scaling& p, index_t r, double base) {
  POSENC_STRICT_FP_BODY
  require(r > 2, "rope_params.rotary_dim", r, "dynamic NTK's exponent r/(r-2) needs rotary_dim > 2");
  using real = long double;
  const real rr = static_cast<real>(r);
  real b = base;
  if (p.sequence_length > p.original_max_position) {
    const real f = p.factor;
    b *= std::pow(f * static_cast<real>(p.sequence_length) / static_cast<real>(p.original_max_position) - (f - 1),
                  rr / (rr - 2));
  }
  return {plain_table(b, r), 1.0};
}

POSENC_STRICT_FP inline rope_frequencies policy_table(const yarn_scaling& p, index_t r, double base) {
  POSENC_STRICT_FP_BODY
  using real = long double;
  const yarn_correction c = yarn_correction_range(p, r, base);
  // Clamping can leave high < low (an original length so short, or so long, for this base and
  // rotary dim that every pair falls on one side); HF would then ramp backwards.
  require(c.low <= c.high, "yarn_scaling.original_max_position", p.original_max_position,
          "gives an empty YaRN correction range [" + to_text(c.low) + ", " + to_text(c.high) + "] for base " +
              to_text(base) + " and rotary_dim " + std::to_string(r));
  const real low = c.low;
  const real high = c.low == c.high ? static_cast<real>(c.high) + 0.001L : static_cast<real>(c.high);
  rope_frequencies out{plain_table(base, r), yarn_magnitude(p)};
  for (std::size_t i = 0; i < out.inv.size(); ++i) {
    const real ramp = std::clamp((static_cast<real>(i) - low) / (high - low), real(0), real(1));
    real& v = out.inv[i];
    v = (v / static_cast<real>(p.factor)) * ramp + v * (1 - ramp);
  }
  return out;
}

POSENC_STRICT_FP inline rope_frequencies policy_table(const llama3_scaling& p, index_t r, double base) {
  POSENC_STRICT_FP_BODY
  using real = long double;
  constexpr real two_pi = 6.283185307179586476925286766559005768L;
  const real l0 = static_cast<real>(p.original_max_position);
  const real lo = p.low_freq_factor;
  const real hi = p.high_freq_factor;
  const real s = p.factor;
  rope_frequencies out{plain_table(base, r), 1.0};
  for (auto& v : out.inv) {
    const real w = two_pi / v;
    if (w > l0 / lo) {
      v /= s;  // long wavelength: interpolate
    } else if (!(w < l0 / hi) && hi > lo) {
      const real t = (l0 / w - lo) / (hi - lo);
      v = (1 - t) * v / s + t * v;  // between: blend
    }                               // short wavelength: keep
  }
  return out;
}

POSENC_STRICT_FP inline rope_frequencies policy_table(const longrope_scaling& p, index_t r, double base) {
  POSENC_STRICT_FP_BODY
  const auto want = static_cast<std::size_t>(r / 2);
  require(p.short_factor.size() == want, "longrope_scaling.short_factor",
          std::to_string(p.short_factor.size()) + " entries",
          "must have rotary_dim/2 = " + std::to_string(want) + " entries");
  require(p.long_factor.size() == want, "longrope_scaling.long_factor",
          std::to_string(p.long_factor.size()) + " entries",
          "must have rotary_dim/2 = " + std::to_string(want) + " entries");
  const bool use_long = p.choice == longrope_choice::fixed_long || p.sequence_length > p.original_max_position;
  const auto& f = use_long ? p.long_factor : p.short_factor;
  rope_frequencies out{plain_table(base, r), longrope_magnitude(p)};
  for (std::size_t i = 0; i < want; ++i) out.inv[i] /= static_cast<long double>(f[i]);
  return out;
}

/// Validates `scaling` against the rotary dimension `r` and `base`, and evaluates its table.
/// Throws `std::invalid_argument` naming the offending field.
inline rope_frequencies compute_frequencies(const rope_scaling& scaling, index_t r, double base) {
  validate_policy(scaling, {});
  return std::visit([&](const auto& p) { return policy_table(p, r, base); }, scaling);
}

}  // namespace detail
}  // namespace posenc
