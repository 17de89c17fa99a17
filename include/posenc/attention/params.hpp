// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/params.hpp
/// `attention_params`, the runtime knobs shared by the naive reference, the blockwise kernel and
/// ring attention, and their validation.

#include <cmath>
#include <limits>
#include <span>
#include <optional>
#include <type_traits>

#include "posenc/attention/mask.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/executor.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Runtime knobs of attention. Every field has a default:
/// `posenc::attention(q, k, v, out, qpos, kpos, enc, {.heads = 32, .kv_heads = 8, .causal = true})`.
///
/// Masking compares positions (see attention/mask.hpp): key j is visible to query i when
/// - `causal`: `kpos[j] <= qpos[i]` (so a query block at the end of a longer KV cache is
///   bottom-right aligned without special cases), and
/// - `window_left >= 0`: `kpos[j] >= qpos[i] - window_left`, and
/// - `window_right >= 0`: `kpos[j] <= qpos[i] + window_right` (moot under `causal`), and
/// - `chunk_size = c`: `floor(kpos[j] / c) == floor(qpos[i] / c)` (chunked attention, Llama 4's
///   `attention_chunk_size`: a token sees only the keys of its own chunk of `c` positions).
/// The window is FlashAttention's `window_size = (left, right)` convention; -1 means unbounded.
///
/// The encoder passed with these knobs is always applied by the call: a rotation (RoPE) rotates
/// copies of the query and key tiles with their positions. Queries and keys that the caller has
/// rotated already (a KV cache of rotated keys) are attended with `posenc::no_position`.
struct attention_params {
  index_t heads = 1;              ///< query heads; q has `heads * head_dim` columns
  index_t kv_heads = 0;           ///< key/value heads (0 = heads); heads must be a multiple (GQA/MQA)
  std::optional<double> scale{};  ///< logit scale; default `1/sqrt(head_dim)`
  /// Logit soft-capping (Gemma 2): every logit `s` (scaled, biases added) becomes
  /// `softcap * tanh(s / softcap)` before masking; 0 = off.
  double softcap = 0;
  /// Attention sinks (gpt-oss): one learned logit per query head that joins every row's softmax
  /// denominator and contributes no value, so `out_i = sum_j e^(s_ij) v_j / (e^(z_h) + sum_j e^(s_ij))`
  /// and `lse_i = log(e^(z_h) + sum_j e^(s_ij))`. `heads` values (local heads), or empty for none;
  /// borrowed, not copied. A row that sees no key gives zeros and `lse = z_h`.
  std::span<const float> sinks{};
  /// bf16 products for Q K^T, as a bf16 model computes its logits: the query and the key, after the
  /// encoder's rotation, are rounded to bf16 (to nearest even); their products (exact in float) are
  /// summed in float and the sum is scaled. Keys stored as bf16 that need no rotation are already
  /// bf16, and queries given in bf16 too, so for inputs of a bf16 model rotated by the caller (or
  /// encoders without a rotation) the logits are as accurate as in the float path. Where the CPU has
  /// AVX512_BF16, prefill computes Q K^T with its `vdpbf16ps` dot products (two products per float
  /// lane, about 1.85x the multiply-adds per second of float FMA); elsewhere the float kernels
  /// multiply the rounded values. Forward only: `attention_backward` refuses it.
  bool bf16_qk = false;
  bool causal = false;            ///< mask keys after the query's position
  position window_left = -1;      ///< sliding window: keys at most this far behind the query; -1 = unbounded
  position window_right = -1;     ///< keys at most this far ahead of the query; -1 = unbounded
  /// Chunked attention: keys visible only in the query's chunk of this many positions (must be
  /// > 0); empty = no chunks. Whole tiles outside every query's chunk are skipped.
  std::optional<position> chunk_size{};
  index_t q_tile = 0;             ///< query rows per tile; 0 = the kernel's default; larger than the call: the call
  index_t k_tile = 0;             ///< key rows per tile; 0 = the kernel's default; larger than the call: the call
  int threads = 0;                ///< workers of the executor to use; 0 = all it has, 1 = the calling thread only
  posenc::executor* executor = nullptr;  ///< where the work items run; nullptr = `posenc::default_executor()`
};

namespace detail {

/// Validated shape of one attention call.
struct attention_shape {
  index_t n_q, n_kv, heads, kv_heads, head_dim, group;
  double scale;
  mask_rule mask;
};

/// The row of query head `h` after the sink `z` joins its softmax: `o *= e^(lse - lse')`,
/// `lse' = log(e^lse + e^z)`. `lse = -inf` (no key seen) gives `o = 0`, `lse' = z`.
template <class C>
C sink_weight(C lse, C z, C& lse_out) {
  if (z == -std::numeric_limits<C>::infinity()) {
    lse_out = lse;
    return C(1);
  }
  if (lse == -std::numeric_limits<C>::infinity()) {
    lse_out = z;
    return C(0);
  }
  const C m = std::max(lse, z);
  const C sum = std::exp(lse - m) + std::exp(z - m);  // in [1, 2]
  lse_out = m + std::log(sum);
  return std::exp(lse - lse_out);
}

/// The visibility rule of `p` (its knobs as checked by `check_params`): every path builds its
/// `mask_rule` here, so a new kind of mask reaches all of them.
inline mask_rule mask_rule_of(const attention_params& p) {
  return mask_rule{p.causal, p.window_left, p.window_right, p.chunk_size.value_or(0)};
}

/// Checks the knobs that do not depend on the matrices (std::invalid_argument naming the field);
/// returns the kv head count (`kv_heads`, or `heads` for 0).
inline index_t check_params(const attention_params& p) {
  require(p.heads > 0, "attention_params.heads", p.heads, "must be positive");
  const index_t kvh = p.kv_heads == 0 ? p.heads : p.kv_heads;
  require(kvh > 0, "attention_params.kv_heads", p.kv_heads, "must be positive (or 0 for heads)");
  if (p.heads % kvh != 0) invalid("attention_params.kv_heads", p.kv_heads, "must divide heads = " + to_text(p.heads));
  require(p.window_left >= -1, "attention_params.window_left", p.window_left, "must be >= -1 (-1 = unbounded)");
  require(p.window_right >= -1, "attention_params.window_right", p.window_right, "must be >= -1 (-1 = unbounded)");
  if (p.chunk_size)
    require(*p.chunk_size > 0, "attention_params.chunk_size", *p.chunk_size, "must be > 0 (leave it empty for none)");
  require(p.q_tile >= 0, "attention_params.q_tile", p.q_tile, "must be >= 0 (0 = default)");
  require(p.k_tile >= 0, "attention_params.k_tile", p.k_tile, "must be >= 0 (0 = default)");
  require(p.threads >= 0, "attention_params.threads", p.threads, "must be >= 0 (0 = all the executor has)");
  if (p.scale) require(std::isfinite(*p.scale), "attention_params.scale", *p.scale, "must be finite");
  require(std::isfinite(p.softcap) && p.softcap >= 0, "attention_params.softcap", p.softcap,
          "must be finite and >= 0 (0 = off)");
  if (!p.sinks.empty()) {
    if (static_cast<index_t>(p.sinks.size()) != p.heads)
      invalid("attention_params.sinks size", p.sinks.size(), "must be heads = " + to_text(p.heads) + " (one per head)");
    for (std::size_t h = 0; h < p.sinks.size(); ++h)
      if (std::isnan(p.sinks[h]) || p.sinks[h] == std::numeric_limits<float>::infinity())
        invalid("attention_params.sinks[" + to_text(h) + "]", p.sinks[h], "must be finite (or -inf for no sink)");
  }
  return kvh;
}

/// Checks the knobs (std::invalid_argument naming the field) and the shapes
/// (`precondition_error` with the sizes).
inline attention_shape check_attention(const attention_params& p, index_t q_rows, index_t q_cols, index_t k_rows,
                                       index_t k_cols, index_t v_rows, index_t v_cols, index_t o_rows, index_t o_cols,
                                       index_t n_qpos, index_t n_kpos) {
  const index_t kvh = check_params(p);
  POSENC_ASSERT(q_cols % p.heads == 0, "attention: q has ", q_cols, " columns, not a multiple of heads = ", p.heads);
  const index_t d = q_cols / p.heads;
  POSENC_ASSERT(d > 0, "attention: q has ", q_cols, " columns, so head_dim = q columns / heads is 0");
  POSENC_ASSERT(k_cols == kvh * d, "attention: k has ", k_cols, " columns but kv_heads * head_dim = ", kvh, " * ", d,
                " = ", kvh * d, " are needed");
  POSENC_ASSERT(v_cols == kvh * d, "attention: v has ", v_cols, " columns but kv_heads * head_dim = ", kvh, " * ", d,
                " = ", kvh * d, " are needed");
  POSENC_ASSERT(v_rows == k_rows, "attention: k has ", k_rows, " rows but v has ", v_rows);
  POSENC_ASSERT(o_rows == q_rows && o_cols == q_cols, "attention: out is [", o_rows, ", ", o_cols, "] but q is [",
                q_rows, ", ", q_cols, "]");
  POSENC_ASSERT(n_qpos == q_rows, "attention: ", n_qpos, " query positions for ", q_rows, " rows of q");
  POSENC_ASSERT(n_kpos == k_rows, "attention: ", n_kpos, " key positions for ", k_rows, " rows of k");
  const double scale = p.scale ? *p.scale : 1.0 / std::sqrt(static_cast<double>(d));
  return {q_rows, k_rows, p.heads, kvh, d, p.heads / kvh, scale, mask_rule_of(p)};
}

/// `M` is a `heads_view` (of any constness).
template <class M>
inline constexpr bool heads_view_arg = is_heads_view_v<std::remove_cvref_t<M>>;
/// Some argument among `M...` is a `heads_view` (the call then takes the heads_view path).
template <class... M>
inline constexpr bool any_heads_view = (heads_view_arg<M> || ...);

/// An argument of `attention` as a `heads_view`: a `heads_view` as it is, a matrix
/// `[tokens, heads * head_dim]` split into `heads` heads.
template <class M>
auto heads_of(M&& m, index_t heads, const char* name) {
  if constexpr (heads_view_arg<M>) {
    return std::remove_cvref_t<M>(m);
  } else {
    const auto v = view_of(std::forward<M>(m));
    using S = std::remove_pointer_t<decltype(v.data)>;
    POSENC_ASSERT(v.cols % heads == 0, "attention: ", name, " has ", v.cols, " columns, not a multiple of its ", heads,
                  " heads");
    return heads_view<S>::rows(v.data, v.rows, heads, v.cols / heads, v.rows <= 1 ? v.cols : v.stride);
  }
}

/// The shape checks of `attention` when some argument is a `heads_view` (after `check_params`):
/// every view has the heads the knobs say, one head_dim, one batch size; out has q's shape and
/// no two of its elements overlap.
template <class SQ, class SK, class SV, class SO>
attention_shape check_heads_attention(const attention_params& p, index_t kvh, const heads_view<SQ>& q,
                                      const heads_view<SK>& k, const heads_view<SV>& v, const heads_view<SO>& o,
                                      index_t n_qpos, index_t n_kpos) {
  POSENC_ASSERT(q.heads == p.heads, "attention: q has ", q.heads, " heads but attention_params.heads = ", p.heads);
  POSENC_ASSERT(k.heads == kvh, "attention: k has ", k.heads, " heads but attention_params.kv_heads = ", p.kv_heads,
                p.kv_heads == 0 ? " (0: heads = " + to_text(p.heads) + ")" : std::string());
  POSENC_ASSERT(v.heads == kvh, "attention: v has ", v.heads, " heads but attention_params.kv_heads = ", p.kv_heads,
                p.kv_heads == 0 ? " (0: heads = " + to_text(p.heads) + ")" : std::string());
  const index_t d = q.head_dim;
  POSENC_ASSERT(d > 0, "attention: q has head_dim 0");
  POSENC_ASSERT(k.head_dim == d && v.head_dim == d, "attention: head_dim of q, k and v must agree, got ", d, ", ",
                k.head_dim, " and ", v.head_dim);
  POSENC_ASSERT(k.batch == q.batch && v.batch == q.batch, "attention: q, k and v must have one batch size, got ",
                q.batch, ", ", k.batch, " and ", v.batch);
  POSENC_ASSERT(v.tokens == k.tokens, "attention: k has ", k.tokens, " tokens but v has ", v.tokens);
  POSENC_ASSERT(o.batch == q.batch && o.tokens == q.tokens && o.heads == q.heads && o.head_dim == d,
                "attention: out is [batch, tokens, heads, head_dim] = [", o.batch, ", ", o.tokens, ", ", o.heads, ", ",
                o.head_dim, "] but q is [", q.batch, ", ", q.tokens, ", ", q.heads, ", ", d, "]");
  POSENC_ASSERT(o.disjoint(), "attention: elements of out overlap (strides: batch ", o.batch_stride, ", token ",
                o.token_stride, ", head ", o.head_stride, "); every output element needs its own memory");
  POSENC_ASSERT(n_qpos == q.tokens, "attention: ", n_qpos, " query positions for ", q.tokens,
                " tokens of q (every batch item has these positions)");
  POSENC_ASSERT(n_kpos == k.tokens, "attention: ", n_kpos, " key positions for ", k.tokens,
                " tokens of k (every batch item has these positions)");
  const double scale = p.scale ? *p.scale : 1.0 / std::sqrt(static_cast<double>(d));
  return {q.tokens, k.tokens, p.heads, kvh, d, p.heads / kvh, scale, mask_rule_of(p)};
}

/// The optional `[n_q, heads]` log-sum-exp argument as a view (checked once), or 0 when the
/// caller passed `nullptr`.
template <class L>
auto lse_view_of(L&& lse, const attention_shape& sh) {
  if constexpr (std::is_null_pointer_v<std::remove_cvref_t<L>>) {
    return 0;
  } else {
    auto lv = view_of(std::forward<L>(lse));
    static_assert(std::same_as<std::remove_pointer_t<decltype(lv.data)>, float> ||
                      std::same_as<std::remove_pointer_t<decltype(lv.data)>, double>,
                  "posenc::attention: lse must be a writable float or double matrix");
    POSENC_ASSERT(lv.rows == sh.n_q && lv.cols == sh.heads, "attention: lse is [", lv.rows, ", ", lv.cols,
                  "] but must be [n_q, heads] = [", sh.n_q, ", ", sh.heads, "]");
    return lv;
  }
}

}  // namespace detail
}  // namespace posenc
