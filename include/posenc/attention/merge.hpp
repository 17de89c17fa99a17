// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/merge.hpp
/// Merging two partial attention results over disjoint key sets through their log-sum-exp.
///
/// If `(o_a, l_a)` and `(o_b, l_b)` are attention outputs and log-sum-exps of the same queries over
/// key sets A and B, then over A u B:
///
///     l = m + log(exp(l_a - m) + exp(l_b - m)),   m = max(l_a, l_b)
///     o = exp(l_a - l) o_a + exp(l_b - l) o_b
///
/// Written so that no exponential overflows, and so that a side with `l = -inf` (no visible key)
/// contributes nothing; both sides empty gives `o = 0`, `l = -inf`, never NaN.

#include <cmath>
#include <limits>
#include <span>

#include "posenc/attention/params.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Merges `(out_b, lse_b)` into `(out_a, lse_a)` in place.
///
/// \param out_a, out_b  `[n_q, heads * d]` row-major, any row stride; `out_a` is overwritten.
/// \param lse_a, lse_b  `[n_q, heads]` float or double; `lse_a` is overwritten.
/// Arithmetic in `compute_t` of the output's storage type. Does not allocate.
template <matrix_argument OA, matrix_argument LA, matrix_argument OB, matrix_argument LB>
void merge_partial(OA&& out_a, LA&& lse_a, OB&& out_b, LB&& lse_b) {
  auto oa = view_of(std::forward<OA>(out_a));
  auto la = view_of(std::forward<LA>(lse_a));
  auto ob = view_of(out_b);
  auto lb = view_of(lse_b);
  using S = std::remove_const_t<std::remove_pointer_t<decltype(oa.data)>>;
  using L = std::remove_const_t<std::remove_pointer_t<decltype(la.data)>>;
  using C = compute_t<S>;
  POSENC_ASSERT(ob.rows == oa.rows && ob.cols == oa.cols, "merge_partial: out_a is [", oa.rows, ", ", oa.cols,
                "] but out_b is [", ob.rows, ", ", ob.cols, "]");
  POSENC_ASSERT(la.rows == oa.rows && lb.rows == oa.rows && lb.cols == la.cols, "merge_partial: lse_a is [", la.rows,
                ", ", la.cols, "] and lse_b [", lb.rows, ", ", lb.cols, "], but both must be [n_q, heads] with n_q = ",
                oa.rows);
  POSENC_ASSERT(la.cols > 0 && oa.cols % la.cols == 0, "merge_partial: out has ", oa.cols,
                " columns, not a multiple of heads = ", la.cols, " (the columns of lse)");
  const index_t heads = la.cols;
  const index_t d = heads ? oa.cols / heads : 0;
  for (index_t i = 0; i < oa.rows; ++i) {
    for (index_t h = 0; h < heads; ++h) {
      const C a = static_cast<C>(la(i, h));
      const C b = static_cast<C>(lb(i, h));
      if (std::isnan(a) || std::isnan(b)) {
        // A NaN partial (its rows saw a NaN) makes the merged row NaN, as in one call.
        for (index_t c = 0; c < d; ++c) oa(i, h * d + c) = static_cast<S>(std::numeric_limits<C>::quiet_NaN());
        la(i, h) = static_cast<L>(std::numeric_limits<C>::quiet_NaN());
        continue;
      }
      const C m = std::max(a, b);
      if (m == -std::numeric_limits<C>::infinity()) {
        for (index_t c = 0; c < d; ++c) oa(i, h * d + c) = S(0);
        la(i, h) = static_cast<L>(m);
        continue;
      }
      // One of the two exponents is exp(0) = 1, so the sum lies in [1, 2]: no overflow, no 0/0.
      const C ea = std::exp(a - m);
      const C eb = std::exp(b - m);
      const C sum = ea + eb;
      const C wa = ea / sum;
      const C wb = eb / sum;
      for (index_t c = 0; c < d; ++c) {
        const index_t col = h * d + c;
        // A side of weight 0 is skipped, not multiplied: its output may be anything finite or not.
        const C xa = wa > C(0) ? wa * static_cast<C>(oa(i, col)) : C(0);
        const C xb = wb > C(0) ? wb * static_cast<C>(ob(i, col)) : C(0);
        oa(i, col) = static_cast<S>(xa + xb);
      }
      la(i, h) = static_cast<L>(m + std::log(sum));
    }
  }
}

/// Adds attention sinks to a merged result: query head `h` of every row gets the sink logit
/// `sinks[h]` in its softmax denominator, `out *= e^(lse - lse')`, `lse' = log(e^lse + e^sink)`
/// (a row with `lse = -inf` stays zero and gets `lse = sink`). Partial results that are merged
/// with `merge_partial` are computed without sinks (`attention_params::sinks` empty) and get them
/// once, here, after the last merge: what `attention` does inside one call.
///
/// \param out  `[n_q, heads * d]`; \param lse  `[n_q, heads]` float or double; both overwritten.
/// \param sinks  `heads` logits (finite, or -inf for none). Does not allocate.
template <matrix_argument O, matrix_argument L>
void apply_sinks(O&& out, L&& lse, std::span<const float> sinks) {
  auto o = view_of(std::forward<O>(out));
  auto l = view_of(std::forward<L>(lse));
  using S = std::remove_pointer_t<decltype(o.data)>;
  using LS = std::remove_pointer_t<decltype(l.data)>;
  using C = compute_t<std::remove_const_t<S>>;
  static_assert(!std::is_const_v<S> && !std::is_const_v<LS>, "posenc::apply_sinks: out and lse must be writable");
  POSENC_ASSERT(static_cast<index_t>(sinks.size()) == l.cols, "apply_sinks: ", sinks.size(), " sinks for ", l.cols,
                " heads (the columns of lse)");
  POSENC_ASSERT(l.rows == o.rows && l.cols > 0 && o.cols % l.cols == 0, "apply_sinks: out is [", o.rows, ", ", o.cols,
                "] and lse [", l.rows, ", ", l.cols, "]; out must have heads * head_dim columns and lse's rows");
  const index_t heads = l.cols, d = o.cols / heads;
  for (index_t i = 0; i < o.rows; ++i)
    for (index_t h = 0; h < heads; ++h) {
      C merged;
      const C w = detail::sink_weight(static_cast<C>(l(i, h)), static_cast<C>(sinks[static_cast<std::size_t>(h)]), merged);
      l(i, h) = static_cast<LS>(merged);
      for (index_t c = 0; c < d; ++c) o(i, h * d + c) = static_cast<S>(w * static_cast<C>(o(i, h * d + c)));
    }
}

}  // namespace posenc
