// Quickstart: Llama 3.1 RoPE from its Hugging Face rope_scaling entry, two ways: applied in place
// to an engine's query and key buffers (keys rotated once, as a KV cache stores them) and then
// attended with no further encoding, or applied inside the attention call to the raw q and k.
// Then the same layer with ALiBi.
// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <cstdio>
#include <random>

#include "posenc/posenc.hpp"

int main() {
  using posenc::index_t;
  constexpr index_t tokens = 256, heads = 8, kv_heads = 2, head_dim = 64;

  // The engine's buffers: row-major [tokens, heads * head_dim], used in place.
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  posenc::row_matrix<float> q(tokens, heads * head_dim), k(tokens, kv_heads * head_dim), v(tokens, kv_heads * head_dim);
  for (auto* m : {&q, &k, &v})
    for (index_t i = 0; i < m->size(); ++i) m->data()[i] = normal(rng);
  const auto pos = posenc::arange(0, tokens);  // int64 positions, one per token

  // RoPE exactly as Llama 3.1 was trained: base 5e5 and its rope_scaling dict from config.json.
  const posenc::rope<float> rope({.head_dim = head_dim, .base = 500000.0},
                                 {{"rope_type", "llama3"},
                                  {"factor", 8.0},
                                  {"low_freq_factor", 1.0},
                                  {"high_freq_factor", 4.0},
                                  {"original_max_position_embeddings", 8192}});
  const posenc::attention_params params{.heads = heads, .kv_heads = kv_heads, .causal = true};

  // Either: RoPE inside the call. The kernel rotates copies of q and k tiles; q and k stay raw.
  posenc::row_matrix<float> out(tokens, heads * head_dim);
  posenc::attention(q, k, v, out, pos, pos, rope, params);

  // Or: rotate in place first (an engine rotates each key once, when it enters the cache), then
  // attend the rotated q and k with no_position. The encoder given to attention is always
  // applied by it, so passing `rope` here too would rotate twice.
  posenc::row_matrix<float> q_rot = q, k_rot = k;
  rope.rotate(q_rot, pos);  // every head, in place
  rope.rotate(k_rot, pos);
  posenc::row_matrix<float> out_rot(tokens, heads * head_dim);
  posenc::attention(q_rot, k_rot, v, out_rot, pos, pos, posenc::no_position<float>{}, params);

  // ALiBi (BLOOM, MPT): a bias on the logits instead of a rotation.
  const posenc::alibi<float> alibi({.num_heads = heads});
  posenc::row_matrix<float> out_alibi(tokens, heads * head_dim);
  posenc::attention(q, k, v, out_alibi, pos, pos, alibi, {.heads = heads, .kv_heads = kv_heads, .causal = true});

  // Check all three against the naive reference, which materialises every score.
  posenc::row_matrix<float> ref(tokens, heads * head_dim), ref_alibi(tokens, heads * head_dim);
  posenc::attention_reference(q, k, v, ref, pos, pos, rope, params);
  posenc::attention_reference(q, k, v, ref_alibi, pos, pos, alibi, params);
  const float err = (out - ref).cwiseAbs().maxCoeff();
  const float err_rot = (out_rot - ref).cwiseAbs().maxCoeff();
  const float err_alibi = (out_alibi - ref_alibi).cwiseAbs().maxCoeff();
  std::printf("%.*s: largest difference from the naive reference %.2g (in the call), %.2g (rotated first); "
              "ALiBi %.2g\n",
              static_cast<int>(rope.name().size()), rope.name().data(), static_cast<double>(err),
              static_cast<double>(err_rot), static_cast<double>(err_alibi));
  return err < 1e-4f && err_rot < 1e-4f && err_alibi < 1e-4f ? 0 : 1;
}
