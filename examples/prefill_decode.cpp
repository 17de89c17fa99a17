// Prefill then decode against a KV cache, as an inference engine runs a layer: once with RoPE
// (keys rotated once, when they enter the cache) and once with ALiBi (a bias from positions).
// Each decoded token is checked against causal attention over the whole sequence at once.
// SPDX-License-Identifier: Apache-2.0
#include <algorithm>
#include <cstdio>
#include <random>

#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
constexpr index_t heads = 8, kv_heads = 2, head_dim = 64, prompt = 500, generated = 12, total = prompt + generated;

posenc::row_matrix<float> random_rows(index_t rows, index_t cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  posenc::row_matrix<float> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

// Runs prefill and decode with `enc`; returns the largest difference from one causal pass.
template <class E>
float run(const E& enc, const posenc::row_matrix<float>& q, const posenc::row_matrix<float>& k,
          const posenc::row_matrix<float>& v) {
  constexpr bool rotation = posenc::rotation<E>;
  const posenc::attention_params params{.heads = heads, .kv_heads = kv_heads, .causal = true};
  // The engine's cache, sized for the whole sequence; queries are rotated as they come. Once
  // rotated, q and k are attended with no_position: the encoder given to attention is applied by
  // it, and RoPE must act once. ALiBi acts inside the call, from the positions.
  posenc::row_matrix<float> k_cache = k, q_rot = q;
  if constexpr (rotation) {
    enc.rotate(k_cache, posenc::arange(0, total));
    enc.rotate(q_rot, posenc::arange(0, total));
  }
  const auto in_call = [&] {
    if constexpr (rotation) {
      return posenc::no_position<float>{};
    } else {
      return enc;
    }
  }();
  posenc::attention_workspace ws;  // reused by every step: no allocation after the first
  posenc::row_matrix<float> out(total, heads * head_dim);

  // Prefill: the prompt attends to itself.
  posenc::attention(q_rot.topRows(prompt), k_cache.topRows(prompt), v.topRows(prompt), out.topRows(prompt),
                    posenc::arange(0, prompt), posenc::arange(0, prompt), in_call, params, nullptr, &ws);
  // Decode: one new token at position t against the t + 1 cached keys.
  for (index_t t = prompt; t < total; ++t) {
    posenc::attention(q_rot.middleRows(t, 1), k_cache.topRows(t + 1), v.topRows(t + 1), out.middleRows(t, 1),
                      posenc::arange(t, 1), posenc::arange(0, t + 1), in_call, params, nullptr, &ws);
  }

  posenc::row_matrix<float> whole(total, heads * head_dim);
  posenc::attention_reference(q, k, v, whole, posenc::arange(0, total), posenc::arange(0, total), enc, params);
  return (out - whole).cwiseAbs().maxCoeff();
}

}  // namespace

int main() {
  const auto q = random_rows(total, heads * head_dim, 1);
  const auto k = random_rows(total, kv_heads * head_dim, 2);
  const auto v = random_rows(total, kv_heads * head_dim, 3);

  const posenc::rope<float> rope({.head_dim = head_dim, .base = 10000.0});
  const posenc::alibi<float> alibi({.num_heads = heads});
  const float err_rope = run(rope, q, k, v);
  const float err_alibi = run(alibi, q, k, v);
  std::printf("prefill %td tokens, decode %td: largest difference from one causal pass %.2g (RoPE), %.2g (ALiBi)\n",
              prompt, generated, static_cast<double>(err_rope), static_cast<double>(err_alibi));
  return std::max(err_rope, err_alibi) < 1e-4f ? 0 : 1;
}
