// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file concepts.hpp
/// One concept for every positional encoder, and one refinement per way of telling attention
/// where a token is.
///
/// | family           | acts on                                   | refinement            |
/// |------------------|-------------------------------------------|-----------------------|
/// | additive input   | embeddings before the projections         | `additive_input`      |
/// | rotation         | queries and keys, in place                | `rotation`            |
/// | score bias       | attention logits, one tile at a time      | `position_bias`,      |
/// |                  |                                           | `relative_key_value`  |
///
/// Attention code takes any `positional_encoding` and dispatches on `E::family` with
/// `if constexpr`.

#include <concepts>
#include <string_view>

#include "posenc/types.hpp"

namespace posenc {

/// How an encoder acts on attention.
enum class encoding_family {
  none,            ///< no positional information (`no_position`)
  additive_input,  ///< `x[i] += p(pos[i])` on token embeddings, before the Q/K/V projections
  rotation,        ///< `q[i] = R(pos[i]) q[i]`, `k[j] = R(pos[j]) k[j]`, in place
  score_bias,      ///< `s[i][j] += b(head, qpos[i], kpos[j])` on the logits
};

/// What every encoder has: an arithmetic type (`float` or `double`), its family as a
/// compile-time constant, and a short name for reports.
template <class E>
concept positional_encoding = requires(const E& e) {
  typename E::scalar_type;
  requires std::same_as<typename E::scalar_type, float> || std::same_as<typename E::scalar_type, double>;
  { E::family } -> std::convertible_to<encoding_family>;
  { e.name() } -> std::convertible_to<std::string_view>;
};

/// An encoder added to token embeddings: `add_to(x, pos)` adds `p(pos[i])` to row `i` of the
/// `[tokens, dim]` matrix `x` in place.
template <class E>
concept additive_input = positional_encoding<E> && E::family == encoding_family::additive_input &&
                         requires(const E& e, strided_view<typename E::scalar_type> x, positions p) {
                           { e.dim() } -> std::convertible_to<index_t>;
                           e.add_to(x, p);
                         };

/// An encoder that rotates queries and keys: `rotate(x, pos)` rotates every head of the
/// `[tokens, heads * head_dim]` matrix `x` in place by the angles of `pos[i]`.
template <class E>
concept rotation = positional_encoding<E> && E::family == encoding_family::rotation &&
                   requires(const E& e, strided_view<typename E::scalar_type> x, positions p) {
                     { e.head_dim() } -> std::convertible_to<index_t>;
                     e.rotate(x, p);
                   };

/// Any encoder that acts on the attention logits.
template <class E>
concept score_bias = positional_encoding<E> && E::family == encoding_family::score_bias;

/// A score bias that depends on the head and the two positions only (ALiBi, T5):
/// `add_bias_tile(tile, head, qpos, kpos)` adds `b(head, qpos[i], kpos[j])` to `tile(i, j)`.
/// `head` is the query head index_t local to the caller; the encoder maps it to a global index_t.
template <class E>
concept position_bias = score_bias<E> && requires(const E& e, strided_view<float> tile, positions p, index_t h) {
  { e.bias(h, position{}, position{}) } -> std::convertible_to<double>;
  e.add_bias_tile(tile, h, p, p);
};

/// A score bias that also depends on the query vector and adds a value term (Shaw et al. 2018
/// relative keys and values). See `shaw_relative` for the blockwise protocol.
template <class E>
concept relative_key_value = score_bias<E> && E::has_value_term;

/// No positional information: satisfies `positional_encoding` and does nothing.
template <class T = float>
struct no_position {
  using scalar_type = T;
  static constexpr encoding_family family = encoding_family::none;
  static constexpr std::string_view name() { return "none"; }
};

}  // namespace posenc
