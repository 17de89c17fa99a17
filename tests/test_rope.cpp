// RoPE: rotation against an independent long double reference, its properties, the cached and
// SIMD paths, strided views, bf16/fp16 storage, and bad input.
#include <Eigen/Core>
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "posenc/encoders/rope.hpp"
#include "posenc/simd.hpp"

using posenc::index_t;
using posenc::position;
using posenc::rope_layout;
using ld = long double;

namespace {

template <class T>
constexpr ld eps = std::numeric_limits<T>::epsilon();

// A rotated element is (a cos - b sin) * m: cos and sin rounded to T, two products and a sum
// rounded, so at most about 2 eps (|a| + |b|) m away; 4 leaves headroom.
constexpr ld k_rot_tol = 4;
// Both the reference and the encoder take inv_freq (and the encoder its turns per position,
// inv / 2 pi) from long double tables, so each angle is off by a few 2^-64 relative to the angle
// (x86's 64-bit long double). This bounds both (times |a| + |b|); it matters only for double at
// large positions (about 1e-10 at 2^31, where float's eps is 1.2e-7).
constexpr ld k_ref_angle_rel = 0x1p-60L;

template <class T>
posenc::row_matrix<T> random_matrix(index_t rows, index_t cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  posenc::row_matrix<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) m(i, j) = static_cast<T>(u(gen));
  return m;
}

std::vector<ld> ref_plain_inv(ld base, index_t r) {
  std::vector<ld> inv(static_cast<std::size_t>(r / 2));
  for (index_t i = 0; i < r / 2; ++i) inv[static_cast<std::size_t>(i)] = std::pow(base, -ld(2 * i) / ld(r));
  return inv;
}

// The two dims of pair i inside a head.
std::pair<index_t, index_t> pair_dims(rope_layout layout, index_t r, index_t i) {
  return layout == rope_layout::half_split ? std::pair{i, i + r / 2} : std::pair{2 * i, 2 * i + 1};
}

struct ref_result {
  posenc::row_matrix<ld> value;  // the rotated matrix
  posenc::row_matrix<ld> tol;    // allowed |got - value| per element, for scalar type T
};

// Independent reference: every pair of every head turned by pos[row] * inv[i] in long double.
template <class T>
ref_result ref_rotate(const posenc::row_matrix<T>& x, index_t head_dim, index_t r, rope_layout layout,
                      const std::vector<ld>& inv, ld mag, const std::vector<position>& pos) {
  ref_result out{x.template cast<ld>(), posenc::row_matrix<ld>::Zero(x.rows(), x.cols())};
  for (index_t row = 0; row < x.rows(); ++row) {
    for (index_t h = 0; h < x.cols() / head_dim; ++h) {
      for (index_t i = 0; i < r / 2; ++i) {
        auto [da, db] = pair_dims(layout, r, i);
        const index_t ca = h * head_dim + da, cb = h * head_dim + db;
        const ld angle = ld(pos[static_cast<std::size_t>(row)]) * inv[static_cast<std::size_t>(i)];
        const ld c = std::cos(angle), s = std::sin(angle);
        const ld a = x(row, ca), b = x(row, cb);
        out.value(row, ca) = (a * c - b * s) * mag;
        out.value(row, cb) = (b * c + a * s) * mag;
        const ld t = (std::abs(a) + std::abs(b)) * (k_rot_tol * eps<T> * mag + std::abs(angle) * k_ref_angle_rel);
        out.tol(row, ca) = t;
        out.tol(row, cb) = t;
      }
    }
  }
  return out;
}

// The element with the largest error relative to its tolerance; printed when a check fails.
struct worst {
  ld ratio = 0, got = 0, want = 0, tol = 0;
  index_t row = -1, col = -1;
  std::string str() const {
    std::ostringstream o;
    o.precision(20);
    o << "worst element (" << row << ", " << col << "): got " << got << ", want " << want << ", tolerance " << tol;
    return o.str();
  }
};

template <class M>
worst compare(const M& got, const ref_result& ref) {
  worst w;
  for (index_t i = 0; i < ref.value.rows(); ++i) {
    for (index_t j = 0; j < ref.value.cols(); ++j) {
      const ld g = static_cast<ld>(static_cast<double>(got(i, j)));
      const ld err = std::abs(g - ref.value(i, j));
      // A zero tolerance (a pass-through dim) demands the exact input value.
      const ld ratio = ref.tol(i, j) > 0 ? err / ref.tol(i, j) : (err == 0 ? 0 : std::numeric_limits<ld>::infinity());
      if (ratio > w.ratio || w.row < 0) w = {ratio, g, ref.value(i, j), ref.tol(i, j), i, j};
    }
  }
  return w;
}

template <class A, class B>
bool bitwise_equal(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (index_t i = 0; i < a.rows(); ++i)
    for (index_t j = 0; j < a.cols(); ++j) {
      const typename A::Scalar va = a(i, j);
      const typename A::Scalar vb = b(i, j);
      if (std::memcmp(&va, &vb, sizeof va) != 0) return false;
    }
  return true;
}

std::vector<position> random_positions(index_t n, position lo, position hi, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<position> u(lo, hi);
  std::vector<position> p(static_cast<std::size_t>(n));
  for (auto& v : p) v = u(gen);
  return p;
}

}  // namespace

TEMPLATE_TEST_CASE("rope rotates every head like the long double reference", "[rope]", float, double) {
  using T = TestType;
  struct config {
    index_t head_dim, rotary_dim;
    rope_layout layout;
    double base;
    index_t heads;
  };
  const config configs[] = {
      {128, 0, rope_layout::half_split, 1e4, 3},    {128, 0, rope_layout::interleaved, 1e4, 2},
      {12, 8, rope_layout::half_split, 500.0, 5},   {12, 8, rope_layout::interleaved, 500.0, 5},
      {2, 0, rope_layout::half_split, 1e4, 7},      {34, 34, rope_layout::interleaved, 5e5, 1},
      {300, 290, rope_layout::half_split, 1e6, 2},  // 145 pairs: more than one stack chunk
      {300, 290, rope_layout::interleaved, 1e6, 2},
  };
  for (const config& c : configs) {
    const index_t r = c.rotary_dim ? c.rotary_dim : c.head_dim;
    posenc::rope<T> rope({.head_dim = c.head_dim, .rotary_dim = c.rotary_dim, .layout = c.layout, .base = c.base});
    CHECK(rope.rotary_dim() == r);
    const index_t rows = 9;
    auto x = random_matrix<T>(rows, c.heads * c.head_dim, 7);
    auto pos = random_positions(rows, -100000, 100000, 11);
    pos[0] = 0;
    pos[1] = 1;
    auto y = x;
    rope.rotate(y, posenc::positions(pos));
    const ref_result ref = ref_rotate(x, c.head_dim, r, c.layout, ref_plain_inv(c.base, r), 1.0L, pos);
    const worst w = compare(y, ref);
    INFO("head_dim " << c.head_dim << ", rotary_dim " << r << ", heads " << c.heads << ", layout "
                     << static_cast<int>(c.layout) << ": " << w.str());
    CHECK(w.ratio <= 1);
  }
}

TEMPLATE_TEST_CASE("rope keeps full accuracy at positions up to 2^31", "[rope][numerics]", float, double) {
  using T = TestType;
  const std::vector<position> pos = {
      (1LL << 31),     (1LL << 31) - 1, -(1LL << 31), (1LL << 30) + 12345, (1LL << 24) + 1,
      (1LL << 24) - 1, 16777217 * 3,    1000000007,   -(1LL << 29) - 77,   8191};
  const index_t rows = static_cast<index_t>(pos.size());
  for (auto layout : {rope_layout::half_split, rope_layout::interleaved}) {
    // A Llama-style table, against the long double reference (exact to about 2^-63 relative).
    {
      posenc::rope<T> rope({.head_dim = 128, .layout = layout, .base = 1e4});
      auto x = random_matrix<T>(rows, 256, 3);
      auto y = x;
      rope.rotate(y, posenc::positions(pos));
      const worst w = compare(y, ref_rotate(x, 128, 128, layout, ref_plain_inv(1e4, 128), 1.0L, pos));
      INFO("base 1e4, layout " << static_cast<int>(layout) << ": " << w.str());
      CHECK(w.ratio <= 1);
    }
    // base 2^16, r = 16: inv_freq = 4^-i exactly, so the reference angles are exact and float
    // gets no allowance for them. (double keeps it: the encoder's turns inv / 2 pi are long double.)
    {
      posenc::rope<T> rope({.head_dim = 16, .layout = layout, .base = 65536.0});
      std::vector<ld> inv(8);
      for (int i = 0; i < 8; ++i) inv[static_cast<std::size_t>(i)] = std::ldexp(1.0L, -2 * i);
      auto x = random_matrix<T>(rows, 32, 5);
      auto y = x;
      rope.rotate(y, posenc::positions(pos));
      ref_result ref = ref_rotate(x, 16, 16, layout, inv, 1.0L, pos);
      for (index_t i = 0; i < rows && std::same_as<T, float>; ++i)
        for (index_t j = 0; j < 32; ++j) {
          const index_t jj = j % 16;
          index_t partner = layout == rope_layout::half_split ? (jj < 8 ? jj + 8 : jj - 8) : (jj ^ 1);
          partner += j - jj;
          ref.tol(i, j) = (std::abs(ld(x(i, j))) + std::abs(ld(x(i, partner)))) * k_rot_tol * eps<T>;
        }
      const worst w = compare(y, ref);
      INFO("base 2^16, layout " << static_cast<int>(layout) << ": " << w.str());
      CHECK(w.ratio <= 1);
    }
  }
}

TEMPLATE_TEST_CASE("rope properties: norms, relative positions, interpolation, layouts", "[rope][properties]", float,
                   double) {
  using T = TestType;
  const index_t hd = 64;
  SECTION("keeps the norm of every head") {
    posenc::rope<T> rope({.head_dim = hd, .base = 1e4});
    auto x = random_matrix<T>(16, 4 * hd, 21);
    auto y = x;
    const auto pos = random_positions(16, -(1LL << 31), 1LL << 31, 22);
    rope.rotate(y, posenc::positions(pos));
    ld worst_rel = 0;
    for (index_t i = 0; i < 16; ++i)
      for (index_t h = 0; h < 4; ++h) {
        const ld n0 = x.row(i).segment(h * hd, hd).template cast<ld>().norm();
        const ld n1 = y.row(i).segment(h * hd, hd).template cast<ld>().norm();
        worst_rel = std::max(worst_rel, std::abs(n1 - n0) / n0);
      }
    // Each element is within ~2 eps (|a| + |b|) of exact: the norm within a few eps.
    CHECK(worst_rel <= 8 * eps<T>);
  }
  SECTION("<R(m) q, R(n) k> depends only on m - n") {
    posenc::rope<T> rope({.head_dim = hd, .layout = rope_layout::interleaved, .base = 1e4});
    const auto q = random_matrix<T>(1, hd, 31);
    const auto k = random_matrix<T>(1, hd, 32);
    auto dot_at = [&](position m, position n) {
      auto qq = q;
      auto kk = k;
      rope.rotate(qq, posenc::arange(m, 1));
      rope.rotate(kk, posenc::arange(n, 1));
      return static_cast<ld>(qq.template cast<ld>().row(0).dot(kk.template cast<ld>().row(0)));
    };
    const ld scale = q.template cast<ld>().norm() * k.template cast<ld>().norm();
    for (position d : {0LL, 1LL, -5LL, 1000LL, -123457LL}) {
      const ld base_dot = dot_at(d, 0);
      for (position shift : {1LL, 77LL, 4096LL, 1LL << 20, -(1LL << 25), 1LL << 31}) {
        const ld shifted = dot_at(d + shift, shift);
        INFO("m - n = " << d << ", shift " << shift);
        CHECK(std::abs(shifted - base_dot) <= 16 * eps<T> * scale);
      }
    }
  }
  SECTION("linear interpolation by s is RoPE at pos / s") {
    for (double s : {2.0, 4.0, 8.0}) {
      posenc::rope<T> plain({.head_dim = hd, .base = 1e4});
      posenc::rope<T> linear({.head_dim = hd, .base = 1e4, .scaling = posenc::linear_scaling{.factor = s}});
      CHECK(linear.name() == "rope-linear");
      const auto base_pos = random_positions(12, -50000, 1LL << 28, 41);
      std::vector<position> scaled(base_pos.size());
      for (std::size_t i = 0; i < base_pos.size(); ++i) scaled[i] = base_pos[i] * static_cast<position>(s);
      auto x = random_matrix<T>(12, 2 * hd, 42);
      auto a = x;
      auto b = x;
      plain.rotate(a, posenc::positions(base_pos));
      linear.rotate(b, posenc::positions(scaled));
      // Both are within k_rot_tol eps (|a| + |b|) of the same exact value.
      const ld diff = (a.template cast<ld>() - b.template cast<ld>()).cwiseAbs().maxCoeff();
      INFO("s = " << s << ", max difference " << double(diff));
      CHECK(diff <= 2 * k_rot_tol * eps<T> * 2);
    }
  }
  SECTION("half-split and interleaved agree after permuting the dims") {
    // Interleaved dim 2i is half-split dim i, 2i + 1 is i + r/2; dims past r stay.
    const index_t r = 48;
    posenc::rope<T> half({.head_dim = hd, .rotary_dim = r, .layout = rope_layout::half_split, .base = 1e4});
    posenc::rope<T> inter({.head_dim = hd, .rotary_dim = r, .layout = rope_layout::interleaved, .base = 1e4});
    const index_t heads = 3;
    auto x = random_matrix<T>(10, heads * hd, 51);
    posenc::row_matrix<T> xp(10, heads * hd);
    for (index_t h = 0; h < heads; ++h)
      for (index_t d = 0; d < hd; ++d) {
        const index_t src = d >= r ? d : (d % 2 == 0 ? d / 2 : d / 2 + r / 2);
        xp.col(h * hd + d) = x.col(h * hd + src);
      }
    const auto pos = random_positions(10, -(1LL << 31), 1LL << 31, 52);
    half.rotate(x, posenc::positions(pos));
    inter.rotate(xp, posenc::positions(pos));
    posenc::row_matrix<T> back(10, heads * hd);
    for (index_t h = 0; h < heads; ++h)
      for (index_t d = 0; d < hd; ++d) {
        const index_t src = d >= r ? d : (d % 2 == 0 ? d / 2 : d / 2 + r / 2);
        back.col(h * hd + src) = xp.col(h * hd + d);
      }
    // Same angles and the same arithmetic per pair: the same bits.
    CHECK(bitwise_equal(back, x));
  }
  SECTION("partial rotary leaves the dims past r untouched") {
    posenc::rope<T> rope({.head_dim = hd, .rotary_dim = 20, .base = 1e4});
    auto x = random_matrix<T>(6, 5 * hd, 61);
    auto y = x;
    rope.rotate(y, posenc::arange(1000, 6));
    bool same = true;
    bool rotated = false;
    for (index_t h = 0; h < 5; ++h) {
      same = same && bitwise_equal(y.middleCols(h * hd + 20, hd - 20), x.middleCols(h * hd + 20, hd - 20));
      rotated = rotated || !bitwise_equal(y.middleCols(h * hd, 20), x.middleCols(h * hd, 20));
    }
    CHECK(same);
    CHECK(rotated);
  }
  SECTION("a negative position undoes the positive one") {
    posenc::rope<T> rope({.head_dim = hd, .base = 1e4});
    auto x = random_matrix<T>(5, 2 * hd, 71);
    auto y = x;
    const std::vector<position> p = {3, 1000, 1LL << 20, (1LL << 31) - 1, 123456789};
    std::vector<position> n(p.size());
    std::transform(p.begin(), p.end(), n.begin(), [](position v) { return -v; });
    rope.rotate(y, posenc::positions(p));
    rope.rotate(y, posenc::positions(n));
    const ld diff = (y.template cast<ld>() - x.template cast<ld>()).cwiseAbs().maxCoeff();
    CHECK(diff <= 4 * k_rot_tol * eps<T>);
  }
}

TEMPLATE_TEST_CASE("rope cache path equals the direct path bit for bit", "[rope][cache]", float, double) {
  using T = TestType;
  for (auto layout : {rope_layout::half_split, rope_layout::interleaved}) {
    posenc::rope<T> rope({.head_dim = 40,
                          .rotary_dim = 34,
                          .layout = layout,
                          .base = 1e4,
                          .scaling = posenc::yarn_scaling{.factor = 4, .original_max_position = 256}});
    const position start = (1LL << 31) - 300;
    auto cache = rope.make_cache(start, 600);
    CHECK(cache.start() == start);
    CHECK(cache.count() == 600);
    CHECK(cache.rotary_dim() == 34);
    CHECK(cache.layout() == layout);
    auto pos = random_positions(33, start, start + 599, 81);  // any order, repeats allowed
    pos[0] = start;
    pos[1] = start + 599;
    auto x = random_matrix<T>(33, 3 * 40, 82);
    auto a = x;
    auto b = x;
    rope.rotate(a, posenc::positions(pos));
    rope.rotate(b, posenc::positions(pos), cache);
    CHECK(bitwise_equal(a, b));
    // A contiguous range through the cache too.
    auto c = x;
    auto d = x;
    rope.rotate(c, posenc::arange(start + 10, 33));
    rope.rotate(d, posenc::arange(start + 10, 33), cache);
    CHECK(bitwise_equal(c, d));
    // A rotary dim wider than one stack chunk (290 pairs), through both paths.
    posenc::rope<T> wide({.head_dim = 600, .rotary_dim = 580, .layout = layout, .base = 1e6});
    auto wide_cache = wide.make_cache(-7, 40);
    const auto wide_pos = random_positions(5, -7, 32, 83);
    auto e = random_matrix<T>(5, 2 * 600, 84);
    auto f = e;
    wide.rotate(e, posenc::positions(wide_pos));
    wide.rotate(f, posenc::positions(wide_pos), wide_cache);
    CHECK(bitwise_equal(e, f));
    // The cache's values are the magnitude times cos/sin of the reference angle.
    const ld inv0 = 1.0L;  // pair 0 is kept by YaRN (it turns fastest)
    const ld angle = ld(start + 5) * inv0;
    const ld mag = 0.1L * std::log(4.0L) + 1;
    const ld tol = 2 * eps<T> + angle * k_ref_angle_rel;
    CHECK(std::abs(ld(cache.cos(start + 5, 0)) - std::cos(angle) * mag) <= tol);
    CHECK(std::abs(ld(cache.sin(start + 5, 0)) - std::sin(angle) * mag) <= tol);
  }
}

TEMPLATE_TEST_CASE("rope rotates strided views in place and leaves other columns alone", "[rope][views]", float,
                   double) {
  using T = TestType;
  const index_t hd = 24;
  for (auto layout : {rope_layout::half_split, rope_layout::interleaved}) {
    posenc::rope<T> rope({.head_dim = hd, .layout = layout, .base = 1e4});
    const auto pos = random_positions(7, 0, 1LL << 31, 91);
    auto cache = rope.make_cache(0, 100);
    const std::vector<position> small = {3, 99, 0, 42, 42, 17, 1};

    // A column block (two heads starting at column 9) of a wider buffer: a fused QKV slice.
    auto big = random_matrix<T>(7, 80, 92);
    const auto before = big;
    rope.rotate(big.block(0, 9, 7, 2 * hd), posenc::positions(pos));
    posenc::row_matrix<T> dense = before.block(0, 9, 7, 2 * hd);
    rope.rotate(dense, posenc::positions(pos));
    CHECK(bitwise_equal(big.block(0, 9, 7, 2 * hd), dense));
    CHECK(bitwise_equal(big.leftCols(9), before.leftCols(9)));
    CHECK(bitwise_equal(big.rightCols(80 - 9 - 2 * hd), before.rightCols(80 - 9 - 2 * hd)));

    // Rows with padding, through a Map with an outer stride, and the cached path.
    std::vector<T> buf(7 * 53);
    for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<T>(std::sin(double(i)));
    const auto buf_before = buf;
    Eigen::Map<posenc::row_matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>> map(buf.data(), 7, hd,
                                                                                  Eigen::OuterStride<>(53));
    rope.rotate(map, posenc::positions(small), cache);
    posenc::row_matrix<T> packed(7, hd);
    for (index_t i = 0; i < 7; ++i)
      for (index_t j = 0; j < hd; ++j) packed(i, j) = buf_before[static_cast<std::size_t>(i * 53 + j)];
    rope.rotate(packed, posenc::positions(small));
    bool rotated_ok = true, padding_ok = true;
    for (index_t i = 0; i < 7; ++i)
      for (index_t j = 0; j < 53; ++j) {
        const auto at = static_cast<std::size_t>(i * 53 + j);
        if (j < hd) {
          rotated_ok = rotated_ok && buf[at] == packed(i, j);
        } else {
          padding_ok = padding_ok && std::memcmp(&buf[at], &buf_before[at], sizeof(T)) == 0;
        }
      }
    CHECK(rotated_ok);
    CHECK(padding_ok);

    // A posenc::strided_view of one head in the middle of a row.
    auto m = random_matrix<T>(7, 3 * hd, 93);
    const auto m_before = m;
    posenc::strided_view<T> v(m.data(), 7, 3 * hd);
    rope.rotate(v.middle_cols(hd, hd), posenc::positions(pos));
    posenc::row_matrix<T> one = m_before.middleCols(hd, hd);
    rope.rotate(one, posenc::positions(pos));
    CHECK(bitwise_equal(m.middleCols(hd, hd), one));
    CHECK(bitwise_equal(m.leftCols(hd), m_before.leftCols(hd)));
    CHECK(bitwise_equal(m.rightCols(hd), m_before.rightCols(hd)));
  }
}

TEMPLATE_TEST_CASE("rope with any head count rotates each head alike", "[rope][heads]", float, double) {
  using T = TestType;
  const index_t hd = 16;
  posenc::rope<T> rope({.head_dim = hd, .base = 1e4});
  const auto pos = random_positions(5, -1000, 1LL << 31, 101);
  for (index_t heads : {1, 2, 3, 7, 32, 33}) {
    auto x = random_matrix<T>(5, heads * hd, static_cast<unsigned>(102 + heads));
    auto y = x;
    rope.rotate(y, posenc::positions(pos));
    bool ok = true;
    for (index_t h = 0; h < heads; ++h) {
      posenc::row_matrix<T> one = x.middleCols(h * hd, hd);
      rope.rotate(one, posenc::positions(pos));
      ok = ok && bitwise_equal(one, y.middleCols(h * hd, hd));
    }
    INFO(heads << " heads");
    CHECK(ok);
  }
  // Zero rows and zero heads are no-ops.
  posenc::row_matrix<T> empty(0, 2 * hd);
  rope.rotate(empty, posenc::arange(0, 0));
  posenc::row_matrix<T> none(3, 0);
  rope.rotate(none, posenc::arange(0, 3));
}

TEMPLATE_TEST_CASE("every SIMD path gives the portable path's bits", "[rope][simd]", float, double) {
  using T = TestType;
  namespace d = posenc::detail;
  const d::simd_level top = d::detected_simd_level();
  INFO("detected SIMD level " << static_cast<int>(top));
  // Pair counts around the vector widths (4, 8, 16 lanes), odd head_dims (partial rotary),
  // and an odd column offset so no row starts aligned.
  for (index_t half : {1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 33, 64}) {
    for (auto layout : {rope_layout::half_split, rope_layout::interleaved}) {
      const index_t hd = 2 * half + 1;
      posenc::rope<T> rope({.head_dim = hd, .rotary_dim = 2 * half, .layout = layout, .base = 1e4});
      auto cache = rope.make_cache(-20, 5000);
      const auto pos = random_positions(6, -20, 4979, static_cast<unsigned>(half));
      const auto x = random_matrix<T>(6, 1 + 3 * hd, static_cast<unsigned>(200 + half));
      auto run = [&](d::simd_level level, bool cached) {
        d::scoped_simd_cap cap(level);
        auto y = x;
        auto block = y.block(0, 1, 6, 3 * hd);
        if (cached) {
          rope.rotate(block, posenc::positions(pos), cache);
        } else {
          rope.rotate(block, posenc::positions(pos));
        }
        return y;
      };
      const auto ref = run(d::simd_level::portable, false);
      CHECK(!bitwise_equal(ref, x));
      for (const d::simd_level level : d::available_simd_levels()) {
        for (bool cached : {false, true}) {
          INFO("pairs " << half << ", layout " << static_cast<int>(layout) << ", level " << static_cast<int>(level)
                        << ", cached " << cached);
          CHECK(bitwise_equal(run(level, cached), ref));
        }
      }
    }
  }
}

TEST_CASE("rope on bf16 and fp16 storage rounds the float result once", "[rope][storage]") {
  const index_t hd = 32;
  for (auto layout : {rope_layout::half_split, rope_layout::interleaved}) {
    posenc::rope<float> rope({.head_dim = hd, .rotary_dim = 24, .layout = layout, .base = 1e4});
    const auto pos = random_positions(9, -(1LL << 31), 1LL << 31, 111);
    auto cache = rope.make_cache(1LL << 30, 64);
    const auto cpos = random_positions(9, 1LL << 30, (1LL << 30) + 63, 112);
    const auto xf = random_matrix<float>(9, 4 * hd, 113);
    auto check_storage = [&](auto tag, const char* name, ld unit_roundoff) {
      using S = decltype(tag);
      posenc::row_matrix<S> xs = xf.cast<S>();
      const posenc::row_matrix<float> xs_f = xs.template cast<float>();  // exactly the stored inputs
      for (bool cached : {false, true}) {
        auto ys = xs;
        auto yf = xs_f;
        const std::vector<position>& p = cached ? cpos : pos;
        if (cached) {
          rope.rotate(ys, posenc::positions(p), cache);
          rope.rotate(yf, posenc::positions(p), cache);
        } else {
          rope.rotate(ys, posenc::positions(p));
          rope.rotate(yf, posenc::positions(p));
        }
        // Computed in float, rounded to the storage type once: exactly the float result, rounded.
        const posenc::row_matrix<S> want = yf.template cast<S>();
        INFO(name << ", layout " << static_cast<int>(layout) << ", cached " << cached);
        CHECK(bitwise_equal(ys, want));
        // And within the storage type's rounding of the exact rotation.
        ref_result ref = ref_rotate(xs_f, hd, 24, layout, ref_plain_inv(1e4, 24), 1.0L, p);
        for (index_t i = 0; i < ref.tol.rows(); ++i)
          for (index_t j = 0; j < ref.tol.cols(); ++j)
            ref.tol(i, j) = ref.tol(i, j) > 0 ? ref.tol(i, j) + unit_roundoff * std::abs(ref.value(i, j)) : 0;
        const posenc::row_matrix<float> ys_f = ys.template cast<float>();
        const worst w = compare(ys_f, ref);
        INFO(w.str());
        CHECK(w.ratio <= 1);
      }
    };
    check_storage(Eigen::bfloat16{}, "bf16", 0x1p-8L);
    check_storage(Eigen::half{}, "fp16", 0x1p-11L);
  }
}

TEST_CASE("rope satisfies the rotation concept and names itself", "[rope]") {
  static_assert(posenc::rotation<posenc::rope<float>>);
  static_assert(posenc::rotation<posenc::rope<double>>);
  static_assert(posenc::rope<float>::family == posenc::encoding_family::rotation);
  CHECK(posenc::rope<float>({}).name() == "rope");
  CHECK(posenc::rope<float>({.scaling = posenc::yarn_scaling{.factor = 4}}).name() == "rope-yarn");
  CHECK(posenc::rope<double>({.scaling = posenc::llama3_scaling{}}).name() == "rope-llama3");
  posenc::rope<float> r({.head_dim = 64, .rotary_dim = 32, .layout = rope_layout::interleaved, .base = 5e5});
  CHECK(r.head_dim() == 64);
  CHECK(r.rotary_dim() == 32);
  CHECK(r.layout() == rope_layout::interleaved);
  CHECK(r.inv_freq().size() == 16);
  CHECK(r.magnitude() == 1.0);
}

TEST_CASE("rope rejects invalid parameters, naming them", "[rope][errors]") {
  using Catch::Matchers::Contains;
  using R = posenc::rope<float>;
  CHECK_THROWS_WITH(R({.head_dim = 0}), Contains("rope_params.head_dim") && Contains("0"));
  CHECK_THROWS_WITH(R({.head_dim = -4}), Contains("rope_params.head_dim"));
  CHECK_THROWS_WITH(R({.head_dim = 16, .rotary_dim = 7}), Contains("rope_params.rotary_dim = 7") && Contains("even"));
  CHECK_THROWS_WITH(R({.head_dim = 7}), Contains("rope_params.rotary_dim = 7"));
  CHECK_THROWS_WITH(R({.head_dim = 16, .rotary_dim = 18}),
                    Contains("rope_params.rotary_dim = 18") && Contains("head_dim"));
  CHECK_THROWS_WITH(R({.head_dim = 16, .rotary_dim = -2}), Contains("rope_params.rotary_dim"));
  CHECK_THROWS_WITH(R({.base = 0}), Contains("rope_params.base = 0"));
  CHECK_THROWS_WITH(R({.base = -1e4}), Contains("rope_params.base"));
  CHECK_THROWS_WITH(R({.base = std::numeric_limits<double>::infinity()}), Contains("rope_params.base"));
  CHECK_THROWS_WITH(R({.attention_factor = 0.0}), Contains("rope_params.attention_factor"));
  CHECK_THROWS_AS(R({.head_dim = 16, .rotary_dim = 7}), std::invalid_argument);
}

TEST_CASE("rope shape bugs fail POSENC_ASSERT", "[rope][errors]") {
  posenc::rope<float> rope({.head_dim = 8});
  posenc::row_matrix<float> x = posenc::row_matrix<float>::Zero(3, 24);
  posenc::row_matrix<float> bad_cols = posenc::row_matrix<float>::Zero(3, 20);
  CHECK_THROWS_AS(rope.rotate(bad_cols, posenc::arange(0, 3)), posenc::precondition_error);
  CHECK_THROWS_AS(rope.rotate(x, posenc::arange(0, 2)), posenc::precondition_error);
  CHECK_THROWS_AS(rope.rotate(x, posenc::arange(0, 4)), posenc::precondition_error);
  auto cache = rope.make_cache(10, 5);
  CHECK_THROWS_AS(rope.rotate(x, posenc::arange(9, 3), cache), posenc::precondition_error);
  CHECK_THROWS_AS(rope.rotate(x, posenc::arange(13, 3), cache), posenc::precondition_error);
  const std::vector<position> outside = {10, 14, 15};
  CHECK_THROWS_AS(rope.rotate(x, posenc::positions(outside), cache), posenc::precondition_error);
  CHECK_NOTHROW(rope.rotate(x, posenc::arange(12, 3), cache));
  CHECK_THROWS_AS(rope.rotate(bad_cols, posenc::arange(10, 3), cache), posenc::precondition_error);
  // A cache from an encoder with other parameters: another base, layout, policy or sequence length.
  posenc::rope<float> other_base({.head_dim = 8, .base = 5e5});
  posenc::rope<float> other_layout({.head_dim = 8, .layout = rope_layout::interleaved});
  posenc::rope<float> dyn_a(
      {.head_dim = 8,
       .scaling = posenc::dynamic_ntk_scaling{.factor = 2, .original_max_position = 16, .sequence_length = 32}});
  posenc::rope<float> dyn_b(
      {.head_dim = 8,
       .scaling = posenc::dynamic_ntk_scaling{.factor = 2, .original_max_position = 16, .sequence_length = 64}});
  CHECK_THROWS_AS(other_base.rotate(x, posenc::arange(10, 3), cache), posenc::precondition_error);
  CHECK_THROWS_AS(other_layout.rotate(x, posenc::arange(10, 3), cache), posenc::precondition_error);
  CHECK_THROWS_AS(dyn_b.rotate(x, posenc::arange(10, 3), dyn_a.make_cache(10, 5)), posenc::precondition_error);
  CHECK_NOTHROW(dyn_a.rotate(x, posenc::arange(10, 3), dyn_a.make_cache(10, 5)));
  CHECK_THROWS_AS(rope.make_cache(0, -1), posenc::precondition_error);
  CHECK_THROWS_AS(rope.make_cache(std::numeric_limits<position>::max() - 2, 5), posenc::precondition_error);
  // Far outside on either side, without overflowing the range arithmetic.
  auto negative = rope.make_cache(-5, 10);
  const std::vector<position> extremes = {std::numeric_limits<position>::max(), std::numeric_limits<position>::min(),
                                          -6, 5};
  for (position p : extremes) {
    INFO("position " << p);
    CHECK_FALSE(negative.contains(p));
    CHECK_THROWS_AS(rope.rotate(x.topRows(1), posenc::positions(std::span<const position>(&p, 1)), negative),
                    posenc::precondition_error);
  }
  CHECK(negative.contains(-5));
  CHECK(negative.contains(4));
  CHECK_THROWS_AS(cache.cos(9, 0), posenc::precondition_error);
  CHECK_THROWS_AS(cache.sin(10, 4), posenc::precondition_error);
}

TEST_CASE("rope tile rotator: every SIMD level gives the portable bits, within float of the formula",
          "[rope][simd][tile]") {
  // The half-split float rows of an attention kernel's key tiles: pair counts around the widths
  // 4, 8 and 16, partial rotary (the pass-through columns copied), positions across several
  // 256-position blocks and negative ones, in place and into another buffer.
  namespace d = posenc::detail;
  for (index_t half : {1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 64}) {
    const index_t hd = 2 * half + 3;
    const posenc::rope<float> rope({.head_dim = hd, .rotary_dim = 2 * half, .base = 1e4});
    const auto rot = rope.tile_rotator();
    std::vector<float> scratch(static_cast<std::size_t>(rot.scratch_size()));
    const auto pos = random_positions(9, -300, 2000, static_cast<unsigned>(half));
    const auto x = random_matrix<float>(9, hd, static_cast<unsigned>(300 + half));
    auto run = [&](d::simd_level level, bool in_place) {
      const d::scoped_simd_cap cap(level);
      posenc::row_matrix<float> y = x;
      if (in_place) {
        rot.rotate(posenc::view_of(y), posenc::positions(pos), scratch.data());
      } else {
        posenc::row_matrix<float> to = posenc::row_matrix<float>::Constant(9, hd, 5.0f);
        rot.rotate(posenc::strided_view<const float>(posenc::view_of(x)), posenc::view_of(to), posenc::positions(pos),
                   scratch.data());
        y = to;
      }
      return y;
    };
    const auto ref = run(d::simd_level::portable, true);
    // Against the rotation in double: each factor is rounded a few times in float.
    for (index_t i = 0; i < 9; ++i)
      for (index_t k = 0; k < half; ++k) {
        const double theta = static_cast<double>(pos[static_cast<std::size_t>(i)]) *
                             std::pow(1e4, -2.0 * static_cast<double>(k) / static_cast<double>(2 * half));
        const double a = x(i, k), b = x(i, half + k);
        INFO("pairs " << half << ", row " << i << ", pair " << k);
        CHECK(std::abs(ref(i, k) - (a * std::cos(theta) - b * std::sin(theta))) <= 2e-5 * (std::abs(a) + std::abs(b)));
        CHECK(std::abs(ref(i, half + k) - (b * std::cos(theta) + a * std::sin(theta))) <=
              2e-5 * (std::abs(a) + std::abs(b)));
      }
    for (index_t i = 0; i < 9; ++i)
      for (index_t k = 2 * half; k < hd; ++k) CHECK(ref(i, k) == x(i, k));
    for (const d::simd_level level : d::available_simd_levels())
      for (bool in_place : {true, false}) {
        INFO("pairs " << half << ", level " << posenc::simd_level_name(level) << ", in place " << in_place);
        CHECK(bitwise_equal(run(level, in_place), ref));
      }
  }
}

TEST_CASE("rope tile rotator: positions just above -2^52, whose block starts at -2^52, agree with rotate",
          "[rope][tile][edges]") {
  // The rotator splits p into a multiple of 256 (the floor) and the rest, so positions in
  // (-2^52, -2^52 + 256) start their block at -2^52 itself, which must be reduced exactly too.
  const position b = position{1} << 52;
  const posenc::rope<float> rope({.head_dim = 16, .base = 1e4});
  const auto rot = rope.tile_rotator();
  std::vector<float> scratch(static_cast<std::size_t>(rot.scratch_size()));
  const std::vector<position> pos{-b, -b + 1, -b + 2, -b + 255, -b + 256, b - 1, b - 255};
  const auto x = random_matrix<float>(static_cast<index_t>(pos.size()), 16, 77);
  posenc::row_matrix<float> direct = x, tile = x;
  rope.rotate(direct, posenc::positions(pos));
  rot.rotate(posenc::view_of(tile), posenc::positions(pos), scratch.data());
  for (index_t i = 0; i < direct.rows(); ++i)
    for (index_t k = 0; k < 16; ++k) {
      INFO("position " << pos[static_cast<std::size_t>(i)] << ", column " << k);
      CHECK(std::abs(tile(i, k) - direct(i, k)) <= 1e-5f * (1.0f + x.row(i).cwiseAbs().maxCoeff()));
    }
}
