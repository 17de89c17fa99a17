// libFuzzer target: a Hugging Face style `rope_scaling` description read from bytes.
//
// The bytes are a flat JSON object, as in a model's config.json:
//     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
// parsed here by a small parser (strings, integers, numbers, booleans, lists of numbers; an input
// it cannot parse is skipped). Two extra keys, "head_dim" and "rotary_dim" (integers, at most
// 512), shape the encoder. `rope_params_from_config` and the `rope` constructor must succeed or
// throw `std::invalid_argument` reading "posenc: <param> = <value>: <what>"; a built encoder must
// have a finite positive magnitude and keep norms. The same object read as a model config (with
// itself as its `rope_scaling` dict, and a "layer" key choosing the layer) goes through
// `layer_encoding_from_config`: it must succeed with settings the encoders and attention accept, or
// throw the same kind of error (its encoder is built when the config's head_dim is at most 512).
#include <cctype>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "fuzz_common.hpp"
#include "posenc/encoders/hf_config.hpp"
#include "posenc/encoders/layer_config.hpp"
#include "posenc/encoders/mrope.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/temperature.hpp"

namespace {

using posenc::index_t;

class json_parser {
 public:
  explicit json_parser(std::string_view s) : s_(s) {}

  std::optional<posenc::config_map> object() {
    posenc::config_map m;
    if (!eat('{')) return std::nullopt;
    if (eat('}')) return m;
    do {
      auto key = string();
      if (!key || !eat(':')) return std::nullopt;
      auto v = value();
      if (!v) return std::nullopt;
      m.insert_or_assign(*key, *v);
    } while (eat(','));
    if (!eat('}')) return std::nullopt;
    return m;
  }

 private:
  void skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool eat(char c) {
    skip();
    if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
    return false;
  }
  std::optional<std::string> string() {
    if (!eat('"')) return std::nullopt;
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') out += s_[i_++];
    if (i_ == s_.size()) return std::nullopt;
    ++i_;
    return out;
  }
  std::optional<double> number(bool& integral) {
    skip();
    const std::size_t start = i_;
    integral = true;
    while (i_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[i_])) ||
                              std::string_view("+-.eE").find(s_[i_]) != std::string_view::npos)) {
      if (!std::isdigit(static_cast<unsigned char>(s_[i_])) && s_[i_] != '-') integral = false;
      ++i_;
    }
    if (i_ == start) return std::nullopt;
    const std::string text(s_.substr(start, i_ - start));
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (end != text.c_str() + text.size()) return std::nullopt;
    return v;
  }
  std::optional<posenc::config_value> value() {
    skip();
    if (i_ >= s_.size()) return std::nullopt;
    if (s_[i_] == '"') {
      auto v = string();
      if (!v) return std::nullopt;
      return posenc::config_value(*v);
    }
    if (s_.substr(i_, 4) == "true") return i_ += 4, posenc::config_value(true);
    if (s_.substr(i_, 5) == "false") return i_ += 5, posenc::config_value(false);
    if (eat('[')) {
      std::vector<double> list;
      if (eat(']')) return posenc::config_value(list);
      do {
        bool integral = false;
        auto v = number(integral);
        if (!v) return std::nullopt;
        list.push_back(*v);
      } while (eat(','));
      if (!eat(']')) return std::nullopt;
      return posenc::config_value(list);
    }
    bool integral = false;
    auto v = number(integral);
    if (!v) return std::nullopt;
    if (integral && std::abs(*v) < 9e18) return posenc::config_value(static_cast<std::int64_t>(*v));
    return posenc::config_value(*v);
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

index_t shape_field(const posenc::config_map& m, const char* key, index_t fallback) {
  auto it = m.find(std::string_view(key));
  if (it == m.end()) return fallback;
  if (const auto* v = std::get_if<std::int64_t>(&it->second)) return std::clamp<std::int64_t>(*v, -4, 512);
  return fallback;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  json_parser parser(std::string_view(reinterpret_cast<const char*>(data), size));
  const auto m = parser.object();
  if (!m) return 0;
  posenc::rope_params base{.head_dim = shape_field(*m, "head_dim", 64), .rotary_dim = shape_field(*m, "rotary_dim", 0)};
  try {
    const posenc::rope_params p = posenc::rope_params_from_config(base, *m);
    const posenc::rope<float> r(p);
    const double mag = r.magnitude();
    if (!(std::isfinite(mag) && mag > 0)) posenc_fuzz::fail("rope from a config with magnitude %.17g", mag);
    posenc::row_matrix<float> x = posenc::row_matrix<float>::Constant(3, p.head_dim, 1.0f);
    const posenc::position pos[] = {0, 131071, (posenc::position{1} << 31) - 1};
    r.rotate(x, posenc::positions(pos));
    for (index_t i = 0; i < 3; ++i) {
      const double got = x.row(i).head(r.rotary_dim()).cast<double>().stableNorm();
      const double want = std::sqrt(static_cast<double>(r.rotary_dim())) * mag;
      if (want > 1e-30 && want < 1e30 && !(std::abs(got - want) <= 1e-5 * want))
        posenc_fuzz::fail("rope from a config: norm %.9g, expected %.9g", got, want);
    }
  } catch (const std::invalid_argument& e) {
    posenc_fuzz::check_invalid_message(e);
  }
  if (m->find(std::string_view("model_type")) == m->end()) return 0;
  try {
    const posenc::layer_encoding le = posenc::layer_encoding_from_config(*m, *m, shape_field(*m, "layer", 0));
    if (le.window_left < -1) posenc_fuzz::fail("layer config: window_left %lld", (long long)le.window_left);
    if (le.chunk_size && *le.chunk_size <= 0) posenc_fuzz::fail("layer config: chunk %lld", (long long)*le.chunk_size);
    if (le.scale && !(std::isfinite(*le.scale) && *le.scale > 0))
      posenc_fuzz::fail("layer config: scale %.17g", *le.scale);
    try {
      posenc::detail::check_params(le.attention_params_for({}));
    } catch (const std::invalid_argument& e) {
      posenc_fuzz::fail("layer config: attention refuses the layer's knobs: %s", e.what());
    }
    if (le.temperature) {
      const posenc::query_temperature t(*le.temperature);
      const double f = t.factor(std::numeric_limits<posenc::position>::max());
      if (!(std::isfinite(f) && f >= 1)) posenc_fuzz::fail("layer config: temperature %.17g", f);
    }
    // A config may name any head_dim; an encoder's tables grow with it (a legitimate allocation), so
    // encoders are built here only for head_dim up to 512, like the shape keys above.
    if (le.rope && le.rope->head_dim <= 512) {
      if (le.mrope_section.empty()) {
        const posenc::rope<float> r(*le.rope);
      } else {
        const posenc::mrope<float> r(le.mrope());
      }
    }
  } catch (const std::invalid_argument& e) {
    posenc_fuzz::check_invalid_message(e);
  }
  return 0;
}
