// Pictures of the position schemes of recent models (docs/mrope.md, docs/chunked_attention.md,
// docs/layer_config.md), computed by the library itself:
//   mrope_axes.csv     the axis (0 t, 1 h, 2 w) of each rotary pair, head_dim 128: Qwen2-VL's
//                      sections [16, 24, 24] and Qwen3-VL's interleaved [24, 20, 20]
//   chunk_mask.csv     32 queries x 32 keys, causal with chunks of 8 (Llama 4), tiles of 4 x 4:
//                      2 visible, 1 hidden in a tile the kernel computes, 0 in a tile it skips
//   window_mask.csv    the same for a causal sliding window of 8 keys (Gemma 3's local layers)
//   layers.csv         per layer of Gemma 3 27B and Llama 4 Scout's published configs: RoPE base,
//                      sliding window, RoPE or NoPE, chunk size
//   temperature.csv    Llama 4's query temperature t(p) at positions 0 .. 2^21
//
// Usage: positions_2025 OUTPUT_FOLDER
// SPDX-License-Identifier: Apache-2.0
#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "picture_common.hpp"
#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
using posenc::position;

// The mask of `p` over positions 0..n-1 in tiles of `tile`, as the kernel decides it; returns the
// number of visible (query, key) pairs.
index_t write_mask(const std::filesystem::path& path, const posenc::attention_params& p, index_t n, index_t tile) {
  const posenc::detail::mask_rule rule = posenc::detail::mask_rule_of(p);
  std::vector<std::string> cols = {"query"};
  for (index_t j = 0; j < n; ++j) cols.push_back(pictures::numbered("k", j));
  pictures::csv out(path, cols);
  index_t visible = 0;
  for (position i = 0; i < n; ++i) {
    std::vector<double> row = {double(i)};
    const position q0 = i / tile * tile;
    for (position j = 0; j < n; ++j) {
      const position k0 = j / tile * tile;
      const bool computed = rule.any_visible({q0, q0 + tile - 1}, {k0, k0 + tile - 1});
      row.push_back(rule.visible(i, j) ? 2.0 : computed ? 1.0 : 0.0);
      visible += rule.visible(i, j) ? 1 : 0;
    }
    out.row(row);
  }
  out.finish();
  return visible;
}

void check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("unexpected result: ") + what);
}

}  // namespace

int main(int argc, char** argv) try {
  const auto dir = pictures::output_folder(argc, argv);

  {
    const posenc::rope_params rope{.head_dim = 128, .base = 1000000.0};
    const posenc::mrope<double> a({.rope = rope, .sections = {16, 24, 24}});                       // Qwen2-VL
    const posenc::mrope<double> b({.rope = rope, .sections = {24, 20, 20}, .interleaved = true});  // Qwen3-VL
    pictures::csv out(dir / "mrope_axes.csv", {"pair", "sections", "interleaved"});
    index_t count_a[3] = {}, count_b[3] = {};
    for (index_t k = 0; k < 64; ++k) {
      out.row({double(k), double(a.axis_of_pair(k)), double(b.axis_of_pair(k))});
      ++count_a[a.axis_of_pair(k)], ++count_b[b.axis_of_pair(k)];
    }
    out.finish();
    // Each axis turns as many pairs as its section; sections lie in order, interleaving starts t, h, w.
    check(count_a[0] == 16 && count_a[1] == 24 && count_a[2] == 24, "Qwen2-VL pairs per axis");
    check(count_b[0] == 24 && count_b[1] == 20 && count_b[2] == 20, "Qwen3-VL pairs per axis");
    check(a.axis_of_pair(15) == 0 && a.axis_of_pair(16) == 1 && a.axis_of_pair(40) == 2, "Qwen2-VL sections");
    check(b.axis_of_pair(0) == 0 && b.axis_of_pair(1) == 1 && b.axis_of_pair(2) == 2, "Qwen3-VL interleaving");
  }

  // Causal within 4 chunks of 8: 4 * (1 + ... + 8) pairs. A window of 8 keys: i + 1 keys for the
  // first 8 queries, 8 for the other 24.
  check(write_mask(dir / "chunk_mask.csv", {.heads = 1, .causal = true, .chunk_size = 8}, 32, 4) == 4 * 36,
        "chunk mask pairs");
  check(write_mask(dir / "window_mask.csv", {.heads = 1, .causal = true, .window_left = 7}, 32, 4) == 36 + 24 * 8,
        "window mask pairs");

  {
    // Gemma 3 27B and Llama 4 Scout (text_config), the fields layer_encoding_from_config reads.
    const posenc::config_map gemma{{"model_type", std::string("gemma3_text")},
                                   {"num_hidden_layers", std::int64_t{62}},
                                   {"head_dim", std::int64_t{128}},
                                   {"sliding_window", std::int64_t{1024}},
                                   {"rope_theta", 1000000.0},
                                   {"rope_local_base_freq", 10000.0}};
    const posenc::config_map gemma_scaling{{"rope_type", std::string("linear")}, {"factor", 8.0}};
    const posenc::config_map llama{{"model_type", std::string("llama4_text")},
                                   {"num_hidden_layers", std::int64_t{48}},
                                   {"head_dim", std::int64_t{128}},
                                   {"rope_theta", 500000.0},
                                   {"attention_chunk_size", std::int64_t{8192}},
                                   {"attn_temperature_tuning", true}};
    pictures::csv out(dir / "layers.csv",
                      {"layer", "gemma_base", "gemma_window", "llama_rope", "llama_chunk", "llama_temperature"});
    for (index_t layer = 0; layer < 24; ++layer) {
      const posenc::layer_encoding g = posenc::layer_encoding_from_config(gemma, gemma_scaling, layer);
      const posenc::layer_encoding l = posenc::layer_encoding_from_config(llama, {}, layer);
      // Gemma 3: every sixth layer global (base 1e6, no window); Llama 4: every fourth layer NoPE.
      check(g.rope && (g.window_left == 1023) == ((layer + 1) % 6 != 0), "Gemma 3 layer pattern");
      check(l.rope.has_value() == ((layer + 1) % 4 != 0) && l.temperature.has_value() != l.rope.has_value(),
            "Llama 4 layer pattern");
      out.row({double(layer), g.rope->base, double(g.window_left), l.rope ? 1.0 : 0.0, double(l.chunk_size.value_or(0)),
               l.temperature ? 1.0 : 0.0});
    }
    out.finish();
  }

  {
    const posenc::query_temperature t({.floor_scale = 8192, .attn_scale = 0.1});
    pictures::csv out(dir / "temperature.csv", {"position", "factor"});
    for (position p = 0; p <= (position{1} << 21); p += 1024) out.row({double(p), t.factor(p)});
    out.finish();
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "positions_2025: %s\n", e.what());
  return 1;
}
