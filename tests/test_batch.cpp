// The engine step (attention/batch.hpp): batches of sequences packed FlashAttention-style, over
// packed keys or a paged KV cache, against one double-precision reference call per sequence;
// appending into the cache; soft-capping and sinks against their formulas; errors for bad block
// tables and lengths.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <variant>
#include <vector>

#include "posenc/attention/batch.hpp"
#include "posenc/attention/merge.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/distributed/ring.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/executor.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::position;
template <class T>
using mat = posenc::row_matrix<T>;

namespace {

constexpr index_t heads = 4, kv_heads = 2, d = 16;

// Float results against the double reference: the kernel's float rounding over at most a few
// thousand keys, on O(1) outputs (the same bound the single-sequence tests use).
constexpr double tolerance = 2e-5;

// One sequence of a batch: its queries sit at the last n_q positions of its n_kv keys (a prefill
// chunk when n_q is large, decode when small).
struct seq_spec {
  index_t n_q, n_kv;
};

std::vector<seq_spec> random_batch(std::mt19937& rng, index_t count, index_t max_len, index_t max_chunk = 1 << 30) {
  std::uniform_int_distribution<index_t> len(1, max_len);
  std::vector<seq_spec> out;
  for (index_t b = 0; b < count; ++b) {
    const index_t n_kv = len(rng);
    // Half decode (1-4 tokens, speculative), half prefill chunks (the last tokens of the sequence).
    const index_t n_q = (rng() % 2) ? std::min<index_t>(n_kv, 1 + static_cast<index_t>(rng() % 4))
                                    : std::uniform_int_distribution<index_t>(1, std::min(n_kv, max_chunk))(rng);
    out.push_back({n_q, n_kv});
  }
  return out;
}

std::vector<std::int32_t> cumulative(const std::vector<seq_spec>& s, bool keys) {
  std::vector<std::int32_t> cu{0};
  for (const auto& x : s) cu.push_back(cu.back() + static_cast<std::int32_t>(keys ? x.n_kv : x.n_q));
  return cu;
}

// The encoders of every family in float (the call) and double (the reference).
template <class F>
void for_each_encoder(F&& f) {
  f("none", posenc::no_position<float>{}, posenc::no_position<double>{});
  const posenc::rope_params rp{.head_dim = d, .base = 10000.0};
  f("rope", posenc::rope<float>(rp), posenc::rope<double>(rp));
  const posenc::alibi_params ap{.num_heads = heads};
  f("alibi", posenc::alibi<float>(ap), posenc::alibi<double>(ap));
  const posenc::t5_bias_params tp{.num_heads = heads, .num_buckets = 16, .max_distance = 64};
  const auto table = posenc_test::random_normal<double>(16, heads, 7);
  f("t5", posenc::t5_relative_bias<float>(tp, mat<float>(table.cast<float>())),
    posenc::t5_relative_bias<double>(tp, table));
  const posenc::shaw_params sp{.head_dim = d, .max_relative_position = 5};
  const auto ak = posenc_test::random_normal<double>(11, d, 8, 0.3), av = posenc_test::random_normal<double>(11, d, 9, 0.3);
  f("shaw", posenc::shaw_relative<float>(sp, mat<float>(ak.cast<float>()), mat<float>(av.cast<float>())),
    posenc::shaw_relative<double>(sp, ak, av));
}

// The reference for one sequence: rows [q0, q0 + n_q) of `q` against its keys, in double.
template <class ED>
void reference_rows(const mat<double>& q, const mat<double>& k, const mat<double>& v, index_t q0, index_t n_q,
                    index_t k0, index_t n_kv, posenc::positions qp, posenc::positions kp, const ED& enc,
                    const posenc::attention_params& p, mat<double>& out, mat<double>& lse) {
  mat<double> o(n_q, heads * d), l(n_q, heads);
  const mat<double> qs = q.middleRows(q0, n_q), ks = k.middleRows(k0, n_kv), vs = v.middleRows(k0, n_kv);
  posenc::attention_params pr = p;
  pr.executor = nullptr;
  posenc::attention_reference(qs, ks, vs, o, qp, kp, enc, pr, l);
  out.middleRows(q0, n_q) = o;
  lse.middleRows(q0, n_q) = l;
}

double max_diff(const mat<float>& got, const mat<double>& want) {
  double worst = 0;
  for (index_t i = 0; i < got.size(); ++i) {
    const double g = got.data()[i], w = want.data()[i];
    if (std::isinf(w) && g == w) continue;
    const double e = std::abs(g - w);
    if (!(e <= worst)) worst = e;  // NaN counts as the worst
  }
  return worst;
}

bool same_bits(const mat<float>& a, const mat<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("varlen: a batch equals one reference call per sequence, every encoder and mask", "[batch][varlen]") {
  std::mt19937 rng(2026);
  for (int trial = 0; trial < 6; ++trial) {
    // Up to 16 short sequences, then 32 of up to 5000 tokens.
    const bool large = trial == 5;
    const auto batch = random_batch(rng, large ? 32 : 1 + trial * 3, large ? 5000 : 300, large ? 200 : 1 << 30);
    const auto cu_q = cumulative(batch, false), cu_k = cumulative(batch, true);
    const index_t total_q = cu_q.back(), total_k = cu_k.back();
    const auto qd = posenc_test::random_normal<double>(total_q, heads * d, 100 + trial);
    const auto kd = posenc_test::random_normal<double>(total_k, kv_heads * d, 200 + trial);
    const auto vd = posenc_test::random_normal<double>(total_k, kv_heads * d, 300 + trial);
    const mat<float> q = qd.cast<float>(), k = kd.cast<float>(), v = vd.cast<float>();
    // Each sequence numbers its own tokens from an offset of its own; queries are its last tokens.
    std::vector<position> qpos, kpos;
    for (std::size_t b = 0; b < batch.size(); ++b) {
      const position offset = static_cast<position>(b) * 1000 - 7;
      for (index_t j = 0; j < batch[b].n_kv; ++j) kpos.push_back(offset + j);
      for (index_t i = 0; i < batch[b].n_q; ++i) qpos.push_back(offset + batch[b].n_kv - batch[b].n_q + i);
    }
    for (const posenc::attention_params& p :
         {posenc::attention_params{.heads = heads, .kv_heads = kv_heads, .causal = true},
          posenc::attention_params{.heads = heads, .kv_heads = kv_heads, .causal = true, .window_left = 37},
          posenc::attention_params{.heads = heads, .kv_heads = kv_heads, .window_left = 20, .window_right = 9}}) {
      if (large && !p.causal) continue;
      if (large && p.window_left >= 0) continue;
      for_each_encoder([&](const char* name, const auto& ef, const auto& ed) {
        mat<float> out(total_q, heads * d), lse(total_q, heads);
        posenc::attention_varlen(q, k, v, out, cu_q, cu_k, posenc::positions(qpos), posenc::positions(kpos), ef, p,
                                 lse);
        mat<double> want(total_q, heads * d), want_lse(total_q, heads);
        for (std::size_t b = 0; b < batch.size(); ++b)
          reference_rows(qd, kd, vd, cu_q[b], batch[b].n_q, cu_k[b], batch[b].n_kv,
                         posenc::positions(std::span<const position>(qpos.data() + cu_q[b], batch[b].n_q)),
                         posenc::positions(std::span<const position>(kpos.data() + cu_k[b], batch[b].n_kv)), ed, p,
                         want, want_lse);
        INFO(name << ", trial " << trial << ", " << batch.size() << " sequences, causal " << p.causal << " window ("
                  << p.window_left << ", " << p.window_right << ")");
        CHECK(max_diff(out, want) <= tolerance);
        CHECK(max_diff(lse, want_lse) <= tolerance);
      });
    }
  }
}

namespace {

// A paged cache of float (or bf16/fp16) pages filled by paged_append from the logical K/V of each
// sequence, with shuffled pages and NaN in every page no block table reaches.
template <class S>
struct paged_fixture {
  index_t page_size, pages_per_seq, num_pages;
  std::vector<std::int32_t> table, lengths;
  mat<S> kc, vc;
  std::vector<seq_spec> batch;
  mat<double> kd, vd;  // logical keys and values, sequences one after another
  std::vector<std::int32_t> cu_k;

  paged_fixture(std::mt19937& rng, std::vector<seq_spec> b, index_t ps) : page_size(ps), batch(std::move(b)) {
    index_t longest = 0;
    for (const auto& s : batch) longest = std::max(longest, s.n_kv);
    pages_per_seq = (longest + ps - 1) / ps + 1;  // one spare block per sequence
    num_pages = static_cast<index_t>(batch.size()) * pages_per_seq + 3;
    std::vector<std::int32_t> order(static_cast<std::size_t>(num_pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    table.assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(batch.size() * pages_per_seq));
    kc = mat<S>::Constant(num_pages * ps, kv_heads * d, S(std::numeric_limits<float>::quiet_NaN()));
    vc = kc;
    cu_k = cumulative(batch, true);
    kd = posenc_test::random_normal<double>(cu_k.back(), kv_heads * d, 400);
    vd = posenc_test::random_normal<double>(cu_k.back(), kv_heads * d, 401);
    for (const auto& s : batch) lengths.push_back(static_cast<std::int32_t>(s.n_kv));
  }

  posenc::paged_kv<S> cache(posenc::cached_keys keys) {
    return {posenc::view_of(kc), posenc::view_of(vc), page_size, table, pages_per_seq, lengths, {}, keys};
  }

  // Appends every sequence's keys in two steps (all but its last token, then the last), as an
  // engine fills its cache over prefill and decode.
  template <class E>
  void fill(const E& enc, posenc::cached_keys keys) {
    const mat<float> kf = kd.cast<float>(), vf = vd.cast<float>();
    std::vector<std::int32_t> saved = lengths;
    for (int step = 0; step < 2; ++step) {
      std::vector<std::int32_t> cu{0};
      std::vector<index_t> rows;
      for (std::size_t b = 0; b < batch.size(); ++b) {
        const index_t n = batch[b].n_kv, first = step == 0 ? 0 : n - 1, count = step == 0 ? n - 1 : 1;
        lengths[b] = static_cast<std::int32_t>(first + count);
        for (index_t t = 0; t < count; ++t) rows.push_back(cu_k[b] + first + t);
        cu.push_back(cu.back() + static_cast<std::int32_t>(count));
      }
      mat<float> kn(static_cast<index_t>(rows.size()), kv_heads * d), vn(kn.rows(), kn.cols());
      for (std::size_t r = 0; r < rows.size(); ++r) kn.row(r) = kf.row(rows[r]), vn.row(r) = vf.row(rows[r]);
      posenc::paged_append(cache(keys), kn, vn, cu, enc);
    }
    lengths = saved;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("paged: a batch over shuffled pages equals one reference call per sequence", "[batch][paged]",
                   float, Eigen::bfloat16, Eigen::half) {
  using S = TestType;
  std::mt19937 rng(7);
  for (const index_t page_size : {1, 3, 16, 64}) {
    paged_fixture<S> fx(rng, random_batch(rng, 7, page_size == 1 ? 150 : 600), page_size);
    // The cache's values as stored (bf16/fp16 round them), for the reference.
    const mat<double> kq = fx.kd.template cast<float>().template cast<S>().template cast<double>();
    const mat<double> vq = fx.vd.template cast<float>().template cast<S>().template cast<double>();
    const auto cu_q = cumulative(fx.batch, false);
    const index_t total_q = cu_q.back();
    const auto qd = posenc_test::random_normal<double>(total_q, heads * d, 500);
    const mat<float> q = qd.cast<float>();
    std::vector<position> qpos;
    for (const auto& s : fx.batch)
      for (index_t i = 0; i < s.n_q; ++i) qpos.push_back(s.n_kv - s.n_q + i);
    const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true};
    for_each_encoder([&](const char* name, const auto& ef, const auto& ed) {
      using EF = std::remove_cvref_t<decltype(ef)>;
      // Rotated when appended for RoPE (what engines keep); the other encoders store keys as given.
      const auto keys = posenc::rotation<EF> ? posenc::cached_keys::rotated : posenc::cached_keys::raw;
      fx.fill(ef, keys);
      mat<float> out(total_q, heads * d), lse(total_q, heads);
      posenc::paged_attention(q, fx.cache(keys), out, cu_q, posenc::positions(qpos), ef, p, lse);
      mat<double> want(total_q, heads * d), want_lse(total_q, heads);
      // The reference rotates the raw stored values itself (for RoPE the cache holds rotated ones).
      const mat<double> kref = posenc::rotation<EF> ? mat<double>(fx.kd.template cast<float>().template cast<double>())
                                                     : kq;
      for (std::size_t b = 0; b < fx.batch.size(); ++b)
        reference_rows(qd, kref, vq, cu_q[b], fx.batch[b].n_q, fx.cu_k[b], fx.batch[b].n_kv,
                       posenc::positions(std::span<const position>(qpos.data() + cu_q[b], fx.batch[b].n_q)),
                       posenc::arange(0, fx.batch[b].n_kv), ed, p, want, want_lse);
      INFO(name << ", page size " << page_size);
      // Rotated keys rounded to bf16/fp16 after rotation differ from rotating rounded keys.
      const double tol = std::same_as<S, float> ? tolerance : (posenc::rotation<EF> ? 2e-2 : tolerance);
      CHECK(max_diff(out, want) <= tol);
      CHECK(max_diff(lse, want_lse) <= tol);
      CHECK(out.allFinite());  // the NaN pages no table reaches were never read
    });
  }
}

TEST_CASE("paged: raw keys rotated by the call equal keys rotated when appended", "[batch][paged][rope]") {
  std::mt19937 rng(11);
  paged_fixture<float> rotated(rng, random_batch(rng, 5, 400), 16), raw = rotated;
  const posenc::rope<float> rope({.head_dim = d, .base = 500000.0});
  rotated.fill(rope, posenc::cached_keys::rotated);
  raw.fill(rope, posenc::cached_keys::raw);
  const auto cu_q = cumulative(rotated.batch, false);
  const mat<float> q = posenc_test::random_normal<float>(cu_q.back(), heads * d, 600);
  std::vector<position> qpos;
  for (const auto& s : rotated.batch)
    for (index_t i = 0; i < s.n_q; ++i) qpos.push_back(s.n_kv - s.n_q + i);
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true};
  mat<float> a(q.rows(), q.cols()), b(q.rows(), q.cols());
  posenc::paged_attention(q, rotated.cache(posenc::cached_keys::rotated), a, cu_q, posenc::positions(qpos), rope, p);
  posenc::paged_attention(q, raw.cache(posenc::cached_keys::raw), b, cu_q, posenc::positions(qpos), rope, p);
  CHECK((a - b).cwiseAbs().maxCoeff() <= 2e-5f);
  // Keys rotated twice would be a different computation: the cache says which it holds, and a
  // rotation encoder with a cache that does not say is refused.
  CHECK_INVALID(posenc::paged_attention(q, rotated.cache(posenc::cached_keys::unspecified), a, cu_q,
                                        posenc::positions(qpos), rope, p),
                "paged_kv.keys");
  CHECK_INVALID(posenc::paged_append(raw.cache(posenc::cached_keys::unspecified), mat<float>(0, kv_heads * d),
                                     mat<float>(0, kv_heads * d), std::vector<std::int32_t>(6, 0), rope),
                "paged_kv.keys");
}

TEST_CASE("paged_append stores what rotating and storing by hand stores", "[batch][paged][rope]") {
  const posenc::rope<float> rope({.head_dim = d});
  const index_t page_size = 4;
  mat<Eigen::half> kc = mat<Eigen::half>::Zero(4 * page_size, kv_heads * d), vc = kc;
  const std::vector<std::int32_t> table{2, 0, 3, 1}, lengths{7, 5};  // two sequences of two pages
  const posenc::paged_kv<Eigen::half> cache{posenc::view_of(kc), posenc::view_of(vc), page_size, table, 2, lengths,
                                           {}, posenc::cached_keys::rotated};
  // Sequence 0 appends tokens 4..6, sequence 1 token 4.
  const mat<float> kn = posenc_test::random_normal<float>(4, kv_heads * d, 1),
                   vn = posenc_test::random_normal<float>(4, kv_heads * d, 2);
  const std::vector<std::int32_t> cu{0, 3, 4};
  posenc::paged_append(cache, kn, vn, cu, rope);
  struct where {
    index_t row_new, token, page_row;
  };
  // Token t of sequence b: page table[b * 2 + t / 4], row t % 4.
  for (const where w : {where{0, 4, 0 * page_size + 0}, where{1, 5, 0 * page_size + 1},
                        where{2, 6, 0 * page_size + 2}, where{3, 4, 1 * page_size + 0}}) {
    mat<float> by_hand = kn.row(w.row_new);
    rope.rotate(by_hand, posenc::arange(w.token, 1));
    for (index_t c = 0; c < kv_heads * d; ++c) {
      CHECK(kc(w.page_row, c) == Eigen::half(by_hand(0, c)));
      CHECK(vc(w.page_row, c) == Eigen::half(vn(w.row_new, c)));
    }
  }
  // Rows outside the appended tokens stay untouched.
  CHECK(kc.row(2 * page_size).isZero());
}

TEST_CASE("paged decode: the same bits for 1, 2 and 3 workers", "[batch][paged][executor]") {
  std::mt19937 rng(3);
  std::vector<seq_spec> batch;
  for (const index_t n : {512, 9000, 3000, 17000, 700}) batch.push_back({1, n});
  paged_fixture<float> fx(rng, batch, 128);
  const posenc::rope<float> rope({.head_dim = d});
  fx.fill(rope, posenc::cached_keys::rotated);
  const auto cu_q = cumulative(batch, false);
  const mat<float> q = posenc_test::random_normal<float>(cu_q.back(), heads * d, 700);
  std::vector<position> qpos;
  for (const auto& s : batch) qpos.push_back(s.n_kv - 1);
  posenc::thread_pool pool(3);
  mat<float> first;
  for (const int workers : {1, 2, 3}) {
    mat<float> out(q.rows(), q.cols());
    posenc::paged_attention(q, fx.cache(posenc::cached_keys::rotated), out, cu_q, posenc::positions(qpos), rope,
                            {.heads = heads, .kv_heads = kv_heads, .causal = true, .threads = workers,
                             .executor = &pool});
    if (workers == 1) {
      first = out;
    } else {
      CHECK(same_bits(first, out));
    }
  }
}

TEST_CASE("a contiguous cache is one page per sequence and equals the varlen call", "[batch][paged]") {
  std::mt19937 rng(5);
  const std::vector<seq_spec> batch{{3, 100}, {100, 100}, {1, 260}};
  const auto cu_q = cumulative(batch, false), cu_k = cumulative(batch, true);
  const mat<float> q = posenc_test::random_normal<float>(cu_q.back(), heads * d, 1);
  const mat<float> k = posenc_test::random_normal<float>(cu_k.back(), kv_heads * d, 2);
  const mat<float> v = posenc_test::random_normal<float>(cu_k.back(), kv_heads * d, 3);
  std::vector<position> qpos, kpos;
  for (const auto& s : batch) {
    for (index_t i = 0; i < s.n_q; ++i) qpos.push_back(s.n_kv - s.n_q + i);
    for (index_t j = 0; j < s.n_kv; ++j) kpos.push_back(j);
  }
  // Each sequence's keys at the start of a page of 300 rows.
  const index_t page = 300;
  mat<float> kc = mat<float>::Zero(3 * page, kv_heads * d), vc = kc;
  for (std::size_t b = 0; b < batch.size(); ++b) {
    kc.middleRows(b * page, batch[b].n_kv) = k.middleRows(cu_k[b], batch[b].n_kv);
    vc.middleRows(b * page, batch[b].n_kv) = v.middleRows(cu_k[b], batch[b].n_kv);
  }
  const std::vector<std::int32_t> table{0, 1, 2}, lengths{100, 100, 260};
  const posenc::alibi<float> alibi({.num_heads = heads});
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .softcap = 20, .causal = true};
  mat<float> paged(q.rows(), q.cols()), varlen(q.rows(), q.cols());
  posenc::paged_attention(q, posenc::paged_kv<const float>{posenc::view_of(kc), posenc::view_of(vc), page, table, 1,
                                                          lengths, {}, posenc::cached_keys::raw},
                          paged, cu_q, posenc::positions(qpos), alibi, p);
  posenc::attention_varlen(q, k, v, varlen, cu_q, cu_k, posenc::positions(qpos), posenc::positions(kpos), alibi, p);
  CHECK(same_bits(paged, varlen));
}

TEST_CASE("a rolling cache with sink tokens: positions stored per row, raw keys", "[batch][paged][rope]") {
  // StreamingLLM: 4 sink tokens at the start, then a window of the latest tokens, numbered by
  // their place in the cache; the ring buffer's rows are out of order, the positions say where
  // each token stands. RoPE acts inside the call on raw keys with those positions.
  const index_t sinks = 4, window = 60, page_size = 16;
  const index_t rows = 4 * page_size;  // 64 rows: 4 sinks + 60 window slots
  const mat<float> kc = posenc_test::random_normal<float>(rows, kv_heads * d, 21);
  const mat<float> vc = posenc_test::random_normal<float>(rows, kv_heads * d, 22);
  std::vector<position> row_pos(static_cast<std::size_t>(rows));
  const index_t newest = 23;  // the window's slot that holds the newest token
  for (index_t r = 0; r < sinks; ++r) row_pos[r] = r;
  for (index_t r = 0; r < window; ++r)
    row_pos[sinks + r] = sinks + (r - newest - 1 + 2 * window) % window;  // oldest at newest + 1
  const std::vector<std::int32_t> table{0, 1, 2, 3}, lengths{static_cast<std::int32_t>(rows)};
  const posenc::rope<float> rope({.head_dim = d});
  const mat<float> q = posenc_test::random_normal<float>(1, heads * d, 23);
  const position qp = sinks + window - 1;  // the newest token's place in the cache
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true};
  mat<float> out(1, heads * d);
  posenc::paged_attention(q, posenc::paged_kv<const float>{posenc::view_of(kc), posenc::view_of(vc), page_size, table,
                                                          4, lengths, row_pos, posenc::cached_keys::raw},
                          out, std::vector<std::int32_t>{0, 1}, posenc::arange(qp, 1), rope, p);
  // The same keys in cache order, attended as one sequence with the same positions.
  mat<double> want(1, heads * d), lse(1, heads);
  posenc::attention_reference(q.cast<double>().eval(), kc.cast<double>().eval(), vc.cast<double>().eval(), want,
                              posenc::arange(qp, 1), posenc::positions(row_pos),
                              posenc::rope<double>({.head_dim = d}), p, lse);
  CHECK(max_diff(out, want) <= tolerance);
}

// ---- soft-capping and sinks --------------------------------------------------------------------

namespace {

// Softmax attention of one head in double, written from the formulas: logits scaled, capped
// (c tanh(s / c)), masked causally, and a sink logit z in the denominator with no value.
void capped_with_sink(const mat<double>& q, const mat<double>& k, const mat<double>& v, index_t h, index_t g,
                      double cap, double z, const std::vector<position>& qp, const std::vector<position>& kp,
                      mat<double>& out, mat<double>& lse) {
  for (index_t i = 0; i < q.rows(); ++i) {
    double denom = std::isinf(z) ? 0.0 : std::exp(z);
    Eigen::VectorXd num = Eigen::VectorXd::Zero(d);
    for (index_t j = 0; j < k.rows(); ++j) {
      if (kp[j] > qp[i]) continue;
      double s = q.row(i).segment(h * d, d).dot(k.row(j).segment(g * d, d)) / std::sqrt(double(d));
      if (cap > 0) s = cap * std::tanh(s / cap);
      denom += std::exp(s);
      num += std::exp(s) * v.row(j).segment(g * d, d).transpose();
    }
    out.row(i).segment(h * d, d) = denom > 0 ? Eigen::RowVectorXd(num.transpose() / denom)
                                             : Eigen::RowVectorXd::Zero(d);
    lse(i, h) = std::log(denom);
  }
}

}  // namespace

TEST_CASE("soft-capping and sinks match their formulas: reference, blockwise, decode chunks, varlen",
          "[batch][softcap][sinks]") {
  for (const index_t n_kv : {300, 9000}) {  // 9000 keys against one query splits the keys into chunks
    const index_t n_q = n_kv == 300 ? 300 : 1;
    const auto qd = posenc_test::random_normal<double>(n_q, heads * d, 31, 3.0);  // large logits: the cap acts
    const auto kd = posenc_test::random_normal<double>(n_kv, kv_heads * d, 32, 3.0);
    const auto vd = posenc_test::random_normal<double>(n_kv, kv_heads * d, 33);
    std::vector<position> qp(static_cast<std::size_t>(n_q)), kp(static_cast<std::size_t>(n_kv));
    for (index_t j = 0; j < n_kv; ++j) kp[j] = j;
    for (index_t i = 0; i < n_q; ++i) qp[i] = n_kv - n_q + i;
    // A query before every key sees none: only its sink is left.
    qp[0] = -5;
    const std::vector<float> sinks{0.5f, -1.0f, 2.0f, -std::numeric_limits<float>::infinity()};
    for (const double cap : {0.0, 5.0}) {
      const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .softcap = cap, .sinks = sinks,
                                       .causal = true};
      mat<double> want(n_q, heads * d), want_lse(n_q, heads);
      for (index_t h = 0; h < heads; ++h)
        capped_with_sink(qd, kd, vd, h, h / (heads / kv_heads), cap, sinks[h], qp, kp, want, want_lse);
      INFO("n_kv " << n_kv << " cap " << cap);
      mat<double> ref(n_q, heads * d), ref_lse(n_q, heads);
      posenc::attention_reference(qd, kd, vd, ref, posenc::positions(qp), posenc::positions(kp),
                                  posenc::no_position<double>{}, p, ref_lse);
      CHECK((ref - want).cwiseAbs().maxCoeff() <= 1e-12);
      CHECK((ref_lse - want_lse).cwiseAbs().maxCoeff() <= 1e-12);
      const mat<float> q = qd.cast<float>(), k = kd.cast<float>(), v = vd.cast<float>();
      mat<float> out(n_q, heads * d), lse(n_q, heads);
      posenc::attention(q, k, v, out, posenc::positions(qp), posenc::positions(kp), posenc::no_position<float>{}, p,
                        lse);
      CHECK(max_diff(out, want) <= 1e-4);
      CHECK(max_diff(lse, want_lse) <= 1e-4);
      CHECK(out.row(0).isZero());  // no visible key: zeros, and lse the sink
      CHECK(lse(0, 0) == 0.5f);
      CHECK(std::isinf(lse(0, 3)));
      const std::vector<std::int32_t> cu_q{0, static_cast<std::int32_t>(n_q)}, cu_k{0, static_cast<std::int32_t>(n_kv)};
      mat<float> out_v(n_q, heads * d);
      posenc::attention_varlen(q, k, v, out_v, cu_q, cu_k, posenc::positions(qp), posenc::positions(kp),
                               posenc::no_position<float>{}, p);
      CHECK(max_diff(out_v, want) <= 1e-4);
    }
  }
}

// ---- errors ------------------------------------------------------------------------------------

TEST_CASE("bad batches, block tables, lengths and page indices are refused before any work", "[batch][errors]") {
  using Catch::Contains;
  mat<float> kc = mat<float>::Zero(4 * 8, kv_heads * d), vc = kc;
  const mat<float> q = posenc_test::random_normal<float>(3, heads * d, 1);
  mat<float> out(3, heads * d);
  const posenc::no_position<float> none;
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true};
  const std::vector<std::int32_t> cu{0, 2, 3}, table{0, 1, 2, 3}, lengths{10, 5};
  auto cache = [&](std::vector<std::int32_t> const& t, std::vector<std::int32_t> const& l, index_t page = 8) {
    return posenc::paged_kv<float>{posenc::view_of(kc), posenc::view_of(vc), page, t, 2, l, {}, posenc::cached_keys::raw};
  };
  CHECK_NOTHROW(posenc::paged_attention(q, cache(table, lengths), out, cu, posenc::arange(0, 3), none, p));
  CHECK_THROWS_WITH(posenc::paged_attention(q, cache({0, 7, 2, 3}, lengths), out, cu, posenc::arange(0, 3), none, p),
                    Contains("block_table[0][1] = 7 is not a page of the cache (4 pages)"));
  CHECK_THROWS_WITH(posenc::paged_attention(q, cache(table, {10, 17}), out, cu, posenc::arange(0, 3), none, p),
                    Contains("paged_kv.lengths[1] = 17 is outside [0, 16]"));
  CHECK_THROWS_WITH(posenc::paged_attention(q, cache({0, 1, 2}, lengths), out, cu, posenc::arange(0, 3), none, p),
                    Contains("the block table has 3 entries but 2 sequences x 2 pages = 4 are needed"));
  CHECK_THROWS_WITH(posenc::paged_attention(q, cache(table, lengths), out, std::vector<std::int32_t>{0, 3, 2},
                                            posenc::arange(0, 3), none, p),
                    Contains("cu_q must not decrease"));
  CHECK_THROWS_WITH(posenc::paged_attention(q, cache(table, lengths), out, std::vector<std::int32_t>{0, 2, 4},
                                            posenc::arange(0, 3), none, p),
                    Contains("cu_q[2] = 4 but there are 3 rows"));
  CHECK_THROWS_WITH(posenc::paged_attention(q, cache(table, {10}), out, cu, posenc::arange(0, 3), none, p),
                    Contains("paged_kv.lengths has 1 entries for 2 sequences"));
  CHECK_INVALID(posenc::paged_attention(q, cache(table, lengths, 0), out, cu, posenc::arange(0, 3), none, p),
                "paged_kv.page_size = 0");
  // A page past a sequence's length is not checked (and not read): block 1 of sequence 1 is unused.
  CHECK_NOTHROW(posenc::paged_attention(q, cache({0, 1, 2, 99}, lengths), out, cu, posenc::arange(0, 3), none, p));
  // Appending more tokens than a sequence's length holds.
  const mat<float> kn = posenc_test::random_normal<float>(7, kv_heads * d, 2);
  CHECK_THROWS_WITH(posenc::paged_append(cache(table, {3, 5}), kn, kn, std::vector<std::int32_t>{0, 4, 7}, none),
                    Contains("sequence 0 appends 4 tokens but its length is 3"));
  CHECK_INVALID(posenc::attention(q, q, q, out, posenc::arange(0, 3), posenc::arange(0, 3), none,
                                  {.heads = heads, .sinks = std::vector<float>{1.0f}}),
                "attention_params.sinks size");
  CHECK_INVALID(posenc::attention(q, q, q, out, posenc::arange(0, 3), posenc::arange(0, 3), none,
                                  {.heads = heads, .softcap = -1}),
                "attention_params.softcap = -1");
}

TEST_CASE("sinks join once: merged halves with apply_sinks, and ring attention, equal one call", "[batch][sinks][ring]") {
  const index_t n = 200;
  const mat<float> q = posenc_test::random_normal<float>(n, heads * d, 41, 2.0);
  const mat<float> k = posenc_test::random_normal<float>(n, kv_heads * d, 42, 2.0);
  const mat<float> v = posenc_test::random_normal<float>(n, kv_heads * d, 43);
  const std::vector<float> sinks{1.5f, -0.5f, 0.0f, 3.0f};
  const posenc::alibi<float> alibi({.num_heads = heads});
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .softcap = 8, .sinks = sinks, .causal = true};
  mat<float> whole(n, heads * d), whole_lse(n, heads);
  posenc::attention(q, k, v, whole, posenc::arange(0, n), posenc::arange(0, n), alibi, p, whole_lse);
  // Two halves of the keys without sinks, merged, then the sinks once.
  posenc::attention_params halves = p;
  halves.sinks = {};
  mat<float> a(n, heads * d), a_lse(n, heads), b(n, heads * d), b_lse(n, heads);
  posenc::attention(q, k.topRows(n / 2), v.topRows(n / 2), a, posenc::arange(0, n), posenc::arange(0, n / 2), alibi,
                    halves, a_lse);
  posenc::attention(q, k.bottomRows(n / 2), v.bottomRows(n / 2), b, posenc::arange(0, n), posenc::arange(n / 2, n / 2),
                    alibi, halves, b_lse);
  posenc::merge_partial(a, a_lse, b, b_lse);
  posenc::apply_sinks(a, a_lse, sinks);
  CHECK((a - whole).cwiseAbs().maxCoeff() <= 2e-6f);
  CHECK((a_lse - whole_lse).cwiseAbs().maxCoeff() <= 2e-6f);
  // The ring merges its steps and adds the sinks at the end.
  for (const auto layout : {posenc::ring_layout::contiguous, posenc::ring_layout::zigzag}) {
    mat<float> ring(n, heads * d);
    posenc::ring_attention_simulate(q, k, v, ring, 3, layout, alibi, p);
    CHECK((ring - whole).cwiseAbs().maxCoeff() <= 2e-6f);
  }
}
