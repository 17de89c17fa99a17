// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/blockwise.hpp
/// Blockwise attention: tiles of queries against tiles of keys with an online softmax, so memory
/// is the inputs plus a fixed per-thread workspace, never O(n_q * n_kv).
///
/// For a query tile, the kernel keeps per row a running max `m`, a running sum `l` and an
/// unnormalised output `acc`. For each key tile with scaled logits `s`:
///
///     m' = max(m, max_j s_j),  a = exp(m - m'),  p_j = exp(s_j - m')
///     l  = a l + sum_j p_j,    acc = a acc + sum_j p_j v_j,  m = m'
///
/// and at the end `out = acc / l`, `lse = m + log l`. Key tiles that the causal mask or the
/// window hides completely are skipped without being read; tiles that are completely visible are
/// not masked element by element.
///
/// Work items are (kv head, query tile) pairs, the query heads of a GQA group stacked into one
/// tile so that each key/value tile is read once for the group; decode calls split the keys into
/// chunks too. Items run on the call's executor (`attention_params::executor`, see executor.hpp).
/// Each item is computed the same way whichever worker runs it, so the result does not depend on
/// the executor or the number of workers. A call is three parts: the plan (attention/plan.hpp:
/// shapes, tiles, work items and the workspace, which `attention_workspace_bytes` reads too),
/// computed before any work starts (every error is thrown there, before a worker runs); the tile
/// worker (attention/tile_worker.hpp), which computes one work item; and the merge of the key
/// chunks of a decode call, in chunk order.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#include "posenc/attention/mask.hpp"
#include "posenc/attention/params.hpp"
#include "posenc/attention/plan.hpp"
#include "posenc/attention/tile_worker.hpp"
#include "posenc/attention/workspace.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/attention_kernels.hpp"
#include "posenc/executor.hpp"
#include "posenc/types.hpp"

namespace posenc {

namespace detail {

/// The optional log-sum-exp `[rows, heads]` matrix (0: none) as the engine writes it.
template <class LV>
auto lse_rows(const LV& v) {
  if constexpr (std::same_as<LV, int>) {
    return 0;
  } else {
    return head_rows_of(v, 1);
  }
}

/// Blockwise attention over the sequences `seq_of(0 .. plan.seqs - 1)` (see `plan_batch`), the
/// engine behind `attention`, `attention_varlen` and `paged_attention`. `rotate_keys`: a rotation
/// encoder rotates the key tiles too (false: the keys were stored rotated, only the queries are
/// rotated here). Every argument was checked; nothing here throws.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void run_batch(head_rows<SQ> qv, head_rows<SK> kv, head_rows<SV> vv, head_rows<SO> ov, LV lse_view,
               const attention_plan& pl, const seq_plan* plans, C* base, const attention_params& p, const E& enc,
               bool rotate_keys, SeqOf&& seq_of) {
  C* const partials = base + static_cast<std::ptrdiff_t>(pl.per_thread) * pl.workers;
  const tile_worker<C, SQ, SK, SV, SO, LV, E, std::remove_cvref_t<SeqOf>> worker(
      qv, kv, vv, ov, lse_view, pl, plans, partials, p, enc, rotate_keys, seq_of);
  auto items = [&](index_t item, int w) { worker.run(item, base + static_cast<std::ptrdiff_t>(w) * pl.per_thread); };
  pl.ex->parallel_for(pl.items, pl.workers, items);
  if (pl.units == 0) return;
  auto units = [&](index_t unit, int) { worker.merge(unit); };
  pl.ex->parallel_for(pl.units, static_cast<int>(std::min<index_t>(pl.units, pl.workers)), units);
}

/// The sequences' plans, in the workspace after the values (see `plan_batch`).
inline seq_plan* plans_in(std::byte* workspace, const attention_plan& pl) {
  return reinterpret_cast<seq_plan*>(workspace + pl.plans_offset);
}

}  // namespace detail

namespace detail {

/// The optional log-sum-exp of a call with `batch` items, as the engine writes it: a
/// `heads_view` of head_dim 1 (`[batch, tokens, heads]` with any strides), or a matrix
/// `[batch * n_q, heads]` (the items' rows one after another); 0 for `nullptr`.
template <class L>
auto lse_heads_of(L&& lse, const attention_shape& sh, index_t batch) {
  if constexpr (std::is_null_pointer_v<std::remove_cvref_t<L>>) {
    return 0;
  } else if constexpr (heads_view_arg<L>) {
    const auto lv = std::remove_cvref_t<L>(lse);
    static_assert(std::same_as<std::remove_pointer_t<decltype(lv.data)>, float> ||
                      std::same_as<std::remove_pointer_t<decltype(lv.data)>, double>,
                  "posenc::attention: lse must be a writable float or double view");
    POSENC_ASSERT(lv.batch == batch && lv.tokens == sh.n_q && lv.heads == sh.heads && lv.head_dim == 1,
                  "attention: lse is [batch, tokens, heads, head_dim] = [", lv.batch, ", ", lv.tokens, ", ", lv.heads,
                  ", ", lv.head_dim, "] but must be [", batch, ", ", sh.n_q, ", ", sh.heads, ", 1]");
    POSENC_ASSERT(lv.disjoint(), "attention: elements of lse overlap (strides: batch ", lv.batch_stride, ", token ",
                  lv.token_stride, ", head ", lv.head_stride, ")");
    return head_rows_of(lv);
  } else {
    attention_shape all = sh;
    all.n_q = sh.n_q * batch;
    return lse_rows(lse_view_of(std::forward<L>(lse), all));
  }
}

/// Runs the engine over `batch` sequences of `sh.n_q` queries and `sh.n_kv` keys each (all
/// checked), every one with the positions `qpos` and `kpos`.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E>
void attention_run(head_rows<SQ> q, head_rows<SK> k, head_rows<SV> v, head_rows<SO> out, LV lse,
                   const attention_shape& sh, index_t batch, positions qpos, positions kpos, const E& enc,
                   const attention_params& p, attention_workspace* ws) {
  if (sh.n_q == 0 || batch == 0) return;
  const auto sizes = [&](index_t) { return std::pair{sh.n_q, sh.n_kv}; };
  const auto seq_of = [&](index_t b) {
    return batch_seq{qpos, sh.n_kv, key_map{.first = b * sh.n_kv, .kpos = kpos}};
  };
  const attention_plan pl = plan_batch<C>(sh, p, enc, batch, sizes);
  attention_workspace local;
  std::byte* const memory = (ws ? *ws : local).reserve(pl.workspace_bytes);
  seq_plan* const plans = plans_in(memory, pl);
  plan_batch<C>(sh, p, enc, batch, sizes, plans);
  run_batch<C>(q, k, v, out, lse, pl, plans, reinterpret_cast<C*>(memory), p, enc, true, seq_of);
}

}  // namespace detail

/// Blockwise softmax attention with any positional encoder; the same contract as
/// `attention_reference` (see there for the formula, shapes, GQA and masking), computed tile by
/// tile in `compute_t<S>` with memory linear in the sequence length.
///
/// \param q, k, v, out  matrices `[tokens, heads * head_dim]` (any row stride), or `heads_view`s
///             of any layout and strides (`[batch, heads, tokens, head_dim]` as PyTorch holds them,
///             a transposed or sliced tensor): read and written in place, never copied. With
///             `heads_view`s, their heads must be `p.heads` (q, out) and `p.kv_heads` (k, v),
///             and a batch of `B > 1` items is `B` independent sequences of equal length, all with
///             the positions `qpos` and `kpos`, in one call (one plan, the items' work shared by
///             the workers). Matrices and views mix (a matrix is split into the knobs' heads).
/// \param enc  applied by this call: a rotation encoder (RoPE) rotates copies of the query and
///             key tiles with their positions (the inputs stay untouched); a score bias is added
///             to the logits. Queries and keys the caller rotated already (a cache of rotated
///             keys) are attended with `posenc::no_position`: passing the rope here as well would
///             rotate them twice. The encoder's `scalar_type` must be the compute type of the
///             storage.
/// \param lse  optional: nullptr, a float/double matrix `[n_q, heads]` (`[batch * n_q, heads]`
///             for a batch of views), or a `heads_view` with head_dim 1 (`[batch, tokens, heads]`
///             with any strides).
/// \param ws   optional workspace reused across calls; without it the call allocates
///             `attention_workspace_bytes` once (never per tile). With a workspace that is large
///             enough (reused from an earlier call of the same plan), the call allocates nothing.
/// Throws, before any work starts: `std::invalid_argument` for invalid knobs or an encoder that
/// does not fit the call, `precondition_error` for matrices and positions that do not fit
/// together.
template <class Q, class K, class V, class O, positional_encoding E, class L = std::nullptr_t>
void attention(Q&& q, K&& k, V&& v, O&& out, positions qpos, positions kpos, const E& enc, const attention_params& p,
               L&& lse = nullptr, attention_workspace* ws = nullptr) {
  static_assert(E::family != encoding_family::additive_input,
                "posenc::attention: additive-input encoders (sinusoidal) act on token embeddings before the Q/K/V "
                "projections; call enc.add_to(embeddings, positions) there and pass posenc::no_position here");
  constexpr bool views = detail::any_heads_view<Q, K, V, O, L>;
  if constexpr (views) {
    const index_t kvh = detail::check_params(p);
    const auto qh = detail::heads_of(std::forward<Q>(q), p.heads, "q");
    const auto kh = detail::heads_of(std::forward<K>(k), kvh, "k");
    const auto vh = detail::heads_of(std::forward<V>(v), kvh, "v");
    const auto oh = detail::heads_of(std::forward<O>(out), p.heads, "out");
    using S = std::remove_const_t<std::remove_pointer_t<decltype(qh.data)>>;
    using C = compute_t<S>;
    static_assert(!std::is_const_v<std::remove_pointer_t<decltype(oh.data)>>, "posenc::attention: out must be writable");
    static_assert(std::same_as<typename E::scalar_type, C> || E::family == encoding_family::none,
                  "posenc::attention: the encoder's scalar_type must be the compute type of q/k/v "
                  "(float for float, bf16 and fp16 storage; double for double)");
    const auto sh = detail::check_heads_attention(p, kvh, qh, kh, vh, oh, qpos.size(), kpos.size());
    const auto lse_rows = detail::lse_heads_of(std::forward<L>(lse), sh, qh.batch);
    detail::check_encoder_fits(enc, sh);
    detail::attention_run<C>(detail::head_rows_of(qh), detail::head_rows_of(kh), detail::head_rows_of(vh),
                             detail::head_rows_of(oh), lse_rows, sh, qh.batch, qpos, kpos, enc, p, ws);
  } else {
    const auto qv = view_of(std::forward<Q>(q));
    const auto kv = view_of(std::forward<K>(k));
    const auto vv = view_of(std::forward<V>(v));
    const auto ov = view_of(std::forward<O>(out));
    using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
    using SO = std::remove_pointer_t<decltype(ov.data)>;
    using C = compute_t<S>;
    static_assert(!std::is_const_v<SO>, "posenc::attention: out must be writable");
    static_assert(std::same_as<typename E::scalar_type, C> || E::family == encoding_family::none,
                  "posenc::attention: the encoder's scalar_type must be the compute type of q/k/v "
                  "(float for float, bf16 and fp16 storage; double for double)");

    const auto sh = detail::check_attention(p, qv.rows, qv.cols, kv.rows, kv.cols, vv.rows, vv.cols, ov.rows, ov.cols,
                                            qpos.size(), kpos.size());
    const auto lse_view = detail::lse_view_of(std::forward<L>(lse), sh);
    detail::check_encoder_fits(enc, sh);
    const index_t d = sh.head_dim;
    detail::attention_run<C>(detail::head_rows_of(qv, d), detail::head_rows_of(kv, d), detail::head_rows_of(vv, d),
                             detail::head_rows_of(ov, d), detail::lse_rows(lse_view), sh, 1, qpos, kpos, enc, p, ws);
  }
}

}  // namespace posenc
