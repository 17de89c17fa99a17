// The backward of ring attention simulated in one process (distributed/ring_backward.hpp): dq,
// dk, dv and the parameter gradients of P = 1..4 devices, both layouts, full, causal and window
// masks, every encoder family with its learned parameters, sinks, GQA, against the single-process
// attention_backward over the whole sequence (itself checked against an independent double
// reference and finite differences in test_backward.cpp); the ring's forward log-sum-exp feeding
// its backward; errors before any work.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "posenc/attention/backward.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/distributed/ring.hpp"
#include "posenc/distributed/ring_backward.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::ring_layout;
template <class T>
using mat = posenc::row_matrix<T>;

namespace {

constexpr index_t H = 4, HK = 2, D = 16;

// Relative to the largest gradient: the ring adds P partial sums per gradient where the single
// call sums tile by tile, a reassociation of a few dozen terms.
template <class T>
constexpr double tolerance = std::same_as<T, float> ? 3e-5 : 1e-12;

template <class T>
double rel_err(const mat<T>& got, const mat<T>& want) {
  const double scale = std::max(1.0, static_cast<double>(want.cwiseAbs().maxCoeff()));
  double worst = 0;
  for (index_t i = 0; i < got.size(); ++i) {
    const double e = std::abs(static_cast<double>(got.data()[i]) - static_cast<double>(want.data()[i]));
    if (!(e <= worst)) worst = e;  // NaN counts as the worst
  }
  return worst / scale;
}

// Where the learned parameters' gradients go (zeroed by the encoders' `make_grads`).
template <class T>
struct grad_store {
  std::vector<double> slopes;
  mat<T> table, ktab, vtab;
  std::vector<float> sinks;
};

// Every family with its learned parameters' gradients wanted: f(name, encoder, make_grads) where
// make_grads(store) returns parameter_gradients pointing into `store`.
template <class T, class F>
void for_each_encoder(F&& f) {
  using store = grad_store<T>;
  f("none", posenc::no_position<T>{}, [](store& s) {
    return posenc::parameter_gradients<posenc::no_position<T>>{.sinks = s.sinks};
  });
  f("rope", posenc::rope<T>({.head_dim = D, .rotary_dim = 12, .base = 1000.0}), [](store& s) {
    return posenc::parameter_gradients<posenc::rope<T>>{.sinks = s.sinks};
  });
  f("alibi", posenc::alibi<T>({.num_heads = H}), [](store& s) {
    s.slopes.assign(H, 0.0);
    return posenc::parameter_gradients<posenc::alibi<T>>{.sinks = s.sinks, .slopes = s.slopes};
  });
  const posenc::t5_bias_params tp{.num_heads = H, .num_buckets = 16, .max_distance = 64};
  f("t5", posenc::t5_relative_bias<T>(tp, posenc_test::random_normal<double>(16, H, 7).cast<T>().eval()),
    [](store& s) {
      s.table = mat<T>::Zero(16, H);
      return posenc::parameter_gradients<posenc::t5_relative_bias<T>>{.sinks = s.sinks,
                                                                      .table = posenc::view_of(s.table)};
    });
  const posenc::shaw_params sp{.head_dim = D, .max_relative_position = 5};
  f("shaw",
    posenc::shaw_relative<T>(sp, posenc_test::random_normal<double>(11, D, 8, 0.3).cast<T>().eval(),
                             posenc_test::random_normal<double>(11, D, 9, 0.3).cast<T>().eval()),
    [](store& s) {
      s.ktab = mat<T>::Zero(11, D);
      s.vtab = mat<T>::Zero(11, D);
      return posenc::parameter_gradients<posenc::shaw_relative<T>>{
          .sinks = s.sinks, .key_table = posenc::view_of(s.ktab), .value_table = posenc::view_of(s.vtab)};
    });
}

// The largest relative difference of the parameter gradients (0 when none is wanted); the sinks'
// (float for every storage type: the ring adds one float per device) apart, with `sinks`.
template <class T>
double params_err(const grad_store<T>& a, const grad_store<T>& b, bool sinks = false) {
  double worst = 0;
  auto vec = [&](const auto& x, const auto& y) {
    double scale = 1;
    for (const auto e : y) scale = std::max(scale, std::abs(static_cast<double>(e)));
    for (std::size_t i = 0; i < x.size(); ++i)
      worst = std::max(worst, std::abs(static_cast<double>(x[i]) - static_cast<double>(y[i])) / scale);
  };
  if (sinks) {
    vec(a.sinks, b.sinks);
    return worst;
  }
  vec(a.slopes, b.slopes);
  auto m = [&](const mat<T>& x, const mat<T>& y) {
    if (x.size() > 0) worst = std::max(worst, rel_err(x, y));
  };
  m(a.table, b.table);
  m(a.ktab, b.ktab);
  m(a.vtab, b.vtab);
  return worst;
}

}  // namespace

TEMPLATE_TEST_CASE("ring backward equals the single-process backward: P = 1..4, both layouts, every encoder",
                   "[ring][backward]", float, double) {
  using T = TestType;
  const index_t n = 37;  // shards of unequal sizes
  const mat<T> q = posenc_test::random_normal<double>(n, H * D, 31).cast<T>();
  const mat<T> k = posenc_test::random_normal<double>(n, HK * D, 32).cast<T>();
  const mat<T> v = posenc_test::random_normal<double>(n, HK * D, 33).cast<T>();
  const mat<T> dout = posenc_test::random_normal<double>(n, H * D, 34).cast<T>();
  const std::vector<float> sink_logits = {0.5f, -1.0f, 0.0f, 2.0f};
  struct mask_case {
    bool causal;
    index_t left;
    bool sinks;
  };
  for (const mask_case mc : {mask_case{false, -1, false}, mask_case{true, -1, false}, mask_case{true, 9, true}}) {
    for_each_encoder<T>([&](const std::string& name, const auto& enc, auto make_grads) {
      posenc::attention_params p{.heads = H, .kv_heads = HK, .causal = mc.causal, .window_left = mc.left};
      if (mc.sinks) p.sinks = sink_logits;
      const auto all = posenc::arange(0, n);
      mat<T> out(n, H * D), lse(n, H);
      posenc::attention(q, k, v, out, all, all, enc, p, lse);
      // Gradients into buffers poisoned with 9 (overwritten) and parameter gradients from zero.
      auto run = [&](auto&& backward) {
        grad_store<T> s;
        if (mc.sinks) s.sinks.assign(H, 0.0f);
        mat<T> dq = mat<T>::Constant(n, H * D, T(9)), dk = mat<T>::Constant(n, HK * D, T(9)),
               dv = mat<T>::Constant(n, HK * D, T(9));
        backward(dq, dk, dv, make_grads(s));
        return std::tuple{dq, dk, dv, s};
      };
      const auto [dq0, dk0, dv0, g0] = run([&](mat<T>& dq, mat<T>& dk, mat<T>& dv, const auto& g) {
        posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, all, all, enc, p, g);
      });
      for (const int P : {1, 2, 3, 4}) {
        for (const ring_layout layout : {ring_layout::contiguous, ring_layout::zigzag}) {
          const auto [dq, dk, dv, g] = run([&](mat<T>& dq_, mat<T>& dk_, mat<T>& dv_, const auto& gr) {
            posenc::ring_attention_backward_simulate(q, k, v, out, lse, dout, dq_, dk_, dv_, P, layout, enc, p, gr);
          });
          INFO(name << ", P " << P << ", " << (layout == ring_layout::zigzag ? "zigzag" : "contiguous") << ", causal "
                    << mc.causal << ", window " << mc.left << ", sinks " << mc.sinks);
          CHECK(rel_err(dq, dq0) <= tolerance<T>);
          CHECK(rel_err(dk, dk0) <= tolerance<T>);
          CHECK(rel_err(dv, dv0) <= tolerance<T>);
          CHECK(params_err(g, g0) <= tolerance<T>);
          CHECK(params_err(g, g0, true) <= 1e-6);
        }
      }
    });
  }
}

TEST_CASE("ring forward with lse, then ring backward on the devices' shards, equals one process", "[ring][backward]") {
  const index_t n = 61, P = 3;
  const auto rope = posenc::rope<float>({.head_dim = D, .base = 500.0});
  const posenc::attention_params p{.heads = H, .kv_heads = HK, .causal = true};
  const mat<float> q = posenc_test::random_normal<double>(n, H * D, 41).cast<float>();
  const mat<float> k = posenc_test::random_normal<double>(n, HK * D, 42).cast<float>();
  const mat<float> v = posenc_test::random_normal<double>(n, HK * D, 43).cast<float>();
  const mat<float> dout = posenc_test::random_normal<double>(n, H * D, 44).cast<float>();
  // The devices of a zigzag ring, each with its shards, out and lse from the ring forward.
  std::vector<std::vector<posenc::position>> pos;
  std::vector<mat<float>> qs, ks, vs, gs, os, ls, dqs, dks, dvs;
  for (index_t r = 0; r < P; ++r) {
    pos.push_back(posenc::ring_shard_positions(n, static_cast<int>(P), static_cast<int>(r), ring_layout::zigzag));
    const posenc::positions pr(pos.back());
    qs.push_back(posenc::ring_take_rows(q, pr));
    ks.push_back(posenc::ring_take_rows(k, pr));
    vs.push_back(posenc::ring_take_rows(v, pr));
    gs.push_back(posenc::ring_take_rows(dout, pr));
    os.emplace_back(pr.size(), H * D);
    ls.emplace_back(pr.size(), H);
    dqs.emplace_back(pr.size(), H * D);
    dks.emplace_back(pr.size(), HK * D);
    dvs.emplace_back(pr.size(), HK * D);
  }
  std::vector<posenc::ring_device<float>> fwd;
  for (index_t r = 0; r < P; ++r) {
    const posenc::positions pr(pos[r]);
    fwd.push_back({posenc::view_of(std::as_const(qs[r])), posenc::view_of(std::as_const(ks[r])),
                   posenc::view_of(std::as_const(vs[r])), pr, pr, posenc::view_of(os[r]), posenc::view_of(ls[r])});
  }
  posenc::ring_attention_simulate(std::span<const posenc::ring_device<float>>(fwd), rope, p);
  std::vector<posenc::ring_backward_device<float>> bwd;
  for (index_t r = 0; r < P; ++r) {
    const posenc::positions pr(pos[r]);
    bwd.push_back({posenc::view_of(std::as_const(qs[r])), posenc::view_of(std::as_const(ks[r])),
                   posenc::view_of(std::as_const(vs[r])), posenc::view_of(std::as_const(os[r])),
                   posenc::view_of(std::as_const(ls[r])), posenc::view_of(std::as_const(gs[r])), pr, pr,
                   posenc::view_of(dqs[r]), posenc::view_of(dks[r]), posenc::view_of(dvs[r])});
  }
  posenc::ring_attention_backward_simulate(std::span<const posenc::ring_backward_device<float>>(bwd), rope, p);
  // One process: forward and backward over the whole sequence.
  const auto all = posenc::arange(0, n);
  mat<float> out(n, H * D), lse(n, H), dq(n, H * D), dk(n, HK * D), dv(n, HK * D);
  posenc::attention(q, k, v, out, all, all, rope, p, lse);
  posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, all, all, rope, p);
  mat<float> dq_ring(n, H * D), dk_ring(n, HK * D), dv_ring(n, HK * D), lse_ring(n, H);
  for (index_t r = 0; r < P; ++r) {
    const posenc::positions pr(pos[r]);
    posenc::ring_put_rows(dqs[r], pr, dq_ring);
    posenc::ring_put_rows(dks[r], pr, dk_ring);
    posenc::ring_put_rows(dvs[r], pr, dv_ring);
    posenc::ring_put_rows(ls[r], pr, lse_ring);
  }
  CHECK(rel_err(lse_ring, lse) <= 1e-5);
  CHECK(rel_err(dq_ring, dq) <= 3e-5);
  CHECK(rel_err(dk_ring, dk) <= 3e-5);
  CHECK(rel_err(dv_ring, dv) <= 3e-5);
}

TEST_CASE("ring backward: shapes that do not fit are refused before any work", "[ring][backward][errors]") {
  const index_t n = 8;
  const mat<float> q = mat<float>::Ones(n, H * D), k = mat<float>::Ones(n, HK * D), lse = mat<float>::Zero(n, H);
  mat<float> dq = mat<float>::Constant(n, H * D, 5.0f), dk = mat<float>::Constant(n, HK * D, 5.0f),
             dv = mat<float>::Constant(n, HK * D, 5.0f);
  const posenc::no_position<float> none;
  const posenc::attention_params p{.heads = H, .kv_heads = HK};
  mat<float> small(n, HK * D - 1);
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(posenc::ring_attention_backward_simulate(q, k, k, q, lse, q, dq, small, dv, 2,
                                                             ring_layout::contiguous, none, p),
                    Contains("dk is ["));
  CHECK_THROWS_WITH(posenc::ring_attention_backward_simulate(q, k, k, q, mat<float>(n, H + 1), q, dq, dk, dv, 2,
                                                             ring_layout::contiguous, none, p),
                    Contains("lse is ["));
  CHECK_THROWS_AS(posenc::ring_attention_backward_simulate(q, k, k, q, lse, q, dq, dk, dv, 0, ring_layout::contiguous,
                                                           none, p),
                  std::invalid_argument);
  CHECK((dq.array() == 5.0f).all());
  CHECK((dk.array() == 5.0f).all());
}
