// Quickstart: Llama 3.1 RoPE from its Hugging Face rope_scaling entry, applied in place to an
// engine's query and key buffers, then causal blockwise attention; and the same layer with ALiBi.
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
  rope.rotate(q, pos);  // every head, in place
  rope.rotate(k, pos);  // keys are rotated once, as a KV cache stores them

  // Causal attention over the rotated queries and keys, GQA 8/2, tile by tile.
  posenc::row_matrix<float> out(tokens, heads * head_dim);
  const posenc::attention_params params{
      .heads = heads, .kv_heads = kv_heads, .causal = true, .rotation = posenc::rotation_mode::already_rotated};
  posenc::attention(q, k, v, out, pos, pos, rope, params);

  // ALiBi (BLOOM, MPT): a bias on the logits instead of a rotation.
  const posenc::alibi<float> alibi({.num_heads = heads});
  posenc::row_matrix<float> out_alibi(tokens, heads * head_dim);
  posenc::attention(q, k, v, out_alibi, pos, pos, alibi, {.heads = heads, .kv_heads = kv_heads, .causal = true});

  // Check both against the naive reference, which materialises every score.
  posenc::row_matrix<float> ref(tokens, heads * head_dim), ref_alibi(tokens, heads * head_dim);
  posenc::attention_reference(q, k, v, ref, pos, pos, rope, params);
  posenc::attention_reference(q, k, v, ref_alibi, pos, pos, alibi,
                              {.heads = heads, .kv_heads = kv_heads, .causal = true});
  const float err = (out - ref).cwiseAbs().maxCoeff();
  const float err_alibi = (out_alibi - ref_alibi).cwiseAbs().maxCoeff();
  std::printf("%.*s: largest difference from the naive reference %.2g (RoPE, llama3 scaling), %.2g (ALiBi)\n",
              static_cast<int>(rope.name().size()), rope.name().data(), static_cast<double>(err),
              static_cast<double>(err_alibi));
  return err < 1e-4f && err_alibi < 1e-4f ? 0 : 1;
}
