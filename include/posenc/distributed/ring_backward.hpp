// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file distributed/ring_backward.hpp
/// The backward of ring attention (docs/ring_attention.md#training), simulated in one process:
/// the gradients of a sequence sharded over P devices, so that the context a model is trained on
/// grows with the number of devices like the forward's.
///
/// Each device keeps its query shard with the forward's output, log-sum-exp and the gradient of
/// the output; the keys and values travel the ring as in the forward, and with them their
/// gradients dK and dV. At step `s` device `r` holds the keys, values, dK and dV of device
/// `(r - s) mod P` and adds its queries' contributions to dK and dV and to its own dQ with
/// `attention_backward`: with the forward's global log-sum-exp, the probabilities of a key shard
/// are those of the whole softmax, so the gradients split over key shards exactly (the
/// FlashAttention-2 backward of a tile needs nothing else). After P steps every dK and dV has met
/// every query; one more hop brings them home. The sum over the shards reassociates the
/// single-device sums, so the gradients equal `attention_backward` over the whole sequence within
/// float rounding.
///
/// The per-step work (`detail::ring_backward_worker::step`) is a function of the device's own
/// shards and the visiting message alone, in a fixed order, so a distributed driver that runs it
/// on the same values gives the same bits.

#include <algorithm>
#include <cstddef>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/attention/backward.hpp"
#include "posenc/attention/params.hpp"
#include "posenc/attention/workspace.hpp"
#include "posenc/concepts.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/distributed/ring.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// One virtual device of the ring backward: the forward's inputs and results for its shard, the
/// gradient of its output, and where its gradients go. Storage float or double.
///
/// `q`, `out`, `dout`, `dq`: `[n_q, heads * d]`; `k`, `v`, `dk`, `dv`: `[n_kv, kv_heads * d]`;
/// `lse`: `[n_q, heads]` (the forward's, over all keys: `ring_attention_simulate` writes it into
/// `ring_device::lse`); one global position per row. Any row strides; shards may be empty.
template <storage_scalar S>
struct ring_backward_device {
  strided_view<const S> q, k, v, out, lse, dout;
  positions qpos, kpos;
  strided_view<S> dq, dk, dv;
};

namespace detail {

/// A device's side of the backward schedule: its query shard, the forward's output and
/// log-sum-exp for it, the gradient of the output, and the dQ accumulator. `step` is the
/// per-step function.
template <storage_scalar S, positional_encoding E>
class ring_backward_worker {
 public:
  ring_backward_worker(const ring_backward_device<S>& dev, const E& enc, const attention_params& p)
      : dev_(dev), enc_(enc), p_(p), dq_(row_matrix<S>::Zero(dev.q.rows, dev.q.cols)),
        dq_part_(dev.q.rows, dev.q.cols) {}

  /// Adds the contributions of this device's queries to `dk` and `dv` (the visiting shard's
  /// accumulators, `[n_kv, kv_heads * d]`) and to its own dQ, for the visiting keys `k`, values `v`
  /// at `kpos`; the parameter gradients are added to `grads` (the sinks' only once: they depend
  /// on the queries alone).
  void step(strided_view<const S> k, strided_view<const S> v, positions kpos, strided_view<S> dk, strided_view<S> dv,
            parameter_gradients<E> grads) {
    if (dev_.q.rows == 0 || k.rows == 0) return;
    if (sinks_added_) grads.sinks = {};
    sinks_added_ = true;
    dk_part_.resize(k.rows, k.cols);
    dv_part_.resize(v.rows, v.cols);
    attention_backward(dev_.q, k, v, dev_.out, dev_.lse, dev_.dout, dq_part_, dk_part_, dv_part_, dev_.qpos, kpos,
                       enc_, p_, grads, &ws_);
    dq_ += dq_part_;
    for (index_t j = 0; j < k.rows; ++j)
      for (index_t c = 0; c < k.cols; ++c) {
        dk(j, c) += dk_part_(j, c);
        dv(j, c) += dv_part_(j, c);
      }
  }

  /// Writes the accumulated dQ.
  void finish() const {
    for (index_t i = 0; i < dev_.dq.rows; ++i)
      for (index_t c = 0; c < dev_.dq.cols; ++c) dev_.dq(i, c) = dq_(i, c);
  }

 private:
  ring_backward_device<S> dev_;
  const E& enc_;
  attention_params p_;
  row_matrix<S> dq_, dq_part_, dk_part_, dv_part_;
  attention_workspace ws_;
  bool sinks_added_ = false;
};

/// Checks one device of the backward before any work (`precondition_error` naming the argument).
template <class S>
void ring_check_backward_device(const ring_backward_device<S>& d, index_t heads, index_t rank) {
  auto same = [&](strided_view<const S> a, const char* name, index_t rows, index_t cols, const char* like) {
    POSENC_ASSERT(a.rows == rows && a.cols == cols, "ring attention backward: device ", rank, "'s ", name, " is [",
                  a.rows, ", ", a.cols, "] but must be shaped like ", like, ", [", rows, ", ", cols, "]");
  };
  same(d.out, "out", d.q.rows, d.q.cols, "q");
  same(d.dout, "dout", d.q.rows, d.q.cols, "q");
  same(d.dq, "dq", d.q.rows, d.q.cols, "q");
  same(d.dk, "dk", d.k.rows, d.k.cols, "k");
  same(d.dv, "dv", d.v.rows, d.v.cols, "v");
  same(d.lse, "lse", d.q.rows, heads, "[n_q, heads]");
}

}  // namespace detail

/// The gradients of ring attention over P devices simulated in one process (see the file
/// comment): each device's dq, dk and dv (overwritten) and the parameter gradients in `grads`
/// (added to, summed over every device), for the same encoder and knobs as the forward. Every
/// device's shapes, the knobs and the encoder are checked before any work (`std::invalid_argument`,
/// `precondition_error`). Allocates, per device, dQ and dK/dV accumulators and the backward's
/// workspace: about the shards' size again.
template <storage_scalar S, positional_encoding E>
void ring_attention_backward_simulate(std::span<const ring_backward_device<S>> devices, const E& enc,
                                      const attention_params& p, const parameter_gradients<E>& grads = {}) {
  static_assert(std::same_as<S, float> || std::same_as<S, double>,
                "posenc::ring_attention_backward_simulate: the backward computes in float or double");
  static_assert(E::family != encoding_family::additive_input,
                "posenc::ring_attention_backward_simulate: additive-input encoders (sinusoidal) act on token "
                "embeddings before the projections; pass posenc::no_position here");
  detail::check_params(p);
  detail::refuse_bf16_qk(p, "ring_attention_backward_simulate");
  index_t head_dim = 0;
  const auto P = static_cast<index_t>(devices.size());
  for (index_t r = 0; r < P; ++r) {
    const auto& d = devices[static_cast<std::size_t>(r)];
    detail::ring_check_device(enc, p, d.q.rows, d.q.cols, d.qpos.size(), d.out.rows, d.out.cols, d.k.rows, d.k.cols,
                              d.v.rows, d.v.cols, d.kpos.size(), head_dim);
    detail::ring_check_backward_device(d, p.heads, r);
  }
  // The travelling accumulators, one per key shard, and the workers.
  std::vector<row_matrix<S>> dk, dv;
  std::vector<detail::ring_backward_worker<S, E>> workers;
  workers.reserve(static_cast<std::size_t>(P));
  for (const auto& d : devices) {
    dk.push_back(row_matrix<S>::Zero(d.k.rows, d.k.cols));
    dv.push_back(row_matrix<S>::Zero(d.v.rows, d.v.cols));
    workers.emplace_back(d, enc, p);
  }
  for (index_t s = 0; s < P; ++s)
    for (index_t r = 0; r < P; ++r) {
      const auto src = static_cast<std::size_t>((r - s + P) % P);
      const auto& from = devices[src];
      workers[static_cast<std::size_t>(r)].step(from.k, from.v, from.kpos, view_of(dk[src]), view_of(dv[src]), grads);
    }
  for (index_t r = 0; r < P; ++r) {
    const auto i = static_cast<std::size_t>(r);
    workers[i].finish();
    const auto& d = devices[i];
    for (index_t j = 0; j < d.k.rows; ++j)
      for (index_t c = 0; c < d.k.cols; ++c) {
        d.dk(j, c) = dk[i](j, c);
        d.dv(j, c) = dv[i](j, c);
      }
  }
}

/// The gradients of ring attention over a whole sequence (positions `0 .. n-1`) simulated with
/// `ranks` devices in `layout`: shards q, k, v, out, lse and dout, runs
/// `ring_attention_backward_simulate` and gathers dq, dk and dv. Shapes as for
/// `attention_backward` with `n_q == n_kv == n`. Throws `std::invalid_argument` for `ranks < 1`.
template <matrix_argument Q, matrix_argument K, matrix_argument V, matrix_argument O, matrix_argument L,
          matrix_argument DO, matrix_argument DQ, matrix_argument DK, matrix_argument DV, positional_encoding E>
void ring_attention_backward_simulate(Q&& q, K&& k, V&& v, O&& out, L&& lse, DO&& dout, DQ&& dq, DK&& dk, DV&& dv,
                                      int ranks, ring_layout layout, const E& enc, const attention_params& p,
                                      const parameter_gradients<E>& grads = {}) {
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
  static_assert(std::same_as<std::remove_const_t<std::remove_pointer_t<decltype(lv.data)>>, S>,
                "posenc::ring_attention_backward_simulate: lse has the storage type of q (float or double)");
  const index_t n = qv.rows;
  POSENC_ASSERT(kv.rows == n && vv.rows == n && ov.rows == n && gv.rows == n && lv.rows == n && dqv.rows == n &&
                    dkv.rows == n && dvv.rows == n,
                "ring_attention_backward_simulate: q, k, v, out, lse, dout, dq, dk and dv must have one row per "
                "token (",
                n, " rows of q)");
  detail::require(ranks >= 1, "ring ranks", ranks, "must be positive");
  std::vector<std::vector<position>> pos;
  std::vector<row_matrix<S>> qs, ks, vs, os, ls, gs, dqs, dks, dvs;
  for (int r = 0; r < ranks; ++r) {
    pos.push_back(ring_shard_positions(n, ranks, r, layout));
    const positions pr(pos.back());
    qs.push_back(ring_take_rows(qv, pr));
    ks.push_back(ring_take_rows(kv, pr));
    vs.push_back(ring_take_rows(vv, pr));
    os.push_back(ring_take_rows(ov, pr));
    ls.push_back(ring_take_rows(lv, pr));
    gs.push_back(ring_take_rows(gv, pr));
    dqs.emplace_back(pr.size(), dqv.cols);
    dks.emplace_back(pr.size(), dkv.cols);
    dvs.emplace_back(pr.size(), dvv.cols);
  }
  std::vector<ring_backward_device<S>> devices;
  for (int r = 0; r < ranks; ++r) {
    const auto i = static_cast<std::size_t>(r);
    const positions pr(pos[i]);
    devices.push_back({view_of(std::as_const(qs[i])), view_of(std::as_const(ks[i])), view_of(std::as_const(vs[i])),
                       view_of(std::as_const(os[i])), view_of(std::as_const(ls[i])), view_of(std::as_const(gs[i])), pr,
                       pr, view_of(dqs[i]), view_of(dks[i]), view_of(dvs[i])});
  }
  ring_attention_backward_simulate(std::span<const ring_backward_device<S>>(devices), enc, p, grads);
  for (int r = 0; r < ranks; ++r) {
    const auto i = static_cast<std::size_t>(r);
    const positions pr(pos[i]);
    ring_put_rows(dqs[i], pr, dqv);
    ring_put_rows(dks[i], pr, dkv);
    ring_put_rows(dvs[i], pr, dvv);
  }
}

}  // namespace posenc
