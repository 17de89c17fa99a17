// libFuzzer target: RoPE applied with arbitrary parameters, shapes, strides and positions
// (negative, near 2^24, 2^31, 2^52, anywhere in int64).
//
// Checks on every input: dims past the rotary dim and elements past a row are untouched; every
// pair keeps its norm times the magnitude; the cached path gives the same bits as the direct one;
// the tile rotator (attention's path) is within a few ulp of it below 2^52. For plain and linear tables at
// |position| <= 2^40, every element matches a long double evaluation of the formula
// (`inv_i = base^(-2i/r) / s`, angle `p inv_i`). Mismatched shapes must raise
// `posenc::precondition_error`.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "fuzz_common.hpp"
#include "posenc/encoders/rope.hpp"

namespace {

using posenc::index_t;
using posenc::position;
using posenc_fuzz::fail;

struct case_spec {
  posenc::rope_params p;
  int policy = 0;  // 0 none, 1 linear, 2 yarn, 3 llama3, 4 ntk
  double factor = 1;
  index_t heads = 1, rows = 0, pad = 0;
  std::vector<position> pos;
  bool range = true;
  double amp = 1;
  std::uint32_t seed = 0;
  int shape_bug = 0;  // 1: one position too few, 2: a column too many
};

case_spec read_case(posenc_fuzz::reader& in) {
  case_spec c;
  c.p.head_dim = in.in_range<index_t>(1, 300);
  c.p.rotary_dim = 2 * in.in_range<index_t>(0, c.p.head_dim / 2);
  if (c.p.rotary_dim == 0 && c.p.head_dim % 2) c.p.rotary_dim = c.p.head_dim - 1;
  if (c.p.rotary_dim == 0 && c.p.head_dim == 1) c.p.head_dim = 2;
  c.p.layout = in.flag() ? posenc::rope_layout::interleaved : posenc::rope_layout::half_split;
  switch (in.byte() % 4) {
    case 0: c.p.base = 10000; break;
    case 1: c.p.base = 500000; break;
    default: c.p.base = std::exp(in.uniform(std::log(1.0001), std::log(1e9))); break;
  }
  c.policy = in.byte() % 5;
  c.factor = std::exp(in.uniform(std::log(0.05), std::log(64.0)));
  const index_t r = c.p.rotary_dim == 0 ? c.p.head_dim : c.p.rotary_dim;
  switch (c.policy) {
    case 1: c.p.scaling = posenc::linear_scaling{.factor = c.factor}; break;
    case 2:
      c.p.scaling = posenc::yarn_scaling{.factor = c.factor, .original_max_position = in.in_range<position>(2, 1 << 20)};
      break;
    case 3: c.p.scaling = posenc::llama3_scaling{.factor = c.factor}; break;
    case 4:
      if (r > 2) c.p.scaling = posenc::ntk_aware_scaling{.alpha = c.factor};
      break;
    default: break;
  }
  if (in.byte() % 4 == 0) c.p.attention_factor = in.uniform(0.01, 4);
  c.heads = in.in_range<index_t>(0, 4);
  c.rows = in.in_range<index_t>(0, 20);
  c.pad = in.in_range<index_t>(0, 3);
  c.range = in.flag();
  const position base = in.position_value((position{1} << 62));
  c.pos.resize(static_cast<std::size_t>(c.rows));
  for (index_t i = 0; i < c.rows; ++i)
    c.pos[static_cast<std::size_t>(i)] = c.range ? base + i : base + in.in_range<position>(-600, 600);
  if (!c.range && in.flag() && c.rows > 0) c.pos[0] = in.position_value(std::numeric_limits<position>::max());
  c.amp = std::exp(in.uniform(std::log(1e-3), std::log(1e4)));
  c.seed = static_cast<std::uint32_t>(in.bits(4));
  const int bug = in.byte();
  c.shape_bug = bug % 32 == 1 ? 1 : (bug % 32 == 2 ? 2 : 0);
  return c;
}

template <class T>
void run_valid_case(const posenc::rope<T>& rope, const case_spec& c) {
  using mat = posenc::row_matrix<T>;
  const index_t d = c.p.head_dim, r = rope.rotary_dim(), half = r / 2, cols = c.heads * d;
  const posenc::positions pos = c.range && c.rows > 0 ? posenc::arange(c.pos[0], c.rows) : posenc::positions(c.pos);
  std::mt19937 rng(c.seed);
  std::normal_distribution<double> nd(0, c.amp);
  mat x0(c.rows, cols + c.pad);
  for (index_t i = 0; i < x0.size(); ++i) x0.data()[i] = static_cast<T>(nd(rng));
  auto view = [&](mat& m) { return posenc::strided_view<T>(m.data(), m.rows(), cols, m.cols()); };

  if (c.shape_bug != 0 && (c.rows > 0 || c.shape_bug == 2)) {
    mat x = x0;
    try {
      if (c.shape_bug == 1) {
        rope.rotate(view(x), pos.subset(0, c.rows - 1));
      } else {
        rope.rotate(posenc::strided_view<T>(x.data(), c.rows, cols + 1, std::max<index_t>(cols + 1, x.cols())), pos);
      }
      if (c.shape_bug == 1 || (cols + 1) % d != 0) fail("rope::rotate accepted a shape bug (%d)", c.shape_bug);
    } catch (const posenc::precondition_error&) {
    }
    return;
  }

  mat x = x0;
  rope.rotate(view(x), pos);

  const double mag = rope.magnitude();
  constexpr double eps = std::numeric_limits<T>::epsilon();
  const bool inter = c.p.layout == posenc::rope_layout::interleaved;
  const bool exact_reference = c.policy <= 1;
  constexpr long double two_pi = 6.283185307179586476925286766559005768L;
  for (index_t i = 0; i < c.rows; ++i) {
    const position p = pos[i];
    for (index_t h = 0; h < c.heads; ++h) {
      const T* in_row = x0.row(i).data() + h * d;
      const T* out_row = x.row(i).data() + h * d;
      for (index_t t = r; t < d; ++t)
        if (!(std::bit_cast<std::uint64_t>(double(in_row[t])) == std::bit_cast<std::uint64_t>(double(out_row[t]))))
          fail("pass-through dim %td of row %td head %td changed", t, i, h);
      for (index_t k = 0; k < half; ++k) {
        const index_t ia = inter ? 2 * k : k, ib = inter ? 2 * k + 1 : k + half;
        const double a = in_row[ia], b = in_row[ib], a2 = out_row[ia], b2 = out_row[ib];
        const double n_in = std::hypot(a, b), n_out = std::hypot(a2, b2);
        if (!std::isfinite(n_out)) fail("rotated pair %td of row %td not finite (position %lld)", k, i, (long long)p);
        if (!(std::abs(n_out - mag * n_in) <= 8 * eps * mag * n_in + 1e-300))
          fail("pair %td of row %td: norm %.17g, expected %.17g x %.17g (position %lld)", k, i, n_out, mag, n_in,
               (long long)p);
        if (exact_reference && std::abs(p) <= (position{1} << 40)) {
          long double inv = std::pow(static_cast<long double>(c.p.base),
                                     -static_cast<long double>(2 * k) / static_cast<long double>(r));
          if (c.policy == 1) inv /= static_cast<long double>(c.factor);
          const long double angle = std::fmod(static_cast<long double>(p) * inv, two_pi);
          const double cs = static_cast<double>(std::cos(angle)) * mag, sn = static_cast<double>(std::sin(angle)) * mag;
          const double ra = a * cs - b * sn, rb = b * cs + a * sn;
          // Rounding of cos/sin and of the products, plus the long double table's 2^-64 of the angle.
          const double tol = (8 * eps + std::abs(static_cast<double>(p) * static_cast<double>(inv)) * 0x1p-60) * mag * n_in;
          if (!(std::abs(a2 - ra) <= tol && std::abs(b2 - rb) <= tol))
            fail("pair %td of row %td at position %lld: got (%.9g, %.9g), reference (%.9g, %.9g), tolerance %.3g", k, i,
                 (long long)p, a2, b2, ra, rb, tol);
        }
      }
    }
    for (index_t t = cols; t < x.cols(); ++t)
      if (!(x0(i, t) == x(i, t) || std::isnan(double(x0(i, t))))) fail("element past row %td's end changed", i);
  }

  // The cached path: the same bits.
  if (c.rows > 0) {
    position lo = pos[0], hi = pos[0];
    for (index_t i = 1; i < c.rows; ++i) lo = std::min(lo, pos[i]), hi = std::max(hi, pos[i]);
    if (static_cast<std::uint64_t>(hi) - static_cast<std::uint64_t>(lo) < 2048) {
      const auto cache = rope.make_cache(lo, static_cast<index_t>(hi - lo) + 1);
      mat y = x0;
      rope.rotate(view(y), pos, cache);
      if (x.size() > 0 && std::memcmp(x.data(), y.data(), sizeof(T) * static_cast<std::size_t>(x.size())) != 0)
        fail("cached rotation differs from the direct one");
    }
  }

  // The tile rotator (attention's path), head by head: within a few ulp of the direct path.
  if (c.heads > 0 && c.rows > 0) {
    const auto rot = rope.tile_rotator();
    std::vector<T> scratch(static_cast<std::size_t>(rot.scratch_size()));
    for (index_t h = 0; h < c.heads; ++h) {
      mat tile(c.rows, d);
      const posenc::strided_view<const T> src(x0.data() + h * d, c.rows, d, x0.cols());
      rot.rotate(src, posenc::strided_view<T>(tile.data(), c.rows, d, d), pos, scratch.data());
      for (index_t i = 0; i < c.rows; ++i) {
        // Past 2^52 an angle is the plain double product (rope.hpp), meaningless to within
        // radians: the rotator's hi + lo split and rotate's product then differ. Norms are
        // checked above for every position.
        if (pos[i] >= (position{1} << 52) || pos[i] < -(position{1} << 52)) continue;
        double row_norm = 0;
        for (index_t t = 0; t < d; ++t) row_norm = std::max(row_norm, std::abs(double(x0(i, h * d + t))));
        for (index_t t = 0; t < d; ++t) {
          const double want = x(i, h * d + t), got = tile(i, t);
          if (!(std::abs(got - want) <= 16 * eps * mag * row_norm * 1.5 + 1e-300))
            fail("tile rotator row %td dim %td at position %lld: %.9g vs rotate's %.9g", i, t, (long long)pos[i], got,
                 want);
        }
      }
    }
  }
}

template <class T>
void run_case(const case_spec& c) {
  try {
    run_valid_case(posenc::rope<T>(c.p), c);
  } catch (const std::invalid_argument& e) {
    posenc_fuzz::check_invalid_message(e);  // a YaRN range that clamps to nothing
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  posenc_fuzz::reader in(data, size);
  const bool use_double = in.flag();
  const case_spec c = read_case(in);
  if (use_double) {
    run_case<double>(c);
  } else {
    run_case<float>(c);
  }
  return 0;
}
