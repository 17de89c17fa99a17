// attention_params::bf16_qk: Q K^T from the query and key rounded to bf16 (after any rotation),
// their exact products summed in float and scaled after. Checked on every kernel set the CPU has,
// including the AVX512_BF16 pair kernels where the CPU has them:
// - on inputs that are bf16 already (no rotation), against the double reference without rounding:
//   the products are exact, so the float path's accuracy holds;
// - a float query or key gives the bits of its own bf16 rounding (the rounding is the operand);
// - with RoPE rotating in the kernel, against a double reference that rounds the rotated rows;
// - thread counts do not change the bits; the backward refuses the knob.
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "posenc/attention/backward.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/simd.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::detail::simd_level;

namespace {

/// The bf16 nearest to `x`, ties to even, from the bits (written here from the format, not with
/// the library's conversion): add half of the dropped part (less one, plus the kept lowest bit).
float bf16_of(float x) {
  REQUIRE(std::isfinite(x));
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::bit_cast<float>(u & 0xffff0000u);
}

posenc::row_matrix<float> bf16_rows(const posenc::row_matrix<float>& m) { return m.unaryExpr(&bf16_of); }

std::vector<simd_level> levels() {
  const auto all = posenc::detail::available_simd_levels();
  return {all.begin(), all.end()};
}

/// Which Q K^T the level runs: the AVX512_BF16 pairs or the float kernels on rounded values.
const char* qk_path() {
  return posenc::detail::bf16_pair_kernels_in_use() ? "vdpbf16ps pairs" : "float kernels on bf16 values";
}

index_t first_difference(const float* a, const float* b, index_t n) {
  for (index_t i = 0; i < n; ++i)
    if (std::bit_cast<std::uint32_t>(a[i]) != std::bit_cast<std::uint32_t>(b[i])) return i;
  return -1;
}

struct shape {
  index_t heads, kv_heads, d, n_q, n_kv;
};

// Prefill (tiles of packed keys: the pair kernels), decode (one token: keys read in place), a few
// rows, odd and small head sizes (the last pair half empty), GQA.
constexpr shape shapes[] = {{4, 2, 64, 200, 333}, {2, 1, 33, 97, 150}, {8, 2, 128, 1, 700},
                            {2, 2, 7, 5, 40},     {1, 1, 130, 70, 70}, {4, 1, 80, 130, 260}};

}  // namespace

TEST_CASE("the bf16 rounding of bf16_qk is Eigen's round-to-nearest-even on every float", "[attention][bf16_qk]") {
  // Every 61st bit pattern (all exponents and signs, mantissas spread) and the edges: zeros,
  // subnormals, ties at both parities, the largest bf16 and the values that round past it, inf, NaN.
  std::vector<std::uint32_t> bits = {0x00000000u, 0x80000000u, 0x00000001u, 0x00008000u, 0x00018000u,
                                     0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x7f7f0000u, 0x7f7f7fffu,
                                     0x7f7f8000u, 0x7f7fffffu, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                     0x7f800001u, 0xffc00001u, 0x7fbfffffu};
  for (std::uint64_t u = 0; u <= 0xffffffffu; u += 61) bits.push_back(static_cast<std::uint32_t>(u));
  index_t wrong = 0;
  std::uint32_t first = 0;
  for (const std::uint32_t u : bits) {
    const float x = std::bit_cast<float>(u);
    const float got = posenc::detail::round_to_bf16(x);
    const float want = static_cast<float>(Eigen::bfloat16(x));
    const bool ok = std::isnan(x) ? std::isnan(got) : std::bit_cast<std::uint32_t>(got) == std::bit_cast<std::uint32_t>(want);
    if (!ok && wrong++ == 0) first = u;
  }
  INFO("first wrong pattern 0x" << std::hex << first);
  CHECK(wrong == 0);
}

TEST_CASE("bf16_qk on bf16 inputs has the float path's accuracy, on every kernel set", "[attention][bf16_qk]") {
  if (!posenc::cpu_has_avx512_bf16())
    WARN("this CPU has no AVX512_BF16: the vdpbf16ps pair kernels are not tested here (the float kernels on the "
         "rounded values are)");
  const auto alibi = posenc::alibi<float>({.num_heads = 8});
  const auto alibi_d = posenc::alibi<double>({.num_heads = 8});
  for (const shape& c : shapes) {
    // Queries and keys of bf16 values (stored as float and as bf16); values in float.
    const auto q = bf16_rows(posenc_test::random_normal<float>(c.n_q, c.heads * c.d, 1));
    const auto k = bf16_rows(posenc_test::random_normal<float>(c.n_kv, c.kv_heads * c.d, 2));
    const auto v = posenc_test::random_normal<float>(c.n_kv, c.kv_heads * c.d, 3);
    const posenc::row_matrix<Eigen::bfloat16> kb = k.cast<Eigen::bfloat16>();
    const posenc::row_matrix<double> qd = q.cast<double>(), kd = k.cast<double>(), vd = v.cast<double>();
    const auto qp = posenc::arange(c.n_kv - c.n_q, c.n_q), kp = posenc::arange(0, c.n_kv);
    for (const bool causal : {false, true}) {
      for (const bool with_alibi : {false, true}) {
        posenc::attention_params p{.heads = c.heads, .kv_heads = c.kv_heads, .causal = causal};
        posenc::row_matrix<double> ref(c.n_q, c.heads * c.d);
        if (with_alibi) {
          posenc::attention_reference(qd, kd, vd, ref, qp, kp, alibi_d, p);
        } else {
          posenc::attention_reference(qd, kd, vd, ref, qp, kp, posenc::no_position<double>{}, p);
        }
        for (const simd_level level : levels()) {
          const posenc::scoped_simd_cap cap(level);
          INFO("heads " << c.heads << "/" << c.kv_heads << ", d " << c.d << ", " << c.n_q << " x " << c.n_kv
                        << (causal ? ", causal" : "") << (with_alibi ? ", alibi" : "") << ", level "
                        << posenc::simd_level_name(level) << ", " << qk_path());
          posenc::row_matrix<float> out(c.n_q, c.heads * c.d), out_b(c.n_q, c.heads * c.d);
          auto run = [&](const auto& keys, posenc::row_matrix<float>& o, bool bf16) {
            p.bf16_qk = bf16;
            if (with_alibi) {
              posenc::attention(q, keys, v, o, qp, kp, alibi, p);
            } else {
              posenc::attention(q, keys, v, o, qp, kp, posenc::no_position<float>{}, p);
            }
          };
          // The float path's error on these inputs (the float ALiBi bias has its own) bounds it.
          run(k, out, false);
          index_t where = -1;
          const double float_err = posenc_test::max_abs_diff(out, ref, &where);
          run(k, out, true);
          run(kb, out_b, true);
          const double err = posenc_test::max_abs_diff(out, ref, &where);
          INFO("largest error " << err << " at " << where << "; float path " << float_err);
          CHECK(err < 1e-6 + 1.5 * float_err);
          // Keys stored as bf16 are the same operands as their float copies.
          CHECK(first_difference(out.data(), out_b.data(), out.size()) == -1);
        }
      }
    }
  }
}

TEST_CASE("bf16_qk rounds a float query and key: their bf16 roundings give the same bits", "[attention][bf16_qk]") {
  for (const shape& c : shapes) {
    const auto q = posenc_test::random_normal<float>(c.n_q, c.heads * c.d, 4);
    const auto k = posenc_test::random_normal<float>(c.n_kv, c.kv_heads * c.d, 5);
    const auto v = posenc_test::random_normal<float>(c.n_kv, c.kv_heads * c.d, 6);
    const auto qr = bf16_rows(q), kr = bf16_rows(k);
    const auto qp = posenc::arange(c.n_kv - c.n_q, c.n_q), kp = posenc::arange(0, c.n_kv);
    const posenc::attention_params p{.heads = c.heads, .kv_heads = c.kv_heads, .bf16_qk = true, .causal = true};
    for (const simd_level level : levels()) {
      const posenc::scoped_simd_cap cap(level);
      INFO("heads " << c.heads << "/" << c.kv_heads << ", d " << c.d << ", " << c.n_q << " x " << c.n_kv << ", level "
                    << posenc::simd_level_name(level) << ", " << qk_path());
      posenc::row_matrix<float> out(c.n_q, c.heads * c.d), out_r(c.n_q, c.heads * c.d), lse(c.n_q, c.heads),
          lse_r(c.n_q, c.heads);
      posenc::attention(q, k, v, out, qp, kp, posenc::no_position<float>{}, p, lse);
      posenc::attention(qr, kr, v, out_r, qp, kp, posenc::no_position<float>{}, p, lse_r);
      CHECK(first_difference(out.data(), out_r.data(), out.size()) == -1);
      CHECK(first_difference(lse.data(), lse_r.data(), lse.size()) == -1);
      // The rounding is real: without bf16_qk the float query gives other logits.
      posenc::attention_params pf = p;
      pf.bf16_qk = false;
      posenc::row_matrix<float> lse_f(c.n_q, c.heads);
      posenc::attention(q, k, v, out, qp, kp, posenc::no_position<float>{}, pf, lse_f);
      CHECK(first_difference(lse.data(), lse_f.data(), lse.size()) != -1);
    }
  }
}

TEST_CASE("bf16_qk with in-kernel RoPE and Shaw: the rounded rotated rows of the double reference",
          "[attention][bf16_qk]") {
  // Prefill (150 queries) and decode (1 query, keys rotated into a tile: not read in place).
  const index_t n_q = GENERATE(150, 1);
  const shape c{4, 2, 64, n_q, 300};
  const auto q = posenc_test::random_normal<float>(c.n_q, c.heads * c.d, 7);
  const auto k = posenc_test::random_normal<float>(c.n_kv, c.kv_heads * c.d, 8);
  const auto v = posenc_test::random_normal<float>(c.n_kv, c.kv_heads * c.d, 9);
  const posenc::row_matrix<double> vd = v.cast<double>();
  const auto qp = posenc::arange(1000 + c.n_kv - c.n_q, c.n_q), kp = posenc::arange(1000, c.n_kv);
  posenc::attention_params p{.heads = c.heads, .kv_heads = c.kv_heads, .causal = true};
  INFO(n_q << " queries");
  SECTION("RoPE") {
    const posenc::rope<float> rope({.head_dim = c.d, .base = 10000.0});
    const posenc::rope<double> rope_d({.head_dim = c.d, .base = 10000.0});
    // The reference: each head's rows rotated in double, rounded to bf16, then plain attention.
    posenc::row_matrix<double> qd = q.cast<double>(), kd = k.cast<double>();
    for (index_t h = 0; h < c.heads; ++h) {
      posenc::row_matrix<double> part = qd.middleCols(h * c.d, c.d);
      rope_d.rotate(part, qp);
      qd.middleCols(h * c.d, c.d) = part;
    }
    for (index_t h = 0; h < c.kv_heads; ++h) {
      posenc::row_matrix<double> part = kd.middleCols(h * c.d, c.d);
      rope_d.rotate(part, kp);
      kd.middleCols(h * c.d, c.d) = part;
    }
    const auto round_d = [](double x) { return static_cast<double>(bf16_of(static_cast<float>(x))); };
    const posenc::row_matrix<double> qr = qd.unaryExpr(round_d), kr = kd.unaryExpr(round_d);
    posenc::row_matrix<double> ref(c.n_q, c.heads * c.d), unrounded(c.n_q, c.heads * c.d);
    posenc::attention_reference(qr, kr, vd, ref, qp, kp, posenc::no_position<double>{}, p);
    posenc::attention_reference(qd, kd, vd, unrounded, qp, kp, posenc::no_position<double>{}, p);
    p.bf16_qk = true;
    for (const simd_level level : levels()) {
      const posenc::scoped_simd_cap cap(level);
      INFO("level " << posenc::simd_level_name(level) << ", " << qk_path());
      posenc::row_matrix<float> out(c.n_q, c.heads * c.d);
      posenc::attention(q, k, v, out, qp, kp, rope, p);
      index_t where = -1;
      // A rotated value within a float rounding of a bf16 tie may round the other way than in
      // double: rare, and one bf16 step of one product.
      const double err = posenc_test::max_abs_diff(out, ref, &where);
      const double err_unrounded = posenc_test::max_abs_diff(out, unrounded, &where);
      INFO("error " << err << " against the rounded reference, " << err_unrounded << " against the unrounded one");
      CHECK(err < 1e-4);
      CHECK(err * 20 < err_unrounded);
    }
  }
  SECTION("Shaw: relative keys meet the rounded query, scaled with the logits") {
    const auto ak = posenc_test::random_normal<float>(33, c.d, 13), av = posenc_test::random_normal<float>(33, c.d, 14);
    const posenc::shaw_relative<float> shaw({.head_dim = c.d, .max_relative_position = 16}, ak, av);
    const posenc::shaw_relative<double> shaw_d({.head_dim = c.d, .max_relative_position = 16},
                                               ak.cast<double>().eval(), av.cast<double>().eval());
    const posenc::row_matrix<double> qr = bf16_rows(q).cast<double>(), kr = bf16_rows(k).cast<double>();
    posenc::row_matrix<double> ref(c.n_q, c.heads * c.d);
    posenc::attention_reference(qr, kr, vd, ref, qp, kp, shaw_d, p);
    p.bf16_qk = true;
    for (const simd_level level : levels()) {
      const posenc::scoped_simd_cap cap(level);
      INFO("level " << posenc::simd_level_name(level));
      posenc::row_matrix<float> out(c.n_q, c.heads * c.d);
      posenc::attention(q, k, v, out, qp, kp, shaw, p);
      index_t where = -1;
      const double err = posenc_test::max_abs_diff(out, ref, &where);
      INFO("error " << err << " at " << where);
      CHECK(err < 2e-6);
    }
  }
}

TEST_CASE("bf16_qk: the same bits for any thread count; the backward refuses it", "[attention][bf16_qk]") {
  const shape c{4, 2, 64, 300, 600};
  const auto q = posenc_test::random_normal<float>(c.n_q, c.heads * c.d, 10);
  const auto k = posenc_test::random_normal<float>(c.n_kv, c.kv_heads * c.d, 11);
  const auto v = posenc_test::random_normal<float>(c.n_kv, c.kv_heads * c.d, 12);
  const auto qp = posenc::arange(c.n_kv - c.n_q, c.n_q), kp = posenc::arange(0, c.n_kv);
  posenc::attention_params p{.heads = c.heads, .kv_heads = c.kv_heads, .bf16_qk = true, .causal = true, .threads = 1};
  posenc::row_matrix<float> one(c.n_q, c.heads * c.d), two(c.n_q, c.heads * c.d), lse(c.n_q, c.heads);
  posenc::attention(q, k, v, one, qp, kp, posenc::no_position<float>{}, p, lse);
  p.threads = 2;
  p.q_tile = 32;
  posenc::attention(q, k, v, two, qp, kp, posenc::no_position<float>{}, p);
  CHECK(first_difference(one.data(), two.data(), one.size()) == -1);

  posenc::row_matrix<float> dq(c.n_q, c.heads * c.d), dk(c.n_kv, c.kv_heads * c.d), dv(c.n_kv, c.kv_heads * c.d);
  CHECK_INVALID(posenc::attention_backward(q, k, v, one, lse, one, dq, dk, dv, qp, kp,
                                                  posenc::no_position<float>{}, p),
                       "bf16_qk");
  CHECK_INVALID(
      posenc::attention_backward_workspace_bytes<float>(p, c.n_q, c.n_kv, c.d, posenc::no_position<float>{}),
      "bf16_qk");
}
