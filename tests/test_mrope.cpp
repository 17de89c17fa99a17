// Multi-axis RoPE (M-RoPE, Qwen2-VL / Qwen3-VL) and axial 2-D RoPE against long double references
// written from the formulas; text tokens against RoPE; bad input.
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "posenc/attention/batch.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/encoders/mrope.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::position;
using posenc::rope_layout;
using ld = long double;

namespace {

// The axis of pair k, written from Hugging Face's conventions. Sections: Qwen2-VL splits the
// r/2 pairs into consecutive runs of sections[a] pairs. Interleaved (Qwen3-VL): start from axis 0
// everywhere, then for axis a >= 1 overwrite pairs a, a + n, a + 2n, ... below n * sections[a].
std::vector<index_t> ref_axes(const std::vector<index_t>& sections, bool interleaved, index_t half) {
  const auto n = static_cast<index_t>(sections.size());
  std::vector<index_t> axis(static_cast<std::size_t>(half), 0);
  if (interleaved) {
    for (index_t a = 1; a < n; ++a)
      for (index_t k = a; k < n * sections[static_cast<std::size_t>(a)] && k < half; k += n)
        axis[static_cast<std::size_t>(k)] = a;
  } else {
    index_t k = 0;
    for (index_t a = 0; a < n; ++a)
      for (index_t c = 0; c < sections[static_cast<std::size_t>(a)]; ++c) axis[static_cast<std::size_t>(k++)] = a;
  }
  return axis;
}

// Turns pair k of every head of x by angle(row, k), in long double; returns the largest error of
// got against it, relative to the tolerance 4 eps (|a| + |b|) + |angle| (|a| + |b|) 2^-60.
template <class T, class Angle>
double worst_ratio(const posenc::row_matrix<T>& x, const posenc::row_matrix<T>& got, index_t head_dim, index_t r,
                   rope_layout layout, Angle angle) {
  double worst = 0;
  for (index_t i = 0; i < x.rows(); ++i)
    for (index_t h = 0; h < x.cols() / head_dim; ++h) {
      for (index_t k = 0; k < r / 2; ++k) {
        const index_t da = layout == rope_layout::half_split ? k : 2 * k;
        const index_t db = layout == rope_layout::half_split ? k + r / 2 : 2 * k + 1;
        const index_t ca = h * head_dim + da, cb = h * head_dim + db;
        const ld t = angle(i, k);
        const ld a = x(i, ca), b = x(i, cb);
        const ld ra = a * std::cos(t) - b * std::sin(t), rb = b * std::cos(t) + a * std::sin(t);
        const ld tol =
            (std::abs(a) + std::abs(b)) * (4 * ld(std::numeric_limits<T>::epsilon()) + std::abs(t) * 0x1p-60L) +
            std::numeric_limits<ld>::min();
        worst = std::max(worst, double(std::abs(ld(got(i, ca)) - ra) / tol));
        worst = std::max(worst, double(std::abs(ld(got(i, cb)) - rb) / tol));
      }
      for (index_t c = r; c < head_dim; ++c)  // pass-through dims are untouched
        worst = std::max(worst, got(i, h * head_dim + c) == x(i, h * head_dim + c) ? 0.0 : 1e30);
    }
  return worst;
}

std::vector<position> random_positions(index_t n, position hi, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<position> u(0, hi);
  std::vector<position> p(static_cast<std::size_t>(n));
  for (auto& v : p) v = u(rng);
  return p;
}

// Named parameters first: g++ 12 warns (-Wmaybe-uninitialized, a false positive) on a variant
// inside a nested designated-initializer temporary.
template <class T>
posenc::mrope<T> make_mrope(const posenc::rope_params& rp, std::vector<index_t> sections, bool interleaved = false) {
  posenc::mrope_params mp;
  mp.rope = rp;
  mp.sections = std::move(sections);
  mp.interleaved = interleaved;
  return posenc::mrope<T>(mp);
}

}  // namespace

TEMPLATE_TEST_CASE("mrope: each section rotates by its own axis", "[mrope][rope]", float, double) {
  using T = TestType;
  struct config {
    std::vector<index_t> sections;
    bool interleaved;
    index_t head_dim, rotary_dim;
    rope_layout layout;
  };
  // Qwen2-VL / Qwen2.5-VL ([16, 24, 24], head_dim 128), Qwen3-VL (interleaved [24, 20, 20]),
  // partial rotary and the interleaved pair layout.
  const std::vector<config> configs = {{{16, 24, 24}, false, 128, 0, rope_layout::half_split},
                                       {{24, 20, 20}, true, 128, 0, rope_layout::half_split},
                                       {{2, 3, 3}, false, 20, 16, rope_layout::interleaved},
                                       {{4, 2, 2}, true, 16, 16, rope_layout::half_split}};
  for (const config& c : configs) {
    const double base = 1e6;
    posenc::rope_params rp;
    rp.head_dim = c.head_dim, rp.rotary_dim = c.rotary_dim, rp.layout = c.layout, rp.base = base;
    const auto enc = make_mrope<T>(rp, c.sections, c.interleaved);
    const index_t r = enc.rotary_dim(), n = 37, heads = 3;
    const auto axes = ref_axes(c.sections, c.interleaved, r / 2);
    for (index_t k = 0; k < r / 2; ++k) REQUIRE(enc.axis_of_pair(k) == axes[static_cast<std::size_t>(k)]);
    for (position hi : {position{64}, position{1} << 31}) {
      const auto pos = random_positions(3 * n, hi, 5);  // token-major [n, 3], axes differ
      const auto x = posenc_test::random_normal<T>(n, heads * c.head_dim, 6);
      auto got = x;
      enc.rotate(got, posenc::axis_positions(pos, 3));
      const double worst = worst_ratio<T>(x, got, c.head_dim, r, c.layout, [&](index_t i, index_t k) {
        const position p = pos[static_cast<std::size_t>(3 * i + axes[static_cast<std::size_t>(k)])];
        return ld(p) * std::pow(ld(base), -ld(2 * k) / ld(r));
      });
      INFO("sections " << c.sections[0] << "/" << c.sections[1] << "/" << c.sections[2] << " interleaved "
                       << c.interleaved << " max position " << hi);
      CHECK(worst <= 1.0);
      // The same positions viewed axis-major give the same bits.
      std::vector<position> by_axis(pos.size());
      for (index_t i = 0; i < n; ++i)
        for (index_t a = 0; a < 3; ++a)
          by_axis[static_cast<std::size_t>(a * n + i)] = pos[static_cast<std::size_t>(3 * i + a)];
      auto again = x;
      enc.rotate(again, posenc::axis_positions::axis_major(by_axis, 3));
      CHECK(again == got);
    }
  }
}

TEMPLATE_TEST_CASE("mrope on text tokens (equal axes) is RoPE, bit for bit", "[mrope][rope]", float, double) {
  using T = TestType;
  for (bool interleaved : {false, true}) {
    posenc::rope_params rp;
    rp.head_dim = 128, rp.base = 1e6;
    const auto enc = make_mrope<T>(
        rp, interleaved ? std::vector<index_t>{24, 20, 20} : std::vector<index_t>{16, 24, 24}, interleaved);
    const posenc::rope<T> plain(rp);
    const index_t n = 50;
    const auto text = random_positions(n, position{1} << 40, 9);
    std::vector<position> three;
    for (const position p : text) three.insert(three.end(), {p, p, p});
    const auto x = posenc_test::random_normal<T>(n, 2 * 128, 10);
    auto by_rope = x, by_axes = x, by_list = x;
    plain.rotate(by_rope, posenc::positions(text));
    enc.rotate(by_axes, posenc::axis_positions(three, 3));
    enc.rotate(by_list, posenc::positions(text));
    CHECK(by_axes == by_rope);
    CHECK(by_list == by_rope);
    // And RoPE's formula, independently.
    const double worst = worst_ratio<T>(x, by_axes, 128, 128, rope_layout::half_split, [&](index_t i, index_t k) {
      return ld(text[static_cast<std::size_t>(i)]) * std::pow(ld(1e6), -ld(2 * k) / ld(128));
    });
    CHECK(worst <= 1.0);
  }
}

TEMPLATE_TEST_CASE("axial 2-D RoPE on a grid of patches", "[mrope][rope2d]", float, double) {
  using T = TestType;
  for (rope_layout layout : {rope_layout::half_split, rope_layout::interleaved}) {
    const index_t d = 80, r = 80, rows = 6, cols = 7, n = rows * cols;  // head_dim 80: the Qwen2-VL ViT
    const posenc::axial_rope<T> enc({.head_dim = d, .base = 10000.0, .layout = layout});
    std::vector<position> grid;
    for (position y = 0; y < rows; ++y)
      for (position xx = 0; xx < cols; ++xx) grid.insert(grid.end(), {y, xx});
    const auto x = posenc_test::random_normal<T>(n, 2 * d, 3);
    auto got = x;
    enc.rotate(got, posenc::axis_positions(grid, 2));
    const double worst = worst_ratio<T>(x, got, d, r, layout, [&](index_t i, index_t k) {
      const index_t q = r / 4;
      const position p = grid[static_cast<std::size_t>(2 * i + (k < q ? 0 : 1))];
      return ld(p) * std::pow(ld(10000), -ld(4 * (k % q)) / ld(r));
    });
    CHECK(worst <= 1.0);
    // Relative: <R(a) q, R(b) k> depends only on a - b (row and column), so shifting the grid keeps
    // every dot product.
    std::vector<position> shifted = grid;
    for (std::size_t i = 0; i < shifted.size(); i += 2) shifted[i] += 1000, shifted[i + 1] += 37;
    auto a = x, b = x;
    enc.rotate(a, posenc::axis_positions(grid, 2));
    enc.rotate(b, posenc::axis_positions(shifted, 2));
    double worst_dot = 0;
    for (index_t i = 0; i < n; i += 5)
      for (index_t j = 0; j < n; j += 3) {
        const double da = double(a.row(i).head(d).dot(a.row(j).head(d)));
        const double db = double(b.row(i).head(d).dot(b.row(j).head(d)));
        worst_dot = std::max(worst_dot, std::abs(da - db));
      }
    CHECK(worst_dot <= 200 * std::numeric_limits<T>::epsilon() * d);
  }
}

TEST_CASE("mrope with text positions inside the attention kernel equals attending to rotated inputs",
          "[mrope][attention]") {
  posenc::rope_params rp;
  rp.head_dim = 32, rp.base = 1e6;
  const auto enc = make_mrope<float>(rp, {4, 6, 6});
  const index_t n = 70;
  const auto q = posenc_test::random_normal<float>(n, 2 * 32, 1);
  const auto k = posenc_test::random_normal<float>(n, 32, 2);
  const auto v = posenc_test::random_normal<float>(n, 32, 3);
  const posenc::attention_params p{.heads = 2, .kv_heads = 1, .causal = true, .q_tile = 16, .k_tile = 16};
  posenc::row_matrix<float> inside(n, 64), outside(n, 64);
  posenc::attention(q, k, v, inside, posenc::arange(5, n), posenc::arange(5, n), enc, p);
  std::vector<position> three;
  for (position i = 5; i < 5 + n; ++i) three.insert(three.end(), {i, i, i});
  auto qr = q, kr = k;
  enc.rotate(qr, posenc::axis_positions(three, 3));
  enc.rotate(kr, posenc::axis_positions(three, 3));
  posenc::attention(qr, kr, v, outside, posenc::arange(5, n), posenc::arange(5, n), posenc::no_position<float>{}, p);
  CHECK((inside - outside).cwiseAbs().maxCoeff() <= 1e-5f);
}

TEST_CASE("mrope with text positions in the batched calls is RoPE, bit for bit", "[mrope][attention][batch]") {
  posenc::rope_params rp;
  rp.head_dim = 32, rp.base = 1e6;
  const auto enc = make_mrope<float>(rp, {6, 5, 5}, true);
  const posenc::rope<float> plain(rp);
  const std::vector<std::int32_t> cu{0, 30, 75};
  const auto q = posenc_test::random_normal<float>(75, 2 * 32, 4);
  const auto k = posenc_test::random_normal<float>(75, 32, 5);
  const auto v = posenc_test::random_normal<float>(75, 32, 6);
  std::vector<position> pos;
  for (position i = 0; i < 30; ++i) pos.push_back(i);
  for (position i = 0; i < 45; ++i) pos.push_back(100 + i);
  const posenc::attention_params p{.heads = 2, .kv_heads = 1, .causal = true, .q_tile = 8, .k_tile = 8};
  posenc::row_matrix<float> a(75, 64), b(75, 64);
  posenc::attention_varlen(q, k, v, a, cu, cu, posenc::positions(pos), posenc::positions(pos), enc, p);
  posenc::attention_varlen(q, k, v, b, cu, cu, posenc::positions(pos), posenc::positions(pos), plain, p);
  CHECK(a == b);
}

TEST_CASE("mrope and axial RoPE refuse bad sections, dims and position views", "[mrope][errors]") {
  posenc::rope_params rp;
  rp.head_dim = 128;
  CHECK_INVALID(make_mrope<float>(rp, {16, 24, 16}), "mrope_params.sections = [16, 24, 16]");
  CHECK_INVALID(make_mrope<float>(rp, {}), "mrope_params.sections");
  CHECK_INVALID(make_mrope<float>(rp, {0, 32, 32}), "every entry must be > 0");
  // Interleaved over 64 pairs, axis 2 reaches at most 21 pairs (2, 5, ..., 62).
  CHECK_INVALID(make_mrope<float>(rp, {2, 30, 32}, true), "mrope_params.sections");
  posenc::rope_params bad = rp;
  bad.base = -1;
  CHECK_INVALID(make_mrope<float>(bad, {16, 24, 24}), "rope_params.base");
  CHECK_INVALID(posenc::axial_rope<float>({.head_dim = 6}), "axial_rope_params.rotary_dim");
  CHECK_INVALID(posenc::axial_rope<float>({.head_dim = 64, .rotary_dim = 66}), "axial_rope_params.rotary_dim");
  CHECK_INVALID(posenc::axial_rope<float>({.head_dim = 64, .base = 0}), "axial_rope_params.base");

  const auto enc = make_mrope<float>(rp, {16, 24, 24});
  posenc::row_matrix<float> x = posenc::row_matrix<float>::Zero(4, 256);
  const std::vector<position> two(8, 1), three(12, 1), flat(12, 1);
  CHECK_THROWS_AS(enc.rotate(x, posenc::axis_positions(two, 2)), posenc::precondition_error);
  CHECK_THROWS_WITH(enc.rotate(x, posenc::axis_positions(two, 2)), Catch::Contains("2 axes"));
  CHECK_THROWS_AS(enc.rotate(x.topRows(3), posenc::axis_positions(three, 3)), posenc::precondition_error);
  CHECK_THROWS_AS(enc.rotate(x, posenc::positions(flat)), posenc::precondition_error);  // 12 positions, 4 rows
  CHECK_THROWS_AS(posenc::axis_positions(flat, 5), posenc::precondition_error);
  CHECK_THROWS_AS(posenc::axis_positions(flat, 0), posenc::precondition_error);
  posenc::row_matrix<float> odd = posenc::row_matrix<float>::Zero(4, 100);
  CHECK_THROWS_AS(enc.rotate(odd, posenc::axis_positions(three.data(), 4, 3, 3, 1)), posenc::precondition_error);
  const posenc::axial_rope<float> axial({.head_dim = 64});
  posenc::row_matrix<float> y = posenc::row_matrix<float>::Zero(4, 64);
  CHECK_THROWS_AS(axial.rotate(y, posenc::axis_positions(three, 3)), posenc::precondition_error);
}

TEST_CASE("a Qwen2-VL sequence with an image: prefill by axis positions, paged decode with mrope in the call",
          "[mrope][attention][batch]") {
  // Hugging Face's get_rope_index for [3 text tokens, a 2 x 3 image, 2 text tokens], then two decoded
  // tokens: text counts up on every axis; image patches take (t0, t0 + row, t0 + column) from the
  // next position t0 = 3; text resumes after the largest position, 3 + 2 = 5.
  const index_t d = 32, heads = 2, n = 13, prefill = 11, page = 4;
  std::vector<std::array<position, 3>> axes;
  for (position i = 0; i < 3; ++i) axes.push_back({i, i, i});
  for (position r = 0; r < 2; ++r)
    for (position c = 0; c < 3; ++c) axes.push_back({3, 3 + r, 3 + c});
  for (position i = 6; i < 10; ++i) axes.push_back({i, i, i});
  REQUIRE(static_cast<index_t>(axes.size()) == n);

  posenc::rope_params rp;
  rp.head_dim = d, rp.base = 1e6;
  const std::vector<index_t> sections{4, 6, 6};
  const auto enc = make_mrope<float>(rp, sections);
  const auto q = posenc_test::random_normal<float>(n, heads * d, 31);
  const auto k = posenc_test::random_normal<float>(n, d, 32);
  const auto v = posenc_test::random_normal<float>(n, d, 33);

  // The reference in double: pair k of every head turned by its section's axis, causal by token order.
  const auto axis = ref_axes(sections, false, d / 2);
  auto turn = [&](const posenc::row_matrix<float>& x) {
    posenc::row_matrix<double> y = x.cast<double>();
    for (index_t i = 0; i < n; ++i)
      for (index_t c0 = 0; c0 < x.cols(); c0 += d)
        for (index_t p = 0; p < d / 2; ++p) {
          const double t = double(axes[i][axis[p]]) * std::pow(1e6, -2.0 * double(p) / double(d));
          const double a = x(i, c0 + p), b = x(i, c0 + p + d / 2);
          y(i, c0 + p) = a * std::cos(t) - b * std::sin(t);
          y(i, c0 + p + d / 2) = b * std::cos(t) + a * std::sin(t);
        }
    return y;
  };
  const auto qd = turn(q), kd = turn(k);
  posenc::row_matrix<double> want(n, heads * d);
  for (index_t i = 0; i < n; ++i)
    for (index_t h = 0; h < heads; ++h) {
      std::vector<double> s(static_cast<std::size_t>(i + 1));
      double top = -1e300, sum = 0;
      for (index_t j = 0; j <= i; ++j) {
        s[j] = qd.row(i).segment(h * d, d).dot(kd.row(j)) / std::sqrt(double(d));
        top = std::max(top, s[j]);
      }
      Eigen::RowVectorXd o = Eigen::RowVectorXd::Zero(d);
      for (index_t j = 0; j <= i; ++j) {
        sum += std::exp(s[j] - top);
        o += std::exp(s[j] - top) * v.row(j).cast<double>();
      }
      want.row(i).segment(h * d, d) = o / sum;
    }
  const posenc::attention_params p{.heads = heads, .kv_heads = 1, .causal = true, .q_tile = 4, .k_tile = 4};
  const double tol = 2e-5;

  // Prefill: queries and keys rotated by their three positions, attended in token order.
  std::vector<position> flat;
  for (index_t i = 0; i < prefill; ++i) flat.insert(flat.end(), axes[i].begin(), axes[i].end());
  posenc::row_matrix<float> qr = q.topRows(prefill), kr = k.topRows(prefill);
  enc.rotate(qr, posenc::axis_positions(flat, 3));
  enc.rotate(kr, posenc::axis_positions(flat, 3));
  posenc::row_matrix<float> out(prefill, heads * d);
  posenc::attention(qr, kr, v.topRows(prefill), out, posenc::arange(0, prefill), posenc::arange(0, prefill),
                    posenc::no_position<float>{}, p);
  CHECK((out.cast<double>() - want.topRows(prefill)).cwiseAbs().maxCoeff() <= tol);

  // The cache: pages of 4 rows in a shuffled order, NaN where no token is. Each row keeps a mask
  // position no later than any later text token's: its largest axis position.
  posenc::row_matrix<float> kc = posenc::row_matrix<float>::Constant(4 * page, d, NAN), vc = kc;
  const std::vector<std::int32_t> table{2, 0, 3, 1};
  std::vector<position> row_pos(static_cast<std::size_t>(4 * page), 0);
  auto row_of = [&](index_t j) { return table[static_cast<std::size_t>(j / page)] * page + j % page; };
  for (index_t j = 0; j < n; ++j) row_pos[row_of(j)] = std::max({axes[j][0], axes[j][1], axes[j][2]});
  std::vector<std::int32_t> lengths{static_cast<std::int32_t>(prefill)};
  const posenc::paged_kv<float> cache{
      posenc::view_of(kc), posenc::view_of(vc), page, table, 4, lengths, row_pos, posenc::cached_keys::rotated};
  posenc::paged_append(cache, kr, v.topRows(prefill), std::vector<std::int32_t>{0, static_cast<std::int32_t>(prefill)},
                       posenc::no_position<float>{});

  // Decode: each new key is rotated by M-RoPE with its text position as it is appended, and the
  // query by the same position inside the call.
  for (index_t i = prefill; i < n; ++i) {
    lengths[0] = static_cast<std::int32_t>(i + 1);
    posenc::paged_append(cache, k.middleRows(i, 1), v.middleRows(i, 1), std::vector<std::int32_t>{0, 1}, enc);
    posenc::row_matrix<float> o(1, heads * d);
    posenc::paged_attention(q.middleRows(i, 1), posenc::paged_kv<const float>(cache), o,
                            std::vector<std::int32_t>{0, 1}, posenc::arange(axes[i][0], 1), enc, p);
    INFO("decoded token " << i);
    CHECK((o.cast<double>() - want.middleRows(i, 1)).cwiseAbs().maxCoeff() <= tol);
  }
}
