// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/hf_config.hpp
/// Reading a Hugging Face style `rope_scaling` dict (the JSON object in a model's
/// `config.json`) into a RoPE frequency policy.
///
/// The dict is given as a `config_map` from field name to value; the caller turns its JSON into
/// one (posenc has no JSON dependency). Field names and defaults follow transformers'
/// `modeling_rope_utils.py`:
///
/// `rope_type` (or the older `type`), and the fields each type reads:
/// - `default`: none.
/// - `linear`: `factor`.
/// - `ntk`: `factor` (the NTK `alpha`).
/// - `dynamic`: `factor`; `original_max_position_embeddings`, else `max_position_embeddings`;
///   optional `sequence_length` (posenc's; default 0, the plain table).
/// - `yarn`: `factor`; `original_max_position_embeddings`, else `max_position_embeddings`;
///   optional `beta_fast`, `beta_slow`, `mscale`, `mscale_all_dim`, `truncate`.
/// - `llama3`: `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`.
/// - `longrope`: `short_factor`, `long_factor`; `original_max_position_embeddings`, else
///   `max_position_embeddings`; optional `factor`, `max_position_embeddings` (with an original
///   length: the extended one), and posenc's `sequence_length` and `choice` (`"per_length"`,
///   `"fixed_long"`).
///
/// Every type also takes `attention_factor` (the magnitude, read by `rope_params_from_config`) and
/// `rope_theta` (the base, likewise). Integers are accepted where numbers are expected. Fields a
/// type does not use are ignored, as HF does. As in HF, a zero `beta_fast` / `beta_slow` means the
/// default (32 / 1). An unknown type, a missing required field, a value of the wrong type or out
/// of range throws `std::invalid_argument` naming the field (`rope_scaling.factor = -1: ...`).

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/encoders/rope_scaling.hpp"

namespace posenc {

/// One value of a config dict: a JSON boolean, integer, number, string or list of numbers.
using config_value = std::variant<bool, std::int64_t, double, std::string, std::vector<double>>;

/// A config dict: field name to value (`{"rope_type": "yarn", "factor": 4.0, ...}`).
using config_map = std::map<std::string, config_value, std::less<>>;

namespace detail {

/// The name of field `key` of the dict `dict` in error messages ("rope_scaling.factor").
inline std::string config_field(std::string_view key, std::string_view dict = "rope_scaling") {
  return std::string(dict) + "." + std::string(key);
}

/// `s` in double quotes for an error message, bytes outside printable ASCII written as `\xNN`
/// (a NUL would otherwise cut the message short, and a control byte garble a log).
inline std::string config_quoted(std::string_view s) {
  std::string out(1, '"');
  for (const char ch : s) {
    const auto u = static_cast<unsigned char>(ch);
    if (u >= 0x20 && u < 0x7f && ch != '\\') {
      out.append(1, ch);
    } else {
      constexpr char hex[] = "0123456789abcdef";
      out.append("\\x").append(1, hex[u >> 4]).append(1, hex[u & 15]);
    }
  }
  out.append(1, '"');
  return out;
}

/// The value as text, for error messages.
inline std::string config_text(const config_value& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using X = std::remove_cvref_t<decltype(x)>;
        // Built with append: g++ 12 at -O3 warns (-Wrestrict, a false positive) on
        // `"literal" + std::string` here.
        std::string out;
        if constexpr (std::same_as<X, std::string>) {
          return config_quoted(x);
        } else if constexpr (std::same_as<X, std::vector<double>>) {
          out.append(1, '[').append(std::to_string(x.size())).append(" numbers]");
          return out;
        } else {
          return to_text(x);
        }
      },
      v);
}

inline const config_value* config_find(const config_map& m, std::string_view key) {
  auto it = m.find(key);
  return it == m.end() ? nullptr : &it->second;
}

[[noreturn]] inline void config_missing(std::string_view key, std::string_view type) {
  invalid(config_field(key), std::string_view("(missing)"), "required for rope_type \"" + std::string(type) + "\"");
}

/// A number field (an integer or a double), if present; errors name it as a field of `dict`.
inline std::optional<double> config_number(const config_map& m, std::string_view key,
                                           std::string_view dict = "rope_scaling") {
  const config_value* v = config_find(m, key);
  if (!v) return std::nullopt;
  if (const auto* d = std::get_if<double>(v)) return *d;
  if (const auto* i = std::get_if<std::int64_t>(v)) return static_cast<double>(*i);
  invalid(config_field(key, dict), config_text(*v), "must be a number");
}

inline double config_required_number(const config_map& m, std::string_view key, std::string_view type) {
  auto v = config_number(m, key);
  if (!v) config_missing(key, type);
  return *v;
}

/// A whole-number field (an integer, or a double with an integral value), if present; errors name
/// it as a field of `dict`.
inline std::optional<position> config_integer(const config_map& m, std::string_view key,
                                              std::string_view dict = "rope_scaling") {
  const config_value* v = config_find(m, key);
  if (!v) return std::nullopt;
  if (const auto* i = std::get_if<std::int64_t>(v)) return *i;
  if (const auto* d = std::get_if<double>(v)) {
    require(std::isfinite(*d) && std::floor(*d) == *d && std::abs(*d) < 9.0e18, config_field(key, dict), *d,
            "must be a whole number");
    return static_cast<position>(*d);
  }
  invalid(config_field(key, dict), config_text(*v), "must be an integer");
}

inline std::optional<bool> config_bool(const config_map& m, std::string_view key) {
  const config_value* v = config_find(m, key);
  if (!v) return std::nullopt;
  if (const auto* b = std::get_if<bool>(v)) return *b;
  invalid(config_field(key), config_text(*v), "must be true or false");
}

inline std::vector<double> config_required_list(const config_map& m, std::string_view key, std::string_view type) {
  const config_value* v = config_find(m, key);
  if (!v) config_missing(key, type);
  if (const auto* l = std::get_if<std::vector<double>>(v)) return *l;
  invalid(config_field(key), config_text(*v), "must be a list of numbers");
}

/// `original_max_position_embeddings`, falling back to `max_position_embeddings` (HF reads the
/// model's `max_position_embeddings` when the dict has no original length). A fallback value is
/// checked here (`> must_exceed`), so that an error names the field the dict has.
inline position config_original_length(const config_map& m, std::string_view type, position must_exceed) {
  if (auto v = config_integer(m, "original_max_position_embeddings")) return *v;
  if (auto v = config_integer(m, "max_position_embeddings")) {
    require(*v > must_exceed, config_field("max_position_embeddings"), *v, "must be > " + to_text(must_exceed));
    return *v;
  }
  config_missing("original_max_position_embeddings", type);
}

/// LongRoPE's lists against the rotary dim of `p` (one factor per rotated pair), named as in the
/// dict. A rotary dim that is itself invalid is left to the `rope` constructor.
inline void config_longrope_lengths(const longrope_scaling& l, const rope_params& p) {
  const index_t r = p.rotary_dim == 0 ? p.head_dim : p.rotary_dim;
  if (p.head_dim <= 0 || r <= 0 || r % 2 != 0 || r > p.head_dim) return;
  const auto want = static_cast<std::size_t>(r / 2);
  const auto check = [&](std::string_view key, const std::vector<double>& list) {
    require(list.size() == want, config_field(key), std::to_string(list.size()) + " entries",
            "must have rotary_dim/2 = " + std::to_string(want) + " entries");
  };
  check("short_factor", l.short_factor);
  check("long_factor", l.long_factor);
}

}  // namespace detail

/// Reads a Hugging Face style `rope_scaling` dict into a frequency policy (see the file comment
/// for the fields of each type). Validates the values with the dict's field names.
/// Throws `std::invalid_argument` for an unknown or missing `rope_type`, a missing required field,
/// a value of the wrong type, or a value out of range. Allocates (LongRoPE's lists).
inline rope_scaling rope_scaling_from_config(const config_map& m) {
  using namespace detail;
  const config_value* tv = config_find(m, "rope_type");
  std::string_view type_key = "rope_type";
  if (!tv) {
    tv = config_find(m, "type");
    type_key = "type";
  }
  if (!tv) invalid(config_field("rope_type"), std::string_view("(missing)"), "required (or the older \"type\")");
  const auto* tp = std::get_if<std::string>(tv);
  if (!tp) invalid(config_field(type_key), config_text(*tv), "must be a string");
  const std::string& type = *tp;

  if (auto af = config_number(m, "attention_factor")) {
    require(positive_finite(*af), config_field("attention_factor"), *af, "must be finite and > 0");
  }
  if (auto theta = config_number(m, "rope_theta")) {
    require(positive_finite(*theta), config_field("rope_theta"), *theta, "must be finite and > 0");
  }

  rope_scaling out;
  if (type == "default") {
    out = no_scaling{};
  } else if (type == "linear") {
    out = linear_scaling{.factor = config_required_number(m, "factor", type)};
  } else if (type == "ntk") {
    out = ntk_aware_scaling{.alpha = config_required_number(m, "factor", type)};
  } else if (type == "dynamic") {
    out = dynamic_ntk_scaling{.factor = config_required_number(m, "factor", type),
                              .original_max_position = config_original_length(m, type, 0),
                              .sequence_length = config_integer(m, "sequence_length").value_or(0)};
  } else if (type == "yarn") {
    yarn_scaling y;
    y.factor = config_required_number(m, "factor", type);
    y.original_max_position = config_original_length(m, type, 0);
    // HF: `rope_scaling.get("beta_fast") or 32`, so an explicit 0 also means the default.
    if (auto v = config_number(m, "beta_fast"); v && *v != 0) y.beta_fast = *v;
    if (auto v = config_number(m, "beta_slow"); v && *v != 0) y.beta_slow = *v;
    y.mscale = config_number(m, "mscale").value_or(0);
    y.mscale_all_dim = config_number(m, "mscale_all_dim").value_or(0);
    y.truncate = config_bool(m, "truncate").value_or(true);
    out = y;
  } else if (type == "llama3") {
    out = llama3_scaling{.factor = config_required_number(m, "factor", type),
                         .low_freq_factor = config_required_number(m, "low_freq_factor", type),
                         .high_freq_factor = config_required_number(m, "high_freq_factor", type),
                         .original_max_position = [&] {
                           auto v = config_integer(m, "original_max_position_embeddings");
                           if (!v) config_missing("original_max_position_embeddings", type);
                           return *v;
                         }()};
  } else if (type == "longrope") {
    longrope_scaling l;
    l.short_factor = config_required_list(m, "short_factor", type);
    l.long_factor = config_required_list(m, "long_factor", type);
    const auto original = config_integer(m, "original_max_position_embeddings");
    const auto maximum = config_integer(m, "max_position_embeddings");
    const auto factor = config_number(m, "factor");
    if (original) {
      l.original_max_position = *original;
      l.max_position = maximum.value_or(0);
    } else if (maximum) {
      // Without an original length, HF takes the model's length as the original one.
      require(*maximum > 1, config_field("max_position_embeddings"), *maximum, "must be > 1");
      l.original_max_position = *maximum;
    } else {
      config_missing("original_max_position_embeddings", type);
    }
    if (factor) {
      require(positive_finite(*factor), config_field("factor"), *factor, "must be finite and > 0");
      l.factor = *factor;
    }
    l.sequence_length = config_integer(m, "sequence_length").value_or(0);
    if (const config_value* c = config_find(m, "choice")) {
      const auto* cs = std::get_if<std::string>(c);
      if (cs && *cs == "per_length") {
        l.choice = longrope_choice::per_length;
      } else if (cs && *cs == "fixed_long") {
        l.choice = longrope_choice::fixed_long;
      } else {
        invalid(config_field("choice"), config_text(*c), "must be \"per_length\" or \"fixed_long\"");
      }
    }
    out = std::move(l);
  } else {
    invalid(config_field(type_key), config_quoted(type),
            "unknown type (known: default, linear, ntk, dynamic, yarn, llama3, longrope)");
  }
  validate_policy(out, field_namer{.hf = true});
  return out;
}

/// The magnitude a dict sets explicitly (`attention_factor`), if any; validated like
/// `rope_scaling_from_config`.
inline std::optional<double> attention_factor_from_config(const config_map& m) {
  auto af = detail::config_number(m, "attention_factor");
  if (af) detail::require(detail::positive_finite(*af), "rope_scaling.attention_factor", *af, "must be finite and > 0");
  return af;
}

/// `p` with its frequency policy read from a `rope_scaling` dict, its magnitude override from
/// the dict's `attention_factor` and its base from `rope_theta`, when present (newer HF configs
/// keep the base in `rope_parameters`). Throws like `rope_scaling_from_config`, and also when
/// LongRoPE's `short_factor` or `long_factor` does not have one entry per rotated pair of `p`
/// (`rotary_dim / 2`, or `head_dim / 2` for `rotary_dim = 0`).
inline rope_params rope_params_from_config(rope_params p, const config_map& m) {
  p.scaling = rope_scaling_from_config(m);
  if (const auto* l = std::get_if<longrope_scaling>(&p.scaling)) detail::config_longrope_lengths(*l, p);
  if (auto af = attention_factor_from_config(m)) p.attention_factor = *af;
  if (auto theta = detail::config_number(m, "rope_theta")) p.base = *theta;
  return p;
}

}  // namespace posenc
