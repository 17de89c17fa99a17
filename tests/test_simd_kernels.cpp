// The tile kernels written once over per-instruction-set vector helpers (softmax rows and the
// half-precision widening), on every kernel set this CPU has (NEON under emulation on x86), against
// double-precision references written from the formulas. Row lengths sweep 1, each vector width
// minus one, the width, plus one, and odd lengths; rows start at odd offsets; columns past a row's
// end must keep their bits.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <type_traits>
#include <vector>

#include "posenc/detail/attention_kernels.hpp"
#include "posenc/detail/cpu.hpp"
#include "posenc/simd.hpp"

using posenc::index_t;

namespace {

constexpr float neg_inf = -std::numeric_limits<float>::infinity();
constexpr float sentinel = 12345.0f;  // in the columns past a row; a kernel must not write there
constexpr double eps = std::numeric_limits<float>::epsilon();

// Row lengths around the widths 4 (NEON), 8 (AVX2) and 16 (AVX-512).
constexpr index_t lengths[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 100};

std::string where(const char* what, index_t n, index_t row, index_t col) {
  std::ostringstream os;
  os << what << ": length " << n << ", row " << row << ", column " << col << ", kernels "
     << posenc::detail::kernels_for<float>().name;
  return os.str();
}

}  // namespace

TEST_CASE("softmax kernel of every kernel set equals the online-softmax formula", "[simd][softmax]") {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> logit(-30.0f, 8.0f);
  std::bernoulli_distribution masked(0.3);
  for (const auto level : posenc::detail::available_simd_levels()) {
    const posenc::detail::scoped_simd_cap cap(level);
    const auto& kern = posenc::detail::kernels_for<float>();
    for (const index_t n : lengths) {
      // Rows: 0 without a previous state, 1 with one, 2 fully masked with a previous state, 3 fully
      // masked without one. One spare column before each row (odd start) and three after it.
      const index_t rows = 4, lds = n + 4;
      std::vector<float> s(static_cast<std::size_t>(rows * lds), sentinel);
      for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < n; ++j) {
          float& x = s[static_cast<std::size_t>(i * lds + 1 + j)];
          x = i >= 2 || (masked(gen) && j != n / 2) ? neg_inf : logit(gen);
        }
      const std::vector<float> before = s;
      std::vector<float> m = {neg_inf, 1.5f, 0.25f, neg_inf}, l = {0.0f, 3.0f, 2.0f, 0.0f}, alpha(4, -1.0f);
      const std::vector<float> m0 = m, l0 = l;
      kern.softmax(s.data() + 1, lds, rows, n, m.data(), l.data(), alpha.data());

      for (index_t i = 0; i < rows; ++i) {
        const float* in = before.data() + i * lds + 1;
        double tile_max = -std::numeric_limits<double>::infinity();
        for (index_t j = 0; j < n; ++j) tile_max = std::max(tile_max, static_cast<double>(in[j]));
        const double m_prev = m0[static_cast<std::size_t>(i)];
        const double m_new = std::max(m_prev, tile_max);
        INFO(where("softmax", n, i, -1));
        if (std::isinf(m_new)) {  // nothing visible yet: weights 0, state kept
          CHECK(alpha[static_cast<std::size_t>(i)] == 1.0f);
          CHECK(m[static_cast<std::size_t>(i)] == m0[static_cast<std::size_t>(i)]);
          CHECK(l[static_cast<std::size_t>(i)] == l0[static_cast<std::size_t>(i)]);
          for (index_t j = 0; j < n; ++j) CHECK(s[static_cast<std::size_t>(i * lds + 1 + j)] == 0.0f);
        } else {
          const double a = std::isinf(m_prev) ? 0.0 : std::exp(m_prev - m_new);
          double sum = 0;
          for (index_t j = 0; j < n; ++j) {
            const double p = std::isinf(in[j]) ? 0.0 : std::exp(static_cast<double>(in[j]) - m_new);
            sum += p;
            const double got = s[static_cast<std::size_t>(i * lds + 1 + j)];
            INFO(where("softmax weight", n, i, j) << ": got " << got << ", expected " << p);
            // exp's polynomial is within 1.5e-7 relative; the argument's rounding adds |x| eps.
            CHECK(std::abs(got - p) <= 8 * eps * (1 + std::abs(static_cast<double>(in[j]) - m_new)) * std::max(p, 1e-30));
            if (std::isinf(in[j])) CHECK(got == 0.0);
          }
          const double l_ref = a * l0[static_cast<std::size_t>(i)] + sum;
          CHECK(m[static_cast<std::size_t>(i)] == static_cast<float>(m_new));
          CHECK(std::abs(alpha[static_cast<std::size_t>(i)] - a) <= 8 * eps * std::max(a, 1e-30) * (1 + std::abs(m_prev - m_new)));
          CHECK(std::abs(l[static_cast<std::size_t>(i)] - l_ref) <= 64 * eps * (1 + static_cast<double>(n)) * l_ref);
        }
        // Nothing before or after the row is written.
        CHECK(s[static_cast<std::size_t>(i * lds)] == sentinel);
        for (index_t j = n + 1; j < lds; ++j) CHECK(s[static_cast<std::size_t>(i * lds + j)] == sentinel);
      }
    }
  }
}

TEMPLATE_TEST_CASE("convert kernel of every kernel set widens and scales with one rounding", "[simd][convert]",
                   Eigen::half, Eigen::bfloat16) {
  using H = TestType;
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> value(-300.0f, 300.0f);
  for (const auto level : posenc::detail::available_simd_levels()) {
    const posenc::detail::scoped_simd_cap cap(level);
    const auto& kern = posenc::detail::kernels_for<float>();
    for (const index_t d : lengths) {
      for (const float factor : {1.0f, 0.088388347f, -3.3f}) {
        const index_t n = 3, lds = d + 3, ldd = d + 5;
        std::vector<H> src(static_cast<std::size_t>(n * lds + 1));
        for (auto& x : src) x = H(value(gen));
        std::vector<float> dst(static_cast<std::size_t>(n * ldd + 1), sentinel);
        if constexpr (std::is_same_v<H, Eigen::half>) {
          kern.convert_f16(src.data() + 1, lds, n, d, factor, dst.data() + 1, ldd);
        } else {
          kern.convert_bf16(src.data() + 1, lds, n, d, factor, dst.data() + 1, ldd);
        }
        CHECK(dst[0] == sentinel);
        for (index_t i = 0; i < n; ++i) {
          for (index_t c = 0; c < ldd; ++c) {
            const float got = dst[static_cast<std::size_t>(1 + i * ldd + c)];
            INFO(where("convert", d, i, c) << ", factor " << factor);
            if (c >= d) {
              CHECK(got == sentinel);
              continue;
            }
            // A half value is a float, the product of two floats is exact in double, so the one
            // rounding of `factor * x` is this reference's rounding to float.
            const double x = static_cast<double>(static_cast<float>(src[static_cast<std::size_t>(1 + i * lds + c)]));
            CHECK(got == static_cast<float>(static_cast<double>(factor) * x));
          }
        }
      }
    }
  }
}

TEST_CASE("the public cap: names, parsing, levels no higher than the cap, restored by scoped_simd_cap",
          "[simd][cap]") {
  using posenc::simd_level;
  for (const simd_level l : {simd_level::portable, simd_level::avx2, simd_level::avx512, simd_level::neon})
    CHECK(posenc::parse_simd_level(posenc::simd_level_name(l)) == l);
  CHECK(posenc::simd_level_name(simd_level::avx2) == "avx2");
  CHECK_THROWS_WITH(posenc::parse_simd_level("AVX2", "POSENC_SIMD_CAP"),
                    "posenc: POSENC_SIMD_CAP = 'AVX2' is not a kernel set; expected portable, avx2, avx512 or neon");
  const simd_level before = posenc::simd_cap();
  {
    const posenc::scoped_simd_cap cap(simd_level::portable);
    CHECK(posenc::simd_cap() == simd_level::portable);
    CHECK(posenc::simd_level_in_use() == simd_level::portable);
    posenc::set_simd_cap(simd_level::avx2);
    const simd_level in_use = posenc::simd_level_in_use();
    // The first vector set of the architecture, or portable on a CPU without one.
    CHECK((in_use == simd_level::portable || in_use == simd_level::avx2 || in_use == simd_level::neon));
    CHECK(in_use != simd_level::avx512);
    posenc::set_simd_cap(simd_level::avx512);
    CHECK(posenc::simd_level_in_use() == posenc::detected_simd_level());
  }
  CHECK(posenc::simd_cap() == before);
}

TEST_CASE("pack_kt of every kernel set is the plain transpose, zero past the keys", "[simd][pack_kt]") {
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> value(-4.0f, 4.0f);
  std::vector<index_t> sizes;  // around every width: 1 .. 2 * 16 + 1, and 128
  for (index_t n = 1; n <= 33; ++n) sizes.push_back(n);
  sizes.push_back(128);
  for (const auto level : posenc::detail::available_simd_levels()) {
    const posenc::detail::scoped_simd_cap cap(level);
    const auto& kern = posenc::detail::kernels_for<float>();
    for (const index_t nk : sizes)
      for (const index_t d : sizes) {
        const index_t ldk = d + 1, ldkt = (nk + 31) / 32 * 32;
        std::vector<float> k(static_cast<std::size_t>(nk * ldk));
        for (auto& x : k) x = value(gen);
        std::vector<float> kt(static_cast<std::size_t>(d * ldkt + 32), sentinel);
        kern.pack_kt(k.data(), ldk, nk, d, kt.data(), ldkt);
        index_t wrong = 0;
        for (index_t c = 0; c < d; ++c)
          for (index_t j = 0; j < ldkt; ++j)
            wrong += kt[static_cast<std::size_t>(c * ldkt + j)] != (j < nk ? k[static_cast<std::size_t>(j * ldk + c)] : 0.0f);
        for (std::size_t i = static_cast<std::size_t>(d * ldkt); i < kt.size(); ++i) wrong += kt[i] != sentinel;
        INFO(where("pack_kt", d, -1, -1) << ", keys " << nk);
        CHECK(wrong == 0);
      }
  }
}

TEST_CASE("qk_rows of every kernel set: dot products, the same bits in any call, fp16/bf16 keys as float",
          "[simd][qk_rows]") {
  std::mt19937 gen(9);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  std::uniform_int_distribution<int> small(-255, 255);
  const index_t max_rows = 9, max_keys = 64 + 3;
  std::vector<index_t> key_counts;
  for (index_t n = 1; n <= 13; ++n) key_counts.push_back(n);
  key_counts.push_back(64);
  for (const auto level : posenc::detail::available_simd_levels()) {
    const posenc::detail::scoped_simd_cap cap(level);
    const auto& kern = posenc::detail::kernels_for<float>();
    for (const index_t d : {1, 3, 4, 5, 8, 15, 16, 17, 64, 128, 130}) {
      // Rows start at odd offsets. Keys are m / 64 with |m| < 256: exact in fp16 and bf16, so the
      // half-precision kernels must give the float kernel's bits on the same values.
      const index_t ldq = d + 1, ldk = d + 3;
      std::vector<float> q(static_cast<std::size_t>(max_rows * ldq + 1)), k(static_cast<std::size_t>(max_keys * ldk + 1));
      for (auto& x : q) x = value(gen);
      for (auto& x : k) x = static_cast<float>(small(gen)) / 64.0f;
      std::vector<Eigen::half> kh(k.size());
      std::vector<Eigen::bfloat16> kb(k.size());
      for (std::size_t i = 0; i < k.size(); ++i) {
        kh[i] = Eigen::half(k[i]);
        kb[i] = Eigen::bfloat16(k[i]);
      }
      const float* q0 = q.data() + 1;
      auto key = [&](index_t j) { return k.data() + 1 + j * ldk; };
      // Every (row, key) alone: one row, one key.
      std::vector<float> alone(static_cast<std::size_t>(max_rows * max_keys));
      for (index_t i = 0; i < max_rows; ++i)
        for (index_t j = 0; j < max_keys; ++j)
          kern.qk_rows(q0 + i * ldq, ldq, 1, d, key(j), ldk, 1, &alone[static_cast<std::size_t>(i * max_keys + j)], 1,
                       nullptr, 0);
      for (index_t i = 0; i < max_rows; ++i)
        for (index_t j = 0; j < max_keys; ++j) {
          double dot = 0, mag = 0;
          for (index_t c = 0; c < d; ++c) {
            const double p = static_cast<double>(q0[i * ldq + c]) * key(j)[c];
            dot += p;
            mag += std::abs(p);
          }
          const double got = alone[static_cast<std::size_t>(i * max_keys + j)];
          INFO(where("qk_rows", d, i, j) << ": got " << got << ", expected " << dot);
          CHECK(std::abs(got - dot) <= static_cast<double>(d + 4) * eps * mag);
        }
      // Calls of 1 .. 9 rows and 1 .. 13 or 64 keys, from key 0 or 3, with and without rows to
      // request ahead, keys of float, fp16 and bf16: each value is its row and key's bits alone;
      // nothing past a row's keys is written.
      for (index_t nq = 1; nq <= max_rows; ++nq)
        for (const index_t nk : key_counts)
          for (const index_t j0 : {index_t{0}, index_t{3}}) {
            if (j0 + nk > max_keys) continue;
            const index_t lds = nk + 2;
            const index_t off = 1 + j0 * ldk;
            for (int type = 0; type < 3; ++type) {
              std::vector<float> s(static_cast<std::size_t>(nq * lds), sentinel);
              const bool ahead = (nq + nk) % 2 == 0;
              if (type == 0) {
                kern.qk_rows(q0, ldq, nq, d, k.data() + off, ldk, nk, s.data(), lds, ahead ? k.data() + 1 : nullptr,
                             ahead ? nk : 0);
              } else if (type == 1) {
                kern.qk_rows_f16(q0, ldq, nq, d, kh.data() + off, ldk, nk, s.data(), lds,
                                 ahead ? kh.data() + 1 : nullptr, ahead ? nk : 0);
              } else {
                kern.qk_rows_bf16(q0, ldq, nq, d, kb.data() + off, ldk, nk, s.data(), lds,
                                  ahead ? kb.data() + 1 : nullptr, ahead ? nk : 0);
              }
              index_t wrong = 0;
              for (index_t i = 0; i < nq; ++i)
                for (index_t j = 0; j < lds; ++j) {
                  const float got = s[static_cast<std::size_t>(i * lds + j)];
                  const float want = j < nk ? alone[static_cast<std::size_t>(i * max_keys + j0 + j)] : sentinel;
                  wrong += std::memcmp(&got, &want, sizeof(float)) != 0;
                }
              INFO(where("qk_rows", d, nq, nk) << ", first key " << j0 << ", keys stored as "
                                               << (type == 0 ? "float" : type == 1 ? "fp16" : "bf16"));
              CHECK(wrong == 0);
            }
          }
    }
  }
}
