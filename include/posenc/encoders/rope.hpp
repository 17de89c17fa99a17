// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/rope.hpp
/// Rotary position embedding (Su et al. 2021, "RoFormer"), with the frequency policies of
/// rope_scaling.hpp.
///
/// Queries and keys are rotated in place, pair by pair: pair `i` of a token at position `p` turns
/// by the angle `p * inv_freq[i]`, and pair `(a, b)` becomes
/// `(a cos - b sin, b cos + a sin) * magnitude`. Then `<R(m) q, R(n) k>` depends only on `m - n`.
///
///     half_split  (GPT-NeoX, LLaMA):  [x0 .. x(r/2-1) | x(r/2) .. x(r-1) | pass-through]
///                                       c c c ..  -  s s s ..             (pair i = (i, i + r/2))
///     interleaved (GPT-J, RoFormer):  [x0 x1 | x2 x3 | .. | pass-through]
///                                       c s    c s                         (pair i = (2i, 2i + 1))
///
/// A matrix argument is `[tokens, heads * head_dim]`, row-major with any row stride (an engine's
/// own buffer, or a column block of a fused QKV buffer); head `h` is the column block
/// `[h * head_dim, (h + 1) * head_dim)`, and any number of heads is taken from the column count.
///
/// Numerics: positions are int64, never a float type. Each angle is `p * inv_freq[i]`, taken
/// modulo 2 pi without rounding the large product: the table of turns per position
/// (`inv_freq / 2 pi`) is kept in long double precision as two doubles, the position is split so
/// that every partial product is exact, and the fractional turns are summed with compensation.
/// The angle's only error is the table's, a few 2^-64 of the angle where long double has 64 bits
/// (x86; more on aarch64 Linux): 2e-10 rad at position 2^31, far below float's 6e-8, so float
/// results keep full accuracy there (a float product is useless past 2^24, a double one loses
/// a few float ulps at 2^31). Where long double is double (MSVC, Apple arm64) the table has
/// 2^-53 relative precision: a few float ulps at 2^31. Past 2^52 the angle is the plain double product.
/// cos and sin are evaluated in double, multiplied by the magnitude, then rounded to `T`; the
/// cached and the direct paths give the same bits. A negative position rotates by a negative
/// angle (with magnitude 1, the inverse rotation).

#include <algorithm>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/concepts.hpp"
#include "posenc/config.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/detail/rope_kernels.hpp"
#include "posenc/detail/simd_traits.hpp"
#include "posenc/encoders/hf_config.hpp"
#include "posenc/executor.hpp"
#include "posenc/encoders/rope_scaling.hpp"
#include "posenc/types.hpp"

namespace posenc {

template <class T>
class rope;
template <class T>
class rope_tile_rotator;

namespace detail {

/// One pair's frequency in turns per position, `t = inv_freq / (2 pi)`, as the double-double
/// `hi + lo`, with `hi` split into `a` (26 significant bits) and `b = hi - a` (at most 27), so
/// that `p1 * a`, `p1 * b`, `p0 * a`, `p0 * b` are exact for positions split as
/// `p = p1 + p0`, `p1` a multiple of 2^26 below 2^52 and `0 <= p0 < 2^26`.
struct rope_turns {
  double a = 0;
  double b = 0;
  double lo = 0;
  double inv = 0;  ///< inv_freq rounded to double, for positions past 2^52
};

inline rope_turns make_rope_turns(long double inv) {
  constexpr long double two_pi = 6.283185307179586476925286766559005768L;
  const long double t = inv / two_pi;
  const double hi = static_cast<double>(t);
  const double lo = static_cast<double>(t - static_cast<long double>(hi));
  const double a = std::bit_cast<double>(std::bit_cast<std::uint64_t>(hi) & ~((std::uint64_t{1} << 27) - 1));
  return {a, hi - a, lo, static_cast<double>(inv)};
}

/// `x` minus its integer part (toward zero): exact, in (-1, 1). Needs `|x| < 2^63`.
inline double drop_integer(double x) { return x - static_cast<double>(static_cast<std::int64_t>(x)); }

/// Knuth's two-sum: `s + e == a + b` exactly.
POSENC_STRICT_FP inline void two_sum(double a, double b, double& s, double& e) {
  POSENC_STRICT_FP_BODY
  s = a + b;
  const double bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}

/// cos and sin of `p * inv_freq` for one pair. `exact` (all turns below 2^10) allows the exact
/// reduction for `-2^52 <= p < 2^52`; past that, or without it, the angle is the plain double
/// product. (-2^52 itself is reduced exactly: it is a multiple of 2^26, so its products are exact,
/// and the tile rotator takes it as the block start of positions just above it.)
POSENC_STRICT_FP inline void rope_cos_sin(position p, const rope_turns& t, bool exact, double& c, double& s) {
  POSENC_STRICT_FP_BODY
  constexpr position limit = position{1} << 52;
  if (!exact || p >= limit || p < -limit) {
    const double angle = static_cast<double>(p) * t.inv;
    c = std::cos(angle);
    s = std::sin(angle);
    return;
  }
  const position p1 = p & ~((position{1} << 26) - 1);
  const double d1 = static_cast<double>(p1);
  const double d0 = static_cast<double>(p - p1);
  // The turns p * t, modulo 1, as sum + err: the four products are exact and so is dropping
  // their integer parts; two_sum keeps the rounding errors of the additions.
  double sum = 0, err = 0, e = 0;
  two_sum(drop_integer(d1 * t.a), drop_integer(d1 * t.b), sum, err);
  sum = drop_integer(sum);
  two_sum(sum, drop_integer(d0 * t.a), sum, e);
  err += e;
  sum = drop_integer(sum);
  two_sum(sum, drop_integer(d0 * t.b), sum, e);
  err += e;
  sum = drop_integer(sum);
  two_sum(sum, drop_integer(static_cast<double>(p) * t.lo), sum, e);
  err += e;
  sum = drop_integer(sum);
  // Quarter turns q, and the rest g in [-1/8, 1/8] turn (sum - q/4 is exact).
  const auto q = static_cast<std::int64_t>(4 * sum + (sum >= 0 ? 0.5 : -0.5));
  const double g = (sum - static_cast<double>(q) * 0.25) + err;
  const double angle = g * 6.283185307179586;
  const double cg = std::cos(angle);
  const double sg = std::sin(angle);
  switch (q & 3) {
    case 0:
      c = cg, s = sg;
      break;
    case 1:
      c = -sg, s = cg;
      break;
    case 2:
      c = -cg, s = -sg;
      break;
    default:
      c = sg, s = -cg;
      break;
  }
}

/// FNV-1a over the bits of the values that determine a cos/sin table.
inline std::uint64_t fingerprint_add(std::uint64_t h, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) {
    h ^= (v >> (8 * i)) & 0xffu;
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace detail

/// Precomputed cos and sin (times the magnitude) of one `rope` for the positions
/// `[start, start + count)`. Made by `rope::make_cache`; passed to `rope::rotate` for positions in
/// that range, in any order. Owns `count * r` values of `T` (the same for both layouts:
/// half-split keeps a cos and a sin table `[count, r/2]`, interleaved one `[count, r]` table with
/// cos and sin of each pair side by side). Remembers which encoder made it, so rotating with a
/// cache of other parameters (another base, policy, sequence length, layout or rotary dim) fails
/// a `POSENC_ASSERT`. Immutable; safe to share across threads.
template <class T>
class rope_cache {
 public:
  /// An empty cache (no positions).
  rope_cache() = default;

  position start() const { return start_; }
  index_t count() const { return count_; }
  index_t rotary_dim() const { return rotary_dim_; }
  rope_layout layout() const { return layout_; }
  /// `p` is in `[start, start + count)`.
  bool contains(position p) const {
    // p - start in unsigned arithmetic: exact when p >= start, where the signed one may overflow.
    return p >= start_ &&
           static_cast<std::uint64_t>(p) - static_cast<std::uint64_t>(start_) < static_cast<std::uint64_t>(count_);
  }

  /// `cos(p * inv_freq[pair]) * magnitude`, rounded to T. `p` must be in the range.
  T cos(position p, index_t pair) const {
    POSENC_ASSERT(contains(p) && pair >= 0 && pair < rotary_dim_ / 2, "rope_cache::cos: position ", p, ", pair ",
                  pair, " is outside the cache (positions [", start_, ", ", start_, " + ", count_, "), ",
                  rotary_dim_ / 2, " pairs)");
    const index_t i = static_cast<index_t>(p - start_);
    return layout_ == rope_layout::half_split ? a_[idx(i * (rotary_dim_ / 2) + pair)]
                                              : a_[idx(i * rotary_dim_ + 2 * pair)];
  }
  /// `sin(p * inv_freq[pair]) * magnitude`, rounded to T. `p` must be in the range.
  T sin(position p, index_t pair) const {
    POSENC_ASSERT(contains(p) && pair >= 0 && pair < rotary_dim_ / 2, "rope_cache::sin: position ", p, ", pair ",
                  pair, " is outside the cache (positions [", start_, ", ", start_, " + ", count_, "), ",
                  rotary_dim_ / 2, " pairs)");
    const index_t i = static_cast<index_t>(p - start_);
    return layout_ == rope_layout::half_split ? b_[idx(i * (rotary_dim_ / 2) + pair)]
                                              : a_[idx(i * rotary_dim_ + 2 * pair + 1)];
  }

 private:
  template <class>
  friend class rope;
  static std::size_t idx(index_t i) { return static_cast<std::size_t>(i); }

  std::vector<T> a_;  // half: cos [count, r/2]; interleaved: [count, r] as c0 s0 c1 s1 ...
  std::vector<T> b_;  // half: sin [count, r/2]; interleaved: empty
  position start_ = 0;
  index_t count_ = 0;
  index_t rotary_dim_ = 0;
  rope_layout layout_ = rope_layout::half_split;
  std::uint64_t fingerprint_ = 0;
};

/// Rotary position embedding for arithmetic type `T` (float or double); a `rotation` encoder.
///
/// Construction validates the parameters (throwing `std::invalid_argument` that names the field:
/// `rope_params.rotary_dim = 7: must be even`) and evaluates the policy's frequency table and
/// magnitude once. After that the object is immutable: every method is const and safe to call
/// from several threads. `rotate` allocates nothing; `make_cache` allocates the cache.
///
/// Matrix arguments: `[tokens, heads * head_dim]`, row-major, any row stride, storage `T`, or
/// for `rope<float>` also `Eigen::bfloat16` / `Eigen::half` (computed in float, rounded once
/// per element on store).
template <class T>
class rope {
  static_assert(std::same_as<T, float> || std::same_as<T, double>, "posenc::rope<T>: T must be float or double");

 public:
  using scalar_type = T;
  static constexpr encoding_family family = encoding_family::rotation;

  /// Validates `p`, builds the frequency table (in long double) and the magnitude.
  /// Throws `std::invalid_argument` naming the field: `head_dim <= 0`, odd `rotary_dim`,
  /// `rotary_dim > head_dim`, `base <= 0`, a policy's factor `<= 0`, NTK exponents at
  /// `rotary_dim = 2`, YaRN `beta_fast <= beta_slow`, Llama 3 `high_freq_factor <= low_freq_factor`,
  /// a LongRoPE list of the wrong length, an `attention_factor` or a policy magnitude that is not a
  /// normal positive value of `T` (for `rope<float>`, outside `[FLT_MIN, FLT_MAX]`), ...
  explicit rope(const rope_params& p) : p_(p) {
    using detail::require;
    require(p.head_dim > 0, "rope_params.head_dim", p.head_dim, "must be > 0");
    require(p.rotary_dim >= 0, "rope_params.rotary_dim", p.rotary_dim, "must be >= 0 (0 means head_dim)");
    r_ = p.rotary_dim == 0 ? p.head_dim : p.rotary_dim;
    require(r_ % 2 == 0, "rope_params.rotary_dim", r_, "must be even");
    require(r_ <= p.head_dim, "rope_params.rotary_dim", r_, "must be <= head_dim = " + std::to_string(p.head_dim));
    require(p.layout == rope_layout::half_split || p.layout == rope_layout::interleaved, "rope_params.layout",
            static_cast<int>(p.layout), "unknown layout");
    require(std::isfinite(p.base) && p.base > 0, "rope_params.base", p.base, "must be finite and > 0");
    // cos and sin times the magnitude are rounded to T: a magnitude above T's largest value turns
    // finite inputs into inf and NaN, one below its smallest normal value loses precision or gives 0.
    constexpr double magnitude_min = std::numeric_limits<T>::min(), magnitude_max = std::numeric_limits<T>::max();
    const auto magnitude_fits = [](double m) { return m >= magnitude_min && m <= magnitude_max; };  // NaN fails
    const std::string magnitude_range = std::string("a normal ") + (std::same_as<T, float> ? "float" : "double") +
                                        " in [" + detail::to_text(std::numeric_limits<T>::min()) + ", " +
                                        detail::to_text(std::numeric_limits<T>::max()) + "]";
    if (p.attention_factor) {
      require(magnitude_fits(*p.attention_factor), "rope_params.attention_factor", *p.attention_factor,
              "must be finite, > 0 and " + magnitude_range);
    }
    detail::rope_frequencies f = detail::compute_frequencies(p.scaling, r_, p.base);
    magnitude_ = p.attention_factor ? *p.attention_factor : f.magnitude;
    // YaRN's (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1) overflows for huge mscales.
    require(magnitude_fits(magnitude_), "rope_params.scaling", scaling_name(p.scaling),
            "gives a magnitude of " + detail::to_text(magnitude_) + ", not " + magnitude_range);
    // Hence cos * magnitude and sin * magnitude (|cos|, |sin| <= 1, products rounded in double and
    // then to T) are finite in T: a zero stays zero, and a rotated row overflows only where its
    // norm times the magnitude does.
    inv_freq_.reserve(f.inv.size());
    turns_.reserve(f.inv.size());
    exact_ = true;
    std::uint64_t h = 0xcbf29ce484222325ull;
    h = detail::fingerprint_add(h, static_cast<std::uint64_t>(r_));
    h = detail::fingerprint_add(h, static_cast<std::uint64_t>(p.layout));
    h = detail::fingerprint_add(h, std::bit_cast<std::uint64_t>(magnitude_));
    for (long double v : f.inv) {
      const double d = static_cast<double>(v);
      require(std::isfinite(d) && d > 0, "rope_params.base", p.base, "gives a frequency that is not finite and > 0");
      // Every int64 position must give a finite angle (|p| <= 2^63), or cos/sin would be NaN.
      require(d <= std::numeric_limits<double>::max() / 0x1p64, "rope_params.base", p.base,
              "gives a frequency of " + detail::to_text(d) + " rad per position, too large for a finite angle");
      inv_freq_.push_back(d);
      turns_.push_back(detail::make_rope_turns(v));
      const detail::rope_turns& t = turns_.back();
      exact_ = exact_ && (t.a + t.b) < 1024.0;
      h = detail::fingerprint_add(h, std::bit_cast<std::uint64_t>(t.a));
      h = detail::fingerprint_add(h, std::bit_cast<std::uint64_t>(t.b));
      h = detail::fingerprint_add(h, std::bit_cast<std::uint64_t>(t.lo));
    }
    fingerprint_ = h;
  }

  /// `p` with `p.scaling`, `p.attention_factor` and `p.base` taken from a Hugging Face style
  /// `rope_scaling` dict where present (see `rope_params_from_config`). Throws
  /// `std::invalid_argument` for an unknown type, a missing field or an out-of-range value.
  rope(rope_params p, const config_map& hf_rope_scaling)
      : rope(rope_params_from_config(std::move(p), hf_rope_scaling)) {}

  /// "rope", or "rope-" and the policy: "rope-linear", "rope-ntk", "rope-dynamic-ntk", "rope-yarn",
  /// "rope-llama3", "rope-longrope".
  std::string_view name() const {
    constexpr std::string_view names[] = {"rope",      "rope-linear", "rope-ntk",     "rope-dynamic-ntk",
                                          "rope-yarn", "rope-llama3", "rope-longrope"};
    return names[p_.scaling.index()];
  }

  index_t head_dim() const { return p_.head_dim; }
  /// The rotated dims per head, `r` (`rope_params::rotary_dim`, or `head_dim` when that was 0).
  index_t rotary_dim() const { return r_; }
  rope_layout layout() const { return p_.layout; }
  double base() const { return p_.base; }
  /// The parameters as given (`rotary_dim` may be 0).
  const rope_params& params() const { return p_; }
  /// The `r/2` inverse frequencies after the policy, rounded to double (the angles use a more
  /// precise table).
  std::span<const double> inv_freq() const { return inv_freq_; }
  /// The factor that multiplies cos and sin (so attention logits get its square): the policy's,
  /// or `attention_factor` when given.
  double magnitude() const { return magnitude_; }

  /// Rotates every head of `x` (`[tokens, heads * head_dim]`) in place: row `i` by position
  /// `pos[i]`, computing each angle and its cos/sin in double (see the file comment).
  /// Rows are shared among the workers of `ex` (`nullptr`: `default_executor()`; `threads`: at
  /// most that many workers, 0 = all); the bits do not depend on it. Throws
  /// `precondition_error` unless `cols % head_dim == 0` and `pos.size() == rows`. No allocation.
  template <matrix_argument M>
  void rotate(M&& x, positions pos, executor* ex = nullptr, int threads = 0) const {
    rotate_by<false>(std::forward<M>(x), pos, ex, threads);
  }

  /// The backward of `rotate`: turns every head of `x` (the gradient with respect to the rotated
  /// values, `[tokens, heads * head_dim]`) in place into the gradient with respect to the values
  /// before rotation. Rotation is orthogonal up to the magnitude `m`, so this is the transposed
  /// rotation `m R(-theta)`: pair `(a, b)` becomes `(a cos + b sin, b cos - a sin) * m`, with the
  /// very cos and sin values `rotate` uses (the same rounding), dims past `rotary_dim` unchanged.
  /// With magnitude 1, `rotate_backward` undoes `rotate` up to rounding. Same arguments, checks,
  /// threading and bits-for-any-worker-count as `rotate`. No allocation.
  template <matrix_argument M>
  void rotate_backward(M&& x, positions pos, executor* ex = nullptr, int threads = 0) const {
    rotate_by<true>(std::forward<M>(x), pos, ex, threads);
  }

  /// Rotates every head of every batch item of `x` in place like `rotate(x, pos)`, for layouts
  /// with any strides (`[batch, heads, tokens, head_dim]` as PyTorch holds queries, a transposed
  /// or sliced tensor): token `t` of each item by `pos[t]`. The same bits as `rotate` on the
  /// `[tokens, heads * head_dim]` matrix of each item. Throws `precondition_error` unless
  /// `x.head_dim == head_dim()`, `pos.size() == x.tokens` and no two elements of `x` overlap.
  template <class S>
    requires(!std::is_const_v<S>)
  void rotate(heads_view<S> x, positions pos, executor* ex = nullptr, int threads = 0) const {
    rotate_by<false>(x, pos, ex, threads);
  }
  /// `rotate_backward` for a `heads_view` (see `rotate(heads_view, ...)`).
  template <class S>
    requires(!std::is_const_v<S>)
  void rotate_backward(heads_view<S> x, positions pos, executor* ex = nullptr, int threads = 0) const {
    rotate_by<true>(x, pos, ex, threads);
  }

 private:
  template <bool Transposed, class M>
  void rotate_by(M&& x, positions pos, executor* ex, int threads) const {
    const auto v = checked_heads(std::forward<M>(x), pos);
    using S = std::remove_pointer_t<decltype(v.data)>;
    const index_t rows = v.batch * v.tokens, heads = v.heads;
    if (rows == 0 || heads == 0) return;
    // Heads head_dim apart: one kernel call per row; otherwise one per head of the row.
    const bool packed = heads == 1 || v.head_stride == p_.head_dim;
    const bool inter = p_.layout == rope_layout::interleaved;
    const auto kernel = detail::select_rope_kernel<S, T>(inter);
    for_row_blocks(rows, ex, threads, [&](index_t first, index_t last) {
      constexpr index_t chunk = detail::k_rope_max_chunk / 2;  // pairs per stack buffer
      alignas(64) T a[2 * chunk];
      alignas(64) T b[chunk];
      const index_t half = r_ / 2;
      for (index_t i = first; i < last; ++i) {
        const index_t item = i / v.tokens, t = i % v.tokens;
        const position p = pos[t];
        for (index_t k0 = 0; k0 < half; k0 += chunk) {
          const index_t m = std::min(chunk, half - k0);
          for (index_t k = 0; k < m; ++k) {
            double c = 0, s = 0;
            detail::rope_cos_sin(p, turns_[static_cast<std::size_t>(k0 + k)], exact_, c, s);
            // The transposed rotation negates the rounded sine (negation is exact).
            const T st = Transposed ? -static_cast<T>(s * magnitude_) : static_cast<T>(s * magnitude_);
            if (inter) {
              a[2 * k] = static_cast<T>(c * magnitude_);
              a[2 * k + 1] = st;
            } else {
              a[k] = static_cast<T>(c * magnitude_);
              b[k] = st;
            }
          }
          for (index_t h = 0; h < (packed ? 1 : heads); ++h) {
            S* const row = v.at(item, t, h);
            if (inter) {
              kernel(row, packed ? heads : 1, p_.head_dim, 2 * k0, 0, 2 * m, a, b);
            } else {
              kernel(row, packed ? heads : 1, p_.head_dim, k0, half + k0, m, a, b);
            }
          }
        }
      }
    });
  }

 public:
  /// The cos/sin table for positions `[start, start + count)` (see `rope_cache`); values equal
  /// those `rotate(x, pos)` computes, bit for bit. Allocates `count * rotary_dim` values of `T`.
  /// Precondition (`POSENC_ASSERT`): `count >= 0`, and `start + count` does not overflow.
  rope_cache<T> make_cache(position start, index_t count) const {
    POSENC_ASSERT(count >= 0, "rope::make_cache: count = ", count, " is negative");
    POSENC_ASSERT(start <= std::numeric_limits<position>::max() - static_cast<position>(count),
                  "rope::make_cache: start + count = ", start, " + ", count, " overflows int64");
    const index_t width = p_.layout == rope_layout::interleaved ? r_ : r_ / 2;
    if (width > 0 && count > std::numeric_limits<index_t>::max() / width)
      detail::invalid("rope::make_cache count", count,
                      "count * " + detail::to_text(width) + " table values overflow the index type");
    rope_cache<T> c;
    c.start_ = start;
    c.count_ = count;
    c.rotary_dim_ = r_;
    c.layout_ = p_.layout;
    c.fingerprint_ = fingerprint_;
    const index_t half = r_ / 2;
    const bool inter = p_.layout == rope_layout::interleaved;
    c.a_.resize(static_cast<std::size_t>(count * (inter ? r_ : half)));
    if (!inter) c.b_.resize(static_cast<std::size_t>(count * half));
    for (index_t i = 0; i < count; ++i) {
      const position p = start + static_cast<position>(i);
      for (index_t k = 0; k < half; ++k) {
        double cv = 0, sv = 0;
        detail::rope_cos_sin(p, turns_[static_cast<std::size_t>(k)], exact_, cv, sv);
        if (inter) {
          c.a_[static_cast<std::size_t>(i * r_ + 2 * k)] = static_cast<T>(cv * magnitude_);
          c.a_[static_cast<std::size_t>(i * r_ + 2 * k + 1)] = static_cast<T>(sv * magnitude_);
        } else {
          c.a_[static_cast<std::size_t>(i * half + k)] = static_cast<T>(cv * magnitude_);
          c.b_[static_cast<std::size_t>(i * half + k)] = static_cast<T>(sv * magnitude_);
        }
      }
    }
    return c;
  }

  /// Rotates every head of `x` in place like `rotate(x, pos)`, reading cos/sin from `cache`
  /// (same bits), on `ex` as `rotate(x, pos, ex, threads)`. Throws `precondition_error`, before
  /// touching `x`, unless the shapes fit as for `rotate(x, pos)`, `cache` was made by an encoder
  /// with the same parameters, and every position lies in the cache's range (in any order).
  /// No allocation.
  template <matrix_argument M>
  void rotate(M&& x, positions pos, const rope_cache<T>& cache, executor* ex = nullptr, int threads = 0) const {
    const auto v = checked_view(std::forward<M>(x), pos);
    using S = std::remove_pointer_t<decltype(v.data)>;
    POSENC_ASSERT(cache.fingerprint_ == fingerprint_ && cache.rotary_dim_ == r_ && cache.layout_ == p_.layout,
                  "rope::rotate: the cache was made by a rope with other parameters (base, scaling, layout or "
                  "rotary dim) than this one");
    for (index_t i = 0; i < v.rows; ++i)
      POSENC_ASSERT(cache.contains(pos[i]), "rope::rotate: position ", pos[i], " (row ", i,
                    ") is outside the cache's range [", cache.start_, ", ", cache.start_, " + ", cache.count_, ")");
    const index_t heads = v.cols / p_.head_dim;
    if (v.rows == 0 || heads == 0) return;
    const bool inter = p_.layout == rope_layout::interleaved;
    const auto kernel = detail::select_rope_kernel<S, T>(inter);
    const index_t half = r_ / 2;
    const index_t width = inter ? r_ : half;
    for_row_blocks(v.rows, ex, threads, [&](index_t first, index_t last) {
      for (index_t i = first; i < last; ++i) {
        const index_t at = static_cast<index_t>(pos[i] - cache.start_) * width;
        if (inter) {
          for (index_t j0 = 0; j0 < r_; j0 += detail::k_rope_max_chunk) {
            const index_t m = std::min(detail::k_rope_max_chunk, r_ - j0);
            kernel(v.row(i), heads, p_.head_dim, j0, 0, m, cache.a_.data() + at + j0, nullptr);
          }
        } else {
          kernel(v.row(i), heads, p_.head_dim, 0, half, half, cache.a_.data() + at, cache.b_.data() + at);
        }
      }
    });
  }

  /// cos and sin of every pair's angle at position `p`, on the unit circle (without the
  /// magnitude): `c[k]`, `s[k]` for `k < rotary_dim / 2`, in double, reduced exactly like `rotate`.
  void unit_cos_sin(position p, double* c, double* s) const { unit_cos_sin(p, 0, r_ / 2, c, s); }

  /// The same for pairs `[first, first + count)` only, into `c[0..count)`, `s[0..count)`.
  void unit_cos_sin(position p, index_t first, index_t count, double* c, double* s) const {
    POSENC_ASSERT(first >= 0 && count >= 0 && first <= r_ / 2 && count <= r_ / 2 - first, "rope::unit_cos_sin: pairs [",
                  first, ", ", first, " + ", count, ") are not inside the ", r_ / 2, " pairs");
    for (index_t k = 0; k < count; ++k)
      detail::rope_cos_sin(p, turns_[static_cast<std::size_t>(first + k)], exact_, c[k], s[k]);
  }

  /// A rotator for many small tiles at arbitrary positions with bounded memory (an attention
  /// kernel's key tiles); see `rope_tile_rotator`. Its table (256 rows of `rotary_dim` values) is
  /// made by the first call on this encoder or a copy of it, once and thread-safely, and shared;
  /// later calls allocate nothing. The rotator refers to this encoder, which must outlive it.
  rope_tile_rotator<T> tile_rotator() const {
    std::call_once(tile_table_->once, [this] { fill_tile_table(); });
    return rope_tile_rotator<T>(*this, tile_table_->values.data());
  }

 private:
  /// Calls `f(first, last)` for blocks of rows covering `[0, rows)`, on the workers of `ex`. Rows
  /// are independent, so the blocks may run anywhere in any order.
  template <class F>
  static void for_row_blocks(index_t rows, executor* ex, int threads, F&& f) {
    detail::require(threads >= 0, "rope::rotate threads", threads, "must be >= 0 (0 = all the executor has)");
    const detail::workers_of w(ex, threads);
    constexpr index_t min_rows = 32;  // below this a block costs more to hand out than to rotate
    const index_t blocks = std::min<index_t>(4 * index_t{w.count}, (rows + min_rows - 1) / min_rows);
    if (w.count <= 1 || blocks <= 1) {
      f(index_t{0}, rows);
      return;
    }
    const index_t per = (rows + blocks - 1) / blocks;
    auto body = [&](index_t b, int) { f(b * per, std::min(rows, (b + 1) * per)); };
    w.ex->parallel_for((rows + per - 1) / per, w.count, body);
  }

  /// `x` as a view, after the compile-time checks of its storage and the shape checks.
  template <matrix_argument M>
  auto checked_view(M&& x, const positions& pos) const {
    auto v = view_of(std::forward<M>(x));
    using S = std::remove_pointer_t<decltype(v.data)>;
    static_assert(!std::is_const_v<S>, "posenc::rope::rotate: x is rotated in place and must be mutable");
    static_assert(storage_for<S, T>,
                  "posenc::rope<T>::rotate: the storage type must compute in T "
                  "(float, bfloat16 or half for rope<float>; double for rope<double>)");
    check_shape(v.rows, v.cols, pos);
    return v;
  }

  /// `x` (a matrix or a `heads_view`) as a `heads_view`, checked like `checked_view`.
  template <class M>
  auto checked_heads(M&& x, const positions& pos) const {
    if constexpr (detail::is_heads_view_v<std::remove_cvref_t<M>>) {
      using S = std::remove_pointer_t<decltype(x.data)>;
      static_assert(storage_for<S, T>,
                    "posenc::rope<T>::rotate: the storage type must compute in T "
                    "(float, bfloat16 or half for rope<float>; double for rope<double>)");
      POSENC_ASSERT(x.head_dim == p_.head_dim, "rope::rotate: x has head_dim ", x.head_dim, " but the encoder has ",
                    p_.head_dim);
      POSENC_ASSERT(pos.size() == x.tokens, "rope::rotate: ", pos.size(), " positions for ", x.tokens,
                    " tokens (one per token is needed; every batch item has these positions)");
      POSENC_ASSERT(x.disjoint(), "rope::rotate: elements of x overlap (strides: batch ", x.batch_stride, ", token ",
                    x.token_stride, ", head ", x.head_stride, "); x is rotated in place");
      return x;
    } else {
      const auto v = checked_view(std::forward<M>(x), pos);
      return heads_view<std::remove_pointer_t<decltype(v.data)>>::rows(v.data, v.rows, v.cols / p_.head_dim,
                                                                       p_.head_dim, v.rows <= 1 ? v.cols : v.stride);
    }
  }

  void check_shape(index_t rows, index_t cols, const positions& pos) const {
    POSENC_ASSERT(cols % p_.head_dim == 0, "rope::rotate: x has ", cols, " columns, not a multiple of head_dim = ",
                  p_.head_dim);
    POSENC_ASSERT(pos.size() == rows, "rope::rotate: ", pos.size(), " positions for ", rows,
                  " rows (one per row is needed)");
  }

  // cos and sin of t * inv_freq (times the magnitude) for t in [0, 256): `rope_tile_rotator`'s
  // table, made on first use.
  void fill_tile_table() const {
    const index_t half = r_ / 2;
    std::vector<T>& table = tile_table_->values;
    table.resize(static_cast<std::size_t>(rope_tile_rotator<T>::block * 2 * half));
    std::vector<double> c(static_cast<std::size_t>(half)), s(static_cast<std::size_t>(half));
    for (position t = 0; t < rope_tile_rotator<T>::block; ++t) {
      unit_cos_sin(t, c.data(), s.data());
      T* row = table.data() + t * 2 * half;
      for (index_t k = 0; k < half; ++k) {
        row[k] = static_cast<T>(c[static_cast<std::size_t>(k)] * magnitude_);
        row[half + k] = static_cast<T>(s[static_cast<std::size_t>(k)] * magnitude_);
      }
    }
  }

  struct tile_table {
    std::once_flag once;
    std::vector<T> values;  // [256, 2 * r/2]: cos then sin, magnitude included
  };

  rope_params p_;
  index_t r_ = 0;
  double magnitude_ = 1.0;
  std::shared_ptr<tile_table> tile_table_ = std::make_shared<tile_table>();
  bool exact_ = true;
  std::uint64_t fingerprint_ = 0;
  std::vector<double> inv_freq_;
  std::vector<detail::rope_turns> turns_;
};

/// Rotates single-head tiles (`[rows, head_dim]`, one position per row) the way `rope::rotate`
/// does, with memory that does not grow with the positions' range: an attention kernel rotates
/// each key tile once per query tile, so the cos/sin must be cheap, and a cache of every position
/// would grow with the sequence.
///
/// Each position splits as `p = hi + lo` with `lo = p mod 256`; `cos/sin(lo theta)` come from a
/// table made once (256 rows of `rotary_dim` values, magnitude included) and `cos/sin(hi theta)`
/// are computed exactly in double when `hi` changes (once per 256 consecutive positions), then
///
///     cos(p theta) = cos(hi theta) cos(lo theta) - sin(hi theta) sin(lo theta)
///     sin(p theta) = sin(hi theta) cos(lo theta) + cos(hi theta) sin(lo theta)
///
/// in `T`. Each factor is rounded once from an exact value, so the result is within a few ulp
/// of `rope::rotate`'s, not bit-identical. Immutable; one object may serve all threads, each
/// passing its own `scratch` of `scratch_size()` values. It refers to the `rope` that made it,
/// which must outlive it.
template <class T>
class rope_tile_rotator {
 public:
  static constexpr position block = 256;

  /// A rotator of `r`'s rotation reading the table `table` (`rope::tile_rotator` makes both).
  rope_tile_rotator(const rope<T>& r, const T* table)
      : head_dim_(r.head_dim()), half_(r.rotary_dim() / 2), layout_(r.layout()), table_(table), rope_(&r) {}

  /// Values of `T` the caller provides as `scratch` to `rotate`.
  index_t scratch_size() const { return 4 * half_; }

  /// Rotates row `i` of `x` (`[rows, head_dim]`, any row stride) by position `pos[i]`.
  /// `scratch` holds `scratch_size()` values and must stay with one thread. No allocation.
  void rotate(strided_view<T> x, positions pos, T* scratch) const {
    rotate(strided_view<const T>(x), x, pos, scratch);
  }

  /// Writes row `i` of `src` rotated by `pos[i]` into row `i` of `dst` (both `[rows, head_dim]`;
  /// `src` of any storage type that computes in `T`; the two may be the same rows): an attention
  /// kernel loads and rotates a key tile in one pass. No allocation.
  ///
  /// Strict (no fused multiply-add), like the AVX-512 row: where fused multiply-add is part of the
  /// target (aarch64), g++ would fuse this loop differently for each storage type, and a tile of
  /// floats would be rotated to other bits than the same tile stored in fp16.
  template <class S>
  POSENC_STRICT_FP void rotate(strided_view<const S> src, strided_view<T> dst, positions pos, T* scratch) const {
    POSENC_STRICT_FP_BODY
    static_assert(storage_for<S, T>, "rope_tile_rotator::rotate: the source must compute in T");
    POSENC_ASSERT(src.cols == head_dim_ && dst.cols == head_dim_ && src.rows == dst.rows,
                  "rope_tile_rotator::rotate: src is [", src.rows, ", ", src.cols, "] and dst [", dst.rows, ", ",
                  dst.cols, "], but both must be [rows, head_dim] with head_dim = ", head_dim_);
    POSENC_ASSERT(pos.size() == dst.rows, "rope_tile_rotator::rotate: ", pos.size(), " positions for ", dst.rows,
                  " rows (one per row is needed)");
    T* hc = scratch;
    T* hs = hc + half_;
    T* c = hs + half_;
    T* s = c + half_;
    bool have = false;
    position cached_hi = 0;
    const bool inter = layout_ == rope_layout::interleaved;
    const index_t r = 2 * half_;
    // Float rows, half-split: the SIMD row kernel of the level in use, chosen once per call.
    [[maybe_unused]] detail::rope_tile_row_kernel row_kernel = nullptr;
    if constexpr (std::same_as<T, float> && std::same_as<S, float>) {
      if (!inter) row_kernel = detail::select_rope_tile_row_kernel();
    }
    for (index_t i = 0; i < dst.rows; ++i) {
      const position p = pos[i];
      const position hi = p & ~(block - 1);  // floor to a multiple of 256, negatives included
      const index_t lo = static_cast<index_t>(p - hi);
      if (!have || hi != cached_hi) {
        for (index_t k0 = 0; k0 < half_; k0 += chunk) {
          const index_t m = std::min(chunk, half_ - k0);
          double bc[chunk], bs[chunk];
          rope_->unit_cos_sin(hi, k0, m, bc, bs);
          for (index_t k = 0; k < m; ++k) {
            hc[k0 + k] = static_cast<T>(bc[k]);
            hs[k0 + k] = static_cast<T>(bs[k]);
          }
        }
        cached_hi = hi;
        have = true;
      }
      const T* lc = table_ + lo * 2 * half_;
      const S* from = src.row(i);
      // Row i + ahead requested now: a head's slice of the K rows of a [tokens, heads * head_dim]
      // cache lies a page apart for 8 heads of 128, where the hardware's prefetchers stop.
      detail::prefetch_row(src.data, src.stride, i + ahead, src.rows, head_dim_);
      T* to = dst.row(i);
      if constexpr (std::same_as<T, float> && std::same_as<S, float>) {
        if (row_kernel != nullptr) {
          row_kernel(from, to, hc, hs, lc, half_);
          for (index_t k = r; k < head_dim_; ++k) to[k] = from[k];
          continue;
        }
      }
      const T* ls = lc + half_;
      for (index_t k = 0; k < half_; ++k) {
        c[k] = hc[k] * lc[k] - hs[k] * ls[k];
        s[k] = hs[k] * lc[k] + hc[k] * ls[k];
      }
      if (inter) {
        for (index_t k = 0; k < half_; ++k) {
          const T a = static_cast<T>(from[2 * k]), b = static_cast<T>(from[2 * k + 1]);
          to[2 * k] = a * c[k] - b * s[k];
          to[2 * k + 1] = b * c[k] + a * s[k];
        }
      } else {
        for (index_t k = 0; k < half_; ++k) {
          const T a = static_cast<T>(from[k]), b = static_cast<T>(from[half_ + k]);
          to[k] = a * c[k] - b * s[k];
          to[half_ + k] = b * c[k] + a * s[k];
        }
      }
      for (index_t k = r; k < head_dim_; ++k) to[k] = static_cast<T>(from[k]);
    }
  }

 private:
  static constexpr index_t chunk = 32;
  /// Rows requested ahead of the row rotated. Causal prefill, 8 heads, d = 128, n = 8k, AVX2
  /// kernels on Zen 5: the rotation's share of the run 2.4% -> 1.4% with 8 rows ahead (2.1% with
  /// 16, 2.1% with one line of each row 8 ahead).
  static constexpr index_t ahead = 8;
  index_t head_dim_, half_;
  rope_layout layout_;
  const T* table_;  // [block, 2 * half]: cos then sin, magnitude included (owned by the rope)
  const rope<T>* rope_;
};

}  // namespace posenc
