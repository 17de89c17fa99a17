// What bench_attention and probe_memory share: the encoders each benchmark point runs with, the
// inputs, the count of visible (query, key) pairs behind the FLOP figures, the memory the naive
// path would need, and the run settings scripts/bench passes through the environment.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "run_settings.hpp"

namespace posenc_bench {

using posenc::index_t;
using posenc::position;

/// An `r x c` matrix of pseudo-random values, uniform in [-1.73, 1.73) (unit variance). A 64-bit
/// xorshift, not <random>'s normal distribution: inputs of a gigabyte are filled in a fraction of
/// a second instead of several seconds per benchmark point.
inline posenc::row_matrix<float> random_matrix(index_t r, index_t c, unsigned seed) {
  std::uint64_t x = 0x9E3779B97F4A7C15ull * (seed + 1);
  posenc::row_matrix<float> m(r, c);
  for (index_t i = 0; i < m.size(); ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    m.data()[i] = static_cast<float>(static_cast<double>(x >> 40) * (3.4641016 / 16777216.0) - 1.7320508);
  }
  return m;
}

// ---- shapes, work and memory ----

/// One attention call: `n_q` queries at the end of `n_kv` keys (positions `n_kv - n_q ..`), so a
/// single query is decode and `n_q = n_kv` is prefill.
struct shape {
  index_t n_q = 0, n_kv = 0, heads = 8, kv_heads = 8, d = 128;
  bool causal = false;
  position window = -1;  ///< window_left; -1 = none

  posenc::attention_params params() const {
    return {.heads = heads, .kv_heads = kv_heads, .causal = causal, .window_left = window, .executor = &pool()};
  }
  /// The kernels' workers: one per hardware thread, started once per process.
  static posenc::thread_pool& pool() {
    static posenc::thread_pool p;
    return p;
  }
  posenc::positions qpos() const { return posenc::arange(n_kv - n_q, n_q); }
  posenc::positions kpos() const { return posenc::arange(0, n_kv); }
};

/// (query, key) pairs the mask lets through, per head: the work attention must do.
inline double visible_pairs(const shape& s) {
  double pairs = 0;
  for (index_t i = 0; i < s.n_q; ++i) {
    const position p = s.n_kv - s.n_q + i;
    position hi = s.causal ? p : s.n_kv - 1;
    position lo = s.window >= 0 ? std::max<position>(0, p - s.window) : 0;
    hi = std::min<position>(hi, s.n_kv - 1);
    if (hi >= lo) pairs += static_cast<double>(hi - lo + 1);
  }
  return pairs;
}

/// FLOP of one call: 2d for q.k and 2d for p*v per visible pair and head.
inline double attention_flop(const shape& s) { return 4.0 * static_cast<double>(s.d) * visible_pairs(s) * static_cast<double>(s.heads); }

/// Bytes of q, k, v and out (float).
inline double input_bytes(const shape& s) {
  return 4.0 * static_cast<double>((2 * s.n_q * s.heads + 2 * s.n_kv * s.kv_heads) * s.d);
}

/// What attention_reference allocates: the [n_q, n_kv] scores and one head's copies of q, k, v
/// and out (float).
inline double naive_kernel_bytes(const shape& s) {
  return 4.0 * (static_cast<double>(s.n_q) * static_cast<double>(s.n_kv) +
                static_cast<double>((2 * s.n_q + 2 * s.n_kv) * s.d));
}

// ---- encoders ----

/// The encoders of the attention benchmarks: none, RoPE under each frequency policy (all with the
/// rotation inside the kernel), ALiBi, T5 and Shaw. Sinusoidal acts on embeddings before the
/// projections, so attention runs with `none` for it (its own cost is in bench_encoders).
enum class encoder : int {
  none, rope, rope_linear, rope_ntk, rope_dynamic_ntk, rope_yarn, rope_llama3, rope_longrope, alibi, t5, shaw, count
};

inline constexpr std::string_view encoder_names[] = {"none",        "rope",      "rope_linear", "rope_ntk",
                                                     "rope_dynamic_ntk", "rope_yarn", "rope_llama3", "rope_longrope",
                                                     "alibi",       "t5",        "shaw"};

inline std::string_view name_of(encoder e) { return encoder_names[static_cast<int>(e)]; }

inline bool parse_encoder(std::string_view s, encoder& out) {
  for (int i = 0; i < static_cast<int>(encoder::count); ++i)
    if (encoder_names[i] == s) {
      out = static_cast<encoder>(i);
      return true;
    }
  return false;
}

/// The frequency policy of each RoPE variant, with the settings of a model that uses it
/// (`n`: the sequence length, for the policies that depend on it).
inline posenc::rope_params rope_params_of(encoder e, index_t d, index_t n) {
  posenc::rope_params p{.head_dim = d, .base = 10000.0};
  switch (e) {
    case encoder::rope_linear: p.scaling = posenc::linear_scaling{.factor = 4}; break;
    case encoder::rope_ntk: p.scaling = posenc::ntk_aware_scaling{.alpha = 8}; break;
    case encoder::rope_dynamic_ntk:
      p.scaling = posenc::dynamic_ntk_scaling{.factor = 4, .original_max_position = 2048, .sequence_length = n};
      break;
    case encoder::rope_yarn: p.scaling = posenc::yarn_scaling{.factor = 16, .original_max_position = 4096}; break;
    case encoder::rope_llama3:
      p.base = 500000.0;
      p.scaling = posenc::llama3_scaling{};
      break;
    case encoder::rope_longrope: {
      std::vector<double> short_f, long_f;
      for (index_t i = 0; i < d / 2; ++i) {
        short_f.push_back(1.0 + 0.5 * static_cast<double>(i) / static_cast<double>(d));
        long_f.push_back(1.0 + 8.0 * static_cast<double>(i) / static_cast<double>(d));
      }
      p.scaling = posenc::longrope_scaling{.short_factor = short_f, .long_factor = long_f,
                                           .original_max_position = 4096, .max_position = 131072,
                                           .sequence_length = n};
      break;
    }
    default: break;
  }
  return p;
}

/// Calls `f(enc)` with encoder `e` built for `heads` heads of width `d` and sequences of `n`.
template <class F>
void with_encoder(encoder e, index_t heads, index_t d, index_t n, F&& f) {
  switch (e) {
    case encoder::none: f(posenc::no_position<float>{}); return;
    case encoder::alibi: f(posenc::alibi<float>({.num_heads = heads})); return;
    case encoder::t5: f(posenc::t5_relative_bias<float>({.num_heads = heads}, random_matrix(32, heads, 4))); return;
    case encoder::shaw: {
      const auto table = random_matrix(2 * 16 + 1, d, 5);
      f(posenc::shaw_relative<float>({.head_dim = d, .max_relative_position = 16}, table, table));
      return;
    }
    default: f(posenc::rope<float>(rope_params_of(e, d, n))); return;
  }
}

}  // namespace posenc_bench
