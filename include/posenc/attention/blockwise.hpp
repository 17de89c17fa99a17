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

/// Copies `n` rows of columns `[col, col + d)` of `src` into `dst` (row stride `ld`), converting
/// to the compute type and multiplying by `factor`. fp16 / bf16 rows are widened by the SIMD
/// kernels (the same bits as the loop below).
template <class C, class S>
void load_rows(strided_view<S> src, index_t row, index_t n, index_t col, index_t d, C factor, C* dst, index_t ld) {
  using SS = std::remove_const_t<S>;
  if (std::same_as<SS, C> && factor == C(1)) {
    for (index_t i = 0; i < n; ++i) std::memcpy(dst + i * ld, src.row(row + i) + col, static_cast<std::size_t>(d) * sizeof(C));
    return;
  }
  if constexpr (kernel_readable<C, SS> && !std::same_as<SS, C>) {
    const auto& kern = kernels_for<C>();
    const SS* from = src.row(row) + col;
    if constexpr (std::same_as<SS, Eigen::half>) {
      kern.convert_f16(from, src.stride, n, d, factor, dst, ld);
    } else {
      kern.convert_bf16(from, src.stride, n, d, factor, dst, ld);
    }
    return;
  }
  for (index_t i = 0; i < n; ++i) {
    const S* from = src.row(row + i) + col;
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

}  // namespace detail

/// Blockwise softmax attention with any positional encoder; the same contract as
/// `attention_reference` (see there for the formula, shapes, GQA and masking), computed tile by
/// tile in `compute_t<S>` with memory linear in the sequence length.
///
/// \param enc  applied by this call: a rotation encoder (RoPE) rotates copies of the query and
///             key tiles with their positions (the inputs stay untouched); a score bias is added
///             to the logits. Queries and keys the caller rotated already (a cache of rotated
///             keys) are attended with `posenc::no_position`: passing the rope here as well would
///             rotate them twice. The encoder's `scalar_type` must be the compute type of the
///             storage.
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
  constexpr bool want_lse = !std::is_null_pointer_v<std::remove_cvref_t<L>>;
  [[maybe_unused]] auto lse_view = detail::lse_view_of(std::forward<L>(lse), sh);
  detail::check_encoder_fits(enc, sh);
  if (sh.n_q == 0) return;

  const detail::attention_plan pl = detail::make_plan<C>(sh, p, enc);
  const detail::tile_plan& plan = pl.tiles;
  const index_t d = sh.head_dim;
  const index_t group = sh.group;
  const index_t tq = pl.tq;
  const index_t sets = pl.sets;
  const index_t chunks = pl.chunks;
  const index_t chunk_keys = pl.chunk_keys;
  const index_t q_tiles = pl.q_tiles;
  const index_t head_sets = pl.head_sets;
  const index_t partial_stride = pl.partial_stride;

  attention_workspace local;
  attention_workspace& w = ws ? *ws : local;
  C* const base = reinterpret_cast<C*>(w.reserve(pl.workspace_bytes));
  C* const partials = base + static_cast<std::ptrdiff_t>(plan.per_thread) * pl.workers;

  constexpr C neg_inf = -std::numeric_limits<C>::infinity();
  const C scale = static_cast<C>(sh.scale);

  const auto& kern = detail::kernels_for<C>();
  constexpr bool rotating = E::family == encoding_family::rotation;
  using SK = std::remove_const_t<std::remove_pointer_t<decltype(kv.data)>>;
  using SV = std::remove_const_t<std::remove_pointer_t<decltype(vv.data)>>;
  // With a few query rows (decode) the kernel is bound by reading K and V once: keys are then
  // multiplied in place without the transposed tile, and values read in place. With many rows,
  // values are copied into a dense tile: an engine's rows are often 4 KiB apart (kv_heads *
  // head_dim floats), and rows at such a stride fall into one L1 set, so reading them in place
  // evicts each other on every pass of the PV kernel.
  const bool few_rows = plan.bq <= detail::few_query_rows;
  // Keys and values are read in place when they need no rotation and (for values) may be read up
  // to head_dim rounded up to 16 columns: keys of the compute type always; fp16 / bf16 keys and
  // values by the few-row kernels, which widen them as they load (half the bytes of a float
  // cache, where a converted copy would cost more than the products).
  const bool keys_in_place = !rotating && (std::same_as<SK, C> || (few_rows && detail::kernel_readable<C, SK>));
  const bool values_in_place = few_rows && detail::kernel_readable<C, SV> && d == plan.dpad;

  // The rotator reads the encoder's table (made on its first use), shared read-only by every worker.
  const auto rotator = [&] {
    if constexpr (detail::has_tile_rotator<E>) {
      return enc.tile_rotator();
    } else {
      return 0;
    }
  }();
  // Rows [row, row + n) of columns [col, col + d) of `src` into the dense tile `dst` (stride d),
  // times `factor`, rotated by `tp` when the encoder rotates inside the kernel. Unscaled tiles
  // with a tile rotator are loaded and rotated in one pass.
  auto load_tile = [&](auto src, index_t row, index_t n, index_t col, positions tp, C factor, C* dst, C* scratch) {
    using SS = std::remove_const_t<std::remove_pointer_t<decltype(src.data)>>;
    const strided_view<C> tile(dst, n, d, d);
    if constexpr (detail::has_tile_rotator<E>) {
      if (factor == C(1)) {
        rotator.rotate(strided_view<const SS>(src.row(row) + col, n, d, src.stride), tile, tp, scratch + plan.rot);
        return;
      }
    }
    detail::load_rows(src, row, n, col, d, factor, dst, d);
    if constexpr (detail::has_tile_rotator<E>) {
      rotator.rotate(tile, tp, scratch + plan.rot);
    } else if constexpr (rotating) {
      enc.rotate(tile, tp);
    }
  };

  // Writes output row r of kv head g (unnormalised accumulator `a`, max `mr`, sum `lr`).
  auto finish_row = [&](index_t g, index_t i0, index_t nq, index_t r, const C* a, C mr, C lr) {
    const index_t i = i0 + r % nq;
    const index_t h = g * group + r / nq;
    SO* dst = ov.row(i) + h * d;
    if (lr == C(0)) {
      for (index_t c = 0; c < d; ++c) dst[c] = SO(0);
      if constexpr (want_lse) lse_view(i, h) = neg_inf;
      return;
    }
    const C inv = C(1) / lr;
    for (index_t c = 0; c < d; ++c) dst[c] = static_cast<SO>(a[c] * inv);
    if constexpr (want_lse)
      lse_view(i, h) = static_cast<std::remove_reference_t<decltype(lse_view(0, 0))>>(mr + std::log(lr));
  };

  // A work item: kv heads [g0, g0 + sets), tokens [i0, i0 + nq), keys of chunk `chunk`. Tile row r
  // of kv head g holds query head g * group + r / nq at token i0 + r % nq (head-major, so each
  // head's rows are contiguous). The kv heads of an item take turns on each key tile, so the
  // item reads whole rows of K and V.
  auto run_item = [&](index_t item, C* scratch) {
    const index_t chunk = item % chunks;
    const index_t qt_index = (item / chunks) % q_tiles;
    const index_t g0 = (item / chunks / q_tiles) * sets;
    const index_t i0 = qt_index * tq;
    const index_t nq = std::min(tq, sh.n_q - i0);
    const index_t rows = nq * group;
    const positions qp = qpos.subset(i0, nq);
    const auto qb = detail::bounds_of(qp);
    auto at = [&](index_t offset, index_t per_set, index_t set) {
      return scratch + offset + set * ((per_set + 15) / 16 * 16);
    };

    // The scale is folded into the query tile: rotation and Shaw's query terms are linear in q.
    for (index_t gs = 0; gs < sets; ++gs) {
      const index_t g = g0 + gs;
      C* const qt = at(plan.q, plan.bq * d, gs);
      for (index_t hh = 0; hh < group; ++hh) {
        load_tile(qv, i0, nq, (g * group + hh) * d, qp, scale, qt + hh * nq * d, scratch);
      }
      std::fill(at(plan.acc, plan.bq * plan.dpad, gs), at(plan.acc, plan.bq * plan.dpad, gs) + rows * plan.dpad, C(0));
      std::fill(at(plan.m, plan.bq, gs), at(plan.m, plan.bq, gs) + rows, neg_inf);
      std::fill(at(plan.l, plan.bq, gs), at(plan.l, plan.bq, gs) + rows, C(0));
      if constexpr (relative_key_value<E>) {
        const strided_view<C> terms(at(plan.terms, plan.bq * plan.r, gs), rows, plan.r, plan.r);
        enc.query_terms(strided_view<const C>(qt, rows, d, d), terms);
        std::fill(at(plan.w, plan.bq * plan.r, gs), at(plan.w, plan.bq * plan.r, gs) + rows * plan.r, C(0));
      }
    }
    C* const alpha = scratch + plan.alpha;

    const index_t k_begin = chunk * chunk_keys;
    const index_t k_end = std::min(sh.n_kv, k_begin + chunk_keys);
    for (index_t j0 = k_begin; j0 < k_end; j0 += plan.bk) {
      const index_t nk = std::min(plan.bk, k_end - j0);
      const positions kp = kpos.subset(j0, nk);
      const auto kb = detail::bounds_of(kp);
      if (!sh.mask.any_visible(qb, kb)) continue;
      const bool full = sh.mask.all_visible(qb, kb);

      for (index_t gs = 0; gs < sets; ++gs) {
        const index_t g = g0 + gs;
        C* const qt = at(plan.q, plan.bq * d, gs);
        C* const acc = at(plan.acc, plan.bq * plan.dpad, gs);
        C* const m = at(plan.m, plan.bq, gs);
        C* const l = at(plan.l, plan.bq, gs);
        [[maybe_unused]] const strided_view<C> terms(at(plan.terms, plan.bq * plan.r, gs), rows, plan.r, plan.r);
        [[maybe_unused]] const strided_view<C> wts(at(plan.w, plan.bq * plan.r, gs), rows, plan.r, plan.r);

        // Key rows in place (`kin`, in their storage type) or as a dense tile (`krows`).
        const SK* kin = nullptr;
        const C* krows = nullptr;
        index_t ldk = d;
        if (keys_in_place) {
          kin = kv.row(j0) + g * d;
          ldk = kv.stride;
        } else {
          C* buf = scratch + plan.krows;
          load_tile(kv, j0, nk, g * d, kp, C(1), buf, scratch);
          krows = buf;
        }
        if (!few_rows) {
          if constexpr (std::same_as<SK, C>) {
            kern.pack_kt(kin ? kin : krows, ldk, nk, d, scratch + plan.kt, plan.ldkt);
          } else {
            kern.pack_kt(krows, ldk, nk, d, scratch + plan.kt, plan.ldkt);
          }
        }
        const SV* vin = nullptr;
        const C* vrows = nullptr;
        index_t ldv = plan.dpad;
        if (values_in_place) {
          vin = vv.row(j0) + g * d;
          ldv = vv.stride;
        } else {
          C* buf = scratch + plan.v;
          detail::load_rows(vv, j0, nk, g * d, d, C(1), buf, plan.dpad);
          if (d != plan.dpad)
            for (index_t j = 0; j < nk; ++j) std::fill(buf + j * plan.dpad + d, buf + (j + 1) * plan.dpad, C(0));
          vrows = buf;
        }

        // The tile's rows in strips whose logits stay in L1 from QK^T through PV.
        for (index_t r0 = 0; r0 < rows; r0 += plan.strip) {
          const index_t nr = std::min(plan.strip, rows - r0);
          // A strip that sees none of the tile's keys (above the diagonal of a causal tile,
          // outside a window) skips it: its rows' state is unchanged, as if the tile were skipped.
          if (!full && !sh.mask.any_visible(detail::strip_bounds(qp, qb, r0, nr), kb)) continue;
          C* const s = scratch + plan.s;
          if (few_rows) {
            if constexpr (detail::kernel_readable<C, SK>) {
              if (kin) detail::qk_rows_of(kern, qt + r0 * d, d, nr, d, kin, ldk, nk, s, plan.ldkt);
            }
            if (!kin) kern.qk_rows(qt + r0 * d, d, nr, d, krows, ldk, nk, s, plan.ldkt);
          } else {
            kern.qk(qt + r0 * d, d, nr, d, scratch + plan.kt, plan.ldkt, s);
          }
          const strided_view<C> sv(s, nr, nk, plan.ldkt);
          // The strip's rows of each query head (tile row r is head r / nq, token r % nq).
          auto for_each_head = [&](auto&& f) {
            for (index_t hh = r0 / nq; hh * nq < r0 + nr; ++hh) {
              const index_t a = std::max(r0, hh * nq), b = std::min(r0 + nr, (hh + 1) * nq);
              f(hh, a - r0, b - a, qp.subset(a - hh * nq, b - a));
            }
          };
          if constexpr (relative_key_value<E>) {
            for_each_head([&](index_t, index_t at_row, index_t n, positions hp) {
              enc.add_bias_tile(sv.middle_rows(at_row, n), strided_view<const C>(terms.middle_rows(r0 + at_row, n)),
                                hp, kp);
            });
          }
          if constexpr (position_bias<E>) {
            for_each_head([&](index_t hh, index_t at_row, index_t n, positions hp) {
              enc.add_bias_tile(sv.middle_rows(at_row, n), g * group + hh, hp, kp);
            });
          }
          if (!full) {
            for (index_t r = 0; r < nr; ++r) sh.mask.mask_row(qp[(r0 + r) % nq], kp, sv.row(r));
          }
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
          if constexpr (detail::kernel_readable<C, SV>) {
            if (vin)
              detail::pv_of(kern, s, plan.ldkt, nr, nk, vin, ldv, d, alpha + r0, acc + r0 * plan.dpad, plan.dpad);
          }
          if (!vin) kern.pv(s, plan.ldkt, nr, nk, vrows, ldv, d, alpha + r0, acc + r0 * plan.dpad, plan.dpad);
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
      if (chunks > 1) {
        // Keep the chunk's state; the merge below finishes the rows.
        C* part = partials + (item * sets + gs) * partial_stride;
        std::copy(acc, acc + rows * plan.dpad, part);
        std::copy(m, m + rows, part + plan.bq * plan.dpad);
        std::copy(l, l + rows, part + plan.bq * plan.dpad + plan.bq);
        continue;
      }
      for (index_t r = 0; r < rows; ++r) finish_row(g, i0, nq, r, acc + r * plan.dpad, m[r], l[r]);
    }
  };

  auto body = [&](index_t item, int worker) {
    run_item(item, base + static_cast<std::ptrdiff_t>(worker) * plan.per_thread);
  };
  pl.ex->parallel_for(pl.items, pl.workers, body);
  if (chunks == 1) return;

  // Merge the chunks of each (head set, query tile) in chunk order: the same arithmetic for any
  // thread count. Rescaled like the online softmax: m = max, acc and l scaled to it.
  for (index_t unit = 0; unit < head_sets * q_tiles; ++unit) {
    const index_t i0 = (unit % q_tiles) * tq;
    const index_t nq = std::min(tq, sh.n_q - i0);
    const index_t rows = nq * group;
    for (index_t gs = 0; gs < sets; ++gs) {
      const index_t g = (unit / q_tiles) * sets + gs;
      C* first = partials + (unit * chunks * sets + gs) * partial_stride;
      for (index_t c = 1; c < chunks; ++c) {
        const C* part = partials + ((unit * chunks + c) * sets + gs) * partial_stride;
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
        finish_row(g, i0, nq, r, first + r * plan.dpad, first[plan.bq * plan.dpad + r],
                   first[plan.bq * plan.dpad + plan.bq + r]);
    }
  }
}

}  // namespace posenc
