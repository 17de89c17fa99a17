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
/// the executor or the number of workers. The plan of a call (attention/plan.hpp) is computed
/// before any work starts; every error is thrown there, before a worker runs.

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

/// Blockwise attention over the sequences `seq_of(0 .. plan.seqs - 1)` (see `plan_batch`), the
/// engine behind `attention`, `attention_varlen` and `paged_attention`. `rotate_keys`: a rotation
/// encoder rotates the key tiles too (false: the keys were stored rotated, only the queries are
/// rotated here). Every argument was checked; nothing here throws.
template <class C, class SQ, class SK, class SV, class SO, class LV, class E, class SeqOf>
void run_batch(head_rows<SQ> qv, head_rows<SK> kv, head_rows<SV> vv, head_rows<SO> ov, LV lse_view,
               const attention_plan& pl, const seq_plan* plans, C* base, const attention_params& p, const E& enc,
               bool rotate_keys, SeqOf&& seq_of) {
  constexpr bool want_lse = !std::same_as<LV, int>;
  const attention_shape& sh = pl.sh;
  const index_t d = sh.head_dim;
  const index_t group = sh.group;
  C* const partials = base + static_cast<std::ptrdiff_t>(pl.per_thread) * pl.workers;
  const index_t rel_cols = relative_columns(enc), rot_scratch = rotator_scratch(enc);

  constexpr C neg_inf = -std::numeric_limits<C>::infinity();
  const C scale = static_cast<C>(sh.scale);
  const C softcap = static_cast<C>(p.softcap);

  const auto& kern = kernels_for<C>();
  constexpr bool rotation = E::family == encoding_family::rotation;
  const bool rotating_keys = rotation && rotate_keys;
  // bf16 Q K^T (`attention_params::bf16_qk`): queries loaded unscaled and rounded to bf16, keys
  // rounded unless they are bf16 already (stored as bf16, not rotated), the logits scaled after
  // the products. With AVX512_BF16 prefill multiplies pairs of bf16 (`pairs`).
  const bool bf16_qk = p.bf16_qk;
  const bool round_keys = bf16_qk && (rotating_keys || !std::same_as<std::remove_const_t<SK>, Eigen::bfloat16>);
  const bf16_pair_kernels* const pairs = [&]() -> const bf16_pair_kernels* {
    if constexpr (std::same_as<C, float>) {
      if (bf16_qk) return bf16_pair_kernels_in_use();
    }
    return nullptr;
  }();
  // Keys and values are read in place when they already have the compute type, need no
  // rotation, lie in consecutive rows, and (for values) may be read up to head_dim rounded up to
  // 16 columns.
  using KS = std::remove_const_t<SK>;
  using VS = std::remove_const_t<SV>;
  constexpr bool keys_compute_type = std::same_as<KS, C>;
  // fp16 / bf16 keys and values are read in place by the few-row kernels, which widen them as they
  // load (half the bytes of a float cache, where a converted copy would cost more than the products).
  constexpr bool keys_readable = kernel_readable<C, KS>;
  constexpr bool values_readable = kernel_readable<C, VS>;
  constexpr bool decode_readable = keys_readable && values_readable && !relative_key_value<E>;
  const index_t half_d = (d + 1) / 2;  // pairs of bf16 in a row (`pairs`)

  // The rotator reads the encoder's table (made on its first use), shared read-only by every worker.
  const auto rotator = [&] {
    if constexpr (has_tile_rotator<E>) {
      return enc.tile_rotator();
    } else {
      return 0;
    }
  }();
  // Rows [row, row + n) of head `head` of `src` into the dense tile `dst` (stride d), times
  // `factor`, rotated by `tp` when `rotate`. Unscaled tiles with a tile rotator are loaded and
  // rotated in one pass.
  auto load_tile = [&](auto src, index_t row, index_t n, index_t head, positions tp, C factor, C* dst, C* rot,
                       bool rotate) {
    using SS = std::remove_const_t<std::remove_pointer_t<decltype(src.data)>>;
    const strided_view<C> tile(dst, n, d, d);
    if constexpr (has_tile_rotator<E>) {
      if (rotate && factor == C(1)) {
        rotator.rotate(strided_view<const SS>(src.at(row, head), n, d, n <= 1 ? d : src.stride), tile, tp, rot);
        return;
      }
    }
    load_rows(src, row, n, head, d, factor, dst, d);
    if (!rotate) return;
    if constexpr (has_tile_rotator<E>) {
      rotator.rotate(tile, tp, rot);
    } else if constexpr (rotation) {
      enc.rotate(tile, tp);
    }
  };

  // Writes output row r of a tile of kv head g (unnormalised accumulator `a`, max `mr`, sum `lr`):
  // query head g * group + r / nq, token i0 + r % nq.
  auto finish_row = [&](index_t g, index_t i0, index_t nq, index_t r, const C* a, C mr, C lr) {
    const index_t i = i0 + r % nq;
    const index_t h = g * group + r / nq;
    SO* dst = ov.at(i, h);
    C lse = lr == C(0) ? neg_inf : mr + std::log(lr);
    C weight = lr == C(0) ? C(0) : C(1) / lr;
    if (!p.sinks.empty()) {
      C with_sink;
      const C keep = sink_weight(lse, static_cast<C>(p.sinks[static_cast<std::size_t>(h)]), with_sink);
      weight *= keep;
      lse = with_sink;
    }
    if (lr == C(0)) {
      for (index_t c = 0; c < d; ++c) dst[c] = static_cast<SO>(0);
    } else {
      for (index_t c = 0; c < d; ++c) dst[c] = static_cast<SO>(a[c] * weight);
    }
    if constexpr (want_lse) *lse_view.at(i, h) = static_cast<std::remove_pointer_t<decltype(lse_view.data)>>(lse);
  };

  // A work item of sequence `b`: kv heads [g0, g0 + sets), tokens [i0, i0 + nq), keys of chunk
  // `chunk`. Tile row r of kv head g holds query head g * group + r / nq at token i0 + r % nq
  // (head-major, so each head's rows are contiguous). The kv heads of an item take turns on each
  // key tile, so the item reads whole rows of K and V.
  auto run_item = [&](index_t item, C* scratch) {
    const index_t b = std::upper_bound(plans, plans + pl.seqs, item,
                                       [](index_t x, const seq_plan& sp) { return x < sp.item0; }) -
                      plans - 1;
    const seq_plan& sp = plans[b];
    const batch_seq seq = seq_of(b);
    const tile_plan plan = tiles_of(sp, pl, rel_cols, rot_scratch);
    const index_t local = item - sp.item0;
    const index_t sets = sp.sets;
    const index_t chunk = local % sp.chunks;
    const index_t qt_index = (local / sp.chunks) % sp.q_tiles;
    const index_t g0 = (local / sp.chunks / sp.q_tiles) * sets;
    const index_t i0 = qt_index * sp.tq;
    const index_t nq = std::min(sp.tq, sp.nq - i0);
    const index_t rows = nq * group;
    const positions qp = seq.qpos.subset(i0, nq);
    const auto qb = bounds_of(qp);
    const bool few_rows = plan.bq <= few_query_rows;
    auto at = [&](index_t offset, index_t per_set, index_t set) {
      return scratch + offset + set * ((per_set + 15) / 16 * 16);
    };
    C* const rot = scratch + plan.rot;
    auto* const kpos_buf = reinterpret_cast<position*>(scratch + plan.kpos);

    // The scale is folded into the query tile: rotation and Shaw's query terms are linear in q.
    // Under bf16_qk the tile holds the rounded query and the logits are scaled instead.
    for (index_t gs = 0; gs < sets; ++gs) {
      const index_t g = g0 + gs;
      C* const qt = at(plan.q, plan.bq * d, gs);
      for (index_t hh = 0; hh < group; ++hh)
        load_tile(qv, sp.q0 + i0, nq, g * group + hh, qp, bf16_qk ? C(1) : scale, qt + hh * nq * d, rot, rotation);
      if (bf16_qk) round_rows_to_bf16(qt, rows, d, d);
      std::fill(at(plan.acc, plan.bq * plan.dpad, gs), at(plan.acc, plan.bq * plan.dpad, gs) + rows * plan.dpad, C(0));
      std::fill(at(plan.m, plan.bq, gs), at(plan.m, plan.bq, gs) + rows, neg_inf);
      std::fill(at(plan.l, plan.bq, gs), at(plan.l, plan.bq, gs) + rows, C(0));
      if constexpr (relative_key_value<E>) {
        const strided_view<C> terms(at(plan.terms, plan.bq * plan.r, gs), rows, plan.r, plan.r);
        enc.query_terms(strided_view<const C>(qt, rows, d, d), terms);
        std::fill(at(plan.w, plan.bq * plan.r, gs), at(plan.w, plan.bq * plan.r, gs) + rows * plan.r, C(0));
      }
    }
    // Rows [r0, r0 + nr) of a tile, one call of f(head in group, first row - r0, rows, positions)
    // per query head (tile row r is head r / nq, token r % nq).
    auto heads_of_strip = [&](index_t r0, index_t nr, auto&& f) {
      for (index_t hh = r0 / nq; hh * nq < r0 + nr; ++hh) {
        const index_t a = std::max(r0, hh * nq), e = std::min(r0 + nr, (hh + 1) * nq);
        f(hh, a - r0, e - a, qp.subset(a - hh * nq, e - a));
      }
    };
    // Logits `sv` of tile rows [r0, r0 + nr) of kv head g against keys at `kp`: the encoder's
    // bias, the soft cap, then the mask (unless every pair is visible).
    auto modify_scores = [&](strided_view<C> sv, index_t r0, index_t nr, index_t g, positions kp, bool full,
                             [[maybe_unused]] strided_view<const C> terms) {
      const index_t nk = sv.cols;
      if constexpr (relative_key_value<E>) {
        heads_of_strip(r0, nr, [&](index_t, index_t at_row, index_t n, positions hp) {
          enc.add_bias_tile(sv.middle_rows(at_row, n), terms.middle_rows(r0 + at_row, n), hp, kp);
        });
      }
      if (bf16_qk) {
        for (index_t r = 0; r < nr; ++r) {
          C* row = sv.row(r);
          for (index_t j = 0; j < nk; ++j) row[j] *= scale;
        }
      }
      if constexpr (position_bias<E>) {
        heads_of_strip(r0, nr, [&](index_t hh, index_t at_row, index_t n, positions hp) {
          enc.add_bias_tile(sv.middle_rows(at_row, n), g * group + hh, hp, kp);
        });
      }
      if (softcap > C(0)) {
        const C inv = C(1) / softcap;
        for (index_t r = 0; r < nr; ++r) {
          C* row = sv.row(r);
          for (index_t j = 0; j < nk; ++j) row[j] = softcap * std::tanh(row[j] * inv);
        }
      }
      if (!full) {
        for (index_t r = 0; r < nr; ++r) sh.mask.mask_row(qp[(r0 + r) % nq], kp, sv.row(r));
      }
    };
    C* const alpha = scratch + plan.alpha;

    const index_t k_begin = chunk * sp.chunk_keys;
    const index_t k_end = std::min(seq.n_kv, k_begin + sp.chunk_keys);

    // Decode reads keys and values in place (widening fp16 / bf16 as it loads), the rows of a
    // tile in blocks of consecutive rows (a page, or `decode_block` keys), every kv head of the
    // item on one block before the next block, so K and V are read in address order while the
    // next block is requested ahead of its use.
    const bool decode_in_place =
        decode_readable && plan.bq <= decode_rows && !rotating_keys && !round_keys && d == plan.dpad;
    // Prefill with the bf16 pair kernels multiplies rows of pairs of the rounded query.
    if constexpr (std::same_as<C, float>) {
      if (pairs && !few_rows && !decode_in_place)
        for (index_t gs = 0; gs < sets; ++gs) pair_dense_rows(at(plan.q, plan.bq * d, gs), rows, d);
    }
    C* const ones = scratch + plan.ones;
    if (decode_in_place) std::fill(ones, ones + decode_rows, C(1));
    // The block of keys that starts at key j, before key `end`: its first K/V row and its length.
    auto block_at = [&](index_t j, index_t end) {
      const index_t n = std::min(decode_block, seq.keys.run(j, end - j));
      return std::pair{seq.keys.row(j), n};
    };
    // Every head's columns of the block of keys at j (before `end`) of `m`, requested at once: the
    // next block's rows are on their way while the kernels work on this one.
    auto prefetch_block = [&](auto m, index_t j, index_t end) {
      const auto [row, n] = block_at(j, end);
      prefetch_rows(m, row, n, g0, sets, d);
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
    auto decode_tile = [&](index_t j0, index_t nk, positions kp, bool full) {
      // Q K^T, a block at a time, each head's part of the keys `k_ahead` further requested first.
      for (index_t j = 0; j < nk;) {
        const auto [row, n] = block_at(j0 + j, j0 + nk);
        if (j + n < nk) {
          prefetch_block(kv, j0 + j + n, j0 + nk);
        } else {
          prefetch_block(vv, j0, j0 + nk);
        }
        for (index_t gs = 0; gs < sets; ++gs) {
          if constexpr (decode_readable) {
            const auto [pf, npf] = ahead(kv, j0 + j + k_ahead, n, g0 + gs);
            qk_rows_of(kern, at(plan.q, plan.bq * d, gs), d, rows, d, kv.at(row, g0 + gs), kv.stride, n,
                       at(plan.s, plan.strip * plan.ldkt, gs) + j, plan.ldkt, pf, npf);
          }
        }
        j += n;
      }
      for (index_t gs = 0; gs < sets; ++gs) {
        const strided_view<C> sv(at(plan.s, plan.strip * plan.ldkt, gs), rows, nk, plan.ldkt);
        modify_scores(sv, 0, rows, g0 + gs, kp, full, strided_view<const C>());
        kern.softmax(sv.data, plan.ldkt, rows, nk, at(plan.m, plan.bq, gs), at(plan.l, plan.bq, gs),
                     at(plan.alpha, plan.bq, gs));
      }
      // P V, a block at a time, values `v_ahead` further requested first.
      for (index_t j = 0; j < nk;) {
        const auto [row, n] = block_at(j0 + j, j0 + nk);
        if (j + n < nk) {
          prefetch_block(vv, j0 + j + n, j0 + nk);
        } else if (j0 + nk < k_end) {
          prefetch_block(kv, j0 + nk, std::min(k_end, j0 + nk + plan.bk));
        }
        for (index_t gs = 0; gs < sets; ++gs) {
          if constexpr (decode_readable) {
            const auto [pf, npf] = ahead(vv, j0 + j + v_ahead, n, g0 + gs);
            pv_of(kern, at(plan.s, plan.strip * plan.ldkt, gs) + j, plan.ldkt, rows, n, vv.at(row, g0 + gs),
                  vv.stride, d, j == 0 ? at(plan.alpha, plan.bq, gs) : ones, at(plan.acc, plan.bq * plan.dpad, gs),
                  plan.dpad, pf, npf);
          }
        }
        j += n;
      }
    };

    for (index_t j0 = k_begin; j0 < k_end; j0 += plan.bk) {
      const index_t nk = std::min(plan.bk, k_end - j0);
      positions kp;
      if (seq.keys.row_positions) {
        for (index_t j = 0; j < nk; ++j) kpos_buf[j] = seq.keys.row_positions[seq.keys.row(j0 + j)];
        kp = positions(std::span<const position>(kpos_buf, static_cast<std::size_t>(nk)));
      } else {
        kp = seq.keys.kpos.subset(j0, nk);
      }
      const auto kb = bounds_of(kp);
      if (!sh.mask.any_visible(qb, kb)) continue;
      const bool full = sh.mask.all_visible(qb, kb);
      if (decode_in_place) {
        decode_tile(j0, nk, kp, full);
        continue;
      }
      // Rows of the tile's keys in K/V: one run, or several (a tile over page boundaries).
      const bool one_run = seq.keys.run(j0, nk) == nk;
      const index_t row0 = seq.keys.row(j0);
      const bool keys_in_place =
          (keys_compute_type || (few_rows && keys_readable)) && !rotating_keys && !round_keys && one_run;
      const bool values_in_place = few_rows && values_readable && d == plan.dpad && one_run;

      for (index_t gs = 0; gs < sets; ++gs) {
        const index_t g = g0 + gs;
        C* const qt = at(plan.q, plan.bq * d, gs);
        C* const acc = at(plan.acc, plan.bq * plan.dpad, gs);
        C* const m = at(plan.m, plan.bq, gs);
        C* const l = at(plan.l, plan.bq, gs);
        [[maybe_unused]] const strided_view<C> terms(at(plan.terms, plan.bq * plan.r, gs), rows, plan.r, plan.r);
        [[maybe_unused]] const strided_view<C> wts(at(plan.w, plan.bq * plan.r, gs), rows, plan.r, plan.r);

        // Key rows in place (`kin`, in their storage type) or as a dense tile (`krows`).
        const KS* kin = nullptr;
        const C* krows = nullptr;
        index_t ldk = d;
        if (keys_in_place) {
          kin = kv.at(row0, g);
          ldk = kv.stride;
        } else {
          C* buf = scratch + plan.krows;
          for (index_t j = 0; j < nk;) {
            const index_t n = seq.keys.run(j0 + j, nk - j);
            load_tile(kv, seq.keys.row(j0 + j), n, g, kp.subset(j, n), C(1), buf + j * d, rot, rotating_keys);
            j += n;
          }
          if (round_keys) round_rows_to_bf16(buf, nk, d, d);
          krows = buf;
        }
        if (!few_rows) {
          if constexpr (keys_compute_type) {
            kern.pack_kt(kin ? kin : krows, ldk, nk, d, scratch + plan.kt, plan.ldkt);
          } else {
            kern.pack_kt(krows, ldk, nk, d, scratch + plan.kt, plan.ldkt);
          }
          if constexpr (std::same_as<C, float>) {
            if (pairs) pairs->pair_rows(scratch + plan.kt, plan.ldkt, d);
          }
        }
        const VS* vin = nullptr;
        const C* vrows = nullptr;
        index_t ldv = plan.dpad;
        if (values_in_place) {
          vin = vv.at(row0, g);
          ldv = vv.stride;
        } else {
          C* buf = scratch + plan.v;
          for (index_t j = 0; j < nk;) {
            const index_t n = seq.keys.run(j0 + j, nk - j);
            load_rows(vv, seq.keys.row(j0 + j), n, g, d, C(1), buf + j * plan.dpad, plan.dpad);
            j += n;
          }
          if (d != plan.dpad)
            for (index_t j = 0; j < nk; ++j) std::fill(buf + j * plan.dpad + d, buf + (j + 1) * plan.dpad, C(0));
          vrows = buf;
        }

        // The tile's rows in strips whose logits stay in L1 from QK^T through PV.
        for (index_t r0 = 0; r0 < rows; r0 += plan.strip) {
          const index_t nr = std::min(plan.strip, rows - r0);
          // A strip that sees none of the tile's keys (above the diagonal of a causal tile,
          // outside a window) skips it: its rows' state is unchanged, as if the tile were skipped.
          if (!full && !sh.mask.any_visible(strip_bounds(qp, qb, r0, nr), kb)) continue;
          C* const s = scratch + plan.s;
          if (few_rows) {
            if constexpr (keys_readable) {
              if (kin) qk_rows_of(kern, qt + r0 * d, d, nr, d, kin, ldk, nk, s, plan.ldkt);
            }
            if (!kin) kern.qk_rows(qt + r0 * d, d, nr, d, krows, ldk, nk, s, plan.ldkt, nullptr, 0);
          } else if (pairs) {
            if constexpr (std::same_as<C, float>)
              pairs->qk(qt + r0 * half_d, half_d, nr, half_d, scratch + plan.kt, plan.ldkt, s);
          } else {
            kern.qk(qt + r0 * d, d, nr, d, scratch + plan.kt, plan.ldkt, s);
          }
          const strided_view<C> sv(s, nr, nk, plan.ldkt);
          modify_scores(sv, r0, nr, g, kp, full, strided_view<const C>(terms));
          auto for_each_head = [&](auto&& f) { heads_of_strip(r0, nr, f); };
          kern.softmax(s, plan.ldkt, nr, nk, m + r0, l + r0, alpha + r0);
          if constexpr (relative_key_value<E>) {
            for (index_t r = r0; r < r0 + nr; ++r)
              if (alpha[r] != C(1))
                for (index_t c = 0; c < plan.r; ++c) wts(r, c) *= alpha[r];
            for_each_head([&](index_t, index_t at_row, index_t n, positions hp) {
              enc.accumulate_value_weights(strided_view<const C>(sv.middle_rows(at_row, n)), hp, kp,
                                           wts.middle_rows(r0 + at_row, n));
            });
          }
          if constexpr (values_readable) {
            if (vin) pv_of(kern, s, plan.ldkt, nr, nk, vin, ldv, d, alpha + r0, acc + r0 * plan.dpad, plan.dpad);
          }
          if (!vin) kern.pv(s, plan.ldkt, nr, nk, vrows, ldv, d, alpha + r0, acc + r0 * plan.dpad, plan.dpad, nullptr, 0);
        }
      }
    }

    for (index_t gs = 0; gs < sets; ++gs) {
      const index_t g = g0 + gs;
      C* const acc = at(plan.acc, plan.bq * plan.dpad, gs);
      const C* const m = at(plan.m, plan.bq, gs);
      const C* const l = at(plan.l, plan.bq, gs);
      if constexpr (relative_key_value<E>)
        enc.add_value_term(strided_view<const C>(at(plan.w, plan.bq * plan.r, gs), rows, plan.r, plan.r),
                           strided_view<C>(acc, rows, d, plan.dpad));
      if (sp.chunks > 1) {
        // Keep the chunk's state; the merge below finishes the rows.
        C* part = partials + sp.partial0 + (local * sets + gs) * partial_stride_of(plan);
        std::copy(acc, acc + rows * plan.dpad, part);
        std::copy(m, m + rows, part + plan.bq * plan.dpad);
        std::copy(l, l + rows, part + plan.bq * plan.dpad + plan.bq);
        continue;
      }
      for (index_t r = 0; r < rows; ++r) finish_row(g, sp.q0 + i0, nq, r, acc + r * plan.dpad, m[r], l[r]);
    }
  };

  auto body = [&](index_t item, int worker) {
    run_item(item, base + static_cast<std::ptrdiff_t>(worker) * pl.per_thread);
  };
  pl.ex->parallel_for(pl.items, pl.workers, body);
  if (pl.units == 0) return;

  // Merge the chunks of each (head set, query tile) of the chunked sequences in chunk order: the
  // same arithmetic for any worker count. Rescaled like the online softmax: m = max, acc and l
  // scaled to it.
  auto merge_unit = [&](index_t unit, int) {
    const index_t b = std::upper_bound(plans, plans + pl.seqs, unit,
                                       [](index_t x, const seq_plan& sp) { return x < sp.unit0; }) -
                      plans - 1;
    const seq_plan& sp = plans[b];
    const tile_plan plan = tiles_of(sp, pl, rel_cols, rot_scratch);
    const index_t stride = partial_stride_of(plan);
    const index_t local = unit - sp.unit0;
    const index_t chunks = sp.chunks, sets = sp.sets;
    const index_t i0 = (local % sp.q_tiles) * sp.tq;
    const index_t nq = std::min(sp.tq, sp.nq - i0);
    const index_t rows = nq * group;
    for (index_t gs = 0; gs < sets; ++gs) {
      const index_t g = (local / sp.q_tiles) * sets + gs;
      C* first = partials + sp.partial0 + (local * chunks * sets + gs) * stride;
      for (index_t c = 1; c < chunks; ++c) {
        const C* part = partials + sp.partial0 + ((local * chunks + c) * sets + gs) * stride;
        for (index_t r = 0; r < rows; ++r) {
          C& m0 = first[plan.bq * plan.dpad + r];
          C& l0 = first[plan.bq * plan.dpad + plan.bq + r];
          const C m1 = part[plan.bq * plan.dpad + r];
          const C l1 = part[plan.bq * plan.dpad + plan.bq + r];
          if (l1 == C(0)) continue;
          C* a0 = first + r * plan.dpad;
          const C* a1 = part + r * plan.dpad;
          if (l0 == C(0)) {
            std::copy(a1, a1 + d, a0);
            m0 = m1, l0 = l1;
            continue;
          }
          const C mx = std::max(m0, m1);
          const C s0 = std::exp(m0 - mx), s1 = std::exp(m1 - mx);
          for (index_t col = 0; col < d; ++col) a0[col] = s0 * a0[col] + s1 * a1[col];
          l0 = s0 * l0 + s1 * l1;
          m0 = mx;
        }
      }
      for (index_t r = 0; r < rows; ++r)
        finish_row(g, sp.q0 + i0, nq, r, first + r * plan.dpad, first[plan.bq * plan.dpad + r],
                   first[plan.bq * plan.dpad + plan.bq + r]);
    }
  };
  pl.ex->parallel_for(pl.units, static_cast<int>(std::min<index_t>(pl.units, pl.workers)), merge_unit);
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
