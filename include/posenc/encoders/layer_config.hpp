// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/layer_config.hpp
/// The position encoding and attention mask of layer `i`, read from a Hugging Face model config
/// (`config.json`; for a multimodal model, its `text_config`). Models of 2025 vary them by layer:
///
/// - **Gemma 3** (`model_type` `gemma3_text` / `gemma3`): local layers use RoPE with base
///   `rope_local_base_freq` (10 000) and a sliding window of `sliding_window` tokens (the key is
///   visible when `q - k < sliding_window`, so `window_left = sliding_window - 1`); every
///   `sliding_window_pattern`-th layer (`(i + 1) % pattern == 0`, or `layer_types[i] ==
///   "full_attention"`) is global: base `rope_theta` (1 000 000) with the `rope_scaling` dict
///   (linear, factor 8). Every layer: logit scale `query_pre_attn_scalar^-1/2`, and
///   `attn_logit_softcapping` when set.
/// - **Llama 4** (`llama4_text` / `llama4`): RoPE (`rope_theta`, `rope_scaling`, interleaved pairs)
///   with chunked attention of `attention_chunk_size` tokens on most layers; no position encoding
///   (NoPE) on the layers where `no_rope_layers[i] == 0` (else every `no_rope_layer_interval`-th,
///   default 4: `(i + 1) % 4 == 0`), with full causal attention and, when
///   `attn_temperature_tuning` is set, the query temperature of temperature.hpp (`floor_scale`,
///   `attn_scale`).
/// - **Qwen2-VL, Qwen2.5-VL, Qwen3-VL** (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, and their `_text`
///   configs): M-RoPE on every layer (mrope.hpp), `mrope_section` and `mrope_interleaved` from the
///   `rope_scaling` dict (whose `type` may be `"mrope"`, meaning the default frequencies).
///
/// Fields that published configs leave out take the defaults of the model's HF config class:
/// `rope_theta` (Gemma 3: 1e6, Llama 4: 5e5, Qwen2-VL: 1e6, Qwen3-VL: 5e6), `head_dim` (Gemma 3: 256,
/// Llama 4 and Qwen3-VL: 128, Qwen2-VL: `hidden_size / num_attention_heads`),
/// `sliding_window_pattern` (or `_sliding_window_pattern`; 6), `rope_local_base_freq` (10 000),
/// `query_pre_attn_scalar` (256), `no_rope_layer_interval` (4), `attn_temperature_tuning` (true),
/// `floor_scale` (8192), `attn_scale` (0.1). Two fields are read only when present, where the class
/// has a default: `sliding_window` is required on sliding layers (the class would take 4096), and
/// without `attention_chunk_size` (a JSON null) a Llama 4 layer has no chunks.
///
/// The config is a `config_map` of its top-level fields (hf_config.hpp), the `rope_scaling` dict a
/// second one (empty for `null`), and `layer_types` (a list of strings) a span, empty when absent.
/// Errors throw `std::invalid_argument` naming the field: `config.sliding_window = 0: must be > 0`.

#include <cmath>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "posenc/attention/params.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoders/hf_config.hpp"
#include "posenc/encoders/mrope.hpp"
#include "posenc/encoders/rope_scaling.hpp"
#include "posenc/encoders/temperature.hpp"

namespace posenc {

/// The model families `layer_encoding_from_config` knows.
enum class model_family { gemma3, llama4, qwen_vl };

/// What layer `i` of a model does with positions, and the mask it attends with.
struct layer_encoding {
  model_family family = model_family::gemma3;
  /// The RoPE of the layer; empty for a layer without position encoding (NoPE: `no_position`).
  std::optional<rope_params> rope{};
  /// M-RoPE sections (`mrope_section`); empty unless the model uses M-RoPE.
  std::vector<index_t> mrope_section{};
  bool mrope_interleaved = false;
  /// Sliding window: keys at most this far behind the query (`window_left`); -1 = none.
  position window_left = -1;
  /// Chunked attention (`attention_chunk_size`); empty = none.
  std::optional<position> chunk_size{};
  /// Query temperature (Llama 4 NoPE layers with `attn_temperature_tuning`); empty = none.
  std::optional<query_temperature_params> temperature{};
  /// Logit scale, when the config sets one (Gemma 3: `query_pre_attn_scalar^-1/2`).
  std::optional<double> scale{};
  /// Logit soft-capping (`attn_logit_softcapping`); 0 = off.
  double softcap = 0;

  /// `p` with this layer's mask and logit knobs: causal, `window_left`, `chunk_size`, `scale`,
  /// `softcap` (heads, tiles and threads are kept).
  attention_params attention_params_for(attention_params p) const {
    p.causal = true;
    p.window_left = window_left;
    p.window_right = -1;
    p.chunk_size = chunk_size;
    if (scale) p.scale = scale;
    p.softcap = softcap;
    return p;
  }

  /// The M-RoPE parameters of the layer (its `rope` and `mrope_section`). Throws
  /// `std::invalid_argument` when the layer has no M-RoPE.
  mrope_params mrope() const {
    detail::require(rope.has_value() && !mrope_section.empty(), "layer_encoding.mrope_section", std::string_view("[]"),
                    "this layer has no M-RoPE");
    mrope_params m;
    m.rope = *rope;
    m.sections = mrope_section;
    m.interleaved = mrope_interleaved;
    return m;
  }
};

namespace detail {

inline std::string model_field(std::string_view key) { return config_field(key, "config"); }

[[noreturn]] inline void model_missing(std::string_view key, std::string_view why) {
  invalid(model_field(key), std::string_view("(missing)"), why);
}

/// A whole-number / number field of the model config, if present (hf_config.hpp's readers, named
/// as fields of `config`).
inline std::optional<position> model_integer(const config_map& m, std::string_view key) {
  return config_integer(m, key, "config");
}
inline std::optional<double> model_number(const config_map& m, std::string_view key) {
  return config_number(m, key, "config");
}

/// A positive whole number, or `fallback` when absent (nullopt: required).
inline position model_positive(const config_map& m, std::string_view key, std::optional<position> fallback,
                               std::string_view why) {
  const auto v = model_integer(m, key);
  if (!v) {
    if (!fallback) model_missing(key, why);
    return *fallback;
  }
  require(*v > 0, model_field(key), *v, "must be > 0");
  return *v;
}

inline double model_positive_number(const config_map& m, std::string_view key, std::optional<double> fallback,
                                    std::string_view why) {
  const auto v = model_number(m, key);
  if (!v) {
    if (!fallback) model_missing(key, why);
    return *fallback;
  }
  require(std::isfinite(*v) && *v > 0, model_field(key), *v, "must be finite and > 0");
  return *v;
}

/// A JSON `true`/`false`, or a number (nonzero = true), if present.
inline std::optional<bool> model_flag(const config_map& m, std::string_view key) {
  const config_value* v = config_find(m, key);
  if (!v) return std::nullopt;
  if (const auto* b = std::get_if<bool>(v)) return *b;
  if (const auto* i = std::get_if<std::int64_t>(v)) return *i != 0;
  if (const auto* d = std::get_if<double>(v)) {
    require(std::isfinite(*d), model_field(key), *d, "must be true, false or a finite number");
    return *d != 0;
  }
  invalid(model_field(key), config_text(*v), "must be true or false");
}

/// `head_dim`; when absent, the model class's default (`fallback`, 0 for none) or else
/// `hidden_size / num_attention_heads`, as HF computes it.
inline index_t model_head_dim(const config_map& m, index_t fallback) {
  if (config_find(m, "head_dim")) return model_positive(m, "head_dim", std::nullopt, "");
  if (fallback > 0) return fallback;
  const position hidden = model_positive(m, "hidden_size", std::nullopt, "needed when head_dim is absent");
  const position heads = model_positive(m, "num_attention_heads", std::nullopt, "needed when head_dim is absent");
  require(hidden % heads == 0, model_field("hidden_size"), hidden,
          "must be a multiple of num_attention_heads = " + to_text(heads) + " when head_dim is absent");
  return hidden / heads;
}

/// `layer_types[layer]` when the list is given: must be one of `known`.
inline std::optional<std::string_view> model_layer_type(std::span<const std::string> types, index_t layer,
                                                        position layers,
                                                        std::initializer_list<std::string_view> known) {
  if (types.empty()) return std::nullopt;
  require(static_cast<position>(types.size()) == layers, "config.layer_types",
          std::to_string(types.size()) + " entries", "must have num_hidden_layers = " + to_text(layers) + " entries");
  const std::string& t = types[static_cast<std::size_t>(layer)];
  for (const std::string_view k : known)
    if (t == k) return k;
  std::string list;
  for (const std::string_view k : known) list += (list.empty() ? "" : ", ") + std::string(k);
  invalid("config.layer_types[" + to_text(layer) + "]", config_quoted(t), "unknown (known here: " + list + ")");
}

/// The rope_scaling dict with M-RoPE's fields taken out (and `type: "mrope"` read as "default"),
/// for `rope_params_from_config`.
inline config_map without_mrope(const config_map& rs) {
  config_map out = rs;
  out.erase("mrope_section");
  out.erase("mrope_interleaved");
  for (const char* key : {"rope_type", "type"}) {
    auto it = out.find(key);
    if (it != out.end())
      if (const auto* s = std::get_if<std::string>(&it->second); s && *s == "mrope")
        it->second = std::string("default");
  }
  return out;
}

}  // namespace detail

/// The position encoding and mask of layer `layer` of a model (see the file comment for the
/// families and fields). `config`: the model config's top-level fields (`text_config` for
/// multimodal models); `hf_rope_scaling`: its `rope_scaling` dict (empty for none); `layer_types`: its
/// `layer_types` list when it has one. Throws `std::invalid_argument` naming the field for an
/// unknown or missing `model_type`, a `layer` outside `[0, num_hidden_layers)`, a missing required
/// field, a value of the wrong type or out of range (`config.attention_chunk_size = 0: must be > 0`),
/// and as `rope_params_from_config` for the `rope_scaling` dict. Allocates (the result's lists).
inline layer_encoding layer_encoding_from_config(const config_map& config, const config_map& hf_rope_scaling,
                                                 index_t layer, std::span<const std::string> layer_types = {}) {
  using namespace detail;
  const config_value* tv = config_find(config, "model_type");
  if (!tv) model_missing("model_type", "required to know how the layers differ");
  const auto* tp = std::get_if<std::string>(tv);
  if (!tp) invalid(model_field("model_type"), config_text(*tv), "must be a string");
  const std::string& type = *tp;

  layer_encoding out;
  if (type == "gemma3_text" || type == "gemma3") {
    out.family = model_family::gemma3;
  } else if (type == "llama4_text" || type == "llama4") {
    out.family = model_family::llama4;
  } else if (type == "qwen2_vl" || type == "qwen2_vl_text" || type == "qwen2_5_vl" || type == "qwen2_5_vl_text" ||
             type == "qwen3_vl" || type == "qwen3_vl_text") {
    out.family = model_family::qwen_vl;
  } else {
    invalid(model_field("model_type"), config_quoted(type),
            "unknown (known: gemma3_text, gemma3, llama4_text, llama4, qwen2_vl, qwen2_5_vl, qwen3_vl and their "
            "_text configs)");
  }

  const position layers = model_positive(config, "num_hidden_layers", std::nullopt, "required");
  require(layer >= 0 && layer < layers, "layer", layer,
          "must be in [0, config.num_hidden_layers = " + to_text(layers) + ")");
  // Fields published configs leave out take the defaults of the model's HF config class.
  const bool qwen3 = type == "qwen3_vl" || type == "qwen3_vl_text";
  const index_t head_dim = model_head_dim(config, out.family == model_family::gemma3   ? 256
                                                  : out.family == model_family::llama4 ? 128
                                                  : qwen3                              ? 128
                                                                                       : 0);
  const double theta = model_positive_number(config, "rope_theta",
                                             out.family == model_family::gemma3   ? 1e6
                                             : out.family == model_family::llama4 ? 5e5
                                             : qwen3                              ? 5e6
                                                                                  : 1e6,
                                             "");
  rope_params rp;
  rp.head_dim = head_dim;
  rp.base = theta;

  switch (out.family) {
    case model_family::gemma3: {
      bool sliding = false;
      if (auto t = model_layer_type(layer_types, layer, layers, {"sliding_attention", "full_attention"})) {
        sliding = *t == "sliding_attention";
      } else {
        const char* key =
            config_find(config, "sliding_window_pattern") || !config_find(config, "_sliding_window_pattern")
                ? "sliding_window_pattern"
                : "_sliding_window_pattern";
        const position pattern = model_positive(config, key, 6, "");
        sliding = (layer + 1) % pattern != 0;
      }
      if (sliding) {
        out.window_left = model_positive(config, "sliding_window", std::nullopt, "required for sliding layers") - 1;
        rp.base = model_positive_number(config, "rope_local_base_freq", 10000.0, "");
        out.rope = rp;
      } else {
        out.rope = hf_rope_scaling.empty() ? rp : rope_params_from_config(rp, hf_rope_scaling);
      }
      out.scale = 1.0 / std::sqrt(model_positive_number(config, "query_pre_attn_scalar", 256.0, ""));
      if (config_find(config, "attn_logit_softcapping"))
        out.softcap = model_positive_number(config, "attn_logit_softcapping", std::nullopt, "");
      break;
    }
    case model_family::llama4: {
      bool use_rope = true;
      if (const config_value* v = config_find(config, "no_rope_layers")) {
        const auto* list = std::get_if<std::vector<double>>(v);
        if (!list) invalid(model_field("no_rope_layers"), config_text(*v), "must be a list of 0 and 1");
        require(static_cast<position>(list->size()) == layers, model_field("no_rope_layers"),
                std::to_string(list->size()) + " entries",
                "must have num_hidden_layers = " + to_text(layers) + " entries");
        const double e = (*list)[static_cast<std::size_t>(layer)];
        require(e == 0 || e == 1, "config.no_rope_layers[" + to_text(layer) + "]", e,
                "must be 1 (RoPE) or 0 (no position encoding)");
        use_rope = e == 1;
      } else {
        const position interval = model_positive(config, "no_rope_layer_interval", 4, "");
        use_rope = (layer + 1) % interval != 0;
      }
      if (auto t = model_layer_type(layer_types, layer, layers, {"chunked_attention", "full_attention"}))
        require((*t == "chunked_attention") == use_rope, "config.layer_types[" + to_text(layer) + "]",
                config_quoted(*t),
                use_rope ? "disagrees with no_rope_layers (a RoPE layer is chunked)"
                         : "disagrees with no_rope_layers (a NoPE layer is full attention)");
      const auto temperature = model_flag(config, "attn_temperature_tuning").value_or(true);
      query_temperature_params tq;
      tq.floor_scale = model_positive(config, "floor_scale", 8192, "");
      tq.attn_scale = model_number(config, "attn_scale").value_or(0.1);
      require(std::isfinite(tq.attn_scale) && tq.attn_scale >= 0 && std::isfinite(44.0 * tq.attn_scale + 1.0),
              model_field("attn_scale"), tq.attn_scale,
              "must be finite, >= 0 and small enough that every factor is finite");
      if (use_rope) {
        rp.layout = rope_layout::interleaved;  // Llama 4 rotates complex pairs (2i, 2i + 1)
        out.rope = hf_rope_scaling.empty() ? rp : rope_params_from_config(rp, hf_rope_scaling);
        if (config_find(config, "attention_chunk_size"))
          out.chunk_size = model_positive(config, "attention_chunk_size", std::nullopt, "");
      } else if (temperature) {
        out.temperature = tq;
      }
      break;
    }
    case model_family::qwen_vl: {
      const config_value* sv = config_find(hf_rope_scaling, "mrope_section");
      if (!sv) invalid("rope_scaling.mrope_section", std::string_view("(missing)"), "required for M-RoPE");
      const auto* list = std::get_if<std::vector<double>>(sv);
      if (!list) invalid("rope_scaling.mrope_section", config_text(*sv), "must be a list of whole numbers");
      for (const double s : *list) {
        require(std::isfinite(s) && std::floor(s) == s && s > 0 && s < 1e9, "rope_scaling.mrope_section",
                config_text(*sv), "every entry must be a whole number > 0");
        out.mrope_section.push_back(static_cast<index_t>(s));
      }
      if (const config_value* iv = config_find(hf_rope_scaling, "mrope_interleaved")) {
        const auto* b = std::get_if<bool>(iv);
        if (!b) invalid("rope_scaling.mrope_interleaved", config_text(*iv), "must be true or false");
        out.mrope_interleaved = *b;
      }
      out.rope = rope_params_from_config(rp, without_mrope(hf_rope_scaling));
      index_t sum = 0;
      for (const index_t s : out.mrope_section) sum += s;
      require(sum * 2 == head_dim, "rope_scaling.mrope_section", config_text(*sv),
              "must sum to head_dim / 2 = " + to_text(head_dim / 2));
      break;
    }
  }
  return out;
}

}  // namespace posenc
