// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/shaw.hpp
/// Relative position representations (Shaw, Uszkoreit and Vaswani 2018), keys and values.
///
/// With clip distance `K`, learned tables `aK`, `aV` of `2K + 1` rows of `head_dim` each, and the
/// relative index `r(i, j) = clip(kpos[j] - qpos[i], -K, K) + K` (from positions, not indices):
///
///     e_ij  = q_i . (k_j + aK[r(i,j)]) / sqrt(d)
///     out_i = sum_j a_ij (v_j + aV[r(i,j)]),     a_ij = softmax_j(e_ij)
///
/// The tables are shared by all heads, as in the paper; a model with per-head tables builds one
/// encoder per head.
///
/// Unlike ALiBi and T5, the bias depends on the query vector, and the output gains a value term,
/// so this encoder does not fit `position_bias`; it satisfies `relative_key_value` and hands a
/// blockwise attention kernel four steps instead. Per head and per query tile `I`, with logit
/// scale `tau` (`1/sqrt(d)` by default):
///
///     once:  G = query_terms(Q_I)                 G(i, r) = q_i . aK[r]          [n_q, 2K+1]
///            m_i = -inf, l_i = 0, acc_i = 0 (d values), w_i = 0 (2K+1 values)
///     for each key tile J:
///            S = Q_I K_J^T                        (unscaled dot products)
///            add_bias_tile(S, G, qpos_I, kpos_J)  S(i, j) += G(i, r(i,j))  -> q_i.(k_j + aK[r])
///            S *= tau, then mask (-inf)
///            m'_i = max(m_i, max_j S(i, j)),  alpha_i = exp(m_i - m'_i)
///            P(i, j) = exp(S(i, j) - m'_i)
///            l_i   = alpha_i l_i + sum_j P(i, j)
///            acc_i = alpha_i acc_i + sum_j P(i, j) v_j
///            w_i   = alpha_i w_i                  (the same rescale as the accumulator)
///            accumulate_value_weights(P, qpos_I, kpos_J, w)   w_i(r) += sum_{j: r(i,j) = r} P(i, j)
///            m_i = m'_i
///     end:   add_value_term(w, acc)               acc_i += sum_r w_i(r) aV[r]
///            out_i = acc_i / l_i
///
/// Why this is exact: at the end, with `M_i` the final running max, every term has been rescaled
/// to `M_i`, so `acc_i = sum_j e^(s_ij - M_i) v_j` and `w_i(r) = sum_{j: r(i,j) = r} e^(s_ij - M_i)`;
/// hence `acc_i + sum_r w_i(r) aV[r] = sum_j e^(s_ij - M_i) (v_j + aV[r(i,j)])`, and dividing by
/// `l_i = sum_j e^(s_ij - M_i)` gives `out_i` above. Step 4 may equally run after the division if
/// `w` is divided by `l_i` too. A partial result over some keys (a ring step) must include its
/// value term before partials are merged by log-sum-exp, because the term belongs to the numerator.
///
/// Costs: steps 1 and 4 are `n_q * (2K+1) * d` multiply-adds once per query tile (like one more
/// key tile of `2K+1` keys); steps 2 and 3 are one lookup per logit. `w` is a `[n_q, 2K+1]`
/// workspace beside the output accumulator. None of the steps allocates.
///
/// If the kernel prefers scaled logits before adding the bias, it passes `G` computed from
/// `tau * q` (or scales `G`); the steps themselves never scale.
///
/// Most keys of a long context clip to -K, so the kernel in posenc::attention subtracts each row's
/// `G(i, 0)` from its terms (the softmax of a row does not change when every logit moves by the
/// same amount; `add_bias_tile` skips a zero term), adds `G(i, 0)` to the row's running max at the
/// end, and sets `w_i(0) = l_i - sum_{r > 0} w_i(r)` there, after summing the other columns with
/// `accumulate_near_value_weights`. Not under a soft cap, which does not commute with the shift.

#include <algorithm>
#include <concepts>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/concepts.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/detail/position_math.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Runtime knobs of `shaw_relative`. Every field has a default.
struct shaw_params {
  index_t head_dim = 64;               ///< width d of a head and of each table row; > 0
  index_t max_relative_position = 16;  ///< clip distance K (>= 0): tables have 2K+1 rows
};

/// Shaw et al. relative keys and values, applied blockwise; see the file comment for the protocol.
///
/// `T` (float or double) is the type the tables are stored in and the arithmetic type of
/// `query_terms` and `add_value_term`. Logit-side matrices (tiles, `G`, `P`, `w`, the output
/// accumulator) are float or double, whatever `T`. All matrices are row-major with any row stride.
///
/// Immutable after construction; safe to share across threads. Only the constructor allocates.
template <class T>
class shaw_relative {
  static_assert(std::same_as<T, float> || std::same_as<T, double>,
                "posenc::shaw_relative<T>: T must be float or double");

 public:
  using scalar_type = T;
  static constexpr encoding_family family = encoding_family::score_bias;
  static constexpr bool has_value_term = true;

  /// Validates the parameters and table shapes (throws `std::invalid_argument` naming the field)
  /// and copies the tables `aK`, `aV`: row-major `[2K+1, head_dim]`, storage suiting `T`; row `r`
  /// is relative distance `r - K`. Allocates the copies.
  template <matrix_argument MK, matrix_argument MV>
  shaw_relative(const shaw_params& p, MK&& aK, MV&& aV) : params_(p) {
    detail::require(p.head_dim > 0, "shaw_params.head_dim", p.head_dim, "must be positive");
    detail::require(p.max_relative_position >= 0, "shaw_params.max_relative_position", p.max_relative_position,
                    "must be non-negative");
    detail::require(p.max_relative_position <= (std::numeric_limits<index_t>::max() - 1) / 2,
                    "shaw_params.max_relative_position", p.max_relative_position,
                    "must be at most (2^63 - 2) / 2, so that the 2K + 1 table rows can be counted");
    ak_ = copy_table(view_of(std::forward<MK>(aK)), "shaw aK");
    av_ = copy_table(view_of(std::forward<MV>(aV)), "shaw aV");
  }

  /// "shaw_relative".
  std::string_view name() const { return "shaw_relative"; }

  /// The parameters this encoder was built with.
  const shaw_params& params() const { return params_; }
  index_t head_dim() const { return params_.head_dim; }
  index_t max_relative_position() const { return params_.max_relative_position; }
  /// Rows of each table: `2K + 1`.
  index_t num_relative() const { return 2 * params_.max_relative_position + 1; }

  /// The stored key table `aK`, `[2K+1, head_dim]`.
  strided_view<const T> key_table() const { return {ak_.data(), num_relative(), params_.head_dim}; }
  /// The stored value table `aV`, `[2K+1, head_dim]`.
  strided_view<const T> value_table() const { return {av_.data(), num_relative(), params_.head_dim}; }

  /// Table row for a query at `q` and a key at `k`: `clip(k - q, -K, K) + K`, for any int64 `q` and
  /// `k` (the difference is saturated to int64 before the clip, which it does not change).
  index_t relative_index(position q, position k) const {
    const position kk = params_.max_relative_position;
    return static_cast<index_t>(std::clamp<position>(detail::saturating_difference(k, q), -kk, kk) + kk);
  }

  /// Step 1: `out(i, r) = q_i . aK[r]` (overwrites `out`). `q` is one head's `[n_q, head_dim]`
  /// block, storage suiting `T`; `out` is `[n_q, 2K+1]` float or double. Computed in `T`.
  template <matrix_argument Q, matrix_argument O>
  void query_terms(Q&& q, O&& out) const {
    auto qv = view_of(std::forward<Q>(q));
    auto ov = view_of(std::forward<O>(out));
    using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
    static_assert(storage_for<S, T>, "shaw_relative::query_terms: the query storage type does not suit T");
    check_logits<decltype(ov), true>();
    const index_t d = params_.head_dim, nr = num_relative();
    POSENC_ASSERT(qv.cols == d, "shaw_relative::query_terms: q has ", qv.cols, " columns but head_dim = ", d);
    POSENC_ASSERT(ov.rows == qv.rows && ov.cols == nr, "shaw_relative::query_terms: out is [", ov.rows, ", ", ov.cols,
                  "] but must be [q rows, 2K+1] = [", qv.rows, ", ", nr, "]");
    using row_t = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>;
    using table_row_t = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;
    for (index_t i = 0; i < qv.rows; ++i) {
      const row_t qi(qv.row(i), d);
      for (index_t r = 0; r < nr; ++r) {
        const table_row_t kr(ak_.data() + r * d, d);
        ov(i, r) = static_cast<std::remove_reference_t<decltype(ov(i, r))>>(qi.template cast<T>().dot(kr));
      }
    }
  }

  /// Step 2: `tile(i, j) += qterms(i, relative_index(q[i], k[j]))`. `tile` is `[q.size(), k.size()]`,
  /// `qterms` the `[q.size(), 2K+1]` result of step 1 for the same query rows; both float or double.
  /// Adds unscaled terms (the kernel scales logits afterwards).
  template <matrix_argument Tile, matrix_argument G>
  void add_bias_tile(Tile&& tile, G&& qterms, positions q, positions k) const {
    auto t = view_of(std::forward<Tile>(tile));
    auto g = view_of(std::forward<G>(qterms));
    check_logits<decltype(t), true>();
    check_logits<decltype(g), false>();
    using E = std::remove_pointer_t<decltype(t.data)>;
    POSENC_ASSERT(t.rows == q.size() && t.cols == k.size(), "shaw_relative::add_bias_tile: the tile is [", t.rows,
                  ", ", t.cols, "] but there are ", q.size(), " query and ", k.size(), " key positions");
    POSENC_ASSERT(g.rows == q.size() && g.cols == num_relative(), "shaw_relative::add_bias_tile: qterms is [", g.rows,
                  ", ", g.cols, "] but must be [query positions, 2K+1] = [", q.size(), ", ", num_relative(), "]");
    const position kk = params_.max_relative_position;
    const index_t n = t.cols;
    for (index_t i = 0; i < t.rows; ++i) {
      E* row = t.row(i);
      const auto* gi = g.row(i);
      const position qi = q[i];
      if (k.is_range() && detail::difference_fits(k.start(), qi)) {
        index_t j1, j2;
        position r0;
        segments(k.start() - qi, n, j1, j2, r0);
        // A zero term (a kernel that shifts each row by its -K term) leaves its keys as they are.
        const E left = static_cast<E>(gi[0]), right = static_cast<E>(gi[2 * kk]);
        if (left != E(0))
          for (index_t j = 0; j < j1; ++j) row[j] += left;
        for (index_t j = j1; j < j2; ++j) row[j] += static_cast<E>(gi[r0 + j + kk]);
        if (right != E(0))
          for (index_t j = j2; j < n; ++j) row[j] += right;
      } else {
        for (index_t j = 0; j < n; ++j) row[j] += static_cast<E>(gi[relative_index(qi, k[j])]);
      }
    }
  }

  /// Step 3: `w(i, relative_index(q[i], k[j])) += p(i, j)` for the unnormalised probabilities `p`
  /// (`[q.size(), k.size()]`) of one key tile; `w` is `[q.size(), 2K+1]`. Both float or double.
  template <matrix_argument P, matrix_argument W>
  void accumulate_value_weights(P&& p, positions q, positions k, W&& w) const {
    accumulate_weights<true>(view_of(std::forward<P>(p)), q, k, view_of(std::forward<W>(w)));
  }

  /// Step 3 for a kernel that sets column 0 itself at the end (each row's total weight less its
  /// other columns): as `accumulate_value_weights`, but the keys clipped to -K may be left out
  /// of `w(i, 0)`, which is then undefined. Most keys of a long context clip to -K, so this
  /// skips the tile's longest sum.
  template <matrix_argument P, matrix_argument W>
  void accumulate_near_value_weights(P&& p, positions q, positions k, W&& w) const {
    accumulate_weights<false>(view_of(std::forward<P>(p)), q, k, view_of(std::forward<W>(w)));
  }

  /// Step 4: `out_i += sum_r w(i, r) aV[r]`. `w` is `[n_q, 2K+1]`, `out` the `[n_q, head_dim]`
  /// output accumulator; both float or double. Rows of `w` that are zero cost nothing.
  template <matrix_argument W, matrix_argument O>
  void add_value_term(W&& w, O&& out) const {
    auto wv = view_of(std::forward<W>(w));
    auto ov = view_of(std::forward<O>(out));
    check_logits<decltype(wv), false>();
    check_logits<decltype(ov), true>();
    using E = std::remove_pointer_t<decltype(ov.data)>;
    using A = std::common_type_t<T, E>;
    const index_t d = params_.head_dim, nr = num_relative();
    POSENC_ASSERT(wv.cols == nr, "shaw_relative::add_value_term: w has ", wv.cols, " columns but 2K+1 = ", nr);
    POSENC_ASSERT(ov.rows == wv.rows && ov.cols == d, "shaw_relative::add_value_term: out is [", ov.rows, ", ",
                  ov.cols, "] but must be [w rows, head_dim] = [", wv.rows, ", ", d, "]");
    for (index_t i = 0; i < wv.rows; ++i) {
      E* oi = ov.row(i);
      for (index_t r = 0; r < nr; ++r) {
        const A wr = static_cast<A>(wv(i, r));
        if (wr == A(0)) continue;
        const T* vr = av_.data() + r * d;
        for (index_t c = 0; c < d; ++c) oi[c] += static_cast<E>(wr * static_cast<A>(vr[c]));
      }
    }
  }

 private:
  template <bool FarLeft, class PV, class WV>
  void accumulate_weights(PV pv, positions q, positions k, WV wv) const {
    check_logits<decltype(pv), false>();
    check_logits<decltype(wv), true>();
    using A = std::remove_pointer_t<decltype(wv.data)>;
    POSENC_ASSERT(pv.rows == q.size() && pv.cols == k.size(), "shaw_relative::accumulate_value_weights: p is [",
                  pv.rows, ", ", pv.cols, "] but there are ", q.size(), " query and ", k.size(), " key positions");
    POSENC_ASSERT(wv.rows == q.size() && wv.cols == num_relative(), "shaw_relative::accumulate_value_weights: w is [",
                  wv.rows, ", ", wv.cols, "] but must be [query positions, 2K+1] = [", q.size(), ", ", num_relative(),
                  "]");
    const position kk = params_.max_relative_position;
    const index_t n = pv.cols;
    for (index_t i = 0; i < pv.rows; ++i) {
      const auto* pi = pv.row(i);
      A* wi = wv.row(i);
      const position qi = q[i];
      if (k.is_range() && detail::difference_fits(k.start(), qi)) {
        index_t j1, j2;
        position r0;
        segments(k.start() - qi, n, j1, j2, r0);
        for (index_t j = j1; j < j2; ++j) wi[r0 + j + kk] += static_cast<A>(pi[j]);
        // Most keys of a long context clip to -K or +K: their sums are the tile's long reductions.
        if constexpr (FarLeft) wi[0] += sum_of<A>(pi, j1);
        wi[2 * kk] += sum_of<A>(pi + j2, n - j2);
      } else {
        for (index_t j = 0; j < n; ++j) wi[relative_index(qi, k[j])] += static_cast<A>(pi[j]);
      }
    }
  }

  /// `p[0] + ... + p[n - 1]` in `A`, over eight interleaved partial sums combined pairwise: eight
  /// independent additions per step, which the compiler may also put in vector lanes (a single
  /// running sum is one dependent addition per element). A fixed order, so the same bits on every
  /// machine and for any number of threads.
  template <class A, class S>
  static A sum_of(const S* p, index_t n) {
    A part[8] = {};
    index_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int t = 0; t < 8; ++t) part[t] += static_cast<A>(p[j + t]);
    for (int t = 0; j < n; ++j, ++t) part[t] += static_cast<A>(p[j]);
    return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
  }

  template <class V, bool Writable>
  static constexpr void check_logits() {
    using E = std::remove_pointer_t<decltype(V::data)>;
    static_assert(std::same_as<std::remove_const_t<E>, float> || std::same_as<std::remove_const_t<E>, double>,
                  "shaw_relative: logits, probabilities, weights and accumulators are float or double");
    static_assert(!Writable || !std::is_const_v<E>, "shaw_relative: this argument must be writable");
  }

  // For keys k0 + j against a query qi with r0 = k0 - qi (which the caller checked fits in int64):
  // columns [0, j1) clip to -K, [j1, j2) map to r0 + j + K, [j2, n) clip to +K. The bounds -K - r0
  // and K + 1 - r0 may pass the int64 range; saturated, they still clamp to the same column.
  void segments(position r0_in, index_t n, index_t& j1, index_t& j2, position& r0) const {
    const position kk = params_.max_relative_position;
    r0 = r0_in;
    j1 = static_cast<index_t>(std::clamp<position>(detail::saturating_difference(-kk, r0), 0, n));
    j2 = static_cast<index_t>(std::clamp<position>(detail::saturating_difference(kk + 1, r0), j1, n));
  }

  template <class V>
  std::vector<T> copy_table(const V& v, const char* which) const {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(v.data)>>;
    static_assert(storage_for<S, T>, "shaw_relative: the table storage type does not suit T");
    const std::string w(which);
    detail::require(v.rows == num_relative(), w + ".rows", v.rows,
                    "must equal 2 * max_relative_position + 1 (" + detail::to_text(num_relative()) + ")");
    detail::require(v.cols == params_.head_dim, w + ".cols", v.cols,
                    "must equal head_dim (" + detail::to_text(params_.head_dim) + ")");
    std::vector<T> out(static_cast<std::size_t>(v.rows * v.cols));
    for (index_t r = 0; r < v.rows; ++r)
      for (index_t c = 0; c < v.cols; ++c) out[r * v.cols + c] = static_cast<T>(v(r, c));
    return out;
  }

  shaw_params params_;
  std::vector<T> ak_;  // [2K+1][head_dim]
  std::vector<T> av_;
};

}  // namespace posenc
