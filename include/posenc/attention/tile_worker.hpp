// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/tile_worker.hpp
/// Internal: the worker of blockwise attention and the merge of key chunks. `attention`,
/// `attention_varlen` and `paged_attention` make a plan (attention/plan.hpp: shapes, tiles, work
/// items, workspace; `attention_workspace_bytes` reads the same plan), then `run_batch`
/// (attention/blockwise.hpp) hands the plan's work items to a `tile_worker` on the executor's
/// workers and, for sequences whose keys are split into chunks, merges the chunks.
///
/// A work item is (kv heads, query tile, key chunk) of one sequence. For it the worker loads the
/// query tile (scaled, rotated), then for each key tile the chunk holds, either
/// - decode (a few query rows): Q K^T and P V read K and V in place, a block of rows at a time, or
/// - prefill: the key tile packed (and rotated), the value tile loaded, and the tile's query rows
///   in strips whose logits stay in L1 from Q K^T through P V,
/// with the encoder's biases, the soft cap and the mask between Q K^T and the online softmax. The
/// item ends with the rows written (or, for a chunk, its state kept for the merge).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <utility>

#include "posenc/attention/mask.hpp"
#include "posenc/attention/params.hpp"
#include "posenc/attention/plan.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/attention_kernels.hpp"
#include "posenc/types.hpp"

namespace posenc::detail {

/// Copies `n` rows of head `head` (`d` columns) of `src` into `dst` (row stride `ld`), converting
/// to the compute type and multiplying by `factor`. fp16 / bf16 rows are widened by the SIMD
/// kernels (the same bits as the loop below).
template <class C, class S>
void load_rows(head_rows<S> src, index_t row, index_t n, index_t head, index_t d, C factor, C* dst, index_t ld) {
  using SS = std::remove_const_t<S>;
  const S* const first = src.at(row, head);
  if (std::same_as<SS, C> && factor == C(1)) {
    for (index_t i = 0; i < n; ++i)
      std::memcpy(dst + i * ld, first + i * src.stride, static_cast<std::size_t>(d) * sizeof(C));
    return;
  }
  if constexpr (kernel_readable<C, SS> && !std::same_as<SS, C>) {
    const auto& kern = kernels_for<C>();
    const SS* from = first;
    if constexpr (std::same_as<SS, Eigen::half>) {
      kern.convert_f16(from, src.stride, n, d, factor, dst, ld);
    } else {
      kern.convert_bf16(from, src.stride, n, d, factor, dst, ld);
    }
    return;
  }
  for (index_t i = 0; i < n; ++i) {
    const S* from = first + i * src.stride;
    C* to = dst + i * ld;
    for (index_t c = 0; c < d; ++c) to[c] = factor * static_cast<C>(from[c]);
  }
}

/// Bounds of the query positions of tile rows [r0, r0 + nr), where row r holds token r % nq of
/// the tile's positions `qp` (bounds `all`): one or two contiguous spans of tokens, or all of them.
inline position_span strip_bounds(positions qp, position_span all, index_t r0, index_t nr) {
  const index_t nq = qp.size();
  if (nr >= nq) return all;
  const index_t t0 = r0 % nq, t1 = (r0 + nr - 1) % nq;
  if (t0 <= t1) return bounds_of(qp.subset(t0, nr));
  const position_span a = bounds_of(qp.subset(t0, nq - t0)), b = bounds_of(qp.subset(0, t1 + 1));
  return {std::min(a.lo, b.lo), std::max(a.hi, b.hi)};
}

/// Where the keys of one sequence live in the call's K/V rows, and their positions.
struct key_map {
  index_t first = 0;                        ///< contiguous keys: key j is row first + j
  const std::int32_t* pages = nullptr;      ///< paged keys: key j is row pages[j / page_size] * page_size + j % page_size
  index_t page_size = 0;
  positions kpos;                           ///< positions of keys 0 .. n_kv - 1 (unless row_positions)
  const position* row_positions = nullptr;  ///< paged: the position of each K/V row

  index_t row(index_t j) const { return pages ? index_t{pages[j / page_size]} * page_size + j % page_size : first + j; }
  /// How many of keys j, j + 1, ... (at most n) lie in consecutive rows.
  index_t run(index_t j, index_t n) const { return pages ? std::min(n, page_size - j % page_size) : n; }
};

/// Asks for the cache lines of heads [h0, h0 + heads) (`d` columns each) of rows [row, row + n)
/// of `m` ahead of their use (a hint: it never faults and changes no result).
template <class S>
inline void prefetch_rows([[maybe_unused]] head_rows<S> m, [[maybe_unused]] index_t row, [[maybe_unused]] index_t n,
                          [[maybe_unused]] index_t h0, [[maybe_unused]] index_t heads, [[maybe_unused]] index_t d) {
#if defined(__GNUC__)
  constexpr index_t per_line = 64 / static_cast<index_t>(sizeof(S));
  // Heads d apart in a row: one span of heads * d columns.
  const index_t spans = m.head_stride == d ? 1 : heads, cols = m.head_stride == d ? heads * d : d;
  for (index_t i = 0; i < n; ++i)
    for (index_t h = 0; h < spans; ++h) {
      const S* r = m.at(row + i, h0 + h);
      for (index_t c = 0; c < cols; c += per_line) __builtin_prefetch(r + c, 0, 3);
    }
#endif
}

/// One sequence of a call: its queries (rows `[q0, q0 + nq)` of the packed q, out and lse, and
/// their positions) and its keys.
struct batch_seq {
  positions qpos;
  index_t n_kv = 0;
  key_map keys;
};

/// The encoder's tile rotator (it reads the encoder's table, made on its first use, shared
/// read-only by every worker), or 0 for an encoder without one.
template <class E>
auto tile_rotator_of(const E& enc) {
  if constexpr (has_tile_rotator<E>) {
    return enc.tile_rotator();
  } else {
    return 0;
  }
}

/// The worker of one call: `run(item, scratch)` computes work item `item` in the worker's tile
/// buffers `scratch` (`pl.per_thread` elements); `merge(unit)` combines the chunks of one (head
/// set, query tile) of a chunked sequence. Holds the call's arguments and what is fixed for the
/// call (kernels, flags); const, so the executor's workers share one.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
class tile_worker {
 public:
  tile_worker(head_rows<SQ> qv, head_rows<SK> kv, head_rows<SV> vv, head_rows<SO> ov, LV lse_view,
              const attention_plan& pl, const seq_plan* plans, C* partials, const attention_params& p, const E& enc,
              bool rotate_keys, const SeqOf& seq_of)
      : qv_(qv),
        kv_(kv),
        vv_(vv),
        ov_(ov),
        lse_view_(lse_view),
        pl_(pl),
        sh_(pl.sh),
        plans_(plans),
        partials_(partials),
        p_(p),
        enc_(enc),
        seq_of_(seq_of),
        d_(pl.sh.head_dim),
        group_(pl.sh.group),
        rel_cols_(forward_relative_columns(enc)),
        rot_scratch_(rotator_scratch(enc)),
        scale_(static_cast<C>(pl.sh.scale)),
        softcap_(static_cast<C>(p.softcap)),
        kern_(kernels_for<C>()),
        rotating_keys_(rotation && rotate_keys),
        bf16_qk_(p.bf16_qk),
        round_keys_(p.bf16_qk && (rotating_keys_ || !std::same_as<KS, Eigen::bfloat16>)),
        pairs_(pair_kernels(p.bf16_qk)),
        rotator_(tile_rotator_of(enc)) {}

  void run(index_t item, C* scratch) const;
  void merge(index_t unit) const;

 private:
  using KS = std::remove_const_t<SK>;
  using VS = std::remove_const_t<SV>;
  static constexpr bool want_lse = !std::same_as<LV, int>;
  static constexpr bool rotation = E::family == encoding_family::rotation;
  static constexpr C neg_inf = -std::numeric_limits<C>::infinity();
  // Keys and values are read in place when they already have the compute type, need no
  // rotation, lie in consecutive rows, and (for values) may be read up to head_dim rounded up to
  // 16 columns.
  static constexpr bool keys_compute_type = std::same_as<KS, C>;
  // fp16 / bf16 keys and values are read in place by the few-row kernels, which widen them as they
  // load (half the bytes of a float cache, where a converted copy would cost more than the products).
  static constexpr bool keys_readable = kernel_readable<C, KS>;
  static constexpr bool values_readable = kernel_readable<C, VS>;
  static constexpr bool decode_readable = keys_readable && values_readable && !relative_key_value<E>;

  // bf16 Q K^T (`attention_params::bf16_qk`): queries loaded unscaled and rounded to bf16, keys
  // rounded unless they are bf16 already (stored as bf16, not rotated), the logits scaled after
  // the products. With AVX512_BF16 prefill multiplies pairs of bf16 (`pairs_`).
  static const bf16_pair_kernels* pair_kernels(bool bf16_qk) {
    if constexpr (std::same_as<C, float>) {
      if (bf16_qk) return bf16_pair_kernels_in_use();
    }
    return nullptr;
  }

  /// One work item of sequence `b`: kv heads [g0, g0 + sets), tokens [i0, i0 + nq), keys of chunk
  /// `chunk`. Tile row r of kv head g holds query head g * group + r / nq at token i0 + r % nq
  /// (head-major, so each head's rows are contiguous). The kv heads of an item take turns on each
  /// key tile, so the item reads whole rows of K and V.
  struct work {
    work(const seq_plan& sp_, const tile_plan& plan_) : sp(&sp_), plan(plan_) {}
    const seq_plan* sp;
    batch_seq seq;
    tile_plan plan;
    index_t local = 0, sets = 0, chunk = 0, g0 = 0, i0 = 0, nq = 0, rows = 0, d = 0;
    index_t k_begin = 0, k_end = 0;  // the chunk's keys
    positions qp;
    position_span qb;
    bool few_rows = false;
    bool decode_in_place = false;
    C* scratch = nullptr;

    /// Set `set`'s part of the buffer at `offset` (`per_set` elements each, 64-byte apart).
    C* at(index_t offset, index_t per_set, index_t set) const {
      return scratch + offset + set * ((per_set + 15) / 16 * 16);
    }
    C* q(index_t set) const { return at(plan.q, plan.bq * d, set); }
    C* acc(index_t set) const { return at(plan.acc, plan.bq * plan.dpad, set); }
    C* m(index_t set) const { return at(plan.m, plan.bq, set); }
    C* l(index_t set) const { return at(plan.l, plan.bq, set); }
    C* s(index_t set) const { return at(plan.s, plan.strip * plan.ldkt, set); }
    C* terms(index_t set) const { return at(plan.terms, plan.bq * plan.r, set); }
    C* weights(index_t set) const { return at(plan.w, plan.bq * plan.r, set); }
    /// Shaw's terms or weights of a set, `terms(set)` or `weights(set)`: the 2K + 1 relative
    /// columns of each row (the row's shift follows them, see `shift_relative_terms`).
    strided_view<C> relative_columns_of(C* base) const {
      return {base, rows, std::max<index_t>(plan.r - 1, 0), plan.r};
    }
    C* rot() const { return scratch + plan.rot; }
  };

  work item_of(index_t item, C* scratch) const;
  template <class M>
  void load_tile(M src, index_t row, index_t n, index_t head, positions tp, C factor, C* dst, C* rot,
                 bool rotate) const;
  void load_queries(const work& w) const;
  template <class F>
  void heads_of_strip(const work& w, index_t r0, index_t nr, F&& f) const;
  /// Keys [j0, j0 + nk) of `seq` as runs of consecutive K/V rows (one run, or one per page): one
  /// call of f(first key - j0, first row, keys in the run) per run.
  template <class F>
  static void for_each_run(const batch_seq& seq, index_t j0, index_t nk, F&& f) {
    for (index_t j = 0; j < nk;) {
      const index_t n = seq.keys.run(j0 + j, nk - j);
      f(j, seq.keys.row(j0 + j), n);
      j += n;
    }
  }
  void modify_scores(const work& w, strided_view<C> sv, index_t r0, index_t nr, index_t g, positions kp, bool full,
                     strided_view<const C> terms) const;
  void decode_tile(const work& w, index_t j0, index_t nk, positions kp, bool full) const;
  void prefill_tile(const work& w, index_t j0, index_t nk, positions kp, position_span kb, bool full) const;
  void finish_item(const work& w) const;
  /// Shaw's own encoder with tables of the compute type: its query terms and value term are
  /// products the tile kernels make (`query_terms` and `add_value_term` otherwise).
  static constexpr bool tables_of_compute_type = requires(const E& e) {
    { e.key_table() } -> std::same_as<strided_view<const C>>;
    { e.value_table() } -> std::same_as<strided_view<const C>>;
  };
  /// Shaw's own encoder: every key whose relative index clips to -K (most keys of a long context)
  /// adds the same term G(i, 0) to the logits of query row i. A constant per row leaves the
  /// softmax as it is, so the rows carry G(i, r) - G(i, 0): those keys get nothing added (the
  /// encoder skips a zero term), the row's running max is moved back by G(i, 0) when the item
  /// ends, and their column of value weights is then the row's total less the other columns
  /// (`accumulate_near_value_weights` leaves it out), so no tile sums it. Not under a soft cap,
  /// which a shift would change. Another relative_key_value encoder gets the four steps as its
  /// protocol states them. `terms` has the 2K + 1 columns; the shift, scaled as the logits are,
  /// is kept after them.
  static constexpr bool near_weights =
      requires(const E& e, strided_view<const C> p, positions q, strided_view<C> w) {
        e.accumulate_near_value_weights(p, q, q, w);
      };
  void shift_relative_terms(strided_view<C> terms) const {
    const index_t nrel = terms.cols;
    for (index_t r = 0; r < terms.rows; ++r) {
      C* t = terms.row(r);
      const C shift = !near_weights || softcap_ > C(0) ? C(0) : t[0];
      for (index_t c = 0; c < nrel; ++c) t[c] -= shift;
      t[nrel] = bf16_qk_ ? shift * scale_ : shift;
    }
  }
  /// The end of `shift_relative_terms`: column 0 of the weights of each row that saw a key, and
  /// the row's running max moved back by its shift.
  static void finish_relative_rows(strided_view<const C> terms, strided_view<C> wts, C* m, const C* l) {
    if constexpr (!near_weights) return;
    const index_t nrel = wts.cols;
    for (index_t r = 0; r < wts.rows; ++r) {
      if (!(l[r] > C(0))) continue;
      C* wr = wts.row(r);
      C rest = 0;
      for (index_t c = 1; c < nrel; ++c) rest += wr[c];
      wr[0] = std::max(l[r] - rest, C(0));
      m[r] += terms(r, nrel);
    }
  }
  void finish_row(index_t g, index_t i0, index_t nq, index_t r, const C* a, C mr, C lr) const;

  head_rows<SQ> qv_;
  head_rows<SK> kv_;
  head_rows<SV> vv_;
  head_rows<SO> ov_;
  LV lse_view_;
  const attention_plan& pl_;
  const attention_shape& sh_;
  const seq_plan* plans_;
  C* partials_;
  const attention_params& p_;
  const E& enc_;
  const SeqOf& seq_of_;
  index_t d_, group_, rel_cols_, rot_scratch_;
  C scale_, softcap_;
  const tile_kernels<C>& kern_;
  bool rotating_keys_, bf16_qk_, round_keys_;
  const bf16_pair_kernels* pairs_;
  decltype(tile_rotator_of(std::declval<const E&>())) rotator_;
};

// Rows [row, row + n) of head `head` of `src` into the dense tile `dst` (stride d), times
// `factor`, rotated by `tp` when `rotate`. Unscaled tiles with a tile rotator are loaded and
// rotated in one pass.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
template <class M>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::load_tile(M src, index_t row, index_t n, index_t head,
                                                             positions tp, C factor, C* dst, C* rot,
                                                             bool rotate) const {
  using SS = std::remove_const_t<std::remove_pointer_t<decltype(src.data)>>;
  const index_t d = d_;
  const strided_view<C> tile(dst, n, d, d);
  if constexpr (has_tile_rotator<E>) {
    if (rotate && factor == C(1)) {
      rotator_.rotate(strided_view<const SS>(src.at(row, head), n, d, n <= 1 ? d : src.stride), tile, tp, rot);
      return;
    }
  }
  load_rows(src, row, n, head, d, factor, dst, d);
  if (!rotate) return;
  if constexpr (has_tile_rotator<E>) {
    rotator_.rotate(tile, tp, rot);
  } else if constexpr (rotation) {
    enc_.rotate(tile, tp);
  }
}

// Writes output row r of a tile of kv head g (unnormalised accumulator `a`, max `mr`, sum `lr`):
// query head g * group + r / nq, token i0 + r % nq.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::finish_row(index_t g, index_t i0, index_t nq, index_t r,
                                                              const C* a, C mr, C lr) const {
  const index_t i = i0 + r % nq;
  const index_t h = g * group_ + r / nq;
  SO* dst = ov_.at(i, h);
  C lse = lr == C(0) ? neg_inf : mr + std::log(lr);
  C weight = lr == C(0) ? C(0) : C(1) / lr;
  if (!p_.sinks.empty()) {
    C with_sink;
    const C keep = sink_weight(lse, static_cast<C>(p_.sinks[static_cast<std::size_t>(h)]), with_sink);
    weight *= keep;
    lse = with_sink;
  }
  if (lr == C(0)) {
    for (index_t c = 0; c < d_; ++c) dst[c] = static_cast<SO>(0);
  } else {
    for (index_t c = 0; c < d_; ++c) dst[c] = static_cast<SO>(a[c] * weight);
  }
  if constexpr (want_lse) *lse_view_.at(i, h) = static_cast<std::remove_pointer_t<decltype(lse_view_.data)>>(lse);
}

template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
auto tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::item_of(index_t item, C* scratch) const -> work {
  const index_t b = std::upper_bound(plans_, plans_ + pl_.seqs, item,
                                     [](index_t x, const seq_plan& sp) { return x < sp.item0; }) -
                    plans_ - 1;
  const seq_plan& sp = plans_[b];
  work w(sp, tiles_of(sp, pl_, rel_cols_, rot_scratch_));
  w.seq = seq_of_(b);
  w.local = item - sp.item0;
  w.sets = sp.sets;
  w.chunk = w.local % sp.chunks;
  w.g0 = sp.set_of_unit(w.local / sp.chunks) * w.sets;
  w.i0 = sp.tile_of_unit(w.local / sp.chunks) * sp.tq;
  w.nq = std::min(sp.tq, sp.nq - w.i0);
  w.rows = w.nq * group_;
  w.d = d_;
  w.k_begin = w.chunk * sp.chunk_keys;
  w.k_end = std::min(w.seq.n_kv, w.k_begin + sp.chunk_keys);
  w.qp = w.seq.qpos.subset(w.i0, w.nq);
  w.qb = bounds_of(w.qp);
  w.few_rows = w.plan.bq <= few_query_rows;
  w.scratch = scratch;
  const tile_plan& plan = w.plan;
  // Decode reads keys and values in place (widening fp16 / bf16 as it loads), the rows of a
  // tile in blocks of consecutive rows (a page, or `decode_block` keys), every kv head of the
  // item on one block before the next block, so K and V are read in address order while the
  // next block is requested ahead of its use.
  w.decode_in_place =
      decode_readable && plan.bq <= decode_rows && !rotating_keys_ && !round_keys_ && d_ == plan.dpad;
  return w;
}

// The scale is folded into the query tile: rotation and Shaw's query terms are linear in q.
// Under bf16_qk the tile holds the rounded query and the logits are scaled instead.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::load_queries(const work& w) const {
  const index_t d = d_;
  for (index_t gs = 0; gs < w.sets; ++gs) {
    const index_t g = w.g0 + gs;
    C* const qt = w.q(gs);
    for (index_t hh = 0; hh < group_; ++hh)
      load_tile(qv_, w.sp->q0 + w.i0, w.nq, g * group_ + hh, w.qp, bf16_qk_ ? C(1) : scale_, qt + hh * w.nq * d,
                w.rot(), rotation);
    if (bf16_qk_) round_rows_to_bf16(qt, w.rows, d, d);
    std::fill(w.acc(gs), w.acc(gs) + w.rows * w.plan.dpad, C(0));
    std::fill(w.m(gs), w.m(gs) + w.rows, neg_inf);
    std::fill(w.l(gs), w.l(gs) + w.rows, C(0));
    if constexpr (relative_key_value<E>) {
      const strided_view<C> terms = w.relative_columns_of(w.terms(gs));
      if constexpr (tables_of_compute_type) {
        // Shaw's own tables: G = Q aK^T by the decode products, aK read in place.
        const auto ak = enc_.key_table();
        kern_.qk_rows(qt, d, w.rows, d, ak.data, ak.stride, ak.rows, terms.data, terms.stride, nullptr, 0);
      } else {
        enc_.query_terms(strided_view<const C>(qt, w.rows, d, d), terms);
      }
      shift_relative_terms(terms);
      std::fill(w.weights(gs), w.weights(gs) + w.rows * w.plan.r, C(0));
    }
  }
  if (w.decode_in_place) std::fill(w.scratch + w.plan.ones, w.scratch + w.plan.ones + decode_rows, C(1));
  // Prefill with the bf16 pair kernels multiplies rows of pairs of the rounded query.
  if constexpr (std::same_as<C, float>) {
    if (pairs_ && !w.few_rows && !w.decode_in_place)
      for (index_t gs = 0; gs < w.sets; ++gs) pair_dense_rows(w.q(gs), w.rows, d);
  }
}

// Rows [r0, r0 + nr) of a tile, one call of f(head in group, first row - r0, rows, positions)
// per query head (tile row r is head r / nq, token r % nq).
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
template <class F>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::heads_of_strip(const work& w, index_t r0, index_t nr,
                                                                  F&& f) const {
  const index_t nq = w.nq;
  for (index_t hh = r0 / nq; hh * nq < r0 + nr; ++hh) {
    const index_t a = std::max(r0, hh * nq), e = std::min(r0 + nr, (hh + 1) * nq);
    f(hh, a - r0, e - a, w.qp.subset(a - hh * nq, e - a));
  }
}

// Logits `sv` of tile rows [r0, r0 + nr) of kv head g against keys at `kp`: Shaw's relative
// keys, the scale under bf16_qk, the encoder's bias, the soft cap, then the mask (unless every
// pair is visible).
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::modify_scores(const work& w, strided_view<C> sv, index_t r0,
                                                                 index_t nr, index_t g, positions kp, bool full,
                                                                 [[maybe_unused]] strided_view<const C> terms) const {
  const index_t nk = sv.cols;
  if constexpr (relative_key_value<E>) {
    heads_of_strip(w, r0, nr, [&](index_t, index_t at_row, index_t n, positions hp) {
      enc_.add_bias_tile(sv.middle_rows(at_row, n), terms.middle_rows(r0 + at_row, n), hp, kp);
    });
  }
  if (bf16_qk_) {
    for (index_t r = 0; r < nr; ++r) {
      C* row = sv.row(r);
      for (index_t j = 0; j < nk; ++j) row[j] *= scale_;
    }
  }
  if constexpr (position_bias<E>) {
    heads_of_strip(w, r0, nr, [&](index_t hh, index_t at_row, index_t n, positions hp) {
      enc_.add_bias_tile(sv.middle_rows(at_row, n), g * group_ + hh, hp, kp);
    });
  }
  if (softcap_ > C(0)) {
    const C inv = C(1) / softcap_;
    for (index_t r = 0; r < nr; ++r) {
      C* row = sv.row(r);
      for (index_t j = 0; j < nk; ++j) row[j] = softcap_ * std::tanh(row[j] * inv);
    }
  }
  if (!full) {
    for (index_t r = 0; r < nr; ++r) sh_.mask.mask_row(w.qp[(r0 + r) % w.nq], kp, sv.row(r));
  }
}

// Decode: keys [j0, j0 + nk) of the chunk read in place, a block of consecutive rows at a time.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::decode_tile(const work& w, index_t j0, index_t nk, positions kp,
                                                               bool full) const {
  const index_t d = d_;
  const batch_seq& seq = w.seq;
  const tile_plan& plan = w.plan;
  C* const ones = w.scratch + plan.ones;
  // The block of keys that starts at key j, before key `end`: its first K/V row and its length.
  auto block_at = [&](index_t j, index_t end) {
    const index_t n = std::min(decode_block, seq.keys.run(j, end - j));
    return std::pair{seq.keys.row(j), n};
  };
  // Every head's columns of the block of keys at j (before `end`) of `m`, requested at once: the
  // next block's rows are on their way while the kernels work on this one.
  auto prefetch_block = [&](auto m, index_t j, index_t end) {
    const auto [row, n] = block_at(j, end);
    prefetch_rows(m, row, n, w.g0, w.sets, d);
  };
  // Rows of keys [j, j + n) of `m` that the kernels request while they read another block:
  // the first row of kv head g's columns and how many follow it (a run at most; none past the
  // sequence's keys: past the chunk they are the next chunk's, which this worker may take next).
  auto ahead = [&](auto m, index_t j, index_t n, index_t g) {
    using T = std::remove_pointer_t<decltype(m.data)>;
    if (j >= seq.n_kv) return std::pair<T*, index_t>{nullptr, 0};
    return std::pair<T*, index_t>{m.at(seq.keys.row(j), g), seq.keys.run(j, std::min(n, seq.n_kv - j))};
  };
  constexpr index_t k_ahead = decode_prefetch_keys<KS>, v_ahead = decode_prefetch_values<VS>;
  // Q K^T, a block at a time, each head's part of the keys `k_ahead` further requested first.
  for (index_t j = 0; j < nk;) {
    const auto [row, n] = block_at(j0 + j, j0 + nk);
    if (j + n < nk) {
      prefetch_block(kv_, j0 + j + n, j0 + nk);
    } else {
      prefetch_block(vv_, j0, j0 + nk);
    }
    for (index_t gs = 0; gs < w.sets; ++gs) {
      if constexpr (decode_readable) {
        const auto [pf, npf] = ahead(kv_, j0 + j + k_ahead, n, w.g0 + gs);
        qk_rows_of(kern_, w.q(gs), d, w.rows, d, kv_.at(row, w.g0 + gs), kv_.stride, n, w.s(gs) + j, plan.ldkt, pf,
                   npf);
      }
    }
    j += n;
  }
  for (index_t gs = 0; gs < w.sets; ++gs) {
    const strided_view<C> sv(w.s(gs), w.rows, nk, plan.ldkt);
    modify_scores(w, sv, 0, w.rows, w.g0 + gs, kp, full, strided_view<const C>());
    kern_.softmax(sv.data, plan.ldkt, w.rows, nk, w.m(gs), w.l(gs), w.at(plan.alpha, plan.bq, gs));
  }
  // P V, a block at a time, values `v_ahead` further requested first.
  for (index_t j = 0; j < nk;) {
    const auto [row, n] = block_at(j0 + j, j0 + nk);
    if (j + n < nk) {
      prefetch_block(vv_, j0 + j + n, j0 + nk);
    } else if (j0 + nk < w.k_end) {
      prefetch_block(kv_, j0 + nk, std::min(w.k_end, j0 + nk + plan.bk));
    }
    for (index_t gs = 0; gs < w.sets; ++gs) {
      if constexpr (decode_readable) {
        const auto [pf, npf] = ahead(vv_, j0 + j + v_ahead, n, w.g0 + gs);
        pv_of(kern_, w.s(gs) + j, plan.ldkt, w.rows, n, vv_.at(row, w.g0 + gs), vv_.stride, d,
              j == 0 ? w.at(plan.alpha, plan.bq, gs) : ones, w.acc(gs), plan.dpad, pf, npf);
      }
    }
    j += n;
  }
}

// Prefill: keys [j0, j0 + nk) of the chunk, packed (rotated) once per kv head, the tile's query
// rows in strips.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::prefill_tile(const work& w, index_t j0, index_t nk, positions kp,
                                                                position_span kb, bool full) const {
  const index_t d = d_;
  const batch_seq& seq = w.seq;
  const tile_plan& plan = w.plan;
  C* const scratch = w.scratch;
  C* const alpha = scratch + plan.alpha;
  // Rows of the tile's keys in K/V: one run, or several (a tile over page boundaries).
  const bool one_run = seq.keys.run(j0, nk) == nk;
  const index_t row0 = seq.keys.row(j0);
  const bool keys_in_place =
      (keys_compute_type || (w.few_rows && keys_readable)) && !rotating_keys_ && !round_keys_ && one_run;
  const bool values_in_place = w.few_rows && values_readable && d == plan.dpad && one_run;
  const index_t half_d = (d + 1) / 2;  // pairs of bf16 in a row (`pairs_`)

  for (index_t gs = 0; gs < w.sets; ++gs) {
    const index_t g = w.g0 + gs;
    C* const qt = w.q(gs);
    C* const acc = w.acc(gs);
    C* const m = w.m(gs);
    C* const l = w.l(gs);
    [[maybe_unused]] const strided_view<C> terms = w.relative_columns_of(w.terms(gs));
    [[maybe_unused]] const strided_view<C> wts = w.relative_columns_of(w.weights(gs));

    // Key rows in place (`kin`, in their storage type) or as a dense tile (`krows`).
    const KS* kin = nullptr;
    const C* krows = nullptr;
    index_t ldk = d;
    if (keys_in_place) {
      kin = kv_.at(row0, g);
      ldk = kv_.stride;
    } else {
      C* buf = scratch + plan.krows;
      for_each_run(seq, j0, nk, [&](index_t j, index_t row, index_t n) {
        load_tile(kv_, row, n, g, kp.subset(j, n), C(1), buf + j * d, w.rot(), rotating_keys_);
      });
      if (round_keys_) round_rows_to_bf16(buf, nk, d, d);
      krows = buf;
    }
    if (!w.few_rows) {
      if constexpr (keys_compute_type) {
        kern_.pack_kt(kin ? kin : krows, ldk, nk, d, scratch + plan.kt, plan.ldkt);
      } else {
        kern_.pack_kt(krows, ldk, nk, d, scratch + plan.kt, plan.ldkt);
      }
      if constexpr (std::same_as<C, float>) {
        if (pairs_) pairs_->pair_rows(scratch + plan.kt, plan.ldkt, d);
      }
    }
    const VS* vin = nullptr;
    const C* vrows = nullptr;
    index_t ldv = plan.dpad;
    if (values_in_place) {
      vin = vv_.at(row0, g);
      ldv = vv_.stride;
    } else {
      C* buf = scratch + plan.v;
      for_each_run(seq, j0, nk, [&](index_t j, index_t row, index_t n) {
        load_rows(vv_, row, n, g, d, C(1), buf + j * plan.dpad, plan.dpad);
      });
      if (d != plan.dpad)
        for (index_t j = 0; j < nk; ++j) std::fill(buf + j * plan.dpad + d, buf + (j + 1) * plan.dpad, C(0));
      vrows = buf;
    }

    // The tile's rows in strips whose logits stay in L1 from QK^T through PV.
    for (index_t r0 = 0; r0 < w.rows; r0 += plan.strip) {
      const index_t nr = std::min(plan.strip, w.rows - r0);
      // A strip that sees none of the tile's keys (above the diagonal of a causal tile,
      // outside a window) skips it: its rows' state is unchanged, as if the tile were skipped.
      const position_span sb = strip_bounds(w.qp, w.qb, r0, nr);
      if (!full && !sh_.mask.any_visible(sb, kb)) continue;
      // Keys past the last one a row of the strip sees (on the diagonal of a causal tile) are left
      // out, as a skipped tile is: each would add exp(-inf) = 0. Keys of consecutive positions.
      const index_t nv =
          full || !kp.is_range() ? nk : count_upto(sh_.mask.keys_for(sb.hi).hi, kp.start(), nk);
      const index_t ncols = std::min(plan.ldkt, (nv + 31) / 32 * 32);
      const positions kpv = kp.subset(0, nv);
      C* const s = scratch + plan.s;
      if (w.few_rows) {
        if constexpr (keys_readable) {
          if (kin) qk_rows_of(kern_, qt + r0 * d, d, nr, d, kin, ldk, nv, s, plan.ldkt);
        }
        if (!kin) kern_.qk_rows(qt + r0 * d, d, nr, d, krows, ldk, nv, s, plan.ldkt, nullptr, 0);
      } else if (pairs_) {
        if constexpr (std::same_as<C, float>)
          pairs_->qk(qt + r0 * half_d, half_d, nr, half_d, scratch + plan.kt, plan.ldkt, ncols, s);
      } else {
        kern_.qk(qt + r0 * d, d, nr, d, scratch + plan.kt, plan.ldkt, ncols, s);
      }
      const strided_view<C> sv(s, nr, nv, plan.ldkt);
      modify_scores(w, sv, r0, nr, g, kpv, full, strided_view<const C>(terms));
      kern_.softmax(s, plan.ldkt, nr, nv, m + r0, l + r0, alpha + r0);
      if constexpr (relative_key_value<E>) {
        for (index_t r = r0; r < r0 + nr; ++r)
          if (alpha[r] != C(1))
            for (index_t c = near_weights ? 1 : 0; c < wts.cols; ++c) wts(r, c) *= alpha[r];
        heads_of_strip(w, r0, nr, [&](index_t, index_t at_row, index_t n, positions hp) {
          const strided_view<const C> pv(sv.middle_rows(at_row, n));
          // Shaw's own encoder leaves column 0 out: finish_relative_rows sets it.
          if constexpr (near_weights) {
            enc_.accumulate_near_value_weights(pv, hp, kpv, wts.middle_rows(r0 + at_row, n));
          } else {
            enc_.accumulate_value_weights(pv, hp, kpv, wts.middle_rows(r0 + at_row, n));
          }
        });
      }
      if constexpr (values_readable) {
        if (vin) pv_of(kern_, s, plan.ldkt, nr, nv, vin, ldv, d, alpha + r0, acc + r0 * plan.dpad, plan.dpad);
      }
      if (!vin) kern_.pv(s, plan.ldkt, nr, nv, vrows, ldv, d, alpha + r0, acc + r0 * plan.dpad, plan.dpad, nullptr, 0);
    }
  }
}

// Shaw's value term, then the rows written, or (a chunk of a chunked sequence) its state kept
// for the merge.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::finish_item(const work& w) const {
  const tile_plan& plan = w.plan;
  for (index_t gs = 0; gs < w.sets; ++gs) {
    const index_t g = w.g0 + gs;
    C* const acc = w.acc(gs);
    C* const m = w.m(gs);
    const C* const l = w.l(gs);
    if constexpr (relative_key_value<E>) {
      const strided_view<C> wts = w.relative_columns_of(w.weights(gs));
      finish_relative_rows(strided_view<const C>(w.terms(gs), w.rows, plan.r, plan.r), wts, m, l);
      bool done = false;
      if constexpr (tables_of_compute_type) {
        // acc += W aV by the P V product, aV read in place (its rows are whole vectors when d is
        // a multiple of 16), with a rescale factor of 1 in the first set's alpha buffer (at least
        // bq rows; no tile needs it any more).
        if (d_ == plan.dpad) {
          const auto av = enc_.value_table();
          C* const ones = w.scratch + plan.alpha;
          std::fill(ones, ones + w.rows, C(1));
          kern_.pv(wts.data, wts.stride, w.rows, wts.cols, av.data, av.stride, d_, ones, acc, plan.dpad, nullptr, 0);
          done = true;
        }
      }
      if (!done) enc_.add_value_term(strided_view<const C>(wts), strided_view<C>(acc, w.rows, d_, plan.dpad));
    }
    if (w.sp->chunks > 1) {
      // Keep the chunk's state; the merge finishes the rows.
      C* part = partials_ + w.sp->partial0 + (w.local * w.sets + gs) * partial_stride_of(plan);
      std::copy(acc, acc + w.rows * plan.dpad, part);
      std::copy(m, m + w.rows, part + plan.bq * plan.dpad);
      std::copy(l, l + w.rows, part + plan.bq * plan.dpad + plan.bq);
      continue;
    }
    for (index_t r = 0; r < w.rows; ++r) finish_row(g, w.sp->q0 + w.i0, w.nq, r, acc + r * plan.dpad, m[r], l[r]);
  }
}

template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::run(index_t item, C* scratch) const {
  const work w = item_of(item, scratch);
  load_queries(w);
  auto* const kpos_buf = reinterpret_cast<position*>(scratch + w.plan.kpos);
  for (index_t j0 = w.k_begin; j0 < w.k_end; j0 += w.plan.bk) {
    const index_t nk = std::min(w.plan.bk, w.k_end - j0);
    positions kp;
    if (w.seq.keys.row_positions) {
      for (index_t j = 0; j < nk; ++j) kpos_buf[j] = w.seq.keys.row_positions[w.seq.keys.row(j0 + j)];
      kp = positions(std::span<const position>(kpos_buf, static_cast<std::size_t>(nk)));
    } else {
      kp = w.seq.keys.kpos.subset(j0, nk);
    }
    const auto kb = bounds_of(kp);
    if (!sh_.mask.any_visible(w.qb, kb)) continue;
    const bool full = sh_.mask.all_visible(w.qb, kb);
    if (w.decode_in_place) {
      decode_tile(w, j0, nk, kp, full);
    } else {
      prefill_tile(w, j0, nk, kp, kb, full);
    }
  }
  finish_item(w);
}

// The chunks of one (head set, query tile) of a chunked sequence, merged in chunk order (the same
// arithmetic for any worker count) and rescaled like the online softmax: m = max, acc and l
// scaled to it; then the rows written.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void tile_worker<C, SQ, SK, SV, SO, LV, E, SeqOf>::merge(index_t unit) const {
  const index_t b = std::upper_bound(plans_, plans_ + pl_.seqs, unit,
                                     [](index_t x, const seq_plan& sp) { return x < sp.unit0; }) -
                    plans_ - 1;
  const seq_plan& sp = plans_[b];
  const tile_plan plan = tiles_of(sp, pl_, rel_cols_, rot_scratch_);
  const index_t stride = partial_stride_of(plan);
  const index_t local = unit - sp.unit0;
  const index_t chunks = sp.chunks, sets = sp.sets;
  const index_t i0 = sp.tile_of_unit(local) * sp.tq;
  const index_t nq = std::min(sp.tq, sp.nq - i0);
  const index_t rows = nq * group_;
  for (index_t gs = 0; gs < sets; ++gs) {
    const index_t g = sp.set_of_unit(local) * sets + gs;
    C* first = partials_ + sp.partial0 + (local * chunks * sets + gs) * stride;
    for (index_t c = 1; c < chunks; ++c) {
      const C* part = partials_ + sp.partial0 + ((local * chunks + c) * sets + gs) * stride;
      for (index_t r = 0; r < rows; ++r) {
        C& m0 = first[plan.bq * plan.dpad + r];
        C& l0 = first[plan.bq * plan.dpad + plan.bq + r];
        const C m1 = part[plan.bq * plan.dpad + r];
        const C l1 = part[plan.bq * plan.dpad + plan.bq + r];
        if (l1 == C(0)) continue;
        C* a0 = first + r * plan.dpad;
        const C* a1 = part + r * plan.dpad;
        if (l0 == C(0)) {
          std::copy(a1, a1 + d_, a0);
          m0 = m1, l0 = l1;
          continue;
        }
        const C mx = std::max(m0, m1);
        const C s0 = std::exp(m0 - mx), s1 = std::exp(m1 - mx);
        for (index_t col = 0; col < d_; ++col) a0[col] = s0 * a0[col] + s1 * a1[col];
        l0 = s0 * l0 + s1 * l1;
        m0 = mx;
      }
    }
    for (index_t r = 0; r < rows; ++r)
      finish_row(g, sp.q0 + i0, nq, r, first + r * plan.dpad, first[plan.bq * plan.dpad + r],
                 first[plan.bq * plan.dpad + plan.bq + r]);
  }
}

}  // namespace posenc::detail
