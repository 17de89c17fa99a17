// Blockwise attention against the double-precision naive reference.
//
// The bar: the blockwise float result is within 2x the error of the naive float path (plus a
// tiny absolute term) of the double reference, for every tile size, length and mask.
#include <catch2/catch.hpp>

#include "support.hpp"
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"

using posenc::index_t;
using posenc::position;

namespace {

constexpr double absolute_slack = 1e-6;  // float outputs are O(1); this is ~8 ulp

template <class T>
posenc::row_matrix<T> random_matrix(index_t r, index_t c, unsigned seed, double amp = 1.0) {
  return posenc_test::random_normal<T>(r, c, seed, amp);
}

struct problem {
  index_t heads = 2, kv_heads = 2, d = 16, n_q = 10, n_kv = 10;
  position q0 = 0;  // first query position; keys start at 0
};

// Runs reference<double>, reference<float> and blockwise<float> on the same inputs.
template <class EF, class ED>
void compare(const problem& pr, const posenc::attention_params& p, const EF& enc_f, const ED& enc_d,
             const std::vector<position>* qpos_list = nullptr, const std::vector<position>* kpos_list = nullptr) {
  const auto qf = random_matrix<float>(pr.n_q, pr.heads * pr.d, 11);
  const auto kf = random_matrix<float>(pr.n_kv, pr.kv_heads * pr.d, 12);
  const auto vf = random_matrix<float>(pr.n_kv, pr.kv_heads * pr.d, 13);
  const posenc::row_matrix<double> qd = qf.cast<double>(), kd = kf.cast<double>(), vd = vf.cast<double>();
  const posenc::positions qp = qpos_list ? posenc::positions(*qpos_list) : posenc::arange(pr.q0, pr.n_q);
  const posenc::positions kp = kpos_list ? posenc::positions(*kpos_list) : posenc::arange(0, pr.n_kv);

  posenc::row_matrix<double> ref(pr.n_q, pr.heads * pr.d), ref_lse(pr.n_q, pr.heads);
  posenc::row_matrix<float> naive(pr.n_q, pr.heads * pr.d), naive_lse(pr.n_q, pr.heads);
  posenc::row_matrix<float> block(pr.n_q, pr.heads * pr.d), block_lse(pr.n_q, pr.heads);
  posenc::attention_reference(qd, kd, vd, ref, qp, kp, enc_d, p, ref_lse);
  posenc::attention_reference(qf, kf, vf, naive, qp, kp, enc_f, p, naive_lse);
  posenc::attention(qf, kf, vf, block, qp, kp, enc_f, p, block_lse);

  index_t wn = -1, wb = -1, ln = -1, lb = -1;
  const double en = posenc_test::max_abs_diff(naive, ref, &wn);
  const double eb = posenc_test::max_abs_diff(block, ref, &wb);
  // lse: -inf rows must match exactly; compare the finite ones.
  for (index_t i = 0; i < ref_lse.size(); ++i) {
    if (std::isinf(ref_lse.data()[i])) {
      CHECK(block_lse.data()[i] == -std::numeric_limits<float>::infinity());
      block_lse.data()[i] = naive_lse.data()[i] = 0;
      ref_lse.data()[i] = 0;
    }
  }
  const double len = posenc_test::max_abs_diff(naive_lse, ref_lse, &ln);
  const double leb = posenc_test::max_abs_diff(block_lse, ref_lse, &lb);
  INFO("heads " << pr.heads << "/" << pr.kv_heads << " d " << pr.d << " n_q " << pr.n_q << " n_kv " << pr.n_kv
                << " q0 " << pr.q0 << " tiles " << p.q_tile << "x" << p.k_tile << " causal " << p.causal
                << " window (" << p.window_left << ", " << p.window_right << ")");
  INFO("out: naive error " << en << ", blockwise error " << eb << " at flat index " << wb);
  CHECK(eb <= 2 * en + absolute_slack);
  INFO("lse: naive error " << len << ", blockwise error " << leb << " at flat index " << lb);
  CHECK(leb <= 2 * len + absolute_slack);
}

}  // namespace

TEST_CASE("blockwise equals the reference for every tile size, length and mask", "[attention][blockwise]") {
  const posenc::no_position<float> none_f;
  const posenc::no_position<double> none_d;
  for (index_t tile : {1, 7, 16, 64, 128}) {
    for (index_t n : {index_t{1}, std::max<index_t>(tile - 1, 1), tile, tile + 1, index_t{1000}}) {
      if (tile == 1 && n == 1000) continue;  // 10^6 single-element tiles add time, not coverage
      problem pr{.heads = 2, .kv_heads = 1, .d = 16, .n_q = n, .n_kv = n};
      for (int mask = 0; mask < 3; ++mask) {
        posenc::attention_params p{.heads = 2, .kv_heads = 1, .q_tile = tile, .k_tile = tile};
        if (mask == 1) p.causal = true;
        if (mask == 2) p.causal = true, p.window_left = 37;
        compare(pr, p, none_f, none_d);
      }
    }
  }
}

TEST_CASE("blockwise: GQA, MQA, decode at the end of a cache, two-sided windows", "[attention][blockwise]") {
  const posenc::no_position<float> none_f;
  const posenc::no_position<double> none_d;
  // GQA 8/2 and 8/1, prefill.
  for (index_t kvh : {2, 1}) {
    compare({.heads = 8, .kv_heads = kvh, .d = 32, .n_q = 70, .n_kv = 70},
            {.heads = 8, .kv_heads = kvh, .causal = true, .q_tile = 16, .k_tile = 32}, none_f, none_d);
  }
  // Decode: 1..16 queries at positions 500.. against 516 cached keys, bottom-right aligned.
  for (index_t nq : {1, 3, 16}) {
    compare({.heads = 8, .kv_heads = 2, .d = 32, .n_q = nq, .n_kv = 516, .q0 = 516 - nq},
            {.heads = 8, .kv_heads = 2, .causal = true}, none_f, none_d);
  }
  // Non-causal sliding window on both sides, with tiles that straddle its edges.
  compare({.n_q = 200, .n_kv = 200}, {.heads = 2, .window_left = 20, .window_right = 5, .q_tile = 16, .k_tile = 16},
          none_f, none_d);
}

TEST_CASE("blockwise: arbitrary position sets (zigzag shards, packed order)", "[attention][blockwise]") {
  const posenc::no_position<float> none_f;
  const posenc::no_position<double> none_d;
  // A zigzag shard: chunks 1 and 6 of 8 chunks of 16 tokens; keys are the whole sequence.
  std::vector<position> qp, kp;
  for (position i = 16; i < 32; ++i) qp.push_back(i);
  for (position i = 96; i < 112; ++i) qp.push_back(i);
  for (position i = 0; i < 128; ++i) kp.push_back(i);
  compare({.n_q = 32, .n_kv = 128}, {.heads = 2, .causal = true, .q_tile = 8, .k_tile = 16}, none_f, none_d, &qp,
          &kp);
  // Shuffled keys: tiles are no longer contiguous ranges, masking must still follow positions.
  std::mt19937 rng(3);
  std::shuffle(kp.begin(), kp.end(), rng);
  compare({.n_q = 32, .n_kv = 128}, {.heads = 2, .causal = true, .window_left = 40, .q_tile = 8, .k_tile = 16},
          none_f, none_d, &qp, &kp);
}

TEST_CASE("blockwise: strided views and thread counts give the same bits", "[attention][blockwise]") {
  const index_t n = 300, d = 16, heads = 2;
  auto buf = random_matrix<float>(n, 3 * heads * d + 5, 21);  // a fused QKV buffer with padding
  auto q = buf.middleCols(0, heads * d);
  auto k = buf.middleCols(heads * d, heads * d);
  auto v = buf.middleCols(2 * heads * d, heads * d);
  posenc::row_matrix<float> wide(n, heads * d + 3);
  wide.setConstant(7.0f);
  auto out = wide.middleCols(0, heads * d);
  posenc::row_matrix<float> dense(n, heads * d);
  const posenc::row_matrix<float> qc = q, kc = k, vc = v;
  const auto pos = posenc::arange(0, n);
  posenc::attention(q, k, v, out, pos, pos, posenc::no_position<float>{}, {.heads = heads, .causal = true, .threads = 1});
  for (int t : {1, 2, 3}) {
    posenc::attention(qc, kc, vc, dense, pos, pos, posenc::no_position<float>{},
                      {.heads = heads, .causal = true, .threads = t});
    CHECK(dense == posenc::row_matrix<float>(out));
  }
  CHECK((wide.rightCols(3).array() == 7.0f).all());  // padding untouched
}

TEST_CASE("blockwise: causal output ignores future keys and values", "[attention][blockwise]") {
  const index_t n = 150, d = 16;
  auto q = random_matrix<float>(n, d, 1);
  auto k = random_matrix<float>(n, d, 2);
  auto v = random_matrix<float>(n, d, 3);
  posenc::row_matrix<float> a(n, d), b(n, d);
  const auto pos = posenc::arange(0, n);
  const posenc::attention_params p{.causal = true, .q_tile = 32, .k_tile = 32};
  posenc::attention(q, k, v, a, pos, pos, posenc::no_position<float>{}, p);
  // Change everything after row 80 wildly, including huge values.
  k.bottomRows(n - 81).setConstant(1e30f);
  v.bottomRows(n - 81).setConstant(-1e30f);
  posenc::attention(q, k, v, b, pos, pos, posenc::no_position<float>{}, p);
  CHECK(a.topRows(81) == b.topRows(81));
}

TEST_CASE("blockwise: fully masked rows give zeros and lse = -inf; n_q = 0 is a no-op", "[attention][blockwise]") {
  auto q = random_matrix<float>(4, 8, 1);
  auto k = random_matrix<float>(5, 8, 2);
  posenc::row_matrix<float> out(4, 8), lse(4, 1);
  std::vector<position> qp{0, 1, 100, 200}, kp{10, 11, 12, 13, 14};
  posenc::attention(q, k, k, out, qp, kp, posenc::no_position<float>{}, {.causal = true, .k_tile = 2}, lse);
  CHECK((out.topRows(2).array() == 0.0f).all());
  CHECK(lse(0, 0) == -std::numeric_limits<float>::infinity());
  CHECK(lse(1, 0) == -std::numeric_limits<float>::infinity());
  CHECK(out.allFinite());
  CHECK(std::isfinite(lse(2, 0)));
  posenc::row_matrix<float> none_q(0, 8), none_out(0, 8);
  CHECK_NOTHROW(posenc::attention(none_q, k, k, none_out, posenc::arange(0, 0), kp, posenc::no_position<float>{}, {}));
}

TEST_CASE("blockwise: workspace is sized by tiles, not by length, and reused", "[attention][blockwise]") {
  const posenc::no_position<float> none;
  const posenc::attention_params p{.heads = 8, .threads = 2};
  // Past a few tiles the workspace does not grow with the sequence.
  const auto bytes = posenc::attention_workspace_bytes<float>(p, 4096, 4096, 128, none);
  CHECK(bytes > 0);
  CHECK(bytes < (4u << 20));  // a few tiles per worker
  CHECK(posenc::attention_workspace_bytes<float>(p, 1 << 20, 1 << 20, 128, none) == bytes);
  // The plan `attention` reserves is the one reported.
  posenc::attention_workspace ws;
  for (index_t n : {100, 1000}) {
    auto q = random_matrix<float>(n, 8 * 16, 1);
    posenc::row_matrix<float> out(n, 8 * 16);
    posenc::attention(q, q, q, out, posenc::arange(0, n), posenc::arange(0, n), none, p, nullptr, &ws);
    CHECK(ws.bytes() == posenc::attention_workspace_bytes<float>(p, n, n, 16, none));
  }
}

TEST_CASE("blockwise: every kernel set this CPU has equals the reference", "[attention][blockwise][simd]") {
  // The default path runs the best kernels the CPU has; capping the level runs each lower one
  // (AVX2, portable) on the same CPU, against the double reference. Head sizes that are not
  // multiples of 8 or 16 exercise the vector tails; the long-cache cases take the decode path.
  using posenc::detail::simd_level;
  const posenc::no_position<float> none_f;
  const posenc::no_position<double> none_d;
  for (const simd_level level : posenc::detail::available_simd_levels()) {
    const posenc::detail::scoped_simd_cap cap(level);
    INFO("kernels: " << posenc::detail::kernels_for<float>().name);
    // 56 and 120 leave 49..63 columns after the 64-column blocks (four vectors, the last partial).
    for (index_t d : {1, 7, 40, 56, 120, 128, 130}) {
      compare({.heads = 4, .kv_heads = 2, .d = d, .n_q = 333, .n_kv = 333},
              {.heads = 4, .kv_heads = 2, .causal = true, .window_left = 100, .q_tile = 48, .k_tile = 64}, none_f,
              none_d);
      compare({.heads = 4, .kv_heads = 2, .d = d, .n_q = 70, .n_kv = 200}, {.heads = 4, .kv_heads = 2}, none_f, none_d);
    }
    for (index_t nq : {1, 2, 5}) {
      compare({.heads = 4, .kv_heads = 2, .d = 72, .n_q = nq, .n_kv = 9000, .q0 = 9000 - nq},
              {.heads = 4, .kv_heads = 2, .causal = true}, none_f, none_d);
    }
    // Decode with keys and values read in place (d a multiple of 16), GQA 8/2: 4 query rows per kv
    // head, the column blocks of decode's P V (AVX2: 32 columns as 2 + 2 vectors, 128 as
    // 3 + 3 + 3 + 3 + 2 + 2) and the one-row key products.
    for (index_t d : {32, 48, 128}) {
      compare({.heads = 8, .kv_heads = 2, .d = d, .n_q = 1, .n_kv = 3000, .q0 = 2999},
              {.heads = 8, .kv_heads = 2, .causal = true}, none_f, none_d);
    }
  }
}

namespace {

// The score-bias families in float and double, built from the same parameters and tables.
struct bias_encoders {
  posenc::alibi<float> alibi_f{{.num_heads = 8, .head_offset = 0}};
  posenc::alibi<double> alibi_d{{.num_heads = 8, .head_offset = 0}};
  posenc::row_matrix<double> t5_table = random_matrix<double>(32, 8, 41);
  posenc::t5_relative_bias<float> t5_f{{.num_heads = 8, .num_buckets = 32, .max_distance = 128},
                                       posenc::row_matrix<float>(t5_table.cast<float>())};
  posenc::t5_relative_bias<double> t5_d{{.num_heads = 8, .num_buckets = 32, .max_distance = 128}, t5_table};
  posenc::row_matrix<double> ak = random_matrix<double>(2 * 5 + 1, 16, 42), av = random_matrix<double>(2 * 5 + 1, 16, 43);
  posenc::shaw_relative<float> shaw_f{{.head_dim = 16, .max_relative_position = 5},
                                      posenc::row_matrix<float>(ak.cast<float>()),
                                      posenc::row_matrix<float>(av.cast<float>())};
  posenc::shaw_relative<double> shaw_d{{.head_dim = 16, .max_relative_position = 5}, ak, av};
};

}  // namespace

TEST_CASE("blockwise equals the reference with ALiBi, T5 and Shaw, every tile size and mask",
          "[attention][blockwise][bias]") {
  const bias_encoders e;
  for (index_t tile : {1, 7, 16, 64, 128}) {
    for (index_t n : {std::max<index_t>(tile - 1, 1), tile + 1, index_t{300}}) {
      if (tile == 1 && n == 300) continue;
      for (int mask = 0; mask < 3; ++mask) {
        posenc::attention_params p{.heads = 8, .kv_heads = 2, .q_tile = tile, .k_tile = tile};
        if (mask == 1) p.causal = true;
        if (mask == 2) p.window_left = 9, p.window_right = 4;
        const problem pr{.heads = 8, .kv_heads = 2, .d = 16, .n_q = n, .n_kv = n};
        compare(pr, p, e.alibi_f, e.alibi_d);
        compare(pr, p, e.t5_f, e.t5_d);
        compare(pr, p, e.shaw_f, e.shaw_d);
      }
    }
  }
}

TEST_CASE("blockwise bias results are invariant to shifting all positions", "[attention][blockwise][bias]") {
  const bias_encoders e;
  const index_t n = 90, d = 16, heads = 8;
  const auto q = random_matrix<float>(n, heads * d, 1);
  const auto k = random_matrix<float>(n, 2 * d, 2);
  const auto v = random_matrix<float>(n, 2 * d, 3);
  const posenc::attention_params p{.heads = heads, .kv_heads = 2, .causal = true, .q_tile = 16, .k_tile = 32};
  auto run = [&](const auto& enc, position shift) {
    posenc::row_matrix<float> out(n, heads * d);
    posenc::attention(q, k, v, out, posenc::arange(shift, n), posenc::arange(shift, n), enc, p);
    return out;
  };
  for (position shift : {position{1000}, position{1} << 40, position{-77}}) {
    INFO("shift " << shift);
    CHECK(run(e.alibi_f, 0) == run(e.alibi_f, shift));
    CHECK(run(e.t5_f, 0) == run(e.t5_f, shift));
    CHECK(run(e.shaw_f, 0) == run(e.shaw_f, shift));
  }
}

TEST_CASE("blockwise decode with ALiBi at the end of a long cache uses global positions", "[attention][blockwise][bias]") {
  const bias_encoders e;
  // 3 queries at positions 997..999 against 1000 cached keys, tiles far from the queries skipped
  // by the window, the rest biased by global distance.
  compare({.heads = 8, .kv_heads = 2, .d = 16, .n_q = 3, .n_kv = 1000, .q0 = 997},
          {.heads = 8, .kv_heads = 2, .causal = true, .window_left = 300}, e.alibi_f, e.alibi_d);
  compare({.heads = 8, .kv_heads = 2, .d = 16, .n_q = 3, .n_kv = 1000, .q0 = 997},
          {.heads = 8, .kv_heads = 2, .causal = true}, e.shaw_f, e.shaw_d);
}

TEST_CASE("blockwise equals the reference with RoPE rotated inside the kernel", "[attention][blockwise][rope]") {
  const posenc::rope_params variants[] = {
      {.head_dim = 16},
      {.head_dim = 16, .layout = posenc::rope_layout::interleaved},
      {.head_dim = 16, .rotary_dim = 8, .base = 500000.0},
      {.head_dim = 16, .scaling = posenc::yarn_scaling{.factor = 4.0, .original_max_position = 64}},
  };
  for (const auto& rp : variants) {
    const posenc::rope<float> rf(rp);
    const posenc::rope<double> rd(rp);
    for (index_t tile : {7, 64}) {
      const problem pr{.heads = 4, .kv_heads = 2, .d = 16, .n_q = 150, .n_kv = 150};
      compare(pr, {.heads = 4, .kv_heads = 2, .causal = true, .q_tile = tile, .k_tile = tile}, rf, rd);
      compare(pr, {.heads = 4, .kv_heads = 2, .window_left = 20, .q_tile = tile, .k_tile = tile}, rf, rd);
    }
    // Decode at far positions: the angles come from global positions.
    compare({.heads = 4, .kv_heads = 2, .d = 16, .n_q = 2, .n_kv = 300, .q0 = (position{1} << 31) - 2},
            {.heads = 4, .kv_heads = 2, .causal = true}, rf, rd);
  }
}

TEST_CASE("blockwise with RoPE: rotating inside the kernel equals attending to rotated inputs",
          "[attention][blockwise][rope]") {
  const index_t n = 200, heads = 4, d = 32;
  const posenc::rope<float> rope({.head_dim = d, .base = 10000.0});
  auto q = random_matrix<float>(n, heads * d, 51);
  auto k = random_matrix<float>(n, heads * d, 52);
  const auto v = random_matrix<float>(n, heads * d, 53);
  const auto pos = posenc::arange(17, n);
  posenc::row_matrix<float> inside(n, heads * d), outside(n, heads * d);
  posenc::attention(q, k, v, inside, pos, pos, rope, {.heads = heads, .causal = true});
  rope.rotate(q, pos);
  rope.rotate(k, pos);
  posenc::attention(q, k, v, outside, pos, pos, posenc::no_position<float>{}, {.heads = heads, .causal = true});
  CHECK((inside - outside).cwiseAbs().maxCoeff() <= 1e-5f);
}

TEMPLATE_TEST_CASE("blockwise on bf16 and fp16 storage accumulates in float", "[attention][blockwise]",
                   Eigen::bfloat16, Eigen::half) {
  using S = TestType;
  const index_t n = 130, heads = 2, d = 32;
  const auto qf = random_matrix<float>(n, heads * d, 61), kf = random_matrix<float>(n, heads * d, 62),
             vf = random_matrix<float>(n, heads * d, 63);
  const posenc::row_matrix<S> q = qf.cast<S>(), k = kf.cast<S>(), v = vf.cast<S>();
  // The float path on exactly the values the low-precision storage holds.
  const posenc::row_matrix<float> qr = q.template cast<float>(), kr = k.template cast<float>(),
                                  vr = v.template cast<float>();
  posenc::row_matrix<S> out(n, heads * d);
  posenc::row_matrix<float> ref(n, heads * d);
  const auto pos = posenc::arange(0, n);
  const posenc::alibi<float> alibi({.num_heads = heads});
  posenc::attention(q, k, v, out, pos, pos, alibi, {.heads = heads, .causal = true});
  posenc::attention(qr, kr, vr, ref, pos, pos, alibi, {.heads = heads, .causal = true});
  // One rounding of each output to the storage type (|out| < 4).
  const double ulp = std::same_as<S, Eigen::bfloat16> ? 4.0 / 128 : 4.0 / 1024;
  CHECK((out.template cast<float>() - ref).cwiseAbs().maxCoeff() <= ulp);
  // RoPE rotated inside the kernel straight from the low-precision keys.
  const posenc::rope<float> rope({.head_dim = d});
  posenc::attention(q, k, v, out, pos, pos, rope, {.heads = heads, .causal = true});
  posenc::attention(qr, kr, vr, ref, pos, pos, rope, {.heads = heads, .causal = true});
  CHECK((out.template cast<float>() - ref).cwiseAbs().maxCoeff() <= ulp);
}

TEST_CASE("blockwise decode over a long cache: key chunks merged, every encoder", "[attention][blockwise][decode]") {
  // Long enough for the decode path (several key chunks, all kv heads in one work item).
  const index_t n_kv = 20000;
  const bias_encoders e;
  const posenc::rope<float> rf({.head_dim = 16});
  const posenc::rope<double> rd({.head_dim = 16});
  for (index_t nq : {1, 2}) {
    // At the end of the cache, and in its middle (later chunks hidden by the causal mask).
    for (position q0 : {n_kv - nq, position{9000}}) {
      const problem pr{.heads = 8, .kv_heads = 2, .d = 16, .n_q = nq, .n_kv = n_kv, .q0 = q0};
      const posenc::attention_params p{.heads = 8, .kv_heads = 2, .causal = true};
      compare(pr, p, posenc::no_position<float>{}, posenc::no_position<double>{});
      compare(pr, p, e.alibi_f, e.alibi_d);
      compare(pr, p, rf, rd);
    }
  }
  // MQA and a window that hides the first chunks.
  compare({.heads = 8, .kv_heads = 1, .d = 16, .n_q = 1, .n_kv = n_kv, .q0 = n_kv - 1},
          {.heads = 8, .kv_heads = 1, .causal = true, .window_left = 5000}, e.t5_f, e.t5_d);
}

namespace {

// A relative_key_value encoder that is not Shaw's own (it has only the four protocol steps): the
// kernel must run them as the protocol states, without Shaw's shortcuts.
template <class T>
struct protocol_only {
  using scalar_type = T;
  static constexpr posenc::encoding_family family = posenc::encoding_family::score_bias;
  static constexpr bool has_value_term = true;
  const posenc::shaw_relative<T>* inner = nullptr;
  std::string_view name() const { return "protocol_only"; }
  index_t head_dim() const { return inner->head_dim(); }
  index_t num_relative() const { return inner->num_relative(); }
  template <class Q, class O>
  void query_terms(Q&& q, O&& out) const { inner->query_terms(std::forward<Q>(q), std::forward<O>(out)); }
  template <class Tile, class G>
  void add_bias_tile(Tile&& t, G&& g, posenc::positions q, posenc::positions k) const {
    inner->add_bias_tile(std::forward<Tile>(t), std::forward<G>(g), q, k);
  }
  template <class P, class W>
  void accumulate_value_weights(P&& p, posenc::positions q, posenc::positions k, W&& w) const {
    inner->accumulate_value_weights(std::forward<P>(p), q, k, std::forward<W>(w));
  }
  template <class W, class O>
  void add_value_term(W&& w, O&& out) const { inner->add_value_term(std::forward<W>(w), std::forward<O>(out)); }
};
static_assert(posenc::relative_key_value<protocol_only<float>>);

}  // namespace

TEST_CASE("blockwise Shaw: key chunks, soft cap, sinks, scattered positions and large far terms",
          "[attention][blockwise][bias]") {
  // The kernel moves each query row's logits by its far-left term q . aK[0] and puts the row's
  // max back at the end; the far-left value weight is the row's total less the others. Every
  // place that could see the moved logits is compared with the double reference here.
  const bias_encoders e;
  for (index_t nq : {1, 2}) {  // decode over several key chunks, merged
    const problem pr{.heads = 8, .kv_heads = 2, .d = 16, .n_q = nq, .n_kv = 20000, .q0 = 20000 - nq};
    compare(pr, {.heads = 8, .kv_heads = 2, .causal = true}, e.shaw_f, e.shaw_d);
    compare(pr, {.heads = 8, .kv_heads = 2, .causal = true, .window_left = 5000}, e.shaw_f, e.shaw_d);
  }
  const std::vector<float> sinks{0.5f, -1.0f, 2.0f, -std::numeric_limits<float>::infinity(), 0.f, 1.f, 3.f, -2.f};
  const problem pr{.heads = 8, .kv_heads = 2, .d = 16, .n_q = 300, .n_kv = 300};
  for (const double cap : {0.0, 2.0}) {
    for (const bool causal : {true, false}) {
      posenc::attention_params p{.heads = 8, .kv_heads = 2, .softcap = cap, .causal = causal, .q_tile = 64,
                                 .k_tile = 64};
      compare(pr, p, e.shaw_f, e.shaw_d);
      p.sinks = sinks;
      compare(pr, p, e.shaw_f, e.shaw_d);
    }
  }
  // Positions that are not a range (gaps, repeats, out of order), so no tile is a range.
  std::vector<position> qpos(300), kpos(300);
  for (index_t i = 0; i < 300; ++i) qpos[i] = (i * 37) % 300 + (i % 3 == 0 ? 1000 : 0), kpos[i] = (i * 7) % 301;
  compare(pr, {.heads = 8, .kv_heads = 2, .q_tile = 32, .k_tile = 32}, e.shaw_f, e.shaw_d, &qpos, &kpos);
  // Far terms that dominate the logits: aK[0] large, so a row's shift is most of its logits.
  posenc::row_matrix<double> ak = e.ak, av = e.av;
  ak.row(0) *= 8.0;
  const posenc::shaw_params sp{.head_dim = 16, .max_relative_position = 5};
  const posenc::shaw_relative<float> big_f(sp, posenc::row_matrix<float>(ak.cast<float>()),
                                           posenc::row_matrix<float>(av.cast<float>()));
  const posenc::shaw_relative<double> big_d(sp, ak, av);
  compare(pr, {.heads = 8, .kv_heads = 2, .causal = true, .q_tile = 64, .k_tile = 64}, big_f, big_d);
  compare(pr, {.heads = 8, .kv_heads = 2, .sinks = sinks, .causal = true}, big_f, big_d);
  // A head_dim that is not a multiple of 16 (the value term is not a whole-vector product).
  const posenc::shaw_params sp24{.head_dim = 24, .max_relative_position = 3};
  const auto ak24 = random_matrix<double>(7, 24, 44), av24 = random_matrix<double>(7, 24, 45);
  const posenc::shaw_relative<float> f24(sp24, posenc::row_matrix<float>(ak24.cast<float>()),
                                         posenc::row_matrix<float>(av24.cast<float>()));
  const posenc::shaw_relative<double> d24(sp24, ak24, av24);
  compare({.heads = 4, .kv_heads = 2, .d = 24, .n_q = 200, .n_kv = 200}, {.heads = 4, .kv_heads = 2, .causal = true},
          f24, d24);
  // The same steps through an encoder that has only the protocol.
  const protocol_only<float> plain_f{&e.shaw_f};
  compare(pr, {.heads = 8, .kv_heads = 2, .causal = true, .q_tile = 64, .k_tile = 64}, plain_f, e.shaw_d);
  compare(pr, {.heads = 8, .kv_heads = 2, .sinks = sinks, .q_tile = 64, .k_tile = 64}, plain_f, e.shaw_d, &qpos,
          &kpos);
}

TEST_CASE("blockwise decode gives the same bits for any thread count", "[attention][blockwise][decode]") {
  const index_t n_kv = 20000, heads = 8, kvh = 2, d = 32;
  const auto q = random_matrix<float>(1, heads * d, 71);
  const auto k = random_matrix<float>(n_kv, kvh * d, 72);
  const auto v = random_matrix<float>(n_kv, kvh * d, 73);
  posenc::row_matrix<float> a(1, heads * d), b(1, heads * d);
  const auto qp = posenc::arange(n_kv - 1, 1), kp = posenc::arange(0, n_kv);
  posenc::attention(q, k, v, a, qp, kp, posenc::no_position<float>{},
                    {.heads = heads, .kv_heads = kvh, .causal = true, .threads = 1});
  for (int t : {2, 3}) {
    posenc::attention(q, k, v, b, qp, kp, posenc::no_position<float>{},
                      {.heads = heads, .kv_heads = kvh, .causal = true, .threads = t});
    CHECK(a == b);
  }
}

TEST_CASE("blockwise rejects bad head counts, tiles and shapes", "[attention][blockwise][errors]") {
  using Catch::Matchers::Contains;
  auto q = random_matrix<float>(4, 8, 1);
  auto k = random_matrix<float>(4, 8, 2);
  posenc::row_matrix<float> out(4, 8), lse(4, 2);
  const auto pos = posenc::arange(0, 4);
  const posenc::no_position<float> none;
  CHECK_THROWS_WITH(posenc::attention(q, k, k, out, pos, pos, none, {.heads = 0}), Contains("attention_params.heads = 0"));
  CHECK_THROWS_WITH(posenc::attention(q, k, k, out, pos, pos, none, {.heads = 2, .kv_heads = 3}),
                    Contains("attention_params.kv_heads = 3"));
  CHECK_THROWS_WITH(posenc::attention(q, k, k, out, pos, pos, none, {.heads = 2, .q_tile = -1}),
                    Contains("attention_params.q_tile = -1"));
  CHECK_THROWS_WITH(posenc::attention(q, k, k, out, pos, pos, none, {.heads = 2, .threads = -2}),
                    Contains("attention_params.threads = -2"));
  CHECK_THROWS_AS(posenc::attention(q, k, k, out, pos, pos, none, {.heads = 3}), posenc::precondition_error);
  CHECK_THROWS_AS(posenc::attention(q, k, k, out, posenc::arange(0, 3), pos, none, {.heads = 2}),
                  posenc::precondition_error);
  posenc::row_matrix<float> bad_lse(4, 1);
  CHECK_THROWS_AS(posenc::attention(q, k, k, out, pos, pos, none, {.heads = 2}, bad_lse), posenc::precondition_error);
  CHECK_NOTHROW(posenc::attention(q, k, k, out, pos, pos, none, {.heads = 2}, lse));
}
