// The attention backward against an independent double-precision backward written here from the
// formulas (materialised scores), which is itself checked against central finite differences of
// the library's forward reference; plus rope::rotate_backward, worker-count independence,
// fully masked rows and the shape checks.
#include <catch2/catch.hpp>

#include "support.hpp"
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

#include "posenc/attention/backward.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"

using posenc::index_t;
using posenc::position;
using dmat = posenc::row_matrix<double>;

namespace {

struct shape {
  index_t heads = 2, kv_heads = 2, d = 8, n_q = 9, n_kv = 11;
};

/// Everything the double reference produces.
struct grads_ref {
  dmat out, lse, dq, dk, dv;
  dmat dtable;                 // T5 [buckets, heads]
  std::vector<double> dslope;  // ALiBi, per head
  dmat dak, dav;               // Shaw
  std::vector<double> dsink;
};

/// RoPE (no scaling policy) from its formula: half-split pairs (i, i + r/2), angle p base^(-2i/r),
/// times the magnitude; `transpose` rotates by the negative angle.
void rope_formula(dmat& x, const std::vector<position>& pos, index_t d, index_t r, double base, double mag,
                  bool transpose) {
  for (index_t t = 0; t < x.rows(); ++t)
    for (index_t h = 0; h < x.cols() / d; ++h)
      for (index_t i = 0; i < r / 2; ++i) {
        const long double ang = static_cast<long double>(pos[t]) * std::pow(static_cast<long double>(base),
                                                                            -2.0L * i / static_cast<long double>(r));
        const double c = static_cast<double>(std::cos(ang)) * mag;
        const double s = static_cast<double>(std::sin(ang)) * mag * (transpose ? -1 : 1);
        double& a = x(t, h * d + i);
        double& b = x(t, h * d + i + r / 2);
        const double a0 = a, b0 = b;
        a = a0 * c - b0 * s;
        b = b0 * c + a0 * s;
      }
}

/// What the reference needs of an encoder.
struct enc_ref {
  enum kind_t { none, rope, bias, shaw } kind = none;
  // rope
  index_t r = 0;
  double base = 10000, mag = 1;
  // bias: b(h, q, k); bias_grad(h, q, k, ds) routes the gradient
  std::function<double(index_t, position, position)> b{};
  std::function<void(grads_ref&, index_t, position, position, double)> bias_grad{};
  // shaw
  dmat ak{}, av{};
  index_t kmax = 0;
};

/// Naive forward and backward in double, from the formulas (see attention/backward.hpp).
grads_ref reference(const shape& s, const dmat& q0, const dmat& k0, const dmat& v, const dmat& dout,
                    const std::vector<position>& qp, const std::vector<position>& kp, const enc_ref& e, bool causal,
                    position wl, position wr, double softcap, const std::vector<float>& sinks, position chunk = 0) {
  const index_t d = s.d, g = s.heads / s.kv_heads;
  const double scale = 1 / std::sqrt(double(d));
  dmat q = q0, k = k0;
  if (e.kind == enc_ref::rope) {
    rope_formula(q, qp, d, e.r, e.base, e.mag, false);
    rope_formula(k, kp, d, e.r, e.base, e.mag, false);
  }
  auto visible = [&](position a, position b) {
    if (causal && b > a) return false;
    if (wl >= 0 && b < a - wl) return false;
    if (wr >= 0 && b > a + wr) return false;
    // Chunked attention: the same chunk of `chunk` positions, floor division for any sign.
    auto chunk_of = [&](position x) { return x >= 0 ? x / chunk : -((-x + chunk - 1) / chunk); };
    if (chunk > 0 && chunk_of(a) != chunk_of(b)) return false;
    return true;
  };
  auto rel = [&](position a, position b) { return std::clamp<position>(b - a, -e.kmax, e.kmax) + e.kmax; };
  grads_ref o;
  o.out = dmat::Zero(s.n_q, s.heads * d);
  o.lse = dmat::Zero(s.n_q, s.heads);
  o.dq = dmat::Zero(s.n_q, s.heads * d);
  o.dk = dmat::Zero(s.n_kv, s.kv_heads * d);
  o.dv = dmat::Zero(s.n_kv, s.kv_heads * d);
  o.dsink.assign(s.heads, 0.0);
  if (e.kind == enc_ref::shaw) o.dak = dmat::Zero(e.ak.rows(), d), o.dav = dmat::Zero(e.av.rows(), d);
  for (index_t h = 0; h < s.heads; ++h) {
    const index_t kh = h / g;
    const double z = sinks.empty() ? -INFINITY : sinks[h];
    for (index_t i = 0; i < s.n_q; ++i) {
      std::vector<double> t(s.n_kv), p(s.n_kv, 0.0), dp(s.n_kv, 0.0);
      std::vector<bool> vis(s.n_kv);
      double m = -INFINITY;
      for (index_t j = 0; j < s.n_kv; ++j) {
        double dot = 0;
        for (index_t c = 0; c < d; ++c) {
          double kk = k(j, kh * d + c);
          if (e.kind == enc_ref::shaw) kk += e.ak(rel(qp[i], kp[j]), c);
          dot += q(i, h * d + c) * kk;
        }
        double x = scale * dot;
        if (e.kind == enc_ref::bias) x += e.b(h, qp[i], kp[j]);
        if (softcap > 0) x = softcap * std::tanh(x / softcap);
        t[j] = x;
        vis[j] = visible(qp[i], kp[j]);
        if (vis[j]) m = std::max(m, x);
      }
      if (m == -INFINITY) {  // no key: zero output, lse = the sink (or -inf)
        o.lse(i, h) = z;
        continue;
      }
      m = std::max(m, z);
      double l = std::exp(z - m);
      for (index_t j = 0; j < s.n_kv; ++j)
        if (vis[j]) l += std::exp(t[j] - m);
      const double lse = m + std::log(l);
      o.lse(i, h) = lse;
      double dsum = 0;
      for (index_t j = 0; j < s.n_kv; ++j) {
        if (!vis[j]) continue;
        p[j] = std::exp(t[j] - lse);
        for (index_t c = 0; c < d; ++c) {
          double vv = v(j, kh * d + c);
          if (e.kind == enc_ref::shaw) vv += e.av(rel(qp[i], kp[j]), c);
          o.out(i, h * d + c) += p[j] * vv;
          dp[j] += dout(i, h * d + c) * vv;
        }
        dsum += p[j] * dp[j];
      }
      o.dsink[h] -= std::exp(z - lse) * dsum;
      for (index_t j = 0; j < s.n_kv; ++j) {
        if (!vis[j]) continue;
        double ds = p[j] * (dp[j] - dsum);
        if (softcap > 0) ds *= 1 - (t[j] / softcap) * (t[j] / softcap);
        for (index_t c = 0; c < d; ++c) {
          o.dv(j, kh * d + c) += p[j] * dout(i, h * d + c);
          double kk = k(j, kh * d + c);
          if (e.kind == enc_ref::shaw) {
            kk += e.ak(rel(qp[i], kp[j]), c);
            o.dak(rel(qp[i], kp[j]), c) += scale * ds * q(i, h * d + c);
            o.dav(rel(qp[i], kp[j]), c) += p[j] * dout(i, h * d + c);
          }
          o.dq(i, h * d + c) += scale * ds * kk;
          o.dk(j, kh * d + c) += scale * ds * q(i, h * d + c);
        }
        if (e.kind == enc_ref::bias && e.bias_grad) e.bias_grad(o, h, qp[i], kp[j], ds);
      }
    }
  }
  if (e.kind == enc_ref::rope) {
    rope_formula(o.dq, qp, d, e.r, e.base, e.mag, true);
    rope_formula(o.dk, kp, d, e.r, e.base, e.mag, true);
  }
  return o;
}

template <class T>
posenc::row_matrix<T> rnd(index_t r, index_t c, unsigned seed, double amp = 1.0) {
  return posenc_test::random_normal<T>(r, c, seed, amp);
}

/// |got - ref| <= tol * max(1, max |ref|), reporting the worst element.
template <class T>
void check_close(const char* what, const posenc::row_matrix<T>& got, const dmat& ref, double tol) {
  index_t where = -1;
  const double err = posenc_test::max_abs_diff(got, ref, &where);
  const double mag = std::max(1.0, ref.cwiseAbs().maxCoeff());
  INFO(what << ": error " << err << " at flat index " << where << ", largest |ref| " << mag);
  CHECK(err <= tol * mag);
}

template <class T>
constexpr double tol_of() {
  return std::same_as<T, float> ? 2e-5 : 1e-12;
}

/// Runs forward + backward in T with `enc`, compares with the reference `er`.
template <class T, class E>
void run_case(const shape& s, const posenc::attention_params& p, const E& enc, const enc_ref& er,
              const std::vector<position>& qp, const std::vector<position>& kp, unsigned seed,
              posenc::parameter_gradients<E> grads = {}, const grads_ref** ref_out = nullptr) {
  const auto q = rnd<T>(s.n_q, s.heads * s.d, seed), k = rnd<T>(s.n_kv, s.kv_heads * s.d, seed + 1);
  const auto v = rnd<T>(s.n_kv, s.kv_heads * s.d, seed + 2), dout = rnd<T>(s.n_q, s.heads * s.d, seed + 3);
  posenc::row_matrix<T> out(s.n_q, s.heads * s.d), lse(s.n_q, s.heads);
  posenc::attention(q, k, v, out, posenc::positions(qp), posenc::positions(kp), enc, p, lse);
  posenc::row_matrix<T> dq(s.n_q, s.heads * s.d), dk(s.n_kv, s.kv_heads * s.d), dv(s.n_kv, s.kv_heads * s.d);
  dq.setConstant(T(7)), dk.setConstant(T(7)), dv.setConstant(T(7));  // overwritten
  posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, posenc::positions(qp), posenc::positions(kp), enc, p,
                             grads);
  std::vector<float> sinks(p.sinks.begin(), p.sinks.end());
  static grads_ref ref;
  ref = reference(s, q.template cast<double>(), k.template cast<double>(), v.template cast<double>(),
                  dout.template cast<double>(), qp, kp, er, p.causal, p.window_left, p.window_right, p.softcap, sinks,
                  p.chunk_size.value_or(0));
  INFO("heads " << s.heads << "/" << s.kv_heads << " d " << s.d << " n " << s.n_q << "x" << s.n_kv << " causal "
                << p.causal << " window (" << p.window_left << ", " << p.window_right << ") chunk "
                << p.chunk_size.value_or(0) << " tiles " << p.q_tile << "x"
                << p.k_tile << " softcap " << p.softcap << " sinks " << p.sinks.size());
  check_close("dq", dq, ref.dq, tol_of<T>());
  check_close("dk", dk, ref.dk, tol_of<T>());
  check_close("dv", dv, ref.dv, tol_of<T>());
  CHECK(dq.allFinite());
  CHECK(dk.allFinite());
  CHECK(dv.allFinite());
  if (ref_out) *ref_out = &ref;
}

std::vector<position> range(position a, index_t n) {
  std::vector<position> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[i] = a + i;
  return v;
}

const std::vector<posenc::attention_params> mask_cases(index_t heads, index_t kv_heads) {
  std::vector<posenc::attention_params> m;
  for (index_t tile : {0, 3, 4}) {
    const std::size_t first = m.size();
    m.push_back({.heads = heads, .kv_heads = kv_heads, .q_tile = tile, .k_tile = tile == 0 ? 0 : tile + 1});
    m.push_back({.heads = heads, .kv_heads = kv_heads, .causal = true, .q_tile = tile, .k_tile = tile});
    m.push_back({.heads = heads, .kv_heads = kv_heads, .window_left = 3, .window_right = 2, .q_tile = tile,
                 .k_tile = tile});
    m.push_back({.heads = heads, .kv_heads = kv_heads, .causal = true, .window_left = 2, .q_tile = tile,
                 .k_tile = tile + 2});
    // Chunked attention (Llama 4): causal within chunks of 5 positions, and bidirectional within chunks of 3.
    m.push_back({.heads = heads, .kv_heads = kv_heads, .causal = true, .chunk_size = 5, .q_tile = tile,
                 .k_tile = tile});
    m.push_back({.heads = heads, .kv_heads = kv_heads, .chunk_size = 3, .q_tile = tile, .k_tile = tile + 1});
    // One worker: the one-pass schedule (a kv head per worker); otherwise the two passes.
    for (std::size_t i = first; i < m.size(); i += 2) m[i].threads = 1;
  }
  return m;
}

/// Double finite differences of `loss = sum(dout * out)` from the library's forward reference.
template <class F>
double central(F&& loss_at, double& x) {
  const double h = 1e-5, x0 = x;
  x = x0 + h;
  const double up = loss_at();
  x = x0 - h;
  const double down = loss_at();
  x = x0;
  return (up - down) / (2 * h);
}

template <class E>
double loss_of(const dmat& q, const dmat& k, const dmat& v, const dmat& dout, const std::vector<position>& qp,
               const std::vector<position>& kp, const E& enc, const posenc::attention_params& p) {
  dmat out(q.rows(), q.cols());
  posenc::attention_reference(q, k, v, out, posenc::positions(qp), posenc::positions(kp), enc, p);
  return (out.array() * dout.array()).sum();
}

}  // namespace

TEST_CASE("the double reference backward agrees with finite differences of the forward", "[backward][reference]") {
  const shape s{.heads = 2, .kv_heads = 1, .d = 4, .n_q = 5, .n_kv = 6};
  const auto q = rnd<double>(s.n_q, s.heads * s.d, 1), k = rnd<double>(s.n_kv, s.kv_heads * s.d, 2);
  const auto v = rnd<double>(s.n_kv, s.kv_heads * s.d, 3), dout = rnd<double>(s.n_q, s.heads * s.d, 4);
  const std::vector<position> qp{3, 9, 4, 12, 7}, kp{0, 2, 5, 9, 11, 4};
  const std::vector<float> sinks{0.3f, -0.5f};
  const double fd_tol = 1e-7;
  auto check_all = [&](const auto& enc, const enc_ref& er, const posenc::attention_params& p,
                       const std::function<void(const grads_ref&)>& extra = {}) {
    const grads_ref r = reference(s, q, k, v, dout, qp, kp, er, p.causal, p.window_left, p.window_right, p.softcap,
                                  std::vector<float>(p.sinks.begin(), p.sinks.end()), p.chunk_size.value_or(0));
    dmat out(s.n_q, s.heads * s.d);
    posenc::attention_reference(q, k, v, out, posenc::positions(qp), posenc::positions(kp), enc, p);
    check_close("reference out", out, r.out, 1e-12);
    dmat qq = q, kk = k, vv = v;
    auto loss = [&] { return loss_of(qq, kk, vv, dout, qp, kp, enc, p); };
    double worst = 0;
    for (index_t i = 0; i < qq.size(); ++i) worst = std::max(worst, std::abs(central(loss, qq.data()[i]) - r.dq.data()[i]));
    for (index_t i = 0; i < kk.size(); ++i) worst = std::max(worst, std::abs(central(loss, kk.data()[i]) - r.dk.data()[i]));
    for (index_t i = 0; i < vv.size(); ++i) worst = std::max(worst, std::abs(central(loss, vv.data()[i]) - r.dv.data()[i]));
    INFO(enc.name() << " causal " << p.causal << " softcap " << p.softcap << " sinks " << p.sinks.size());
    CHECK(worst < fd_tol);
    if (!p.sinks.empty()) {
      std::vector<float> sk(p.sinks.begin(), p.sinks.end());
      for (index_t h = 0; h < s.heads; ++h) {
        // Sinks are float: a step of 2^-10, exact in float, with a second-order error below 1e-6.
        const float step = 0x1p-10f;
        auto at = [&](float dz) {
          std::vector<float> z = sk;
          z[h] += dz;
          posenc::attention_params pp = p;
          pp.sinks = z;
          return loss_of(q, k, v, dout, qp, kp, enc, pp);
        };
        const double fd = (at(step) - at(-step)) / (2.0 * step);
        CHECK(std::abs(fd - r.dsink[h]) < 1e-5);
      }
    }
    if (extra) extra(r);
  };
  for (bool causal : {false, true})
    for (double cap : {0.0, 1.5})
      for (bool with_sinks : {false, true}) {
        posenc::attention_params p{.heads = 2, .kv_heads = 1, .softcap = cap, .causal = causal, .window_left = 6};
        if (with_sinks) p.sinks = sinks;
        check_all(posenc::no_position<double>{}, enc_ref{}, p);
        const posenc::rope<double> rope({.head_dim = 4, .base = 100.0, .attention_factor = 1.2});
        check_all(rope, enc_ref{.kind = enc_ref::rope, .r = 4, .base = 100.0, .mag = 1.2}, p);
      }
  // ALiBi slopes and T5 table entries: perturb the parameter and rebuild the encoder.
  const posenc::attention_params p{.heads = 2, .kv_heads = 1, .causal = true};
  {
    const posenc::alibi<double> al({.num_heads = 2});
    enc_ref er{.kind = enc_ref::bias};
    er.b = [&](index_t h, position a, position b) { return al.bias(h, a, b); };
    er.bias_grad = [&](grads_ref& o, index_t h, position a, position b, double ds) {
      if (o.dslope.empty()) o.dslope.assign(2, 0.0);
      o.dslope[h] -= ds * double(a - b);
    };
    check_all(al, er, p, [&](const grads_ref& g) {
      // The slope rule has no free parameter per head, so head h's slope is perturbed by scaling
      // its bias (-slope_h * dist) by f, in the forward written here (checked above against the
      // library's reference).
      for (index_t h = 0; h < 2; ++h) {
        auto loss_scaled = [&](double f) {
          enc_ref e2 = er;
          e2.b = [&](index_t hh, position a, position b) { return (hh == h ? f : 1.0) * al.bias(hh, a, b); };
          e2.bias_grad = {};
          const grads_ref o = reference(s, q, k, v, dout, qp, kp, e2, true, -1, -1, 0, {});
          return (o.out.array() * dout.array()).sum();
        };
        const double fd = (loss_scaled(1 + 1e-5) - loss_scaled(1 - 1e-5)) / (2e-5 * al.slope(h));
        REQUIRE(g.dslope.size() == 2);
        CHECK(std::abs(fd - g.dslope[h]) < 1e-6);
      }
    });
  }
  {
    const dmat table = rnd<double>(8, 2, 9);
    const posenc::t5_bias_params tp{.num_heads = 2, .num_buckets = 8, .max_distance = 20, .bidirectional = true};
    const posenc::t5_relative_bias<double> t5(tp, table);
    enc_ref er{.kind = enc_ref::bias};
    er.b = [&](index_t h, position a, position b) { return t5.bias(h, a, b); };
    er.bias_grad = [&](grads_ref& o, index_t h, position a, position b, double ds) {
      if (o.dtable.size() == 0) o.dtable = dmat::Zero(8, 2);
      o.dtable(t5.bucket(b - a), h) += ds;
    };
    const posenc::attention_params pf{.heads = 2, .kv_heads = 1};
    check_all(t5, er, pf, [&](const grads_ref& g) {
      dmat tb = table;
      for (index_t i = 0; i < tb.size(); ++i) {
        auto loss = [&] { return loss_of(q, k, v, dout, qp, kp, posenc::t5_relative_bias<double>(tp, tb), pf); };
        const double fd = central(loss, tb.data()[i]);
        const double an = g.dtable.size() ? g.dtable.data()[i] : 0.0;
        CHECK(std::abs(fd - an) < 1e-7);
      }
    });
  }
  {
    const index_t K = 2;
    const dmat ak = rnd<double>(2 * K + 1, 4, 10), av = rnd<double>(2 * K + 1, 4, 11);
    const posenc::shaw_relative<double> sh({.head_dim = 4, .max_relative_position = K}, ak, av);
    const enc_ref er{.kind = enc_ref::shaw, .ak = ak, .av = av, .kmax = K};
    check_all(sh, er, p, [&](const grads_ref& g) {
      dmat a = ak, b = av;
      auto loss = [&] {
        return loss_of(q, k, v, dout, qp, kp, posenc::shaw_relative<double>({.head_dim = 4, .max_relative_position = K}, a, b), p);
      };
      double worst = 0;
      for (index_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(central(loss, a.data()[i]) - g.dak.data()[i]));
      for (index_t i = 0; i < b.size(); ++i) worst = std::max(worst, std::abs(central(loss, b.data()[i]) - g.dav.data()[i]));
      CHECK(worst < 1e-7);
    });
  }
}

TEMPLATE_TEST_CASE("attention_backward equals the double reference", "[backward]", float, double) {
  using T = TestType;
  for (const shape s : {shape{}, shape{.heads = 4, .kv_heads = 2, .d = 8, .n_q = 13, .n_kv = 7},
                        shape{.heads = 3, .kv_heads = 1, .d = 5, .n_q = 6, .n_kv = 17},
                        shape{.heads = 2, .kv_heads = 1, .d = 48, .n_q = 21, .n_kv = 40}}) {
    const auto qp = range(s.n_kv - s.n_q + 2, s.n_q);  // bottom-right, partly past the keys
    const auto kp = range(0, s.n_kv);
    for (posenc::attention_params p : mask_cases(s.heads, s.kv_heads)) {
      run_case<T>(s, p, posenc::no_position<T>{}, enc_ref{}, qp, kp, 20);
      // RoPE: partial rotary, magnitude
      if (s.d % 2 == 0) {
        const posenc::rope<T> rope({.head_dim = s.d, .rotary_dim = s.d - 2, .base = 500.0, .attention_factor = 1.1});
        run_case<T>(s, p, rope, enc_ref{.kind = enc_ref::rope, .r = s.d - 2, .base = 500.0, .mag = 1.1}, qp, kp, 30);
      }
    }
  }
}

TEMPLATE_TEST_CASE("attention_backward: bias encoders, softcap, sinks and their parameter gradients",
                   "[backward]", float, double) {
  using T = TestType;
  const shape s{.heads = 4, .kv_heads = 2, .d = 8, .n_q = 12, .n_kv = 14};
  // Arbitrary, unsorted positions with repeats and a gap.
  const std::vector<position> qp{5, 40, 3, 17, 17, 1000, 9, 0, 12, 41, 6, 2};
  const std::vector<position> kp{0, 1, 2, 3, 4, 6, 9, 12, 17, 40, 41, 30, 7, 999};
  const std::vector<float> sinks{0.5f, -1.0f, 2.0f, -INFINITY};
  for (bool causal : {false, true})
    for (index_t tile : {0, 5}) {
      posenc::attention_params p{.heads = 4, .kv_heads = 2, .softcap = 2.0, .causal = causal, .q_tile = tile,
                                 .k_tile = tile, .threads = tile == 0 ? 2 : 0};
      p.sinks = sinks;
      const grads_ref* ref = nullptr;
      {
        std::vector<float> dz(4, 0.25f);
        run_case<T>(s, p, posenc::no_position<T>{}, enc_ref{}, qp, kp, 40, {.sinks = dz}, &ref);
        for (index_t h = 0; h < 4; ++h) CHECK(std::abs(dz[h] - 0.25 - ref->dsink[h]) < 1e-4);
        CHECK(dz[3] == 0.25f);  // no sink: no gradient
      }
      {
        // The causal form without the causal mask gives keys ahead of the query a positive bias.
        const bool causal_form = tile == 0;
        const posenc::alibi<T> al({.num_heads = 6, .head_offset = 1,
                                   .form = causal_form ? posenc::alibi_form::causal : posenc::alibi_form::symmetric});
        enc_ref er{.kind = enc_ref::bias};
        er.b = [&](index_t h, position a, position b) { return al.bias(h, a, b); };
        er.bias_grad = [&](grads_ref& o, index_t h, position a, position b, double ds) {
          if (o.dslope.empty()) o.dslope.assign(4, 0.0);
          const double dist = double(a - b);
          o.dslope[h] -= ds * (causal_form ? dist : std::abs(dist));
        };
        std::vector<double> dsl(6, 1.0);
        run_case<T>(s, p, al, er, qp, kp, 50, {.slopes = dsl}, &ref);
        CHECK(dsl[0] == 1.0);
        CHECK(dsl[5] == 1.0);
        double mag = 1;
        for (index_t h = 0; h < 4; ++h) mag = std::max(mag, std::abs(ref->dslope[h]));
        for (index_t h = 0; h < 4; ++h) CHECK(std::abs(dsl[h + 1] - 1.0 - ref->dslope[h]) < 10 * tol_of<T>() * mag);
      }
      {
        const auto table = rnd<T>(10, 5, 60);
        const posenc::t5_bias_params tp{.num_heads = 5, .num_buckets = 10, .max_distance = 30,
                                        .bidirectional = !causal, .head_offset = 1};
        const posenc::t5_relative_bias<T> t5(tp, table);
        enc_ref er{.kind = enc_ref::bias};
        er.b = [&](index_t h, position a, position b) { return t5.bias(h, a, b); };
        er.bias_grad = [&](grads_ref& o, index_t h, position a, position b, double ds) {
          if (o.dtable.size() == 0) o.dtable = dmat::Zero(10, 5);
          o.dtable(t5.bucket(b - a), h + 1) += ds;
        };
        posenc::row_matrix<T> dt = posenc::row_matrix<T>::Constant(10, 5, T(0.5));
        run_case<T>(s, p, t5, er, qp, kp, 70, {.table = posenc::view_of(dt)}, &ref);
        dmat expect = ref->dtable.array() + 0.5;
        check_close("dtable", dt, expect, 10 * tol_of<T>());
      }
      {
        const index_t K = 3;
        const auto ak = rnd<T>(2 * K + 1, 8, 80), av = rnd<T>(2 * K + 1, 8, 81);
        const posenc::shaw_relative<T> sh({.head_dim = 8, .max_relative_position = K}, ak, av);
        const enc_ref er{.kind = enc_ref::shaw, .ak = ak.template cast<double>(), .av = av.template cast<double>(),
                         .kmax = K};
        posenc::row_matrix<T> dak = posenc::row_matrix<T>::Zero(2 * K + 1, 8), dav = dak;
        run_case<T>(s, p, sh, er, qp, kp, 90, {.key_table = posenc::view_of(dak), .value_table = posenc::view_of(dav)},
                    &ref);
        check_close("daK", dak, ref->dak, 10 * tol_of<T>());
        check_close("daV", dav, ref->dav, 10 * tol_of<T>());
      }
    }
}

TEMPLATE_TEST_CASE("attention_backward: rows that see no key get zero gradients, never NaN", "[backward]", float,
                   double) {
  using T = TestType;
  const shape s{.heads = 2, .kv_heads = 2, .d = 8, .n_q = 6, .n_kv = 8};
  // Queries at 0..2 see no key under the causal mask (keys start at 10); queries 3..5 see some.
  const std::vector<position> qp{0, 1, 2, 12, 15, 20};
  const auto kp = range(10, 8);
  for (index_t tile : {0, 2}) {
    const posenc::attention_params p{.heads = 2, .causal = true, .q_tile = tile, .k_tile = tile};
    run_case<T>(s, p, posenc::no_position<T>{}, enc_ref{}, qp, kp, 100);
    const auto q = rnd<T>(6, 16, 1), k = rnd<T>(8, 16, 2), v = rnd<T>(8, 16, 3), dout = rnd<T>(6, 16, 4);
    posenc::row_matrix<T> out(6, 16), lse(6, 2), dq(6, 16), dk(8, 16), dv(8, 16);
    posenc::attention(q, k, v, out, posenc::positions(qp), posenc::positions(kp), posenc::no_position<T>{}, p, lse);
    posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, posenc::positions(qp), posenc::positions(kp),
                               posenc::no_position<T>{}, p);
    CHECK(dq.topRows(3).cwiseAbs().maxCoeff() == T(0));
    CHECK(dq.bottomRows(3).cwiseAbs().maxCoeff() > T(0));
    CHECK(dq.allFinite());
  }
  // Nothing visible at all, and empty calls.
  const posenc::attention_params p{.heads = 2, .window_left = 0, .window_right = 0};
  const auto q = rnd<T>(3, 16, 1), k = rnd<T>(4, 16, 2), v = rnd<T>(4, 16, 3), dout = rnd<T>(3, 16, 4);
  const std::vector<position> far{100, 200, 300};
  posenc::row_matrix<T> out(3, 16), lse(3, 2), dq(3, 16), dk(4, 16), dv(4, 16);
  posenc::attention(q, k, v, out, posenc::positions(far), posenc::arange(0, 4), posenc::no_position<T>{}, p, lse);
  dk.setConstant(T(3));
  posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, posenc::positions(far), posenc::arange(0, 4),
                             posenc::no_position<T>{}, p);
  CHECK(dq.cwiseAbs().maxCoeff() == T(0));
  CHECK(dk.cwiseAbs().maxCoeff() == T(0));
  CHECK(dv.cwiseAbs().maxCoeff() == T(0));
  posenc::row_matrix<T> q0(0, 16), out0(0, 16), lse0(0, 2), dq0(0, 16);
  dk.setConstant(T(3));
  posenc::attention_backward(q0, k, v, out0, lse0, q0, dq0, dk, dv, posenc::arange(0, 0), posenc::arange(0, 4),
                             posenc::no_position<T>{}, p);
  CHECK(dk.cwiseAbs().maxCoeff() == T(0));
}

// With 2 kv heads, 1 and 2 workers run one pass per kv head, 3 workers the two passes: all agree.
TEST_CASE("attention_backward gives the same bits for 1, 2 and 3 workers", "[backward][threads]") {
  posenc::thread_pool pool(3);
  const index_t H = 4, KVH = 2, d = 16, n = 70;
  const auto q = rnd<float>(n, H * d, 1), k = rnd<float>(n, KVH * d, 2), v = rnd<float>(n, KVH * d, 3);
  const auto dout = rnd<float>(n, H * d, 4);
  const auto table = rnd<float>(32, 4, 5);
  const posenc::t5_relative_bias<float> t5({.num_heads = 4}, table);
  const posenc::rope<float> rope({.head_dim = d});
  auto run = [&](const auto& enc, int threads, posenc::row_matrix<float>* dt) {
    posenc::attention_params p{.heads = H, .kv_heads = KVH, .causal = true, .q_tile = 16, .k_tile = 8,
                               .threads = threads, .executor = &pool};
    posenc::row_matrix<float> out(n, H * d), lse(n, H), dq(n, H * d), dk(n, KVH * d), dv(n, KVH * d);
    posenc::attention(q, k, v, out, posenc::arange(0, n), posenc::arange(0, n), enc, p, lse);
    using E = std::remove_cvref_t<decltype(enc)>;
    posenc::parameter_gradients<E> g{};
    if constexpr (std::same_as<E, posenc::t5_relative_bias<float>>) g.table = posenc::view_of(*dt);
    posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, posenc::arange(0, n), posenc::arange(0, n), enc,
                               p, g);
    posenc::row_matrix<float> all(n, H * d + 2 * KVH * d);
    all << dq, dk, dv;
    return all;
  };
  posenc::row_matrix<float> t1 = posenc::row_matrix<float>::Zero(32, 4), t2 = t1, t3 = t1;
  const auto a1 = run(t5, 1, &t1), a2 = run(t5, 2, &t2), a3 = run(t5, 3, &t3);
  CHECK(a1 == a2);
  CHECK(a1 == a3);
  CHECK(t1 == t2);
  CHECK(t1 == t3);
  CHECK(t1.cwiseAbs().maxCoeff() > 0);
  CHECK(run(rope, 1, nullptr) == run(rope, 3, nullptr));
}

TEMPLATE_TEST_CASE("rope::rotate_backward is the transposed rotation", "[backward][rope]", float, double) {
  using T = TestType;
  const index_t d = 10, n = 7;
  const std::vector<position> pos{0, 5, -3, 1000, 1 << 20, 77, 4};
  for (auto layout : {posenc::rope_layout::half_split, posenc::rope_layout::interleaved}) {
    const posenc::rope<T> r({.head_dim = d, .rotary_dim = 8, .layout = layout, .attention_factor = 1.25});
    const auto x = rnd<T>(n, 2 * d, 1), y = rnd<T>(n, 2 * d, 2);
    posenc::row_matrix<T> rx = x, ry = y;
    r.rotate(rx, posenc::positions(pos));
    r.rotate_backward(ry, posenc::positions(pos));
    // <R x, y> == <x, R^T y>, row by row.
    for (index_t i = 0; i < n; ++i) {
      const double a = rx.row(i).template cast<double>().dot(y.row(i).template cast<double>());
      const double b = x.row(i).template cast<double>().dot(ry.row(i).template cast<double>());
      CHECK(std::abs(a - b) < 50 * std::numeric_limits<T>::epsilon() * (1 + std::abs(a)));
    }
    // R^T R x = magnitude^2 x on the rotated dims; pass-through dims untouched.
    r.rotate_backward(rx, posenc::positions(pos));
    dmat back = rx.template cast<double>();
    for (index_t h = 0; h < 2; ++h) back.middleCols(h * d, 8) /= 1.25 * 1.25;  // pass-through dims: unscaled
    check_close("R^T R x", x, back, 20 * std::numeric_limits<T>::epsilon());
    CHECK(ry.col(8) == y.col(8));
    CHECK(ry.col(19) == y.col(19));
  }
}

TEST_CASE("attention_backward rejects arguments that do not fit, naming them", "[backward][errors]") {
  const index_t H = 2, d = 4, n = 5;
  const auto q = rnd<float>(n, H * d, 1), k = rnd<float>(n, H * d, 2), v = rnd<float>(n, H * d, 3);
  posenc::row_matrix<float> out(n, H * d), lse(n, H), dq(n, H * d), dk(n, H * d), dv(n, H * d), dout = q;
  const posenc::attention_params p{.heads = H};
  const auto pos = posenc::arange(0, n);
  const posenc::no_position<float> none;
  posenc::row_matrix<float> bad_lse(n, H + 1), bad_dq(n - 1, H * d), bad_dk(n, H * d + 1), bad_dv(n + 1, H * d),
      bad_dout(n, H * d - 1);
  using posenc::precondition_error;
  CHECK_THROWS_AS(posenc::attention_backward(q, k, v, out, bad_lse, dout, dq, dk, dv, pos, pos, none, p),
                  precondition_error);
  CHECK_THROWS_WITH(posenc::attention_backward(q, k, v, out, bad_lse, dout, dq, dk, dv, pos, pos, none, p),
                    Catch::Contains("lse is [5, 3]"));
  CHECK_THROWS_WITH(posenc::attention_backward(q, k, v, out, lse, bad_dout, dq, dk, dv, pos, pos, none, p),
                    Catch::Contains("dout is [5, 7]"));
  CHECK_THROWS_WITH(posenc::attention_backward(q, k, v, out, lse, dout, bad_dq, dk, dv, pos, pos, none, p),
                    Catch::Contains("dq is [4, 8]"));
  CHECK_THROWS_WITH(posenc::attention_backward(q, k, v, out, lse, dout, dq, bad_dk, dv, pos, pos, none, p),
                    Catch::Contains("dk is [5, 9]"));
  CHECK_THROWS_WITH(posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, bad_dv, pos, pos, none, p),
                    Catch::Contains("dv is [6, 8]"));
  CHECK_THROWS_AS(posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, posenc::arange(0, n - 1), pos, none,
                                             p),
                  precondition_error);
  std::vector<float> dz(3);
  CHECK_THROWS_WITH(posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, pos, pos, none, p, {.sinks = dz}),
                    Catch::Contains("grads.sinks has 3 values"));
  const posenc::t5_relative_bias<float> t5({.num_heads = 2}, rnd<float>(32, 2, 4));
  posenc::row_matrix<float> table(32, 3);
  CHECK_THROWS_WITH(posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, pos, pos, t5, p,
                                               {.table = posenc::view_of(table)}),
                    Catch::Contains("grads.table is [32, 3]"));
  const posenc::alibi<float> al({.num_heads = 2});
  std::vector<double> ds(1);
  CHECK_THROWS_WITH(
      posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, pos, pos, al, p, {.slopes = ds}),
      Catch::Contains("grads.slopes has 1 values"));
  const posenc::shaw_relative<float> sh({.head_dim = 4, .max_relative_position = 1}, rnd<float>(3, 4, 5),
                                        rnd<float>(3, 4, 6));
  posenc::row_matrix<float> dak(3, 5);
  CHECK_THROWS_WITH(posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, pos, pos, sh, p,
                                               {.key_table = posenc::view_of(dak)}),
                    Catch::Contains("grads.key_table is [3, 5]"));
  CHECK_THROWS_AS(posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, pos, pos, none,
                                             posenc::attention_params{.heads = 3}),
                  precondition_error);
}
