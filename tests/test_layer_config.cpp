// Per-layer encodings read from Hugging Face model configs (Gemma 3, Llama 4, Qwen2-VL, Qwen3-VL)
// with their published values, Llama 4's query temperature, and errors naming the field.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "posenc/encoders/layer_config.hpp"
#include "posenc/encoders/rope.hpp"
#include "support.hpp"

using posenc::config_map;
using posenc::index_t;
using posenc::position;
using ld = long double;

namespace {

// Gemma 3 4B (google/gemma-3-4b-it, text_config).
config_map gemma3_4b() {
  return {{"model_type", std::string("gemma3_text")},
          {"num_hidden_layers", std::int64_t{34}},
          {"hidden_size", std::int64_t{2560}},
          {"num_attention_heads", std::int64_t{8}},
          {"head_dim", std::int64_t{256}},
          {"sliding_window", std::int64_t{1024}},
          {"sliding_window_pattern", std::int64_t{6}},
          {"rope_theta", 1000000.0},
          {"rope_local_base_freq", 10000.0},
          {"query_pre_attn_scalar", std::int64_t{256}}};
}
const config_map gemma3_scaling{{"rope_type", std::string("linear")}, {"factor", 8.0}};

// Llama 4 Scout (meta-llama/Llama-4-Scout-17B-16E, text_config).
config_map llama4_scout() {
  return {{"model_type", std::string("llama4_text")},
          {"num_hidden_layers", std::int64_t{48}},
          {"hidden_size", std::int64_t{5120}},
          {"num_attention_heads", std::int64_t{40}},
          {"head_dim", std::int64_t{128}},
          {"rope_theta", 500000.0},
          {"attention_chunk_size", std::int64_t{8192}},
          {"attn_temperature_tuning", true},
          {"floor_scale", std::int64_t{8192}},
          {"attn_scale", 0.1}};
}
const config_map llama4_scaling{{"rope_type", std::string("llama3")},
                                {"factor", 16.0},
                                {"low_freq_factor", 1.0},
                                {"high_freq_factor", 1.0},
                                {"original_max_position_embeddings", std::int64_t{8192}}};

// Llama 3 frequencies written from the formula (w = 2 pi / inv; keep below L0 / high, divide by
// the factor above L0 / low, blend between), in long double.
ld llama3_inv(ld base, index_t r, index_t k, ld factor, ld low, ld high, ld l0) {
  const ld inv = std::pow(base, -ld(2 * k) / ld(r));
  const ld w = 2 * 3.14159265358979323846264338327950288L / inv;
  if (w < l0 / high) return inv;
  if (w > l0 / low) return inv / factor;
  const ld t = (l0 / w - low) / (high - low);
  return (1 - t) * inv / factor + t * inv;
}

void check_inv(const posenc::rope_params& rp, const std::vector<ld>& want) {
  const posenc::rope<double> enc(rp);
  REQUIRE(enc.inv_freq().size() == want.size());
  for (std::size_t k = 0; k < want.size(); ++k) {
    INFO("pair " << k);
    CHECK(std::abs(ld(enc.inv_freq()[k]) - want[k]) <= 4 * ld(std::numeric_limits<double>::epsilon()) * want[k]);
  }
}

__extension__ typedef __int128 i128;

// t(p) = ln(floor((p + 1) / floor_scale) + 1) * attn_scale + 1, with the floor in 128-bit integers.
ld ref_temperature(position p, position floor_scale, ld attn_scale) {
  const i128 steps = (i128(p) + 1) / floor_scale;
  return std::log(ld(steps) + 1) * attn_scale + 1;
}

}  // namespace

TEST_CASE("layer config: Gemma 3 alternates local and global RoPE with a sliding window", "[layer_config][gemma3]") {
  const config_map cfg = gemma3_4b();
  std::vector<std::string> types;
  for (index_t i = 0; i < 34; ++i) types.push_back((i + 1) % 6 == 0 ? "full_attention" : "sliding_attention");
  for (index_t i = 0; i < 34; ++i) {
    INFO("layer " << i);
    for (bool with_types : {false, true}) {
      const posenc::layer_encoding le =
          posenc::layer_encoding_from_config(cfg, gemma3_scaling, i, with_types ? types : std::vector<std::string>{});
      REQUIRE(le.rope.has_value());
      CHECK(le.rope->head_dim == 256);
      CHECK(le.rope->layout == posenc::rope_layout::half_split);
      CHECK(!le.chunk_size);
      CHECK(!le.temperature);
      REQUIRE(le.scale.has_value());
      CHECK(*le.scale == 1.0 / 16.0);  // query_pre_attn_scalar 256
      const bool global = (i + 1) % 6 == 0;
      std::vector<ld> want;
      for (index_t k = 0; k < 128; ++k)
        want.push_back(global ? std::pow(1e6L, -ld(2 * k) / 256) / 8 : std::pow(1e4L, -ld(2 * k) / 256));
      check_inv(*le.rope, want);
      const posenc::attention_params p = le.attention_params_for({.heads = 8, .kv_heads = 4});
      CHECK(p.causal);
      CHECK(p.heads == 8);
      CHECK(p.window_left == (global ? -1 : 1023));  // q - k < sliding_window = 1024
      CHECK(!p.chunk_size);
    }
  }
  // Gemma 3 1B: no rope_scaling, a window of 512, 26 layers; head_dim from the config.
  config_map one = gemma3_4b();
  one["num_hidden_layers"] = std::int64_t{26};
  one["sliding_window"] = std::int64_t{512};
  one["hidden_size"] = std::int64_t{1152};
  one["num_attention_heads"] = std::int64_t{4};
  const auto global = posenc::layer_encoding_from_config(one, {}, 23);
  std::vector<ld> plain;
  for (index_t k = 0; k < 128; ++k) plain.push_back(std::pow(1e6L, -ld(2 * k) / 256));
  check_inv(*global.rope, plain);
  CHECK(global.window_left == -1);
  CHECK(posenc::layer_encoding_from_config(one, {}, 0).window_left == 511);

  // Gemma 3 27B's published text_config leaves rope_theta, rope_local_base_freq and the pattern
  // to the class defaults (1e6, 1e4, 6); query_pre_attn_scalar is 168, head_dim 128.
  const config_map g27{{"model_type", std::string("gemma3_text")},
                       {"num_hidden_layers", std::int64_t{62}},
                       {"head_dim", std::int64_t{128}},
                       {"hidden_size", std::int64_t{5376}},
                       {"num_attention_heads", std::int64_t{32}},
                       {"query_pre_attn_scalar", std::int64_t{168}},
                       {"sliding_window", std::int64_t{1024}}};
  for (index_t i : {0, 5, 59, 61}) {
    INFO("27B layer " << i);
    const auto le = posenc::layer_encoding_from_config(g27, gemma3_scaling, i);
    const bool global27 = (i + 1) % 6 == 0;
    CHECK(le.window_left == (global27 ? -1 : 1023));
    CHECK(*le.scale == 1.0 / std::sqrt(168.0));
    std::vector<ld> want27;
    for (index_t k = 0; k < 64; ++k)
      want27.push_back(global27 ? std::pow(1e6L, -ld(2 * k) / 128) / 8 : std::pow(1e4L, -ld(2 * k) / 128));
    check_inv(*le.rope, want27);
  }
}

TEST_CASE("layer config: Llama 4 RoPE layers chunked, every fourth layer NoPE with temperature",
          "[layer_config][llama4]") {
  const config_map cfg = llama4_scout();
  std::vector<ld> want;
  for (index_t k = 0; k < 64; ++k) want.push_back(llama3_inv(5e5L, 128, k, 16, 1, 1, 8192));
  config_map listed = cfg;
  std::vector<double> flags;
  for (index_t i = 0; i < 48; ++i) flags.push_back((i + 1) % 4 == 0 ? 0.0 : 1.0);
  listed["no_rope_layers"] = flags;
  for (const config_map* c : {&cfg, static_cast<const config_map*>(&listed)}) {
    for (index_t i = 0; i < 48; ++i) {
      INFO("layer " << i);
      const posenc::layer_encoding le = posenc::layer_encoding_from_config(*c, llama4_scaling, i);
      const bool nope = (i + 1) % 4 == 0;
      CHECK(le.rope.has_value() == !nope);
      CHECK(le.temperature.has_value() == nope);
      CHECK(le.chunk_size.has_value() == !nope);
      CHECK(le.window_left == -1);
      const posenc::attention_params p = le.attention_params_for({});
      CHECK(p.causal);
      if (nope) {
        CHECK(le.temperature->floor_scale == 8192);
        CHECK(le.temperature->attn_scale == 0.1);
        CHECK(!p.chunk_size);
      } else {
        CHECK(*le.chunk_size == 8192);
        CHECK(*p.chunk_size == 8192);
        CHECK(le.rope->layout == posenc::rope_layout::interleaved);
        check_inv(*le.rope, want);
      }
    }
  }
  // Without attn_temperature_tuning the NoPE layers have no temperature; 4 reads as true (early
  // Llama 4 configs).
  config_map off = cfg;
  off["attn_temperature_tuning"] = false;
  CHECK(!posenc::layer_encoding_from_config(off, llama4_scaling, 3).temperature);
  off["attn_temperature_tuning"] = std::int64_t{4};
  CHECK(posenc::layer_encoding_from_config(off, llama4_scaling, 3).temperature);
}

TEST_CASE("layer config: Qwen2-VL and Qwen3-VL read M-RoPE sections", "[layer_config][mrope]") {
  // Qwen2-VL-7B-Instruct: hidden 3584, 28 heads (head_dim 128), theta 1e6, mrope [16, 24, 24].
  const config_map q2{{"model_type", std::string("qwen2_vl")},
                      {"num_hidden_layers", std::int64_t{28}},
                      {"hidden_size", std::int64_t{3584}},
                      {"num_attention_heads", std::int64_t{28}},
                      {"rope_theta", 1000000.0}};
  const config_map q2_scaling{{"type", std::string("mrope")}, {"mrope_section", std::vector<double>{16, 24, 24}}};
  const auto le = posenc::layer_encoding_from_config(q2, q2_scaling, 27);
  CHECK(le.mrope_section == std::vector<index_t>{16, 24, 24});
  CHECK(!le.mrope_interleaved);
  const posenc::mrope<double> enc(le.mrope());
  CHECK(enc.head_dim() == 128);
  for (index_t k = 0; k < 64; ++k) CHECK(enc.axis_of_pair(k) == (k < 16 ? 0 : k < 40 ? 1 : 2));
  std::vector<ld> plain;
  for (index_t k = 0; k < 64; ++k) plain.push_back(std::pow(1e6L, -ld(2 * k) / 128));
  check_inv(*le.rope, plain);

  // Qwen3-VL-8B-Instruct text config: head_dim 128, theta 5e6, interleaved [24, 20, 20].
  const config_map q3{{"model_type", std::string("qwen3_vl_text")},
                      {"num_hidden_layers", std::int64_t{36}},
                      {"head_dim", std::int64_t{128}},
                      {"rope_theta", 5000000.0}};
  const config_map q3_scaling{{"rope_type", std::string("default")},
                              {"mrope_section", std::vector<double>{24, 20, 20}},
                              {"mrope_interleaved", true}};
  const auto le3 = posenc::layer_encoding_from_config(q3, q3_scaling, 0);
  CHECK(le3.mrope_interleaved);
  const posenc::mrope<double> enc3(le3.mrope());
  for (index_t k = 0; k < 64; ++k) {
    const index_t want = (k % 3 == 1 && k < 60) ? 1 : (k % 3 == 2 && k < 60) ? 2 : 0;
    CHECK(enc3.axis_of_pair(k) == want);
  }
}

TEST_CASE("query temperature: values at chosen positions and scaled queries", "[layer_config][temperature]") {
  const posenc::query_temperature t({.floor_scale = 8192, .attn_scale = 0.1});
  const position big = std::numeric_limits<position>::max();
  for (position p : {position{0}, position{8190}, position{8191}, position{8192}, position{16383}, position{1000000},
                     position{1} << 40, big}) {
    INFO("position " << p);
    const ld want = ref_temperature(p, 8192, 0.1L);
    CHECK(std::abs(ld(t.factor(p)) - want) <= 4 * ld(std::numeric_limits<double>::epsilon()) * want);
  }
  // Small floor scales at the largest position: floor_scale 1 gives 2^63 steps (past int64).
  for (position f : {position{1}, position{2}, position{3}, position{7}})
    for (position p : {position{0}, f - 1, f, big - 1, big}) {
      INFO("floor_scale " << f << ", position " << p);
      const posenc::query_temperature small({.floor_scale = f, .attn_scale = 0.5});
      const ld want = ref_temperature(p, f, 0.5L);
      CHECK(std::abs(ld(small.factor(p)) - want) <= 4 * ld(std::numeric_limits<double>::epsilon()) * want);
    }
  CHECK(t.factor(8190) == 1.0);  // floor(8191 / 8192) = 0
  CHECK(t.factor(8191) > 1.06);  // 1 + 0.1 ln 2

  const std::vector<position> pos{0, 8191, 50000, 3, big};
  const auto q = posenc_test::random_normal<float>(5, 24, 3);
  auto got = q;
  t.scale_queries(got, posenc::positions(pos));
  for (index_t i = 0; i < 5; ++i)
    for (index_t j = 0; j < 24; ++j) {
      const ld want = ld(q(i, j)) * ref_temperature(pos[static_cast<std::size_t>(i)], 8192, 0.1L);
      CHECK(std::abs(ld(got(i, j)) - want) <= ld(std::numeric_limits<float>::epsilon()) * std::abs(want));
    }
  posenc::row_matrix<Eigen::bfloat16> h(1, 4);
  h.setConstant(Eigen::bfloat16(2.0f));
  t.scale_queries(h, posenc::positions(std::vector<position>{8191}));
  CHECK(std::abs(float(h(0, 0)) - float(2 * ref_temperature(8191, 8192, 0.1L))) <= 0.01f);

  CHECK_THROWS_AS(t.scale_queries(got, posenc::positions(std::vector<position>{0, 1})), posenc::precondition_error);
  CHECK_THROWS_AS(t.scale_queries(got, posenc::positions(std::vector<position>{0, 1, -1, 3, 4})),
                  posenc::precondition_error);
  CHECK_THROWS_AS(t.factor(-5), posenc::precondition_error);
  CHECK_INVALID(posenc::query_temperature({.floor_scale = 0}), "query_temperature_params.floor_scale = 0");
  CHECK_INVALID(posenc::query_temperature({.attn_scale = -1}), "query_temperature_params.attn_scale = -1");
  CHECK_INVALID(posenc::query_temperature({.attn_scale = 1e307}), "query_temperature_params.attn_scale = 1e+307");
  CHECK(std::isfinite(posenc::query_temperature({.attn_scale = 1e305}).factor(std::numeric_limits<position>::max())));
}

TEST_CASE("layer config: bad configs throw naming the field", "[layer_config][errors]") {
  using posenc::layer_encoding_from_config;
  config_map g = gemma3_4b();
  CHECK_INVALID(layer_encoding_from_config(g, gemma3_scaling, 34), "layer = 34");
  CHECK_INVALID(layer_encoding_from_config(g, gemma3_scaling, -1), "layer = -1");
  g["sliding_window"] = std::int64_t{0};
  CHECK_INVALID(layer_encoding_from_config(g, gemma3_scaling, 0), "config.sliding_window = 0");
  g = gemma3_4b();
  g.erase("sliding_window");
  CHECK_INVALID(layer_encoding_from_config(g, gemma3_scaling, 0), "config.sliding_window = (missing)");
  g = gemma3_4b();
  g["sliding_window_pattern"] = std::int64_t{0};
  CHECK_INVALID(layer_encoding_from_config(g, gemma3_scaling, 0), "config.sliding_window_pattern = 0");
  g = gemma3_4b();
  g["rope_theta"] = -1.0;
  CHECK_INVALID(layer_encoding_from_config(g, gemma3_scaling, 5), "config.rope_theta = -1");
  g = gemma3_4b();
  g["model_type"] = std::string("gemma9");
  CHECK_INVALID(layer_encoding_from_config(g, gemma3_scaling, 0), "config.model_type = \"gemma9\"");
  g.erase("model_type");
  CHECK_INVALID(layer_encoding_from_config(g, gemma3_scaling, 0), "config.model_type = (missing)");
  config_map q2bad{{"model_type", std::string("qwen2_vl")},
                   {"num_hidden_layers", std::int64_t{28}},
                   {"hidden_size", std::int64_t{3585}},
                   {"num_attention_heads", std::int64_t{28}}};
  CHECK_INVALID(layer_encoding_from_config(q2bad, {{"type", std::string("mrope")}}, 0), "config.hidden_size = 3585");
  const std::vector<std::string> types(34, "local");
  CHECK_INVALID(layer_encoding_from_config(gemma3_4b(), gemma3_scaling, 2, types), "config.layer_types[2] = \"local\"");
  CHECK_INVALID(layer_encoding_from_config(gemma3_4b(), {{"rope_type", std::string("linear")}, {"factor", -2.0}}, 5),
                "rope_scaling.factor = -2");

  config_map l = llama4_scout();
  l["attention_chunk_size"] = std::int64_t{0};
  CHECK_INVALID(layer_encoding_from_config(l, llama4_scaling, 0), "config.attention_chunk_size = 0");
  l = llama4_scout();
  l["floor_scale"] = std::int64_t{0};
  CHECK_INVALID(layer_encoding_from_config(l, llama4_scaling, 3), "config.floor_scale = 0");
  l = llama4_scout();
  l["no_rope_layers"] = std::vector<double>(47, 1.0);
  CHECK_INVALID(layer_encoding_from_config(l, llama4_scaling, 3), "config.no_rope_layers = 47 entries");
  l["no_rope_layers"] = std::vector<double>(48, 2.0);
  CHECK_INVALID(layer_encoding_from_config(l, llama4_scaling, 3), "config.no_rope_layers[3] = 2");
  l = llama4_scout();
  l["attention_chunk_size"] = std::string("8192");
  CHECK_INVALID(layer_encoding_from_config(l, llama4_scaling, 0), "config.attention_chunk_size = \"8192\"");

  const config_map q{{"model_type", std::string("qwen2_vl")},
                     {"num_hidden_layers", std::int64_t{28}},
                     {"head_dim", std::int64_t{128}},
                     {"rope_theta", 1e6}};
  CHECK_INVALID(layer_encoding_from_config(q, {{"type", std::string("mrope")}}, 0), "rope_scaling.mrope_section");
  CHECK_INVALID(layer_encoding_from_config(
                    q, {{"type", std::string("mrope")}, {"mrope_section", std::vector<double>{16, 24, 16}}}, 0),
                "rope_scaling.mrope_section");
  CHECK_INVALID(layer_encoding_from_config(
                    q, {{"type", std::string("mrope")}, {"mrope_section", std::vector<double>{16.5, 23.5, 24}}}, 0),
                "whole number");
  CHECK_INVALID(posenc::layer_encoding{}.mrope(), "layer_encoding.mrope_section");
}
