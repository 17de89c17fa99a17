// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/reference.hpp
/// Naive attention that materialises the `[n_q, n_kv]` scores of each head: the test oracle and
/// the benchmark baseline. It allocates O(n_q * n_kv) per head; use the blockwise kernel for
/// anything long.

#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "posenc/attention/params.hpp"
#include "posenc/attention/plan.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/attention_kernels.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Softmax attention with any positional encoder, computed naively in `compute_t<S>`.
///
///     s_ij = scale * (q_i . k_j) + b(h, qpos_i, kpos_j)      (score-bias encoders)
///     s_ij = c tanh(s_ij / c)                                 (softcap c > 0)
///     out_i = sum_j e^(s_ij) v_j / (e^(z_h) + sum_j e^(s_ij))   (sink z_h; without one, e^(z_h) = 0)
///
/// \param q     `[n_q, heads * d]` row-major, any row stride.
/// \param k, v  `[n_kv, kv_heads * d]`; query head `h` reads kv head `h / (heads / kv_heads)`.
/// \param out   `[n_q, heads * d]`, written.
/// \param qpos, kpos  one int64 position per row of q and of k.
/// \param enc   applied by this call: a rotation encoder rotates copies of q and k (pass
///              `no_position` for inputs rotated already); a score-bias encoder adds its bias to
///              the scaled logits (Shaw's relative keys are scaled with the logits, its value term
///              is added to the output); additive-input encoders belong before the projections and
///              are refused.
/// \param lse   optional `[n_q, heads]` (float or double): the natural log-sum-exp of each row's
///              scaled logits, `-inf` for a row with no visible key (whose output is zero).
/// Allocates the score matrix and copies of q/k for rotation.
template <class Q, class K, class V, class O, positional_encoding E, class L = std::nullptr_t>
void attention_reference(Q&& q, K&& k, V&& v, O&& out, positions qpos, positions kpos, const E& enc,
                         const attention_params& p, L&& lse = nullptr) {
  static_assert(E::family != encoding_family::additive_input,
                "posenc::attention: additive-input encoders (sinusoidal) act on token embeddings before the Q/K/V "
                "projections; call enc.add_to(embeddings, positions) there and pass posenc::no_position here");
  auto qv = view_of(std::forward<Q>(q));
  auto kv = view_of(std::forward<K>(k));
  auto vv = view_of(std::forward<V>(v));
  auto ov = view_of(std::forward<O>(out));
  using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
  using C = compute_t<S>;
  static_assert(!std::is_const_v<std::remove_pointer_t<decltype(ov.data)>>, "posenc::attention: out must be writable");

  const auto sh = detail::check_attention(p, qv.rows, qv.cols, kv.rows, kv.cols, vv.rows, vv.cols, ov.rows, ov.cols,
                                          qpos.size(), kpos.size());
  constexpr bool want_lse = !std::is_null_pointer_v<std::remove_cvref_t<L>>;
  [[maybe_unused]] auto lse_view = detail::lse_view_of(std::forward<L>(lse), sh);
  detail::check_encoder_fits(enc, sh);
  auto set_lse = [&](index_t i, index_t h, C value) {
    if constexpr (want_lse) lse_view(i, h) = static_cast<std::remove_reference_t<decltype(lse_view(i, h))>>(value);
  };
  const index_t d = sh.head_dim;
  constexpr C neg_inf = -std::numeric_limits<C>::infinity();

  using mat = row_matrix<C>;
  mat qh(sh.n_q, d), kh(sh.n_kv, d), vh(sh.n_kv, d), scores(sh.n_q, sh.n_kv), oh(sh.n_q, d);
  for (index_t h = 0; h < sh.heads; ++h) {
    const index_t g = h / sh.group;
    for (index_t i = 0; i < sh.n_q; ++i)
      for (index_t c = 0; c < d; ++c) qh(i, c) = static_cast<C>(qv(i, h * d + c));
    for (index_t j = 0; j < sh.n_kv; ++j)
      for (index_t c = 0; c < d; ++c) {
        kh(j, c) = static_cast<C>(kv(j, g * d + c));
        vh(j, c) = static_cast<C>(vv(j, g * d + c));
      }
    if constexpr (E::family == encoding_family::rotation) {
      if constexpr (std::same_as<typename E::scalar_type, C>) {
        enc.rotate(qh, qpos);
        enc.rotate(kh, kpos);
      } else {
        // An encoder of another precision: rotate in its own type, then come back.
        using ET = typename E::scalar_type;
        row_matrix<ET> qe = qh.template cast<ET>(), ke = kh.template cast<ET>();
        enc.rotate(qe, qpos);
        enc.rotate(ke, kpos);
        qh = qe.template cast<C>();
        kh = ke.template cast<C>();
      }
    }
    if (p.bf16_qk) {
      // attention_params::bf16_qk: the products of the rotated query and key rounded to bf16.
      qh = qh.unaryExpr([](C x) { return detail::round_to_bf16(x); });
      kh = kh.unaryExpr([](C x) { return detail::round_to_bf16(x); });
    }
    scores.noalias() = qh * kh.transpose();
    if constexpr (relative_key_value<E>) {
      mat terms(sh.n_q, enc.num_relative());
      enc.query_terms(qh, terms);
      enc.add_bias_tile(scores, terms, qpos, kpos);
    }
    scores *= static_cast<C>(sh.scale);
    if constexpr (position_bias<E>) enc.add_bias_tile(scores, h, qpos, kpos);
    if (p.softcap > 0) {
      const C cap = static_cast<C>(p.softcap);
      scores = (scores.array() / cap).tanh() * cap;
    }
    // The sink joins the denominator as one more logit with no value.
    const C sink = p.sinks.empty() ? neg_inf : static_cast<C>(p.sinks[static_cast<std::size_t>(h)]);

    mat weights;
    if constexpr (relative_key_value<E>) weights = mat::Zero(sh.n_q, enc.num_relative());
    for (index_t i = 0; i < sh.n_q; ++i) {
      C m = neg_inf;
      for (index_t j = 0; j < sh.n_kv; ++j) {
        if (!sh.mask.visible(qpos[i], kpos[j])) scores(i, j) = neg_inf;
        m = std::max(m, scores(i, j));
      }
      if (m == neg_inf) {
        // Nothing visible, or (the maximum skips NaN) only NaN and masked logits: NaN policy of
        // docs/numerics.md, a NaN the row sees makes the row NaN.
        const bool nan_seen = scores.row(i).array().isNaN().any();
        scores.row(i).setConstant(nan_seen ? std::numeric_limits<C>::quiet_NaN() : C(0));
        set_lse(i, h, nan_seen ? std::numeric_limits<C>::quiet_NaN() : sink);
        continue;
      }
      m = std::max(m, sink);
      C l = sink == neg_inf ? C(0) : std::exp(sink - m);
      for (index_t j = 0; j < sh.n_kv; ++j) {
        const C e = scores(i, j) == neg_inf ? C(0) : std::exp(scores(i, j) - m);
        scores(i, j) = e;
        l += e;
      }
      scores.row(i) /= l;
      set_lse(i, h, m + std::log(l));
    }
    oh.noalias() = scores * vh;
    if constexpr (relative_key_value<E>) {
      enc.accumulate_value_weights(scores, qpos, kpos, weights);
      enc.add_value_term(weights, oh);
    }
    for (index_t i = 0; i < sh.n_q; ++i)
      for (index_t c = 0; c < d; ++c) ov(i, h * d + c) = static_cast<S>(oh(i, c));
  }
}

}  // namespace posenc
