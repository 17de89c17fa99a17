// Heads with any strides (posenc::heads_view): attention, its backward and RoPE on PyTorch's [batch, heads,
// tokens, head_dim], FlashAttention's [batch, tokens, heads, head_dim], a slice of a fused QKV
// projection and an expanded (stride 0) key batch, read and written in place, against a double
// reference computed per batch item on dense copies gathered by the test from the strides.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "posenc/attention/backward.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/executor.hpp"
#include "support.hpp"

using posenc::heads_view;
using posenc::index_t;
using posenc::position;
template <class T>
using mat = posenc::row_matrix<T>;

namespace {

constexpr index_t H = 4, HK = 2, D = 16;
constexpr double tolerance = 2e-5;  // float kernel against double, O(1) outputs, < 100 keys

// Where element (b, t, h, c) of a layout lives, written out here (not taken from heads_view).
struct strides {
  index_t batch, tokens, heads, b, t, h;  // extents, then element strides
  index_t index(index_t bi, index_t ti, index_t hi, index_t c) const { return bi * b + ti * t + hi * h + c; }
};

// The layouts a framework hands over for `heads` heads of `n` tokens, `batch` items, in a buffer
// of `size` elements (the fused one holds q, k and v of every token side by side).
enum class layout { bhtd, bthd, fused_qkv, padded_rows };

strides strides_of(layout l, index_t batch, index_t n, index_t heads, index_t& size) {
  switch (l) {
    case layout::bhtd:
      size = batch * heads * n * D;
      return {batch, n, heads, heads * n * D, D, n * D};
    case layout::bthd:
      size = batch * n * heads * D;
      return {batch, n, heads, n * heads * D, heads * D, D};
    case layout::fused_qkv:  // [batch, tokens, 3, heads, D]: this operand is the second slot
      size = batch * n * 3 * heads * D;
      return {batch, n, heads, n * 3 * heads * D, 3 * heads * D, D};
    case layout::padded_rows:  // [batch, heads, tokens, D + 8]: rows longer than a head
      size = batch * heads * n * (D + 8);
      return {batch, n, heads, heads * n * (D + 8), D + 8, n * (D + 8)};
  }
  return {};
}
index_t offset_of(layout l, index_t heads) { return l == layout::fused_qkv ? heads * D : 0; }

template <class S>
heads_view<S> view_in(std::vector<std::remove_const_t<S>>& buf, index_t at, const strides& s) {
  return heads_view<S>(buf.data() + at, s.batch, s.tokens, s.heads, D, s.b, s.t, s.h);
}

// Batch item b of a strided buffer as a dense [tokens, heads * D] double matrix.
template <class T>
mat<double> gather(const std::vector<T>& buf, index_t at, const strides& s, index_t b) {
  mat<double> m(s.tokens, s.heads * D);
  for (index_t t = 0; t < s.tokens; ++t)
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t c = 0; c < D; ++c) m(t, h * D + c) = static_cast<double>(buf[at + s.index(b, t, h, c)]);
  return m;
}

template <class T>
std::vector<T> random_buffer(index_t size, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<T> v(static_cast<std::size_t>(size));
  for (auto& x : v) x = static_cast<T>(nd(rng));
  return v;
}

template <class F>
void for_each_encoder(F&& f) {
  f("none", posenc::no_position<float>{}, posenc::no_position<double>{});
  const posenc::rope_params rp{.head_dim = D, .rotary_dim = 12, .base = 10000.0};
  f("rope", posenc::rope<float>(rp), posenc::rope<double>(rp));
  const posenc::alibi_params ap{.num_heads = H};
  f("alibi", posenc::alibi<float>(ap), posenc::alibi<double>(ap));
  const posenc::t5_bias_params tp{.num_heads = H, .num_buckets = 16, .max_distance = 64};
  const auto table = posenc_test::random_normal<double>(16, H, 7);
  f("t5", posenc::t5_relative_bias<float>(tp, mat<float>(table.cast<float>())),
    posenc::t5_relative_bias<double>(tp, table));
  const posenc::shaw_params sp{.head_dim = D, .max_relative_position = 5};
  const auto ak = posenc_test::random_normal<double>(11, D, 8, 0.3), av = posenc_test::random_normal<double>(11, D, 9, 0.3);
  f("shaw", posenc::shaw_relative<float>(sp, mat<float>(ak.cast<float>()), mat<float>(av.cast<float>())),
    posenc::shaw_relative<double>(sp, ak, av));
}

}  // namespace

TEST_CASE("heads_view: the layouts' element addresses and overlap", "[heads_view]") {
  std::vector<float> buf(2 * 3 * 5 * 4);
  const auto a = heads_view<float>::bhtd(buf.data(), 2, 3, 5, 4);  // [2, 3 heads, 5 tokens, 4]
  CHECK(a.at(1, 2, 1) - buf.data() == 1 * 60 + 1 * 20 + 2 * 4);
  CHECK(a.disjoint());
  CHECK_FALSE(a.row_packed());
  const auto b = heads_view<float>::bthd(buf.data(), 2, 5, 3, 4);  // [2, 5 tokens, 3 heads, 4]
  CHECK(b.at(1, 2, 1) - buf.data() == 1 * 60 + 2 * 12 + 1 * 4);
  CHECK(b.row_packed());
  CHECK(b.disjoint());
  const auto r = heads_view<float>::rows(buf.data(), 5, 3, 4, 20);  // a [5, 12] slice of [5, 20] rows
  CHECK(r.at(0, 4, 2) - buf.data() == 4 * 20 + 2 * 4);
  CHECK(r.disjoint());
  // A head stride smaller than head_dim, and a stride-0 (expanded) axis, overlap.
  CHECK_FALSE(heads_view<float>(buf.data(), 1, 5, 3, 4, 0, 12, 2).disjoint());
  CHECK_FALSE(heads_view<float>(buf.data(), 2, 5, 3, 4, 0, 12, 4).disjoint());
  CHECK(heads_view<float>(buf.data(), 1, 5, 3, 4, 0, 12, 4).disjoint());  // one item: its stride is moot
  CHECK(heads_view<float>(buf.data(), 2, 0, 3, 4, 0, 0, 0).disjoint());   // no element
  CHECK_THROWS_AS(heads_view<float>(buf.data(), 1, 5, 3, 4, 0, -12, 4), posenc::precondition_error);
  CHECK_THROWS_AS(heads_view<float>::rows(buf.data(), 5, 3, 4, 11), posenc::precondition_error);
}

TEST_CASE("attention on heads_view layouts equals the reference per batch item, every encoder", "[heads_view]") {
  const index_t batch = 3;
  struct shape {
    index_t n_q, n_kv;
  };
  // Prefill (queries at the end of their keys), decode, a few speculative tokens.
  for (const shape sh : {shape{37, 53}, shape{1, 70}, shape{3, 41}}) {
    for (const layout lq : {layout::bhtd, layout::bthd, layout::fused_qkv, layout::padded_rows}) {
      // Keys and values in another layout than the queries; out in q's layout (or bhtd when q is
      // a slice of a fused projection).
      const layout lk = lq == layout::bhtd ? layout::bthd : layout::bhtd;
      const layout lo = lq == layout::fused_qkv ? layout::bhtd : lq;
      index_t qsize = 0, ksize = 0, osize = 0;
      const strides qs = strides_of(lq, batch, sh.n_q, H, qsize), ks = strides_of(lk, batch, sh.n_kv, HK, ksize),
                    os = strides_of(lo, batch, sh.n_q, H, osize);
      const index_t q0 = offset_of(lq, H);
      const auto q = random_buffer<float>(qsize, 1), k = random_buffer<float>(ksize, 2),
                 v = random_buffer<float>(ksize, 3);
      const std::vector<position> qpos = [&] {
        std::vector<position> p;
        for (index_t i = 0; i < sh.n_q; ++i) p.push_back(sh.n_kv - sh.n_q + i);
        return p;
      }();
      for (const bool causal : {false, true}) {
        for_each_encoder([&](const std::string& name, const auto& enc, const auto& enc_ref) {
          const posenc::attention_params p{.heads = H, .kv_heads = HK, .causal = causal, .q_tile = 16, .k_tile = 16};
          // Out sits in a NaN-filled buffer: the call writes its elements and nothing else.
          std::vector<float> out(static_cast<std::size_t>(osize), std::numeric_limits<float>::quiet_NaN());
          // lse [batch, heads, tokens] (PyTorch's), strided.
          std::vector<float> lse(static_cast<std::size_t>(batch * H * sh.n_q), -1.0f);
          const heads_view<float> lv(lse.data(), batch, sh.n_q, H, 1, H * sh.n_q, 1, sh.n_q);
          auto qbuf = q, kbuf = k, vbuf = v;  // the views are const; check that they stay untouched
          posenc::attention(view_in<const float>(qbuf, q0, qs), view_in<const float>(kbuf, 0, ks),
                            view_in<const float>(vbuf, 0, ks), view_in<float>(out, 0, os), posenc::positions(qpos),
                            posenc::arange(0, sh.n_kv), enc, p, lv);
          CHECK(qbuf == q);
          CHECK(kbuf == k);
          for (index_t b = 0; b < batch; ++b) {
            mat<double> o(sh.n_q, H * D), l(sh.n_q, H);
            posenc::attention_reference(gather(q, q0, qs, b), gather(k, 0, ks, b), gather(v, 0, ks, b), o,
                                        posenc::positions(qpos), posenc::arange(0, sh.n_kv), enc_ref, p, l);
            const mat<double> got = gather(out, 0, os, b);
            INFO("encoder " << name << ", n_q " << sh.n_q << ", n_kv " << sh.n_kv << ", q layout "
                            << static_cast<int>(lq) << ", causal " << causal << ", item " << b);
            CHECK((got - o).cwiseAbs().maxCoeff() < tolerance);
            double lerr = 0;
            for (index_t t = 0; t < sh.n_q; ++t)
              for (index_t h = 0; h < H; ++h)
                lerr = std::max(lerr, std::abs(lse[static_cast<std::size_t>((b * H + h) * sh.n_q + t)] - l(t, h)));
            CHECK(lerr < tolerance);
          }
          if (lo == layout::padded_rows) {  // the 8 padding elements of each row stay NaN
            bool padding_untouched = true;
            for (index_t i = 0; i < osize; ++i)
              if (i % (D + 8) >= D) padding_untouched = padding_untouched && std::isnan(out[i]);
            CHECK(padding_untouched);
          }
        });
      }
    }
  }
}

TEST_CASE("heads_view: an expanded key batch (stride 0), bf16 storage, bits of per-item matrix calls",
          "[heads_view]") {
  const index_t batch = 2, n_q = 24, n_kv = 2100;  // decode-sized chunks over 2100 keys when n_q = 1
  for (const index_t nq : {n_q, index_t{1}}) {
    // Keys and values shared by both items: a batch stride of 0 reads the same [n_kv, HK, D].
    const auto k = random_buffer<Eigen::bfloat16>(n_kv * HK * D, 4), v = random_buffer<Eigen::bfloat16>(n_kv * HK * D, 5);
    const auto q = random_buffer<Eigen::bfloat16>(batch * H * nq * D, 6);
    const heads_view<const Eigen::bfloat16> kh(k.data(), batch, n_kv, HK, D, 0, HK * D, D), vh(v.data(), batch, n_kv,
                                                                                               HK, D, 0, HK * D, D);
    std::vector<Eigen::bfloat16> out(q.size());
    const posenc::rope<float> rope({.head_dim = D});
    posenc::attention_params p{.heads = H, .kv_heads = HK, .causal = true};
    const auto qpos = posenc::arange(n_kv - nq, nq), kpos = posenc::arange(0, n_kv);
    posenc::attention(heads_view<const Eigen::bfloat16>::bhtd(q.data(), batch, H, nq, D), kh, vh,
                      heads_view<Eigen::bfloat16>::bhtd(out.data(), batch, H, nq, D), qpos, kpos, rope, p);
    // The same call per item on [tokens, heads * D] matrices: the same bits (each row's arithmetic
    // does not depend on the tiles or the batch).
    const Eigen::Map<const mat<Eigen::bfloat16>> km(k.data(), n_kv, HK * D), vm(v.data(), n_kv, HK * D);
    for (index_t b = 0; b < batch; ++b) {
      mat<Eigen::bfloat16> qm(nq, H * D), om(nq, H * D);
      for (index_t t = 0; t < nq; ++t)
        for (index_t h = 0; h < H; ++h)
          for (index_t c = 0; c < D; ++c) qm(t, h * D + c) = q[static_cast<std::size_t>(((b * H + h) * nq + t) * D + c)];
      posenc::attention(qm, km, vm, om, qpos, kpos, rope, p);
      bool same = true;
      for (index_t t = 0; t < nq; ++t)
        for (index_t h = 0; h < H; ++h)
          for (index_t c = 0; c < D; ++c)
            same = same && om(t, h * D + c) == out[static_cast<std::size_t>(((b * H + h) * nq + t) * D + c)];
      INFO("n_q " << nq << ", item " << b);
      CHECK(same);
    }
  }
}

TEST_CASE("heads_view: the same bits for 1, 2 and 3 workers; the workspace the call reports", "[heads_view][executor]") {
  const index_t batch = 3, n = 300;
  const auto q = random_buffer<float>(batch * H * n * D, 7), k = random_buffer<float>(batch * HK * n * D, 8),
             v = random_buffer<float>(batch * HK * n * D, 9);
  const posenc::alibi<float> alibi({.num_heads = H});
  std::vector<std::vector<float>> outs;
  for (const int threads : {1, 2, 3}) {
    posenc::thread_pool pool(threads);
    const posenc::attention_params p{.heads = H, .kv_heads = HK, .causal = true, .executor = &pool};
    std::vector<float> out(q.size());
    posenc::attention_workspace ws;
    posenc::attention(heads_view<const float>::bhtd(q.data(), batch, H, n, D),
                      heads_view<const float>::bhtd(k.data(), batch, HK, n, D),
                      heads_view<const float>::bhtd(v.data(), batch, HK, n, D),
                      heads_view<float>::bhtd(out.data(), batch, H, n, D), posenc::arange(0, n), posenc::arange(0, n),
                      alibi, p, nullptr, &ws);
    CHECK(ws.bytes() == posenc::attention_workspace_bytes<float>(p, n, n, D, alibi, batch));
    outs.push_back(out);
  }
  CHECK(outs[0] == outs[1]);
  CHECK(outs[0] == outs[2]);
}

TEST_CASE("heads_view: shapes that do not fit are refused before any work", "[heads_view][errors]") {
  const index_t n = 5;
  std::vector<float> q(2 * H * n * D), k(2 * HK * n * D), out(q.size(), 7.0f);
  const auto qh = heads_view<const float>::bhtd(q.data(), 2, H, n, D);
  const auto kh = heads_view<const float>::bhtd(k.data(), 2, HK, n, D);
  const auto oh = heads_view<float>::bhtd(out.data(), 2, H, n, D);
  const posenc::no_position<float> none;
  const auto pos = posenc::arange(0, n);
  const posenc::attention_params p{.heads = H, .kv_heads = HK};
  using Catch::Matchers::Contains;
  // The knobs' heads must be the views' (a forgotten .heads is an error, not one head of 4 * D).
  CHECK_THROWS_WITH(posenc::attention(qh, kh, kh, oh, pos, pos, none, posenc::attention_params{}),
                    Contains("q has 4 heads but attention_params.heads = 1"));
  CHECK_THROWS_WITH(posenc::attention(qh, kh, kh, oh, pos, pos, none, {.heads = H}),
                    Contains("k has 2 heads but attention_params.kv_heads = 0 (0: heads = 4)"));
  CHECK_THROWS_WITH(posenc::attention(qh, heads_view<const float>::bhtd(k.data(), 1, HK, n, D), kh, oh, pos, pos, none, p),
                    Contains("one batch size"));
  CHECK_THROWS_WITH(posenc::attention(qh, kh, kh, heads_view<float>(out.data(), 2, n, H, D, 0, D, n * D), pos, pos,
                                      none, p),
                    Contains("elements of out overlap"));
  CHECK_THROWS_WITH(posenc::attention(qh, kh, kh, oh, posenc::arange(0, n - 1), pos, none, p),
                    Contains("4 query positions for 5 tokens"));
  std::vector<float> lse(2 * H * n);
  CHECK_THROWS_WITH(posenc::attention(qh, kh, kh, oh, pos, pos, none, p, heads_view<float>::bhtd(lse.data(), 2, H, n, 1)
                                                                              .head(0, 0)),
                    Contains("lse is [")); /* a matrix [n, 1]: wrong shape for [batch * n, heads] */
  // A matrix beside views is split into the knobs' heads; its columns must divide.
  const mat<float> bad(n, H * D - 1);
  CHECK_THROWS_WITH(posenc::attention(bad, kh, kh, oh, pos, pos, none, p), Contains("not a multiple of its 4 heads"));
  bool untouched = true;
  for (const float x : out) untouched = untouched && x == 7.0f;
  CHECK(untouched);
}

TEST_CASE("rope.rotate on heads_view equals the per-pair formula in double, and rotate_backward undoes it",
          "[heads_view][rope]") {
  const index_t batch = 2, n = 9;
  for (const auto pl : {posenc::rope_layout::half_split, posenc::rope_layout::interleaved}) {
    const index_t r = 12;  // partial rotary: dims 12..15 pass through
    const posenc::rope<float> rope({.head_dim = D, .rotary_dim = r, .layout = pl, .base = 500.0});
    for (const layout l : {layout::bhtd, layout::fused_qkv, layout::padded_rows}) {
      index_t size = 0;
      const strides s = strides_of(l, batch, n, H, size);
      const index_t at = offset_of(l, H);
      const auto x0 = random_buffer<float>(size, 11);
      auto x = x0;
      std::vector<position> pos;
      for (index_t t = 0; t < n; ++t) pos.push_back(1000 * t + 3);
      rope.rotate(view_in<float>(x, at, s), posenc::positions(pos));
      double err = 0;
      for (index_t b = 0; b < batch; ++b)
        for (index_t t = 0; t < n; ++t)
          for (index_t h = 0; h < H; ++h) {
            for (index_t i = 0; i < r / 2; ++i) {
              const index_t ca = pl == posenc::rope_layout::half_split ? i : 2 * i;
              const index_t cb = pl == posenc::rope_layout::half_split ? i + r / 2 : 2 * i + 1;
              const double angle = static_cast<double>(pos[static_cast<std::size_t>(t)]) * std::pow(500.0, -2.0 * static_cast<double>(i) / static_cast<double>(r));
              const double a = x0[at + s.index(b, t, h, ca)], bb = x0[at + s.index(b, t, h, cb)];
              err = std::max(err, std::abs(x[at + s.index(b, t, h, ca)] - (a * std::cos(angle) - bb * std::sin(angle))));
              err = std::max(err, std::abs(x[at + s.index(b, t, h, cb)] - (bb * std::cos(angle) + a * std::sin(angle))));
            }
            for (index_t c = r; c < D; ++c) err = std::max(err, std::abs(double(x[at + s.index(b, t, h, c)] - x0[at + s.index(b, t, h, c)])));
          }
      CHECK(err < 1e-5);  // a few float roundings of O(1) values; angles up to 8000 rad in double
      // Elements outside the view (the fused buffer's other slots, the padding) are untouched.
      std::vector<bool> inside(static_cast<std::size_t>(size), false);
      for (index_t b = 0; b < batch; ++b)
        for (index_t t = 0; t < n; ++t)
          for (index_t h = 0; h < H; ++h)
            for (index_t c = 0; c < D; ++c) inside[static_cast<std::size_t>(at + s.index(b, t, h, c))] = true;
      bool outside_same = true;
      for (index_t i = 0; i < size; ++i)
        if (!inside[static_cast<std::size_t>(i)]) outside_same = outside_same && x[i] == x0[i];
      CHECK(outside_same);
      rope.rotate_backward(view_in<float>(x, at, s), posenc::positions(pos));
      double back = 0;
      for (index_t i = 0; i < size; ++i) back = std::max(back, double(std::abs(x[i] - x0[i])));
      CHECK(back < 1e-5);
    }
  }
  const posenc::rope<float> rope({.head_dim = D});
  std::vector<float> x(2 * H * 3 * D);
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(rope.rotate(heads_view<float>(x.data(), 1, 3, H, D, 0, D, D), posenc::arange(0, 3)),
                    Contains("elements of x overlap"));
  CHECK_THROWS_WITH(rope.rotate(heads_view<float>::bhtd(x.data(), 2, H, 3, D), posenc::arange(0, 2)),
                    Contains("2 positions for 3 tokens"));
  CHECK_THROWS_WITH(rope.rotate(heads_view<float>::bhtd(x.data(), 2, H, 6, D / 2), posenc::arange(0, 6)),
                    Contains("head_dim 8 but the encoder has 16"));
}

TEST_CASE("attention_backward on heads_views: the bits of per-item matrix calls, parameter gradients summed",
          "[heads_view][backward]") {
  const index_t batch = 2, n = 29;
  // q, out, dout, dq in PyTorch's [batch, heads, tokens, D]; k, v, dk, dv in [batch, tokens, kv heads, D];
  // lse [batch, heads, tokens].
  const auto q = random_buffer<float>(batch * H * n * D, 21), k = random_buffer<float>(batch * n * HK * D, 22),
             v = random_buffer<float>(batch * n * HK * D, 23), dout = random_buffer<float>(batch * H * n * D, 24);
  const auto qh = heads_view<const float>::bhtd(q.data(), batch, H, n, D), gh = heads_view<const float>::bhtd(dout.data(), batch, H, n, D);
  const auto kh = heads_view<const float>::bthd(k.data(), batch, n, HK, D), vh = heads_view<const float>::bthd(v.data(), batch, n, HK, D);
  const posenc::attention_params p{.heads = H, .kv_heads = HK, .causal = true};
  const auto pos = posenc::arange(0, n);
  const posenc::t5_bias_params tp{.num_heads = H, .num_buckets = 16, .max_distance = 64};
  const posenc::t5_relative_bias<float> t5(tp, posenc_test::random_normal<double>(16, H, 7).cast<float>().eval());
  const posenc::rope<float> rope({.head_dim = D});
  auto run = [&](const auto& enc, auto grads_for) {
    std::vector<float> out(q.size()), lse(static_cast<std::size_t>(batch * H * n));
    const heads_view<float> oh = heads_view<float>::bhtd(out.data(), batch, H, n, D);
    const heads_view<float> lh(lse.data(), batch, n, H, 1, H * n, 1, n);
    posenc::attention(qh, kh, vh, oh, pos, pos, enc, p, lh);
    std::vector<float> dq(q.size(), 9.0f), dk(k.size(), 9.0f), dv(v.size(), 9.0f);
    mat<float> table = mat<float>::Zero(16, H), table_items = mat<float>::Zero(16, H);
    posenc::attention_backward(qh, kh, vh, heads_view<const float>(oh), heads_view<const float>(lh), gh,
                               heads_view<float>::bhtd(dq.data(), batch, H, n, D),
                               heads_view<float>::bthd(dk.data(), batch, n, HK, D),
                               heads_view<float>::bthd(dv.data(), batch, n, HK, D), pos, pos, enc, p, grads_for(table));
    bool same = true;
    for (index_t b = 0; b < batch; ++b) {
      auto dense = [&](const std::vector<float>& buf, heads_view<const float> h) {
        mat<float> m(n, h.heads * D);
        for (index_t t = 0; t < n; ++t)
          for (index_t hh = 0; hh < h.heads; ++hh)
            for (index_t c = 0; c < D; ++c) m(t, hh * D + c) = *(buf.data() + (h.at(b, t, hh) - h.data) + c);
        return m;
      };
      const mat<float> qm = dense(q, qh), km = dense(k, kh), vm = dense(v, vh), gm = dense(dout, gh),
                       om = dense(out, oh);
      mat<float> lm(n, H), dqm(n, H * D), dkm(n, HK * D), dvm(n, HK * D);
      for (index_t t = 0; t < n; ++t)
        for (index_t hh = 0; hh < H; ++hh) lm(t, hh) = lse[static_cast<std::size_t>((b * H + hh) * n + t)];
      posenc::attention_backward(qm, km, vm, om, lm, gm, dqm, dkm, dvm, pos, pos, enc, p, grads_for(table_items));
      same = same && dqm == dense(dq, heads_view<const float>::bhtd(dq.data(), batch, H, n, D)) &&
             dkm == dense(dk, heads_view<const float>::bthd(dk.data(), batch, n, HK, D)) &&
             dvm == dense(dv, heads_view<const float>::bthd(dv.data(), batch, n, HK, D));
    }
    CHECK(same);
    CHECK(table == table_items);  // the items' sums in the same order
  };
  run(rope, [](mat<float>&) { return posenc::parameter_gradients<posenc::rope<float>>{}; });
  run(t5, [](mat<float>& t) {
    return posenc::parameter_gradients<posenc::t5_relative_bias<float>>{.table = posenc::view_of(t)};
  });
  // Shapes that do not fit.
  std::vector<float> lse(static_cast<std::size_t>(batch * H * n)), dq(q.size()), dk(k.size());
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(posenc::attention_backward(qh, kh, vh, qh, heads_view<const float>(lse.data(), batch, n, H, 1, H * n, 1, n), gh,
                                               heads_view<float>::bhtd(dq.data(), batch, H, n, D),
                                               heads_view<float>::bthd(dk.data(), batch, n, HK, D),
                                               heads_view<float>::bthd(dk.data(), batch, n - 1, HK, D), pos, pos, rope, p),
                    Contains("dv is [batch, tokens, heads, head_dim] = [2, 28"));
}
