// Chunked attention (Llama 4's attention_chunk_size): the mask rule against the formula, and every
// attention path (blockwise, varlen, ring) against a double-precision reference written here.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "posenc/attention/batch.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/distributed/ring.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::position;

namespace {

__extension__ typedef __int128 i128;

// floor(a / b) for b > 0, in 128-bit arithmetic, so that it is right for every int64.
i128 floor_div(i128 a, i128 b) {
  i128 q = a / b;
  if (a % b != 0 && a < 0) --q;
  return q;
}

// The rule of attention_params written from its documentation, in 128-bit arithmetic.
bool ref_visible(const posenc::attention_params& p, position q, position k) {
  const i128 Q = q, K = k;
  if (p.causal && K > Q) return false;
  if (p.window_left >= 0 && K < Q - p.window_left) return false;
  if (p.window_right >= 0 && K > Q + p.window_right) return false;
  if (p.chunk_size && floor_div(K, *p.chunk_size) != floor_div(Q, *p.chunk_size)) return false;
  return true;
}

// Naive attention in double over the rule above: out[i] = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j
// over the visible keys, zeros for a row that sees none.
posenc::row_matrix<double> ref_attention(const posenc::row_matrix<float>& q, const posenc::row_matrix<float>& k,
                                         const posenc::row_matrix<float>& v, const std::vector<position>& qp,
                                         const std::vector<position>& kp, const posenc::attention_params& p) {
  const index_t heads = p.heads, kvh = p.kv_heads == 0 ? p.heads : p.kv_heads, d = q.cols() / heads;
  posenc::row_matrix<double> out = posenc::row_matrix<double>::Zero(q.rows(), q.cols());
  for (index_t h = 0; h < heads; ++h) {
    const index_t g = h / (heads / kvh);
    for (index_t i = 0; i < q.rows(); ++i) {
      std::vector<double> s(static_cast<std::size_t>(k.rows()), -std::numeric_limits<double>::infinity());
      double m = -std::numeric_limits<double>::infinity();
      for (index_t j = 0; j < k.rows(); ++j) {
        if (!ref_visible(p, qp[static_cast<std::size_t>(i)], kp[static_cast<std::size_t>(j)])) continue;
        double dot = 0;
        for (index_t c = 0; c < d; ++c) dot += double(q(i, h * d + c)) * double(k(j, g * d + c));
        s[static_cast<std::size_t>(j)] = dot / std::sqrt(double(d));
        m = std::max(m, s[static_cast<std::size_t>(j)]);
      }
      if (std::isinf(m)) continue;
      double sum = 0;
      for (index_t j = 0; j < k.rows(); ++j) {
        const double w = std::exp(s[static_cast<std::size_t>(j)] - m);
        if (w == 0) continue;
        sum += w;
        for (index_t c = 0; c < d; ++c) out(i, h * d + c) += w * double(v(j, g * d + c));
      }
      for (index_t c = 0; c < d; ++c) out(i, h * d + c) /= sum;
    }
  }
  return out;
}

std::vector<position> iota_positions(position start, index_t n) {
  std::vector<position> p(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) p[static_cast<std::size_t>(i)] = start + i;
  return p;
}

constexpr double k_tol = 2e-5;  // float attention of O(1) values against the double reference

void check_close(const posenc::row_matrix<float>& got, const posenc::row_matrix<double>& ref) {
  index_t where = -1;
  const double e = posenc_test::max_abs_diff(got, ref, &where);
  INFO("worst error " << e << " at flat index " << where);
  CHECK(e <= k_tol);
}

}  // namespace

TEST_CASE("chunk mask: keys_for, visible, any/all_visible and queries_for equal the formula",
          "[attention][chunk][mask]") {
  const position big = std::numeric_limits<position>::max(), small = std::numeric_limits<position>::min();
  for (position chunk : {1, 3, 4, 7}) {
    for (int variant = 0; variant < 4; ++variant) {
      posenc::attention_params p{.causal = variant != 1, .chunk_size = chunk};
      if (variant == 2) p.window_left = 2;
      if (variant == 3) p.causal = false, p.window_left = 5, p.window_right = 1;
      const posenc::detail::mask_rule m = posenc::detail::mask_rule_of(p);
      INFO("chunk " << chunk << " variant " << variant);
      for (position base : {position{-20}, position{0}, big - 40, small + 1}) {
        for (position q = base; q < base + 30; ++q) {
          for (position k = base; k < base + 30; ++k) {
            INFO("q " << q << " k " << k);
            REQUIRE(m.visible(q, k) == ref_visible(p, q, k));
          }
        }
        // Tile tests over every pair of spans of a small box, against the brute force.
        for (position qlo = base; qlo < base + 12; ++qlo)
          for (position qhi = qlo; qhi < base + 12; qhi += 3)
            for (position klo = base; klo < base + 12; klo += 2)
              for (position khi = klo; khi < base + 12; khi += 3) {
                bool any = false, all = true;
                for (position q = qlo; q <= qhi; ++q)
                  for (position k = klo; k <= khi; ++k) {
                    const bool vis = ref_visible(p, q, k);
                    any = any || vis;
                    all = all && vis;
                  }
                INFO("q [" << qlo << ", " << qhi << "] k [" << klo << ", " << khi << "]");
                REQUIRE(m.any_visible({qlo, qhi}, {klo, khi}) == any);
                REQUIRE(m.all_visible({qlo, qhi}, {klo, khi}) == all);
                // queries_for is exact: q inside it iff q sees some key of [klo, khi].
                const posenc::detail::position_span seeing = m.queries_for(klo, khi);
                for (position q = base; q < base + 24; ++q) {
                  bool sees = false;
                  for (position k = klo; k <= khi; ++k) sees = sees || ref_visible(p, q, k);
                  REQUIRE((q >= seeing.lo && q <= seeing.hi) == sees);
                }
              }
      }
    }
  }
  // The chunks at the ends of the int64 range are clamped, not overflowed.
  const posenc::detail::mask_rule m{.causal = false, .chunk = 3};
  CHECK(m.visible(small, small + 1));
  CHECK(m.visible(big, big - 1));
  CHECK(m.keys_for(small).lo == small);
  CHECK(m.keys_for(big).hi == big);
}

TEST_CASE("chunked attention: blockwise equals the reference for tile sizes, GQA, windows and decode",
          "[attention][chunk][blockwise]") {
  const posenc::no_position<float> none;
  for (position chunk : {1, 5, 16, 64, 1000}) {
    for (index_t tile : {1, 7, 16, 64}) {
      for (int variant = 0; variant < 3; ++variant) {
        const index_t n = tile == 1 ? 40 : 150;
        posenc::attention_params p{
            .heads = 4, .kv_heads = 2, .causal = variant != 1, .chunk_size = chunk, .q_tile = tile, .k_tile = tile};
        if (variant == 2) p.window_left = 9;
        INFO("chunk " << chunk << " tile " << tile << " variant " << variant);
        const auto q = posenc_test::random_normal<float>(n, 4 * 16, 1);
        const auto k = posenc_test::random_normal<float>(n, 2 * 16, 2);
        const auto v = posenc_test::random_normal<float>(n, 2 * 16, 3);
        const auto pos = iota_positions(7, n);  // chunks not aligned to the first token
        posenc::row_matrix<float> out(n, 4 * 16);
        posenc::attention(q, k, v, out, posenc::positions(pos), posenc::positions(pos), none, p);
        check_close(out, ref_attention(q, k, v, pos, pos, p));
      }
    }
  }
  // Decode: 1..16 queries at the end of a 700-token cache, chunk boundaries among them.
  for (index_t nq : {1, 3, 16}) {
    const posenc::attention_params p{.heads = 4, .kv_heads = 1, .causal = true, .chunk_size = 256};
    const auto q = posenc_test::random_normal<float>(nq, 4 * 32, 4);
    const auto k = posenc_test::random_normal<float>(700, 32, 5);
    const auto v = posenc_test::random_normal<float>(700, 32, 6);
    const auto qp = iota_positions(700 - nq - 188, nq), kp = iota_positions(0, 700);
    posenc::row_matrix<float> out(nq, 4 * 32);
    posenc::attention(q, k, v, out, posenc::positions(qp), posenc::positions(kp), none, p);
    INFO("decode " << nq);
    check_close(out, ref_attention(q, k, v, qp, kp, p));
  }
}

TEST_CASE("chunked attention: keys outside every query's chunk are never read", "[attention][chunk][blockwise]") {
  // Queries of the last chunk; every key and value of the earlier chunks is NaN. Tiles of those
  // chunks are skipped whole, so the output is finite and equals the reference on the last chunk.
  const posenc::no_position<float> none;
  const position chunk = 64;
  const index_t n = 4 * chunk;
  auto k = posenc_test::random_normal<float>(n, 16, 8);
  auto v = posenc_test::random_normal<float>(n, 16, 9);
  const auto q = posenc_test::random_normal<float>(chunk, 16, 7);
  const auto kp = iota_positions(0, n), qp = iota_positions(3 * chunk, chunk);
  const auto k_clean = k, v_clean = v;
  k.topRows(3 * chunk).setConstant(std::numeric_limits<float>::quiet_NaN());
  v.topRows(3 * chunk).setConstant(std::numeric_limits<float>::quiet_NaN());
  for (index_t tile : {16, 32, 64}) {
    for (bool causal : {true, false}) {
      const posenc::attention_params p{.causal = causal, .chunk_size = chunk, .q_tile = tile, .k_tile = tile};
      posenc::row_matrix<float> out(chunk, 16);
      posenc::attention(q, k, v, out, posenc::positions(qp), posenc::positions(kp), none, p);
      INFO("tile " << tile << " causal " << causal);
      CHECK(out.allFinite());
      check_close(out, ref_attention(q, k_clean, v_clean, qp, kp, p));
    }
  }
}

TEST_CASE("chunked attention: varlen and ring equal the reference", "[attention][chunk][batch][ring]") {
  const posenc::no_position<float> none;
  // Two packed sequences of 90 and 130 tokens, each numbered from 0, chunks of 32.
  const std::vector<std::int32_t> cu{0, 90, 220};
  const auto q = posenc_test::random_normal<float>(220, 2 * 16, 11);
  const auto k = posenc_test::random_normal<float>(220, 16, 12);
  const auto v = posenc_test::random_normal<float>(220, 16, 13);
  std::vector<position> pos = iota_positions(0, 90);
  const auto second = iota_positions(0, 130);
  pos.insert(pos.end(), second.begin(), second.end());
  const posenc::attention_params p{
      .heads = 2, .kv_heads = 1, .causal = true, .chunk_size = 32, .q_tile = 16, .k_tile = 16};
  posenc::row_matrix<float> out(220, 2 * 16);
  posenc::attention_varlen(q, k, v, out, cu, cu, posenc::positions(pos), posenc::positions(pos), none, p);
  posenc::row_matrix<double> ref(220, 2 * 16);
  for (std::size_t b = 0; b < 2; ++b) {
    const index_t s = cu[b], len = cu[b + 1] - cu[b];
    const std::vector<position> bp(pos.begin() + s, pos.begin() + s + len);
    ref.middleRows(s, len) = ref_attention(q.middleRows(s, len), k.middleRows(s, len), v.middleRows(s, len), bp, bp, p);
  }
  {
    INFO("varlen");
    check_close(out, ref);
  }

  // Ring over 4 simulated ranks, contiguous and zigzag shards.
  const index_t n = 256;
  const auto rq = posenc_test::random_normal<float>(n, 2 * 16, 14);
  const auto rk = posenc_test::random_normal<float>(n, 16, 15);
  const auto rv = posenc_test::random_normal<float>(n, 16, 16);
  const auto rp = iota_positions(0, n);
  for (auto layout : {posenc::ring_layout::contiguous, posenc::ring_layout::zigzag}) {
    posenc::row_matrix<float> rout(n, 2 * 16);
    posenc::ring_attention_simulate(
        rq, rk, rv, rout, 4, layout, none,
        posenc::attention_params{.heads = 2, .kv_heads = 1, .causal = true, .chunk_size = 48});
    INFO("ring, layout " << int(layout));
    check_close(rout, ref_attention(rq, rk, rv, rp, rp, {.heads = 2, .kv_heads = 1, .causal = true, .chunk_size = 48}));
  }
}

TEST_CASE("chunked attention: paged attention equals the reference", "[attention][chunk][batch]") {
  // Two sequences of 40 and 70 tokens in shuffled pages of 16 rows; the last 3 tokens of each
  // attend with chunks of 16. Cache rows no sequence uses are NaN.
  const posenc::no_position<float> none;
  const index_t page = 16, per_seq = 5, d = 16;
  const std::vector<std::int32_t> table{3, 0, 7, 0, 0, 1, 5, 2, 6, 4}, lengths{40, 70}, cu_q{0, 3, 6};
  posenc::row_matrix<float> kc =
      posenc::row_matrix<float>::Constant(8 * page, d, std::numeric_limits<float>::quiet_NaN());
  posenc::row_matrix<float> vc = kc;
  std::vector<posenc::row_matrix<float>> ks, vs;
  for (std::size_t b = 0; b < 2; ++b) {
    ks.push_back(posenc_test::random_normal<float>(lengths[b], d, static_cast<unsigned>(20 + b)));
    vs.push_back(posenc_test::random_normal<float>(lengths[b], d, static_cast<unsigned>(30 + b)));
    for (index_t t = 0; t < lengths[b]; ++t) {
      const index_t row = table[b * per_seq + static_cast<std::size_t>(t / page)] * page + t % page;
      kc.row(row) = ks[b].row(t);
      vc.row(row) = vs[b].row(t);
    }
  }
  const auto q = posenc_test::random_normal<float>(6, 2 * d, 40);
  const std::vector<position> qpos{37, 38, 39, 67, 68, 69};
  const posenc::paged_kv<const float> cache{posenc::view_of(std::as_const(kc)),
                                            posenc::view_of(std::as_const(vc)),
                                            page,
                                            table,
                                            per_seq,
                                            lengths,
                                            {},
                                            posenc::cached_keys::raw};
  const posenc::attention_params p{.heads = 2, .kv_heads = 1, .causal = true, .chunk_size = 16};
  posenc::row_matrix<float> out(6, 2 * d);
  posenc::paged_attention(q, cache, out, cu_q, posenc::positions(qpos), none, p);
  posenc::row_matrix<double> ref(6, 2 * d);
  for (std::size_t b = 0; b < 2; ++b) {
    const std::vector<position> qp(qpos.begin() + 3 * static_cast<std::ptrdiff_t>(b),
                                   qpos.begin() + 3 * static_cast<std::ptrdiff_t>(b) + 3);
    ref.middleRows(3 * static_cast<index_t>(b), 3) =
        ref_attention(q.middleRows(3 * static_cast<index_t>(b), 3), ks[b], vs[b], qp, iota_positions(0, lengths[b]), p);
  }
  CHECK(out.allFinite());
  check_close(out, ref);
}

TEST_CASE("chunked attention: a chunk size <= 0 is refused, naming the field", "[attention][chunk][errors]") {
  const posenc::no_position<float> none;
  const auto x = posenc_test::random_normal<float>(4, 16, 1);
  posenc::row_matrix<float> out(4, 16);
  for (position bad : {position{0}, position{-1}, std::numeric_limits<position>::min()}) {
    const posenc::attention_params p{.causal = true, .chunk_size = bad};
    CHECK_INVALID(posenc::attention(x, x, x, out, posenc::arange(0, 4), posenc::arange(0, 4), none, p),
                  "attention_params.chunk_size");
  }
}
