// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/params.hpp
/// `attention_params`, the runtime knobs shared by the naive reference and the blockwise kernel,
/// and the masking rule both apply.

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "posenc/detail/check.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// What the attention functions do with a rotation encoder.
enum class rotation_mode {
  in_kernel,        ///< rotate copies of q and k tiles with their positions; the inputs stay untouched
  already_rotated,  ///< q and k were rotated by the caller (keys rotated once when cached): use as given
};

/// Runtime knobs of attention. Every field has a default:
/// `posenc::attention({.heads = 32, .kv_heads = 8, .causal = true})`.
///
/// Masking compares positions: key j is visible to query i when
/// - `causal`: `kpos[j] <= qpos[i]` (so a query block at the end of a longer KV cache is
///   bottom-right aligned without special cases), and
/// - `window_left >= 0`: `kpos[j] >= qpos[i] - window_left`, and
/// - `window_right >= 0`: `kpos[j] <= qpos[i] + window_right` (moot under `causal`).
/// This is FlashAttention's `window_size = (left, right)` convention; -1 means unbounded.
struct attention_params {
  index_t heads = 1;                 ///< query heads; q has `heads * head_dim` columns
  index_t kv_heads = 0;              ///< key/value heads (0 = heads); heads must be a multiple (GQA/MQA)
  std::optional<double> scale{};     ///< logit scale; default `1/sqrt(head_dim)`
  bool causal = false;               ///< mask keys after the query's position
  position window_left = -1;         ///< sliding window: keys at most this far behind the query; -1 = unbounded
  position window_right = -1;        ///< keys at most this far ahead of the query; -1 = unbounded
  rotation_mode rotation = rotation_mode::in_kernel;
  index_t q_tile = 0;                ///< query rows per tile; 0 = the kernel's default
  index_t k_tile = 0;                ///< key rows per tile; 0 = the kernel's default
  int threads = 0;                   ///< worker threads; 0 = all available, 1 = the calling thread only
};

namespace detail {

/// Validated shape of one attention call.
struct attention_shape {
  index_t n_q, n_kv, heads, kv_heads, head_dim, group;
  double scale;
  bool causal;
  position left, right;
};

/// Checks the knobs (std::invalid_argument naming the field) and the shapes (POSENC_ASSERT).
inline attention_shape check_attention(const attention_params& p, index_t q_rows, index_t q_cols, index_t k_rows,
                                       index_t k_cols, index_t v_rows, index_t v_cols, index_t o_rows, index_t o_cols,
                                       index_t n_qpos, index_t n_kpos) {
  require(p.heads > 0, "attention_params.heads", p.heads, "must be positive");
  const index_t kvh = p.kv_heads == 0 ? p.heads : p.kv_heads;
  require(kvh > 0, "attention_params.kv_heads", p.kv_heads, "must be positive (or 0 for heads)");
  require(p.heads % kvh == 0, "attention_params.kv_heads", p.kv_heads, "must divide heads");
  require(p.window_left >= -1, "attention_params.window_left", p.window_left, "must be >= -1 (-1 = unbounded)");
  require(p.window_right >= -1, "attention_params.window_right", p.window_right, "must be >= -1 (-1 = unbounded)");
  require(p.q_tile >= 0, "attention_params.q_tile", p.q_tile, "must be >= 0 (0 = default)");
  require(p.k_tile >= 0, "attention_params.k_tile", p.k_tile, "must be >= 0 (0 = default)");
  require(p.threads >= 0, "attention_params.threads", p.threads, "must be >= 0 (0 = all)");
  if (p.scale) require(std::isfinite(*p.scale), "attention_params.scale", *p.scale, "must be finite");
  POSENC_ASSERT(q_cols % p.heads == 0, "attention: q has ", q_cols, " columns, not a multiple of heads = ", p.heads);
  const index_t d = q_cols / p.heads;
  POSENC_ASSERT(d > 0, "attention: q has ", q_cols, " columns, so head_dim = q columns / heads is 0");
  POSENC_ASSERT(k_cols == kvh * d, "attention: k has ", k_cols, " columns but kv_heads * head_dim = ", kvh, " * ", d,
                " = ", kvh * d, " are needed");
  POSENC_ASSERT(v_cols == kvh * d, "attention: v has ", v_cols, " columns but kv_heads * head_dim = ", kvh, " * ", d,
                " = ", kvh * d, " are needed");
  POSENC_ASSERT(v_rows == k_rows, "attention: k has ", k_rows, " rows but v has ", v_rows);
  POSENC_ASSERT(o_rows == q_rows && o_cols == q_cols, "attention: out is [", o_rows, ", ", o_cols,
                "] but q is [", q_rows, ", ", q_cols, "]");
  POSENC_ASSERT(n_qpos == q_rows, "attention: ", n_qpos, " query positions for ", q_rows, " rows of q");
  POSENC_ASSERT(n_kpos == k_rows, "attention: ", n_kpos, " key positions for ", k_rows, " rows of k");
  const double scale = p.scale ? *p.scale : 1.0 / std::sqrt(static_cast<double>(d));
  return {q_rows, k_rows, p.heads, kvh, d, p.heads / kvh, scale, p.causal, p.window_left, p.window_right};
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

/// `hi - lo > limit` for any int64 positions, without overflow (the difference of two int64
/// values fits in uint64 when it is positive) and without rounding (a double loses the last bits
/// of positions beyond 2^53).
inline bool gap_exceeds(position hi, position lo, position limit) {
  return hi > lo && static_cast<std::uint64_t>(hi) - static_cast<std::uint64_t>(lo) > static_cast<std::uint64_t>(limit);
}

/// Key at `kp` is visible to the query at `qp`.
inline bool visible(const attention_shape& s, position qp, position kp) {
  if (s.causal && kp > qp) return false;
  if (s.left >= 0 && gap_exceeds(qp, kp, s.left)) return false;
  if (s.right >= 0 && gap_exceeds(kp, qp, s.right)) return false;
  return true;
}

/// Sets the logits of the keys in `kp` that the query at `qp` does not see to -inf (`row[j]` for
/// key `kp[j]`). For a key range the visible keys are one interval, found with overflow-checked
/// integer arithmetic and masked with two fills; a list is tested key by key.
template <class C>
void mask_row(const attention_shape& s, position qp, positions kp, C* row) {
  constexpr C neg_inf = -std::numeric_limits<C>::infinity();
  const index_t n = kp.size();
#if defined(__GNUC__) || defined(__clang__)
  position off;  // key j is at j - off relative to the query
  if (kp.is_range() && !__builtin_sub_overflow(qp, kp.start(), &off)) {
    // Visible: j in [lo, hi]. A bound that overflows int64 lies beyond every key, so it drops out.
    position lo = 0, hi = static_cast<position>(n) - 1, b;
    if (s.causal) hi = std::min(hi, off);
    if (s.left >= 0 && !__builtin_sub_overflow(off, s.left, &b)) lo = std::max(lo, b);
    if (s.right >= 0 && !__builtin_add_overflow(off, s.right, &b)) hi = std::min(hi, b);
    if (lo > hi) {
      std::fill(row, row + n, neg_inf);
      return;
    }
    std::fill(row, row + lo, neg_inf);  // lo and hi are in [0, n - 1] here
    std::fill(row + hi + 1, row + n, neg_inf);
    return;
  }
#endif
  for (index_t j = 0; j < n; ++j)
    if (!visible(s, qp, kp[j])) row[j] = neg_inf;
}

}  // namespace detail
}  // namespace posenc
