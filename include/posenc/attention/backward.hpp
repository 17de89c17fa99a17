// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/backward.hpp
/// The backward pass of attention: gradients of a loss with respect to q, k, v (and the learned
/// parameters of the encoder and the sinks) given the gradient `dout` of the forward's output,
/// computed tile by tile with the FlashAttention-2 algorithm, in memory linear in the sequence
/// length.
///
/// The forward (`posenc::attention`) saves its output `out` and the per-row log-sum-exp `lse`.
/// The backward recomputes each tile's logits from q and k, and with them the probabilities
/// `P = exp(t - lse)` exactly as the forward normalised them, so no `[n_q, n_kv]` matrix is ever
/// stored. Per query head, with `s` the scaled logits plus biases and `t = c tanh(s / c)` under a
/// soft-cap `c` (`t = s` without one):
///
///     D_i   = dout_i . out_i                            (once per row)
///     dv_j  = sum_i P_ij dout_i                          (summed over the heads of a GQA group)
///     dP_ij = dout_i . v_j    (+ dout_i . aV[r(i,j)] with Shaw's value term)
///     dt_ij = P_ij (dP_ij - D_i)
///     ds_ij = dt_ij (1 - (t_ij / c)^2)                  (soft-cap; ds = dt without one)
///     dq_i  = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i
///
/// `D_i` stands for the whole row sum `sum_j P_ij dP_ij`, sink included: a sink joins the
/// denominator and contributes no value, so the formula holds unchanged, and the sink logit's own
/// gradient is `dz_h = -sum_i e^(z_h - lse_i) D_i`. Masked keys have `P = 0`, so they get no
/// gradient; a row that sees no key (`lse = -inf`, or `lse = z_h` with a sink) gives zero gradients.
///
/// Every output row has exactly one writer, and every sum runs in a fixed order, so the result
/// has the same bits for any executor and any number of workers. Two schedules compute the same
/// operations on the same operands in the same order per output row, hence the same bits:
/// - one pass per kv head, when there are at least as many kv heads as workers: the item walks the
///   key tiles, accumulates dk and dv of each over every query tile and head of the group, and
///   keeps the dq accumulators of all its query rows (`[group, n_q, head_dim]`, O(n) per worker)
///   across the key tiles; the logits of each tile pair are computed once;
/// - otherwise (and always with Shaw's encoder), two passes with more, smaller items: (kv head,
///   key tile) items accumulate dk and dv, then (query head, query tile) items accumulate dq,
///   recomputing the logits (7 tile products per tile pair instead of 5), so that every worker
///   has work even for MQA.
/// Parameter gradients (bias tables, slopes, sinks) are summed per (query head, query tile) and
/// these sums are added in order. FlashAttention-2 instead adds to dq atomically from the
/// workers that own key tiles, whose order changes from run to run.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include "posenc/attention/mask.hpp"
#include "posenc/attention/params.hpp"
#include "posenc/attention/plan.hpp"
#include "posenc/attention/workspace.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/attention_kernels.hpp"
#include "posenc/detail/position_math.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/executor.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Where `attention_backward` adds the gradients of the learned parameters of a call, each one
/// optional (an empty span or view: not wanted). Gradients are *added* to what the caller's
/// buffers hold, so parameters shared by several layers or calls accumulate, as in an autograd
/// framework; dq, dk and dv are overwritten.
///
/// The primary template (no parameters: `no_position`, `rope`) holds the sinks' gradient only.
template <class E>
struct parameter_gradients {
  std::span<float> sinks{};  ///< `heads` values: `+= dL/dz_h` for each sink logit (`attention_params::sinks`)
};

/// ALiBi: the gradient of the slopes (fixed in the paper; learnable in some variants).
template <class T>
struct parameter_gradients<alibi<T>> {
  std::span<float> sinks{};    ///< as in the primary template
  std::span<double> slopes{};  ///< `num_heads` values (global heads): `+= dL/dslope`
};

/// T5: the gradient of the `[num_buckets, num_heads]` table.
template <class T>
struct parameter_gradients<t5_relative_bias<T>> {
  std::span<float> sinks{};     ///< as in the primary template
  strided_view<T> table{};      ///< `[num_buckets, num_heads]`, the table's layout: `+= dL/dtable`
};

/// Shaw: the gradients of the relative key and value tables.
template <class T>
struct parameter_gradients<shaw_relative<T>> {
  std::span<float> sinks{};       ///< as in the primary template
  strided_view<T> key_table{};    ///< `[2K+1, head_dim]`: `+= dL/daK`
  strided_view<T> value_table{};  ///< `[2K+1, head_dim]`: `+= dL/daV`
};

namespace detail {

inline constexpr index_t backward_default_tile = 64;

template <class E>
struct is_alibi : std::false_type {};
template <class T>
struct is_alibi<alibi<T>> : std::true_type {};
template <class E>
struct is_t5 : std::false_type {};
template <class T>
struct is_t5<t5_relative_bias<T>> : std::true_type {};

/// The layout of one backward call, decided before any work: tiles, work items and the
/// workspace, whose size this plan alone determines (`attention_backward_workspace_bytes` reports it).
struct backward_plan {
  attention_shape sh{};
  executor* ex = nullptr;
  int workers = 1;
  index_t bq = 1, bk = 1, q_tiles = 0, k_tiles = 0, r = 0;
  index_t items_kv = 0, items_q = 0;  // pass 1: (kv head, key tile); pass 2: (query head, query tile)
  /// One pass per kv head instead of two passes: each item owns a kv head and keeps the dq
  /// accumulators of its query heads (`dq_acc`, `[group, n_q, dpad]` per worker) across the key tiles.
  bool single = false;
  index_t dq_acc = 0;
  // Offsets in compute values.
  index_t dsum = 0, qrot = 0, krot = 0, gterms = 0, hterms = 0, scratch = 0, per_worker = 0;
  index_t ldkt = 0, dpad = 0, ldt = 0;  // key tile width rounded up to 32; head_dim and bq rounded up to 16
  // Within a worker's scratch: query and dout rows (dpad wide), packed K^T and V^T (ldkt wide), key
  // rows (dpad wide), logits / probabilities / ds (ldkt wide), P^T and ds^T (ldt wide),
  // accumulators (dpad wide), ones, the softmax kernel's row state, Shaw's per-row sums.
  index_t qt = 0, gt = 0, kt = 0, vt = 0, kr = 0, s = 0, pr = 0, ds = 0, pt = 0, dst = 0, acc_a = 0, acc_b = 0,
          ones = 0, rm = 0, rl = 0, ra = 0, w = 0, u = 0;
  index_t partial = 0;  // doubles of parameter-gradient sums per (query head, query tile)
  std::size_t partial_offset = 0, bytes = 0;
};

/// Doubles of parameter gradient each (query head, query tile) item sums.
template <class E>
index_t partial_values(const E& enc, bool wanted, index_t d) {
  if (!wanted) return 0;
  if constexpr (is_t5<E>::value) {
    return enc.params().num_buckets;
  } else if constexpr (is_alibi<E>::value) {
    return 1;
  } else if constexpr (relative_key_value<E>) {
    return 2 * enc.num_relative() * d;
  } else {
    (void)enc, (void)d;
    return 0;
  }
}

/// `attention_params::bf16_qk` is forward only: the backward's logits are float products.
inline void refuse_bf16_qk(const attention_params& p, std::string_view call) {
  if (p.bf16_qk)
    throw std::invalid_argument("posenc: attention_params::bf16_qk = true: " + std::string(call) +
                                " computes float logits (bf16_qk is for the forward only)");
}

template <class C, class E>
backward_plan plan_backward(const attention_shape& sh, const attention_params& p, const E& enc, bool params_wanted) {
  backward_plan b;
  b.sh = sh;
  const workers_of w(p.executor, p.threads);
  b.ex = w.ex;
  const index_t d = sh.head_dim;
  b.bq = std::max<index_t>(1, std::min(p.q_tile > 0 ? p.q_tile : backward_default_tile, sh.n_q));
  b.bk = std::max<index_t>(1, std::min(p.k_tile > 0 ? p.k_tile : backward_default_tile, sh.n_kv));
  b.q_tiles = (sh.n_q + b.bq - 1) / b.bq;
  b.k_tiles = (sh.n_kv + b.bk - 1) / b.bk;
  b.r = relative_columns(enc);
  checked_index c;
  b.items_kv = c.mul(sh.kv_heads, b.k_tiles);
  b.items_q = c.mul(sh.heads, b.q_tiles);
  // One pass when every worker gets a kv head (Shaw's per-row sums need the second pass).
  b.single = !relative_key_value<E> && sh.kv_heads >= w.count;
  b.workers = static_cast<int>(
      std::clamp<index_t>(b.single ? sh.kv_heads : std::max(b.items_kv, b.items_q), 1, w.count));
  constexpr bool rotation = E::family == encoding_family::rotation;
  auto buf = [&](index_t& at, index_t& o, index_t n) {
    at = o;
    o = c.add(o, c.round_up(n, 16));
  };
  index_t o = 0;
  buf(b.dsum, o, c.mul(sh.n_q, sh.heads));
  buf(b.qrot, o, rotation ? c.mul(sh.n_q, c.mul(sh.heads, d)) : 0);
  buf(b.krot, o, rotation ? c.mul(sh.n_kv, c.mul(sh.kv_heads, d)) : 0);
  buf(b.gterms, o, c.mul(c.mul(sh.heads, sh.n_q), b.r));
  buf(b.hterms, o, c.mul(c.mul(sh.heads, sh.n_q), b.r));
  b.scratch = o;
  b.ldkt = c.round_up(b.bk, 32);
  b.dpad = c.round_up(d, 16);
  b.ldt = c.round_up(b.bq, 16);
  const index_t most = std::max(b.bq, b.bk);
  index_t t = 0;
  buf(b.qt, t, c.mul(b.bq, b.dpad));
  buf(b.gt, t, c.mul(b.bq, b.dpad));
  buf(b.kt, t, c.mul(d, b.ldkt));
  buf(b.vt, t, c.mul(d, b.ldkt));
  buf(b.kr, t, c.mul(b.bk, b.dpad));
  buf(b.s, t, c.mul(b.bq, b.ldkt));
  buf(b.pr, t, c.mul(b.bq, b.ldkt));
  buf(b.ds, t, c.mul(b.bq, b.ldkt));
  buf(b.pt, t, c.mul(b.bk, b.ldt));
  buf(b.dst, t, c.mul(b.bk, b.ldt));
  buf(b.acc_a, t, c.mul(most, b.dpad));
  buf(b.acc_b, t, c.mul(b.bk, b.dpad));
  buf(b.ones, t, most);
  buf(b.rm, t, b.bq);
  buf(b.rl, t, b.bq);
  buf(b.ra, t, b.bq);
  if (b.single) buf(b.dq_acc, t, c.mul(c.mul(sh.group, c.mul(b.q_tiles, b.bq)), b.dpad));
  buf(b.w, t, c.mul(b.bq, b.r));
  buf(b.u, t, c.mul(b.bq, b.r));
  b.per_worker = t;
  o = c.add(o, c.mul(t, b.workers));
  b.partial = partial_values(enc, params_wanted, d);
  const index_t value_bytes = c.round_up(c.mul(o, static_cast<index_t>(sizeof(C))), 64);
  const index_t total = c.add(value_bytes, c.mul(c.mul(b.partial, b.items_q), static_cast<index_t>(sizeof(double))));
  if (c.overflow || total > std::numeric_limits<index_t>::max() / 2)
    invalid("attention_backward n_q", sh.n_q, "the workspace of this call overflows the address space");
  b.partial_offset = static_cast<std::size_t>(value_bytes);
  b.bytes = static_cast<std::size_t>(total);
  return b;
}

}  // namespace detail

/// Bytes of workspace `attention_backward` reserves for a call with these knobs, sizes, storage
/// `S` and encoder: O(n_q * heads) for the row sums, plus rotated copies of q and k with a
/// rotation encoder, plus `[n_q, heads, 2K+1]` query and output terms with Shaw's, plus per-worker
/// tiles. `params_wanted`: the call asks for the encoder's parameter gradients. Throws
/// `std::invalid_argument` for invalid knobs or sizes.
template <storage_scalar S, positional_encoding E>
std::size_t attention_backward_workspace_bytes(const attention_params& p, index_t n_q, index_t n_kv, index_t head_dim,
                                               const E& enc, bool params_wanted = false) {
  const index_t kvh = detail::check_params(p);
  detail::refuse_bf16_qk(p, "attention_backward_workspace_bytes");
  detail::require(n_q >= 0, "attention_backward_workspace_bytes n_q", n_q, "must be >= 0");
  detail::require(n_kv >= 0, "attention_backward_workspace_bytes n_kv", n_kv, "must be >= 0");
  detail::require(head_dim > 0, "attention_backward_workspace_bytes head_dim", head_dim, "must be > 0");
  const detail::attention_shape sh{n_q, n_kv, p.heads, kvh, head_dim, p.heads / kvh, 1.0, detail::mask_rule_of(p)};
  if (n_q == 0) return 0;
  return detail::plan_backward<compute_t<S>>(sh, p, enc, params_wanted).bytes;
}

namespace detail {

/// The backward of one sequence on checked operands (see `attention_backward`): every operand is
/// read and written through its head accessor, so matrices `[tokens, heads * d]` and
/// `heads_view`s with any strides take the same path.
template <class S, class LS, class E>
void backward_run(head_rows<const S> qv, head_rows<const S> kv, head_rows<const S> vv, head_rows<const S> ov,
                  head_rows<const LS> lv, head_rows<const S> gv, head_rows<S> dqv, head_rows<S> dkv, head_rows<S> dvv,
                  const attention_shape& sh, positions qpos, positions kpos, const E& enc, const attention_params& p,
                  const parameter_gradients<E>& grads, attention_workspace* ws, bool params_wanted) {
  using C = S;
  constexpr bool rotation = E::family == encoding_family::rotation;
  constexpr bool shaw = relative_key_value<E>;
  const index_t d = sh.head_dim, group = sh.group;
  auto zero_rows = [&](head_rows<S> m, index_t rows, index_t heads) {
    for (index_t i = 0; i < rows; ++i)
      for (index_t h = 0; h < heads; ++h) std::fill(m.at(i, h), m.at(i, h) + d, S(0));
  };
  if (sh.n_q == 0 || sh.n_kv == 0) {
    // No pair of query and key: every gradient is zero (a row without keys has zero output).
    zero_rows(dqv, sh.n_q, sh.heads), zero_rows(dkv, sh.n_kv, sh.kv_heads), zero_rows(dvv, sh.n_kv, sh.kv_heads);
    return;
  }

  const detail::backward_plan pl = detail::plan_backward<C>(sh, p, enc, params_wanted);
  attention_workspace local;
  attention_workspace& wsr = ws ? *ws : local;
  std::byte* const memory = wsr.reserve(pl.bytes);
  C* const base = reinterpret_cast<C*>(memory);
  double* const partials = reinterpret_cast<double*>(memory + pl.partial_offset);
  const C scale = static_cast<C>(sh.scale);
  const C softcap = static_cast<C>(p.softcap);
  constexpr C neg_inf = -std::numeric_limits<C>::infinity();

  // Rotated copies of q and k (the forward rotates them the same way), read by both passes.
  head_rows<const C> qs = qv, ks = kv;
  if constexpr (rotation) {
    const strided_view<C> qr(base + pl.qrot, sh.n_q, sh.heads * d), kr(base + pl.krot, sh.n_kv, sh.kv_heads * d);
    for (index_t i = 0; i < sh.n_q; ++i)
      for (index_t h = 0; h < sh.heads; ++h) std::copy(qv.at(i, h), qv.at(i, h) + d, qr.row(i) + h * d);
    for (index_t j = 0; j < sh.n_kv; ++j)
      for (index_t h = 0; h < sh.kv_heads; ++h) std::copy(kv.at(j, h), kv.at(j, h) + d, kr.row(j) + h * d);
    enc.rotate(qr, qpos, p.executor, p.threads);
    enc.rotate(kr, kpos, p.executor, p.threads);
    qs = head_rows_of(strided_view<const C>(qr), d), ks = head_rows_of(strided_view<const C>(kr), d);
  }
  const head_rows<const C> vs = vv, os = ov, gs = gv;
  C* const dsum = base + pl.dsum;  // [n_q, heads]
  const index_t nrel = pl.r;
  C* const gterms = base + pl.gterms;  // [heads][n_q][2K+1]: q~_i . aK[r]
  C* const hterms = base + pl.hterms;  // [heads][n_q][2K+1]: dout_i . aV[r]

  // Pass 0: per row and head, D = dout . out (and Shaw's terms), blocks of rows on the workers.
  {
    const index_t rows_per = 64;
    const index_t blocks = (sh.n_q + rows_per - 1) / rows_per;
    auto body = [&](index_t blk, int) {
      const index_t i0 = blk * rows_per, i1 = std::min(sh.n_q, i0 + rows_per);
      for (index_t i = i0; i < i1; ++i)
        for (index_t h = 0; h < sh.heads; ++h) {
          const C* a = gs.at(i, h);
          const C* b = os.at(i, h);
          C sum = 0;
          for (index_t c = 0; c < d; ++c) sum += a[c] * b[c];
          dsum[i * sh.heads + h] = sum;
        }
      if constexpr (shaw) {
        const auto ak = enc.key_table(), av = enc.value_table();
        for (index_t h = 0; h < sh.heads; ++h) {
          const strided_view<C> gt(gterms + (h * sh.n_q + i0) * nrel, i1 - i0, nrel, nrel);
          const strided_view<C> ht(hterms + (h * sh.n_q + i0) * nrel, i1 - i0, nrel, nrel);
          for (index_t i = i0; i < i1; ++i)
            for (index_t r = 0; r < nrel; ++r) {
              C x = 0, y = 0;
              const C* qi = qs.at(i, h);
              const C* gi = gs.at(i, h);
              for (index_t c = 0; c < d; ++c) x += qi[c] * ak(r, c), y += gi[c] * av(r, c);
              gt(i - i0, r) = x;
              ht(i - i0, r) = y;
            }
        }
      }
    };
    pl.ex->parallel_for(blocks, static_cast<int>(std::min<index_t>(blocks, pl.workers)), body);
  }

  // The tile products run on the forward's tile kernels (detail/attention_kernels.hpp: AVX-512,
  // AVX2 or portable, chosen once per process): `qk` against a packed transposed tile for the
  // logits and dP, `pv` (with a rescale of 1) for every accumulation, on transposed P and ds where
  // the sum runs over the query rows.
  const auto& kern = detail::kernels_for<C>();
  const index_t ldkt = pl.ldkt, dpad = pl.dpad, ldt = pl.ldt;
  // Rows [row, row + n) of head column block `col` of `src` into a dense buffer `dpad` wide, the
  // padding zero (the kernels read up to dpad columns).
  auto load = [&](head_rows<const C> src, index_t row, index_t n, index_t head, C* dst) {
    for (index_t i = 0; i < n; ++i) {
      const C* from = src.at(row + i, head);
      std::copy(from, from + d, dst + i * dpad);
      std::fill(dst + i * dpad + d, dst + (i + 1) * dpad, C(0));
    }
  };
  // The same rows where the kernels find them: in place when a row is a whole number of vectors
  // (d == dpad), else loaded into `buf`.
  struct rows_at {
    const C* p;
    index_t ld;
  };
  auto rows = [&](head_rows<const C> src, index_t row, index_t n, index_t head, C* buf) {
    if (d == dpad) return rows_at{src.at(row, head), n <= 1 ? d : src.stride};
    load(src, row, n, head, buf);
    return rows_at{buf, dpad};
  };
  // `dst[j][i] = src[i][j]` for i < nq, j < nk.
  auto transpose = [&](const C* src, index_t nq, index_t nk, C* dst) {
    for (index_t i = 0; i < nq; ++i)
      for (index_t j = 0; j < nk; ++j) dst[j * ldt + i] = src[i * ldkt + j];
  };

  // One tile pair of query head h, its query and dout rows loaded in `qt`, `gt` and its packed
  // K^T and V^T in `kt`, `vt`: logits (soft-capped, unmasked) in `t`, probabilities in `pm`, logit
  // gradients ds in `dsb`, all `[nq, nk]` with row stride ldkt.
  auto tile = [&](index_t h, index_t i0, index_t nq, positions qp, index_t nk, positions kp, bool full, rows_at qt,
                  rows_at gt, const C* kt, const C* vt, C* t, C* pm, C* dsb, C* rm, C* rl, C* ra) {
    const strided_view<C> tv(t, nq, nk, ldkt), dsv(dsb, nq, nk, ldkt);
    kern.qk(qt.p, qt.ld, nq, d, kt, ldkt, ldkt, t);
    if constexpr (shaw) {
      enc.add_bias_tile(tv, strided_view<const C>(gterms + (h * sh.n_q + i0) * nrel, nq, nrel, nrel), qp, kp);
    }
    for (index_t i = 0; i < nq; ++i)
      for (index_t j = 0; j < nk; ++j) tv(i, j) *= scale;
    if constexpr (position_bias<E>) enc.add_bias_tile(tv, h, qp, kp);
    if (softcap > C(0)) {
      const C inv = C(1) / softcap;
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < nk; ++j) tv(i, j) = softcap * std::tanh(tv(i, j) * inv);
    }
    // P = exp(t - lse) by the forward's softmax kernel (its vectorised exp): started from the
    // running max lse, which bounds every logit of the row, it rescales nothing and writes
    // exp(t - lse) (0 for masked keys). A row that saw no key in the forward (lse = -inf) is
    // masked whole, so its probabilities are 0.
    for (index_t i = 0; i < nq; ++i) {
      const C l = static_cast<C>(*lv.at(i0 + i, h));
      C* prow = pm + i * ldkt;
      rm[i] = l;
      rl[i] = 0;
      if (l == neg_inf) {
        std::fill(prow, prow + nk, neg_inf);
        continue;
      }
      std::copy(tv.row(i), tv.row(i) + nk, prow);
      if (!full) sh.mask.mask_row(qp[i], kp, prow);
    }
    kern.softmax(pm, ldkt, nq, nk, rm, rl, ra);
    kern.qk(gt.p, gt.ld, nq, d, vt, ldkt, ldkt, dsb);
    if constexpr (shaw) {
      enc.add_bias_tile(dsv, strided_view<const C>(hterms + (h * sh.n_q + i0) * nrel, nq, nrel, nrel), qp, kp);
    }
    for (index_t i = 0; i < nq; ++i) {
      const C di = dsum[(i0 + i) * sh.heads + h];
      C* drow = dsv.row(i);
      const C* prow = pm + i * ldkt;
      for (index_t j = 0; j < nk; ++j) drow[j] = prow[j] * (drow[j] - di);
      if (softcap > C(0)) {
        const C inv = C(1) / softcap;
        const C* trow = tv.row(i);
        for (index_t j = 0; j < nk; ++j) {
          const C th = trow[j] * inv;
          drow[j] *= C(1) - th * th;
        }
      }
    }
  };

  auto q_tile_of = [&](index_t it, index_t& i0, index_t& nq) {
    i0 = it * pl.bq;
    nq = std::min(pl.bq, sh.n_q - i0);
  };
  auto k_tile_of = [&](index_t jt, index_t& j0, index_t& nk) {
    j0 = jt * pl.bk;
    nk = std::min(pl.bk, sh.n_kv - j0);
  };

  // A tile's ds added to the bias parameters' sums of its (query head, query tile) item.
  auto bias_sums = [&](strided_view<const C> dsv, positions qp, positions kp, double* part) {
    if (pl.partial == 0) return;
    const index_t nq = dsv.rows, nk = dsv.cols;
    if constexpr (detail::is_t5<E>::value) {
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < nk; ++j)
          if (dsv(i, j) != C(0)) part[enc.bucket(detail::saturating_difference(kp[j], qp[i]))] += dsv(i, j);
    } else if constexpr (detail::is_alibi<E>::value) {
      // b = -slope * dist, so db/dslope = -dist.
      const bool symmetric = enc.params().form == alibi_form::symmetric;
      double sum = 0;
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < nk; ++j) {
          if (dsv(i, j) == C(0)) continue;
          const double dist = detail::position_difference(qp[i], kp[j]);
          sum -= static_cast<double>(dsv(i, j)) * (symmetric ? std::abs(dist) : dist);
        }
      part[0] += sum;
    } else {
      (void)dsv, (void)qp, (void)kp, (void)part;
    }
  };

  // Pass 1: dk and dv of (kv head g, key tile), over the group's heads and every query tile.
  auto pass_kv = [&](index_t item, int worker) {
    C* const scr = base + pl.scratch + static_cast<std::ptrdiff_t>(worker) * pl.per_worker;
    const index_t g = item / pl.k_tiles;
    index_t j0, nk;
    k_tile_of(item % pl.k_tiles, j0, nk);
    const positions kp = kpos.subset(j0, nk);
    const detail::position_span kbnd = detail::bounds_of(kp);
    C* const dka = scr + pl.acc_a;
    C* const dva = scr + pl.acc_b;
    C* const ones = scr + pl.ones;
    std::fill(dka, dka + nk * dpad, C(0));
    std::fill(dva, dva + nk * dpad, C(0));
    std::fill(ones, ones + std::max(pl.bq, pl.bk), C(1));
    kern.pack_kt(ks.at(j0, g), ks.stride, nk, d, scr + pl.kt, ldkt);
    kern.pack_kt(vs.at(j0, g), vs.stride, nk, d, scr + pl.vt, ldkt);
    for (index_t hh = 0; hh < group; ++hh) {
      const index_t h = g * group + hh;
      for (index_t it = 0; it < pl.q_tiles; ++it) {
        index_t i0, nq;
        q_tile_of(it, i0, nq);
        const positions qp = qpos.subset(i0, nq);
        const detail::position_span qbnd = detail::bounds_of(qp);
        if (!sh.mask.any_visible(qbnd, kbnd)) continue;
        const rows_at qt = rows(qs, i0, nq, h, scr + pl.qt), gt = rows(gs, i0, nq, h, scr + pl.gt);
        tile(h, i0, nq, qp, nk, kp, sh.mask.all_visible(qbnd, kbnd), qt, gt, scr + pl.kt,
             scr + pl.vt, scr + pl.s, scr + pl.pr, scr + pl.ds, scr + pl.rm,
             scr + pl.rl, scr + pl.ra);
        transpose(scr + pl.pr, nq, nk, scr + pl.pt);
        transpose(scr + pl.ds, nq, nk, scr + pl.dst);
        kern.pv(scr + pl.pt, ldt, nk, nq, gt.p, gt.ld, d, ones, dva, dpad, nullptr, 0);
        kern.pv(scr + pl.dst, ldt, nk, nq, qt.p, qt.ld, d, ones, dka, dpad, nullptr, 0);
      }
    }
    for (index_t j = 0; j < nk; ++j) {
      S* krow = dkv.at(j0 + j, g);
      S* vrow = dvv.at(j0 + j, g);
      for (index_t c = 0; c < d; ++c) krow[c] = scale * dka[j * dpad + c], vrow[c] = dva[j * dpad + c];
    }
  };

  // Pass 2: dq of (query head h, query tile) over every key tile, and the item's parameter sums.
  auto pass_q = [&](index_t item, int worker) {
    C* const scr = base + pl.scratch + static_cast<std::ptrdiff_t>(worker) * pl.per_worker;
    const index_t h = item / pl.q_tiles;
    const index_t g = h / group;
    index_t i0, nq;
    q_tile_of(item % pl.q_tiles, i0, nq);
    const positions qp = qpos.subset(i0, nq);
    const detail::position_span qbnd = detail::bounds_of(qp);
    C* const dqa = scr + pl.acc_a;
    C* const ones = scr + pl.ones;
    std::fill(dqa, dqa + nq * dpad, C(0));
    std::fill(ones, ones + std::max(pl.bq, pl.bk), C(1));
    const rows_at qt = rows(qs, i0, nq, h, scr + pl.qt), gt = rows(gs, i0, nq, h, scr + pl.gt);
    double* const part = partials + item * pl.partial;
    std::fill(part, part + pl.partial, 0.0);
    [[maybe_unused]] const strided_view<C> wv(scr + pl.w, nq, nrel, nrel), uv(scr + pl.u, nq, nrel, nrel);
    if constexpr (shaw) {
      std::fill(scr + pl.w, scr + pl.w + nq * nrel, C(0));
      std::fill(scr + pl.u, scr + pl.u + nq * nrel, C(0));
    }
    for (index_t jt = 0; jt < pl.k_tiles; ++jt) {
      index_t j0, nk;
      k_tile_of(jt, j0, nk);
      const positions kp = kpos.subset(j0, nk);
      const detail::position_span kbnd = detail::bounds_of(kp);
      if (!sh.mask.any_visible(qbnd, kbnd)) continue;
      kern.pack_kt(ks.at(j0, g), ks.stride, nk, d, scr + pl.kt, ldkt);
      kern.pack_kt(vs.at(j0, g), vs.stride, nk, d, scr + pl.vt, ldkt);
      const rows_at kr = rows(ks, j0, nk, g, scr + pl.kr);
      tile(h, i0, nq, qp, nk, kp, sh.mask.all_visible(qbnd, kbnd), qt, gt, scr + pl.kt,
           scr + pl.vt, scr + pl.s, scr + pl.pr, scr + pl.ds, scr + pl.rm,
             scr + pl.rl, scr + pl.ra);
      kern.pv(scr + pl.ds, ldkt, nq, nk, kr.p, kr.ld, d, ones, dqa, dpad, nullptr, 0);
      const strided_view<const C> dsv(scr + pl.ds, nq, nk, ldkt);
      if constexpr (shaw) {
        enc.accumulate_value_weights(dsv, qp, kp, wv);
        enc.accumulate_value_weights(strided_view<const C>(scr + pl.pr, nq, nk, ldkt), qp, kp, uv);
      }
      bias_sums(dsv, qp, kp, part);
    }
    if constexpr (shaw) {
      // dq~ += W aK over the 2K+1 table rows; daK += scale W^T q~ and daV += U^T dout for this
      // item's rows.
      const auto ak = enc.key_table();
      for (index_t i = 0; i < nq; ++i)
        for (index_t r = 0; r < nrel; ++r) {
          const C wr = wv(i, r);
          if (wr == C(0)) continue;
          for (index_t c = 0; c < d; ++c) dqa[i * dpad + c] += wr * ak(r, c);
        }
      if (pl.partial > 0) {
        for (index_t r = 0; r < nrel; ++r)
          for (index_t c = 0; c < d; ++c) {
            double a = 0, b = 0;
            for (index_t i = 0; i < nq; ++i) {
              a += static_cast<double>(wv(i, r)) * static_cast<double>(qt.p[i * qt.ld + c]);
              b += static_cast<double>(uv(i, r)) * static_cast<double>(gt.p[i * gt.ld + c]);
            }
            part[r * d + c] = static_cast<double>(scale) * a;
            part[(nrel + r) * d + c] = b;
          }
      }
    }
    for (index_t i = 0; i < nq; ++i) {
      S* row = dqv.at(i0 + i, h);
      for (index_t c = 0; c < d; ++c) row[c] = scale * dqa[i * dpad + c];
    }
  };

  // One pass for kv head g: the operations of both passes above, on the same operands in the same
  // order per output row (dk and dv of a key tile over (head, query tile); dq of a query tile and
  // its parameter sums over the key tiles), so the same bits as the two passes, with the logits
  // computed once.
  auto pass_fused = [&](index_t g, int worker) {
    C* const scr = base + pl.scratch + static_cast<std::ptrdiff_t>(worker) * pl.per_worker;
    C* const dqacc = scr + pl.dq_acc;
    C* const dka = scr + pl.acc_a;
    C* const dva = scr + pl.acc_b;
    C* const ones = scr + pl.ones;
    std::fill(dqacc, dqacc + group * pl.q_tiles * pl.bq * dpad, C(0));
    std::fill(ones, ones + std::max(pl.bq, pl.bk), C(1));
    for (index_t hh = 0; hh < group; ++hh)
      for (index_t it = 0; it < pl.q_tiles; ++it) {
        double* const part = partials + ((g * group + hh) * pl.q_tiles + it) * pl.partial;
        std::fill(part, part + pl.partial, 0.0);
      }
    for (index_t jt = 0; jt < pl.k_tiles; ++jt) {
      index_t j0, nk;
      k_tile_of(jt, j0, nk);
      const positions kp = kpos.subset(j0, nk);
      const detail::position_span kbnd = detail::bounds_of(kp);
      std::fill(dka, dka + nk * dpad, C(0));
      std::fill(dva, dva + nk * dpad, C(0));
      kern.pack_kt(ks.at(j0, g), ks.stride, nk, d, scr + pl.kt, ldkt);
      kern.pack_kt(vs.at(j0, g), vs.stride, nk, d, scr + pl.vt, ldkt);
      const rows_at kr = rows(ks, j0, nk, g, scr + pl.kr);
      for (index_t hh = 0; hh < group; ++hh) {
        const index_t h = g * group + hh;
        for (index_t it = 0; it < pl.q_tiles; ++it) {
          index_t i0, nq;
          q_tile_of(it, i0, nq);
          const positions qp = qpos.subset(i0, nq);
          const detail::position_span qbnd = detail::bounds_of(qp);
          if (!sh.mask.any_visible(qbnd, kbnd)) continue;
          const rows_at qt = rows(qs, i0, nq, h, scr + pl.qt), gt = rows(gs, i0, nq, h, scr + pl.gt);
          tile(h, i0, nq, qp, nk, kp, sh.mask.all_visible(qbnd, kbnd), qt, gt, scr + pl.kt, scr + pl.vt, scr + pl.s,
               scr + pl.pr, scr + pl.ds, scr + pl.rm, scr + pl.rl, scr + pl.ra);
          transpose(scr + pl.pr, nq, nk, scr + pl.pt);
          transpose(scr + pl.ds, nq, nk, scr + pl.dst);
          kern.pv(scr + pl.pt, ldt, nk, nq, gt.p, gt.ld, d, ones, dva, dpad, nullptr, 0);
          kern.pv(scr + pl.dst, ldt, nk, nq, qt.p, qt.ld, d, ones, dka, dpad, nullptr, 0);
          kern.pv(scr + pl.ds, ldkt, nq, nk, kr.p, kr.ld, d, ones, dqacc + (hh * pl.q_tiles + it) * pl.bq * dpad,
                  dpad, nullptr, 0);
          bias_sums(strided_view<const C>(scr + pl.ds, nq, nk, ldkt), qp, kp,
                    partials + (h * pl.q_tiles + it) * pl.partial);
        }
      }
      for (index_t j = 0; j < nk; ++j) {
        S* krow = dkv.at(j0 + j, g);
        S* vrow = dvv.at(j0 + j, g);
        for (index_t c = 0; c < d; ++c) krow[c] = scale * dka[j * dpad + c], vrow[c] = dva[j * dpad + c];
      }
    }
    for (index_t hh = 0; hh < group; ++hh)
      for (index_t it = 0; it < pl.q_tiles; ++it) {
        index_t i0, nq;
        q_tile_of(it, i0, nq);
        const C* dqa = dqacc + (hh * pl.q_tiles + it) * pl.bq * dpad;
        for (index_t i = 0; i < nq; ++i) {
          S* row = dqv.at(i0 + i, g * group + hh);
          for (index_t c = 0; c < d; ++c) row[c] = scale * dqa[i * dpad + c];
        }
      }
  };

  if (pl.single) {
    pl.ex->parallel_for(sh.kv_heads, static_cast<int>(std::min<index_t>(sh.kv_heads, pl.workers)), pass_fused);
  } else {
    pl.ex->parallel_for(pl.items_kv, static_cast<int>(std::min<index_t>(pl.items_kv, pl.workers)), pass_kv);
    pl.ex->parallel_for(pl.items_q, static_cast<int>(std::min<index_t>(pl.items_q, pl.workers)), pass_q);
  }

  // The items' parameter sums, in item order.
  if (pl.partial > 0) {
    for (index_t item = 0; item < pl.items_q; ++item) {
      const double* part = partials + item * pl.partial;
      const index_t h = item / pl.q_tiles;
      if constexpr (detail::is_t5<E>::value) {
        const index_t col = enc.params().head_offset + h;
        for (index_t b = 0; b < pl.partial; ++b)
          grads.table(b, col) = static_cast<C>(static_cast<double>(grads.table(b, col)) + part[b]);
      } else if constexpr (detail::is_alibi<E>::value) {
        grads.slopes[static_cast<std::size_t>(enc.params().head_offset + h)] += part[0];
      } else if constexpr (shaw) {
        for (index_t r = 0; r < nrel; ++r)
          for (index_t c = 0; c < d; ++c) {
            if (grads.key_table.rows != 0)
              grads.key_table(r, c) = static_cast<C>(static_cast<double>(grads.key_table(r, c)) + part[r * d + c]);
            if (grads.value_table.rows != 0)
              grads.value_table(r, c) =
                  static_cast<C>(static_cast<double>(grads.value_table(r, c)) + part[(nrel + r) * d + c]);
          }
      }
    }
  }
  // Sinks: dz_h = -sum_i e^(z_h - lse_i) D_i, rows in order.
  if (!grads.sinks.empty() && !p.sinks.empty()) {
    for (index_t h = 0; h < sh.heads; ++h) {
      const double z = p.sinks[static_cast<std::size_t>(h)];
      if (z == -std::numeric_limits<double>::infinity()) continue;
      double sum = 0;
      for (index_t i = 0; i < sh.n_q; ++i) {
        const double l = static_cast<double>(*lv.at(i, h));
        if (l == -std::numeric_limits<double>::infinity()) continue;
        sum -= std::exp(z - l) * static_cast<double>(dsum[i * sh.heads + h]);
      }
      grads.sinks[static_cast<std::size_t>(h)] += static_cast<float>(sum);
    }
  }
  // Back from the rotated frame: the transposed rotation, with the forward's positions.
  if constexpr (rotation) {
    enc.rotate_backward(heads_view<S>(dqv.data, 1, sh.n_q, sh.heads, d, 0, dqv.stride, dqv.head_stride), qpos,
                        p.executor, p.threads);
    enc.rotate_backward(heads_view<S>(dkv.data, 1, sh.n_kv, sh.kv_heads, d, 0, dkv.stride, dkv.head_stride), kpos,
                        p.executor, p.threads);
  }
}

}  // namespace detail

/// Gradients of softmax attention (`posenc::attention`, same formula, knobs, masks, GQA and
/// encoders) with respect to q, k and v, and the learned parameters in `grads`, by the
/// FlashAttention-2 backward (see the file comment).
///
/// \param q, k, v  the forward's inputs, as given to it (not rotated: a rotation encoder rotates
///                 copies here, as the forward does). `[n_q, heads * d]`, `[n_kv, kv_heads * d]`.
/// \param out      the forward's output `[n_q, heads * d]`.
/// \param lse      the forward's log-sum-exp `[n_q, heads]`, float or double (`-inf`: the row saw
///                 no key).
/// \param dout     the gradient of the loss with respect to `out`, `[n_q, heads * d]`.
/// \param dq, dk, dv  written: the gradients, shaped like q, k and v (with GQA, dk and dv sum the
///                 group's query heads). They must not overlap the inputs.
/// \param grads    optional parameter gradients, added to (see `parameter_gradients`).
/// \param ws       optional workspace reused across calls (`attention_backward_workspace_bytes`);
///                 without it the call allocates once. Its size grows linearly with n_q (and with
///                 n_kv for a rotation encoder), never with n_q * n_kv.
/// q, k, v, out, dout, dq, dk and dv hold one storage type, float or double, any row stride.
/// Throws, before any work starts: `std::invalid_argument` for invalid knobs or an encoder that
/// does not fit, `precondition_error` naming the argument for shapes that do not fit together.
namespace detail {

/// The checks of `attention_backward` that do not depend on the operands' layout: the encoder
/// against the call, and the shapes of the wanted parameter gradients. Returns whether some
/// parameter gradient is wanted.
template <class E>
bool backward_param_checks(const E& enc, const parameter_gradients<E>& grads, const attention_shape& sh) {
  detail::check_encoder_fits(enc, sh);
  POSENC_ASSERT(grads.sinks.empty() || static_cast<index_t>(grads.sinks.size()) == sh.heads,
                "attention_backward: grads.sinks has ", grads.sinks.size(), " values but heads = ", sh.heads);
  constexpr bool shaw = relative_key_value<E>;
  bool params_wanted = false;
  if constexpr (detail::is_alibi<E>::value) {
    POSENC_ASSERT(grads.slopes.empty() || static_cast<index_t>(grads.slopes.size()) == enc.params().num_heads,
                  "attention_backward: grads.slopes has ", grads.slopes.size(), " values but the encoder's num_heads = ",
                  enc.params().num_heads);
    params_wanted = !grads.slopes.empty();
  } else if constexpr (detail::is_t5<E>::value) {
    POSENC_ASSERT(grads.table.rows == 0 || (grads.table.rows == enc.params().num_buckets &&
                                            grads.table.cols == enc.params().num_heads),
                  "attention_backward: grads.table is [", grads.table.rows, ", ", grads.table.cols,
                  "] but must be [num_buckets, num_heads] = [", enc.params().num_buckets, ", ",
                  enc.params().num_heads, "]");
    params_wanted = grads.table.rows != 0;
  } else if constexpr (shaw) {
    const index_t nr = enc.num_relative();
    POSENC_ASSERT(grads.key_table.rows == 0 || (grads.key_table.rows == nr && grads.key_table.cols == sh.head_dim),
                  "attention_backward: grads.key_table is [", grads.key_table.rows, ", ", grads.key_table.cols,
                  "] but must be [2K+1, head_dim] = [", nr, ", ", sh.head_dim, "]");
    POSENC_ASSERT(
        grads.value_table.rows == 0 || (grads.value_table.rows == nr && grads.value_table.cols == sh.head_dim),
        "attention_backward: grads.value_table is [", grads.value_table.rows, ", ", grads.value_table.cols,
        "] but must be [2K+1, head_dim] = [", nr, ", ", sh.head_dim, "]");
    params_wanted = grads.key_table.rows != 0 || grads.value_table.rows != 0;
  }

  return params_wanted;
}

}  // namespace detail

template <class Q, class K, class V, class O, class L, class DO, class DQ, class DK, class DV, positional_encoding E>
void attention_backward(Q&& q, K&& k, V&& v, O&& out, L&& lse, DO&& dout, DQ&& dq, DK&& dk, DV&& dv, positions qpos,
                        positions kpos, const E& enc, const attention_params& p,
                        const parameter_gradients<E>& grads = {}, attention_workspace* ws = nullptr) {
  static_assert(E::family != encoding_family::additive_input,
                "posenc::attention_backward: additive-input encoders (sinusoidal) act on token embeddings before "
                "the projections, whose gradient passes through them unchanged; pass posenc::no_position here");
  detail::refuse_bf16_qk(p, "attention_backward");
  constexpr bool views = detail::any_heads_view<Q, K, V, O, L, DO, DQ, DK, DV>;
  if constexpr (views) {
    // heads_views of any strides (matrices beside them are split into the knobs' heads): every
    // batch item is one sequence with the positions qpos and kpos.
    const index_t kvh = detail::check_params(p);
    const auto qh = detail::heads_of(std::forward<Q>(q), p.heads, "q");
    const auto kh = detail::heads_of(std::forward<K>(k), kvh, "k");
    const auto vh = detail::heads_of(std::forward<V>(v), kvh, "v");
    const auto oh = detail::heads_of(std::forward<O>(out), p.heads, "out");
    const auto gh = detail::heads_of(std::forward<DO>(dout), p.heads, "dout");
    const auto dqh = detail::heads_of(std::forward<DQ>(dq), p.heads, "dq");
    const auto dkh = detail::heads_of(std::forward<DK>(dk), kvh, "dk");
    const auto dvh = detail::heads_of(std::forward<DV>(dv), kvh, "dv");
    using S = std::remove_const_t<std::remove_pointer_t<decltype(qh.data)>>;
    static_assert(std::same_as<S, float> || std::same_as<S, double>,
                  "posenc::attention_backward: q, k, v, out and dout are float or double");
    static_assert(std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(kh.data)>>, S> &&
                      std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(vh.data)>>, S> &&
                      std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(oh.data)>>, S> &&
                      std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(gh.data)>>, S>,
                  "posenc::attention_backward: q, k, v, out and dout hold one storage type");
    static_assert(std::same_as<std::remove_pointer_t<decltype(dqh.data)>, S> &&
                      std::same_as<std::remove_pointer_t<decltype(dkh.data)>, S> &&
                      std::same_as<std::remove_pointer_t<decltype(dvh.data)>, S>,
                  "posenc::attention_backward: q and the gradients hold one storage type; dq, dk and dv must be writable");
    static_assert(std::same_as<typename E::scalar_type, S> || E::family == encoding_family::none,
                  "posenc::attention_backward: the encoder's scalar_type must be the storage type (float or double)");
    const auto sh = detail::check_heads_attention(p, kvh, qh, kh, vh, oh, qpos.size(), kpos.size());
    auto like = [](const auto& a, const auto& b, const char* name, const char* other) {
      POSENC_ASSERT(a.batch == b.batch && a.tokens == b.tokens && a.heads == b.heads && a.head_dim == b.head_dim,
                    "attention_backward: ", name, " is [batch, tokens, heads, head_dim] = [", a.batch, ", ", a.tokens,
                    ", ", a.heads, ", ", a.head_dim, "] but must be shaped like ", other, ", [", b.batch, ", ", b.tokens,
                    ", ", b.heads, ", ", b.head_dim, "]");
    };
    like(gh, qh, "dout", "q");
    like(dqh, qh, "dq", "q");
    like(dkh, kh, "dk", "k");
    like(dvh, kh, "dv", "k");
    POSENC_ASSERT(dqh.disjoint() && dkh.disjoint() && dvh.disjoint(),
                  "attention_backward: elements of dq, dk or dv overlap; every gradient element needs its own memory");
    // lse: a heads_view of head_dim 1, or a matrix [batch * n_q, heads] (the items' rows in turn).
    const auto lh = [&] {
      if constexpr (detail::heads_view_arg<L>) {
        return std::remove_cvref_t<L>(lse);
      } else {
        const auto lm = view_of(std::forward<L>(lse));
        POSENC_ASSERT(lm.rows == qh.batch * sh.n_q && lm.cols == sh.heads, "attention_backward: lse is [", lm.rows,
                      ", ", lm.cols, "] but must be [batch * n_q, heads] = [", qh.batch * sh.n_q, ", ", sh.heads, "]");
        using LT = std::remove_pointer_t<decltype(lm.data)>;
        return heads_view<LT>(lm.data, qh.batch, sh.n_q, sh.heads, 1, sh.n_q * lm.stride, lm.stride, 1);
      }
    }();
    using LS = std::remove_const_t<std::remove_pointer_t<decltype(lh.data)>>;
    static_assert(std::same_as<LS, float> || std::same_as<LS, double>,
                  "posenc::attention_backward: lse is float or double");
    POSENC_ASSERT(lh.batch == qh.batch && lh.tokens == sh.n_q && lh.heads == sh.heads && lh.head_dim == 1,
                  "attention_backward: lse is [batch, tokens, heads, head_dim] = [", lh.batch, ", ", lh.tokens, ", ",
                  lh.heads, ", ", lh.head_dim, "] but must be [", qh.batch, ", ", sh.n_q, ", ", sh.heads, ", 1]");
    const bool params_wanted = detail::backward_param_checks(enc, grads, sh);
    // Batch item b of a view, as the accessor of one sequence.
    auto item = [](const auto& h, index_t b) {
      return detail::head_rows<std::remove_pointer_t<decltype(h.data)>>{h.data + b * h.batch_stride, h.token_stride,
                                                                         h.head_stride};
    };
    auto in = [&](const auto& h, index_t b) {
      const auto r = item(h, b);
      return detail::head_rows<const std::remove_const_t<std::remove_pointer_t<decltype(h.data)>>>{r.data, r.stride,
                                                                                                   r.head_stride};
    };
    for (index_t b = 0; b < qh.batch; ++b)
      detail::backward_run<S, LS>(in(qh, b), in(kh, b), in(vh, b), in(oh, b), in(lh, b), in(gh, b), item(dqh, b),
                                  item(dkh, b), item(dvh, b), sh, qpos, kpos, enc, p, grads, ws, params_wanted);
  } else {
  const auto qv = view_of(std::forward<Q>(q));
  const auto kv = view_of(std::forward<K>(k));
  const auto vv = view_of(std::forward<V>(v));
  const auto ov = view_of(std::forward<O>(out));
  const auto lv = view_of(std::forward<L>(lse));
  const auto gv = view_of(std::forward<DO>(dout));
  const auto dqv = view_of(std::forward<DQ>(dq));
  const auto dkv = view_of(std::forward<DK>(dk));
  const auto dvv = view_of(std::forward<DV>(dv));
  using S = std::remove_const_t<std::remove_pointer_t<decltype(qv.data)>>;
  using C = S;
  using LS = std::remove_const_t<std::remove_pointer_t<decltype(lv.data)>>;
  static_assert(std::same_as<S, float> || std::same_as<S, double>,
                "posenc::attention_backward: q, k, v, out and dout are float or double");
  static_assert(std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(kv.data)>>, S> &&
                    std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(vv.data)>>, S> &&
                    std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(ov.data)>>, S> &&
                    std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(gv.data)>>, S> &&
                    std::same_as<std::remove_pointer_t<decltype(dqv.data)>, S> &&
                    std::same_as<std::remove_pointer_t<decltype(dkv.data)>, S> &&
                    std::same_as<std::remove_pointer_t<decltype(dvv.data)>, S>,
                "posenc::attention_backward: q, k, v, out, dout and the gradients hold one storage type; dq, dk and "
                "dv must be writable");
  static_assert(std::same_as<LS, float> || std::same_as<LS, double>,
                "posenc::attention_backward: lse is a float or double matrix");
  static_assert(std::same_as<typename E::scalar_type, C> || E::family == encoding_family::none,
                "posenc::attention_backward: the encoder's scalar_type must be the storage type (float or double)");

  const auto sh = detail::check_attention(p, qv.rows, qv.cols, kv.rows, kv.cols, vv.rows, vv.cols, ov.rows, ov.cols,
                                          qpos.size(), kpos.size());
  POSENC_ASSERT(lv.rows == sh.n_q && lv.cols == sh.heads, "attention_backward: lse is [", lv.rows, ", ", lv.cols,
                "] but must be [n_q, heads] = [", sh.n_q, ", ", sh.heads, "]");
  POSENC_ASSERT(gv.rows == qv.rows && gv.cols == qv.cols, "attention_backward: dout is [", gv.rows, ", ", gv.cols,
                "] but must be shaped like q, [", qv.rows, ", ", qv.cols, "]");
  POSENC_ASSERT(dqv.rows == qv.rows && dqv.cols == qv.cols, "attention_backward: dq is [", dqv.rows, ", ", dqv.cols,
                "] but must be shaped like q, [", qv.rows, ", ", qv.cols, "]");
  POSENC_ASSERT(dkv.rows == kv.rows && dkv.cols == kv.cols, "attention_backward: dk is [", dkv.rows, ", ", dkv.cols,
                "] but must be shaped like k, [", kv.rows, ", ", kv.cols, "]");
  POSENC_ASSERT(dvv.rows == vv.rows && dvv.cols == vv.cols, "attention_backward: dv is [", dvv.rows, ", ", dvv.cols,
                "] but must be shaped like v, [", vv.rows, ", ", vv.cols, "]");
  const bool params_wanted = detail::backward_param_checks(enc, grads, sh);

  const index_t d = sh.head_dim;
  const auto in = [d](strided_view<const S> m) { return detail::head_rows_of(m, d); };
  detail::backward_run<S, LS>(in(qv), in(kv), in(vv), in(ov), detail::head_rows_of(strided_view<const LS>(lv), 1), in(gv),
                              detail::head_rows_of(dqv, d), detail::head_rows_of(dkv, d), detail::head_rows_of(dvv, d),
                              sh, qpos, kpos, enc, p, grads, ws, params_wanted);
  }
}

}  // namespace posenc
