// Keys and values stored in fp16 / bf16: the kernels that widen them as they load (decode reads
// them in place) give exactly the bits of the float kernels on the widened values, on every kernel
// set the CPU has, and attention on a half-precision cache matches the double reference.
//
// Widening fp16 and bf16 to float is exact, so "the same call on float copies" is a bitwise
// oracle: any difference is a bug in a half-precision path (a wrong stride, a tail read from the
// wrong place, a conversion that rounds), never rounding noise.
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::position;
using posenc::detail::simd_level;

namespace {

constexpr double absolute_slack = 1e-6;  // float outputs are O(1); this is ~8 ulp

/// The kernel sets this CPU has, lowest first.
std::vector<simd_level> levels() {
  const auto all = posenc::detail::available_simd_levels();
  return {all.begin(), all.end()};
}

template <class H>
const char* type_name() {
  return std::same_as<H, Eigen::half> ? "fp16" : "bf16";
}

/// `n` values of type `H` from normal samples, with the edges of the format mixed in when `edges`:
/// signed zeros, the smallest subnormal, the largest finite value, subnormals of both signs. They
/// exercise the widening (a conversion that flushed subnormals or mishandled the exponent of the
/// largest value would change bits) while keeping products finite.
template <class H>
std::vector<H> random_values(std::size_t n, unsigned seed, bool edges) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<H> out(n);
  for (auto& x : out) x = H(normal(rng));
  if (edges) {
    const std::uint16_t specials[] = {0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x83ff, 0x0200};
    std::uniform_int_distribution<std::size_t> at(0, n - 1);
    for (std::size_t i = 0; i < n / 8 + 1; ++i) {
      const std::uint16_t bits = specials[i % std::size(specials)];
      out[at(rng)] = std::bit_cast<H>(bits);
    }
    // The largest finite value (fp16 65504, bf16 3.4e38) at one place: in qk_rows its product
    // with a small query stays finite.
    out[at(rng)] = std::numeric_limits<H>::max();
  }
  return out;
}

template <class H>
std::vector<float> widened(const std::vector<H>& h) {
  std::vector<float> f(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) f[i] = static_cast<float>(h[i]);
  return f;
}

bool same_bits(float a, float b) { return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b); }

/// The first index where two float arrays differ in their bits, or -1.
index_t first_difference(const float* a, const float* b, index_t n) {
  for (index_t i = 0; i < n; ++i)
    if (!same_bits(a[i], b[i])) return i;
  return -1;
}

template <class H>
void check_kernels_bitwise() {
  const auto& kern = posenc::detail::kernels_for<float>();
  INFO("kernels " << kern.name << ", storage " << type_name<H>());
  // Head sizes around the vector widths (8, 16) and the 64-column block of pv; tiles of 1, 5 and
  // 33 keys; rows strided as in an engine's cache (two heads per row).
  for (index_t d : {1, 7, 8, 9, 15, 16, 17, 36, 64, 72, 120, 128, 130}) {
    for (index_t nk : {1, 5, 33}) {
      for (index_t nq : {1, 3, 8, 11}) {
        const index_t dpad = (d + 15) / 16 * 16;
        const index_t ld = 2 * dpad + 3;  // odd: every row starts at another alignment
        INFO("d " << d << ", keys " << nk << ", query rows " << nq);
        // qk_rows: the buffer ends where the last key row does, so a tail read past the row
        // leaves it (the address sanitizer sees the scalar and memcpy tails, not masked loads).
        const auto kh =
            random_values<H>(static_cast<std::size_t>((nk - 1) * ld + d), static_cast<unsigned>(100 + d), true);
        const auto kf = widened(kh);
        std::vector<float> q(static_cast<std::size_t>(nq * d));
        std::mt19937 rng(static_cast<unsigned>(7 * d + nq));
        std::normal_distribution<float> normal(0.0f, 1e-3f);
        for (auto& x : q) x = normal(rng);
        std::vector<float> s_half(static_cast<std::size_t>(nq * nk), -1.0f), s_float(s_half);
        kern.qk_rows(q.data(), d, nq, d, kf.data(), ld, nk, s_float.data(), nk, nullptr, 0);
        posenc::detail::qk_rows_of(kern, q.data(), d, nq, d, kh.data(), ld, nk, s_half.data(), nk);
        const index_t at_s = first_difference(s_half.data(), s_float.data(), nq * nk);
        INFO("qk_rows: first differing logit " << at_s);
        CHECK(at_s == -1);

        // pv: values readable up to d rounded up to 16 columns, probabilities with zeros (a
        // skipped key in the portable kernel) and alpha both 1 and not.
        const auto vh =
            random_values<H>(static_cast<std::size_t>((nk - 1) * ld + dpad), static_cast<unsigned>(200 + d), true);
        const auto vf = widened(vh);
        std::vector<float> p(static_cast<std::size_t>(nq * nk)), alpha(static_cast<std::size_t>(nq));
        std::uniform_real_distribution<float> unit(0.0f, 1.0f);
        for (auto& x : p) x = unit(rng) < 0.2f ? 0.0f : unit(rng);
        for (index_t i = 0; i < nq; ++i) alpha[static_cast<std::size_t>(i)] = i % 2 ? 1.0f : unit(rng);
        std::vector<float> acc_half(static_cast<std::size_t>(nq * dpad));
        for (auto& x : acc_half) x = unit(rng);
        std::vector<float> acc_float(acc_half);
        kern.pv(p.data(), nk, nq, nk, vf.data(), ld, d, alpha.data(), acc_float.data(), dpad, nullptr, 0);
        posenc::detail::pv_of(kern, p.data(), nk, nq, nk, vh.data(), ld, d, alpha.data(), acc_half.data(), dpad);
        // Columns past d are scratch; the first d of each row are the result.
        index_t at_acc = -1;
        for (index_t i = 0; i < nq && at_acc < 0; ++i) {
          const index_t at = first_difference(acc_half.data() + i * dpad, acc_float.data() + i * dpad, d);
          if (at >= 0) at_acc = i * dpad + at;
        }
        INFO("pv: first differing accumulator " << at_acc);
        CHECK(at_acc == -1);
      }
      // convert: the rows widened and scaled, written with stride ldd, nothing past d.
      const index_t ld = d + 5, ldd = d + 2;
      const auto xh =
          random_values<H>(static_cast<std::size_t>((nk - 1) * ld + d), static_cast<unsigned>(300 + d), true);
      for (float factor : {1.0f, 0.0883883476f}) {
        std::vector<float> got(static_cast<std::size_t>(nk * ldd), 7.0f);
        if constexpr (std::same_as<H, Eigen::half>) {
          kern.convert_f16(xh.data(), ld, nk, d, factor, got.data(), ldd);
        } else {
          kern.convert_bf16(xh.data(), ld, nk, d, factor, got.data(), ldd);
        }
        index_t bad = -1;
        for (index_t i = 0; i < nk && bad < 0; ++i)
          for (index_t c = 0; c < ldd && bad < 0; ++c) {
            const float want = c < d ? factor * static_cast<float>(xh[static_cast<std::size_t>(i * ld + c)]) : 7.0f;
            if (!same_bits(got[static_cast<std::size_t>(i * ldd + c)], want)) bad = i * ldd + c;
          }
        INFO("convert, factor " << factor << ": first wrong element " << bad);
        CHECK(bad == -1);
      }
    }
  }
}

struct decode_case {
  index_t heads, kv_heads, d;
};

/// Queries, keys and values stored as `H`, and float copies of the same (widened) values. Made
/// once per shape at the longest length: a call on fewer tokens takes the top rows.
template <class H>
struct half_inputs {
  posenc::row_matrix<H> q, k, v;
  posenc::row_matrix<float> qf, kf, vf;
  half_inputs(const decode_case& c, index_t n_q, index_t n_kv)
      : q(posenc_test::random_normal<float>(n_q, c.heads * c.d, 31).cast<H>()),
        k(posenc_test::random_normal<float>(n_kv, c.kv_heads * c.d, 32).cast<H>()),
        v(posenc_test::random_normal<float>(n_kv, c.kv_heads * c.d, 33).cast<H>()),
        qf(q.template cast<float>()),
        kf(k.template cast<float>()),
        vf(v.template cast<float>()) {}
};

/// Attention on K/V (and q) stored as `H` against the same call on float copies of the widened
/// values: the same bits of out and lse, on every kernel set (the portable one when `portable`);
/// and, when `reference`, within the float error of the double reference.
template <class H, class EF, class ED>
void check_decode(const decode_case& c, const half_inputs<H>& in, index_t n_q, index_t n_kv, const EF& enc_f,
                  const ED& enc_d, const char* enc_name, bool portable, bool reference) {
  const auto qh = in.q.topRows(n_q), kh = in.k.topRows(n_kv), vh = in.v.topRows(n_kv);
  const auto qf = in.qf.topRows(n_q), kf = in.kf.topRows(n_kv), vf = in.vf.topRows(n_kv);
  const auto qp = posenc::arange(n_kv - n_q, n_q);
  const auto kp = posenc::arange(0, n_kv);
  const posenc::attention_params p{.heads = c.heads, .kv_heads = c.kv_heads, .causal = true};
  INFO(type_name<H>() << " cache, heads " << c.heads << "/" << c.kv_heads << ", d " << c.d << ", " << n_q
                      << " queries, " << n_kv << " keys, encoder " << enc_name);

  posenc::row_matrix<float> out_h(n_q, c.heads * c.d), lse_h(n_q, c.heads);
  posenc::row_matrix<float> out_f(n_q, c.heads * c.d), lse_f(n_q, c.heads);
  for (simd_level level : levels()) {
    if (level == simd_level::portable && !portable) continue;
    const posenc::detail::scoped_simd_cap cap(level);
    INFO("kernels " << posenc::detail::kernels_for<float>().name);
    out_h.setConstant(-7.0f);
    out_f.setConstant(-9.0f);
    posenc::attention(qh, kh, vh, out_h, qp, kp, enc_f, p, lse_h);
    posenc::attention(qf, kf, vf, out_f, qp, kp, enc_f, p, lse_f);
    const index_t at_out = first_difference(out_h.data(), out_f.data(), out_h.size());
    const index_t at_lse = first_difference(lse_h.data(), lse_f.data(), lse_h.size());
    INFO("first differing output " << at_out << ", lse " << at_lse);
    CHECK(at_out == -1);
    CHECK(at_lse == -1);
  }

  if (!reference) return;
  // The float error of the naive path on the same (widened) values bounds the blockwise one.
  const posenc::row_matrix<double> qd = qf.template cast<double>(), kd = kf.template cast<double>(),
                                   vd = vf.template cast<double>();
  posenc::row_matrix<double> ref(n_q, c.heads * c.d), ref_lse(n_q, c.heads);
  posenc::row_matrix<float> naive(n_q, c.heads * c.d), naive_lse(n_q, c.heads);
  posenc::attention_reference(qd, kd, vd, ref, qp, kp, enc_d, p, ref_lse);
  posenc::attention_reference(qf, kf, vf, naive, qp, kp, enc_f, p, naive_lse);
  index_t wn = -1, wb = -1, ln = -1, lb = -1;
  const double en = posenc_test::max_abs_diff(naive, ref, &wn);
  const double eb = posenc_test::max_abs_diff(out_h, ref, &wb);
  const double len = posenc_test::max_abs_diff(naive_lse, ref_lse, &ln);
  const double leb = posenc_test::max_abs_diff(lse_h, ref_lse, &lb);
  INFO("out: naive error " << en << ", half-cache error " << eb << " at flat index " << wb);
  CHECK(eb <= 2 * en + absolute_slack);
  INFO("lse: naive error " << len << ", half-cache error " << leb << " at flat index " << lb);
  CHECK(leb <= 2 * len + absolute_slack);
}

template <class H>
void check_decode_sweep() {
  // GQA 8/2 (4 rows per kv head and token), no grouping (1 row), 32/8; head sizes that are and
  // are not multiples of 16 (values in place only when they are) and of 8 (the AVX2 key tail).
  const decode_case cases[] = {{8, 2, 128}, {4, 4, 72}, {32, 8, 36}};
  // Key counts around the key tile (128) and the decode thresholds: the key chunks of the decode
  // path start at 8192 keys (2 chunks), a third chunk at 12288.
  const std::vector<index_t> lengths = {129, 8191, 8192, 12289}, short_lengths = {129, 1000};
  const index_t longest = 12289;
  const posenc::alibi<float> alibi_f({.num_heads = 32});
  const posenc::alibi<double> alibi_d({.num_heads = 32});
  for (const decode_case& c : cases) {
    const half_inputs<H> in(c, 16, longest);
    const posenc::rope<float> rope_f({.head_dim = c.d});
    const posenc::rope<double> rope_d({.head_dim = c.d});
    // 1, 2, 4, 16 tokens: few rows per tile (keys and values in place) up to 8 rows, the
    // converted tiles past that.
    for (index_t n_q : {1, 2, 4, 16}) {
      if (c.heads == 32 && n_q > 2) continue;  // 32/8 adds heads, not paths
      // Past 8 rows per tile (tokens times the GQA group) the tiles are converted and the keys not
      // chunked: the decode thresholds do not apply, short caches cover the path.
      const bool few_rows = n_q * (c.heads / c.kv_heads) <= posenc::detail::few_query_rows;
      for (index_t n_kv : few_rows ? lengths : short_lengths) {
        // Time goes to the portable kernels (scalar dot products) and the references (O(n_q n_kv)
        // per head; the double RoPE computes an angle per key element). The thresholds are the
        // blockwise driver's, the same for every kernel set: the portable kernels run on the
        // shorter caches. The references: few tokens, the short caches and the longest one.
        const bool portable = n_kv <= 8192;
        const bool reference = n_q <= 2 && (n_kv <= 1000 || (n_kv == 12289 && c.heads == 8));
        check_decode(c, in, n_q, n_kv, posenc::no_position<float>{}, posenc::no_position<double>{}, "none", portable,
                     reference);
        check_decode(c, in, n_q, n_kv, alibi_f, alibi_d, "alibi", portable, reference);
        check_decode(c, in, n_q, n_kv, rope_f, rope_d, "rope", portable, reference && n_kv <= 1000);
      }
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("half-precision kernels give the bits of the float kernels on widened data", "[attention][half]",
                   Eigen::half, Eigen::bfloat16) {
  for (simd_level level : levels()) {
    const posenc::detail::scoped_simd_cap cap(level);
    check_kernels_bitwise<TestType>();
  }
}

TEMPLATE_TEST_CASE("decode on a half-precision cache: the bits of float copies, the reference's accuracy",
                   "[attention][half][decode]", Eigen::half, Eigen::bfloat16) {
  check_decode_sweep<TestType>();
}
