// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/mrope.hpp
/// Rotary embeddings with positions on several axes: multi-axis RoPE (M-RoPE, Qwen2-VL,
/// Qwen2.5-VL, Qwen3-VL) and 2-D axial RoPE (the vision encoders of Qwen2-VL and its successors).
///
/// Each token carries one position per axis (`axis_positions`, an `[tokens, axes]` int64 view).
/// Every rotary pair `k` belongs to one axis `a(k)` and turns by `pos[a(k)] * inv_freq(k)`; the
/// rotation itself is RoPE's (rope.hpp: the same pair layouts, the same exact angle reduction in
/// double, the same kernels).
///
/// M-RoPE (`mrope`, `mrope_section` `[s0, s1, s2]`, summing to `r/2`, the frequencies of RoPE):
///
///     sections  (Qwen2-VL, [16, 24, 24]):  pairs 0..15 -> t, 16..39 -> h, 40..63 -> w
///     interleaved (Qwen3-VL, [24, 20, 20]): pairs t h w t h w ... (pair k -> axis k mod 3 while
///                                            k < 3 s_axis), the rest -> t
///
/// A text token has equal positions on every axis, and then M-RoPE is RoPE exactly (the same bits).
///
/// Axial 2-D RoPE (`axial_rope`): axes (row, column); the first `r/4` pairs turn by the row, the
/// next `r/4` by the column, both with the frequencies `base^(-4j/r)`, `j < r/4` (a RoPE table of
/// `r/2` dims used once per axis).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/concepts.hpp"
#include "posenc/config.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/executor.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Positions of tokens on several axes: element `(i, a)` is token `i`'s position on axis `a`, at
/// `data[i * row_stride + a * axis_stride]`. Borrowed, never copied; the storage must outlive
/// the view. Token-major `[tokens, axes]` (the default) and axis-major `[axes, tokens]` (Hugging
/// Face's `position_ids` of shape `(3, seq)`) are both views.
class axis_positions {
 public:
  axis_positions() = default;
  /// A token-major list: `values.size() / axes` tokens of `axes` positions each. Throws
  /// `precondition_error` unless `axes > 0` and `axes` divides the length.
  axis_positions(std::span<const position> values, index_t axes)
      : axis_positions(values.data(), axes > 0 ? static_cast<index_t>(values.size()) / axes : 0, axes, axes, 1) {
    POSENC_ASSERT(axes > 0 && static_cast<index_t>(values.size()) % axes == 0, "axis_positions: ", values.size(),
                  " values are not tokens of axes = ", axes, " positions each");
  }
  /// A general strided view: `tokens` rows of `axes` positions.
  axis_positions(const position* data, index_t tokens, index_t axes, index_t row_stride, index_t axis_stride)
      : data_(data), tokens_(tokens), axes_(axes), row_stride_(row_stride), axis_stride_(axis_stride) {
    POSENC_ASSERT(tokens >= 0 && axes > 0, "axis_positions: shape [", tokens, ", ", axes,
                  "] must have tokens >= 0 and axes > 0");
  }
  /// An axis-major list `[axes, tokens]` (Hugging Face's `position_ids[:, 0, :]` for one sequence).
  static axis_positions axis_major(std::span<const position> values, index_t axes) {
    POSENC_ASSERT(axes > 0 && static_cast<index_t>(values.size()) % axes == 0,
                  "axis_positions::axis_major: ", values.size(), " values are not axes = ", axes,
                  " rows of equal length");
    const index_t n = static_cast<index_t>(values.size()) / axes;
    return axis_positions(values.data(), n, axes, 1, n);
  }

  index_t size() const { return tokens_; }
  index_t axes() const { return axes_; }
  position operator()(index_t token, index_t axis) const { return data_[token * row_stride_ + axis * axis_stride_]; }

 private:
  const position* data_ = nullptr;
  index_t tokens_ = 0;
  index_t axes_ = 1;
  index_t row_stride_ = 1;
  index_t axis_stride_ = 1;
};

namespace detail {

/// A run of consecutive rotary pairs `[first, first + count)` that turn by one axis, with the
/// frequencies `[freq_first, freq_first + count)` of the inner RoPE table.
struct axis_run {
  index_t first, count, axis, freq_first;
};

/// Rotates every head of `x` by the runs: pair `k` of row `i` by `pos(i, axis) * inv_freq` of
/// `table` (cos/sin exactly as `rope::rotate` makes them, times `magnitude`), with RoPE's kernels.
template <class T, class M>
void rotate_axis_runs(M&& x, const axis_positions& pos, const rope<T>& table, double magnitude, index_t head_dim,
                      index_t rotary_dim, rope_layout layout, std::span<const axis_run> runs, index_t axes,
                      executor* ex, int threads, std::string_view who) {
  auto v = view_of(std::forward<M>(x));
  using S = std::remove_pointer_t<decltype(v.data)>;
  static_assert(!std::is_const_v<S>, "posenc: x is rotated in place and must be mutable");
  static_assert(storage_for<S, T>, "posenc: the storage type must compute in T (float, bfloat16 or half for float)");
  POSENC_ASSERT(v.cols % head_dim == 0, who, ": x has ", v.cols, " columns, not a multiple of head_dim = ", head_dim);
  POSENC_ASSERT(pos.axes() == axes, who, ": the positions have ", pos.axes(), " axes, but this encoder needs ", axes,
                " (one column per axis)");
  POSENC_ASSERT(pos.size() == v.rows, who, ": ", pos.size(), " tokens of positions for ", v.rows,
                " rows (one per row is needed)");
  require(threads >= 0, std::string(who) + " threads", threads, "must be >= 0 (0 = all the executor has)");
  const index_t heads = v.cols / head_dim;
  if (v.rows == 0 || heads == 0) return;
  const bool inter = layout == rope_layout::interleaved;
  const auto kernel = select_rope_kernel<S, T>(inter);
  const index_t half = rotary_dim / 2;
  const auto body = [&](index_t first, index_t last) {
    constexpr index_t chunk = k_rope_max_chunk / 2;
    alignas(64) T a[2 * chunk];
    alignas(64) T b[chunk];
    double c[chunk], s[chunk];
    for (index_t i = first; i < last; ++i) {
      for (const axis_run& run : runs) {
        const position p = pos(i, run.axis);
        for (index_t k0 = 0; k0 < run.count; k0 += chunk) {
          const index_t m = std::min(chunk, run.count - k0);
          table.unit_cos_sin(p, run.freq_first + k0, m, c, s);
          for (index_t k = 0; k < m; ++k) {
            if (inter) {
              a[2 * k] = static_cast<T>(c[k] * magnitude);
              a[2 * k + 1] = static_cast<T>(s[k] * magnitude);
            } else {
              a[k] = static_cast<T>(c[k] * magnitude);
              b[k] = static_cast<T>(s[k] * magnitude);
            }
          }
          const index_t at = run.first + k0;
          if (inter) {
            kernel(v.row(i), heads, head_dim, 2 * at, 0, 2 * m, a, b);
          } else {
            kernel(v.row(i), heads, head_dim, at, half + at, m, a, b);
          }
        }
      }
    }
  };
  const workers_of w(ex, threads);
  constexpr index_t min_rows = 32;
  const index_t blocks = std::min<index_t>(4 * index_t{w.count}, (v.rows + min_rows - 1) / min_rows);
  if (w.count <= 1 || blocks <= 1) {
    body(0, v.rows);
    return;
  }
  const index_t per = (v.rows + blocks - 1) / blocks;
  auto block = [&](index_t blk, int) { body(blk * per, std::min(v.rows, (blk + 1) * per)); };
  w.ex->parallel_for((v.rows + per - 1) / per, w.count, block);
}

}  // namespace detail

/// Parameters of multi-axis RoPE. `rope` gives the head size, rotary dims, base (`rope_theta`),
/// pair layout and frequency policy, exactly as for `posenc::rope`; `sections` (`mrope_section`)
/// the pairs per axis, summing to `rotary_dim / 2`; `interleaved` (`mrope_interleaved`) the axis
/// order of Qwen3-VL.
struct mrope_params {
  rope_params rope{};
  std::vector<index_t> sections{};  ///< pairs per axis (t, h, w for the Qwen VL models), each > 0
  bool interleaved = false;         ///< pair k -> axis k mod axes while k < axes * sections[axis]; else axis 0
};

/// Multi-axis RoPE (M-RoPE) for arithmetic type `T`; a `rotation` encoder. `rotate(x, axis_positions)`
/// rotates by each pair's axis; `rotate(x, positions)` takes one position per token for every axis
/// (text tokens), which is plain RoPE, so the attention kernel applies it to text sequences.
/// Construction throws `std::invalid_argument` naming the field (the `rope` fields as for `rope`;
/// `mrope_params.sections` when empty, when an entry is <= 0, when the sum is not `rotary_dim / 2`,
/// or when interleaving cannot give each axis its count). Immutable and thread-safe; `rotate`
/// allocates nothing.
template <class T>
class mrope {
 public:
  using scalar_type = T;
  static constexpr encoding_family family = encoding_family::rotation;

  explicit mrope(const mrope_params& p) : p_(p), rope_(p.rope) {
    const index_t half = rope_.rotary_dim() / 2;
    const auto n = static_cast<index_t>(p.sections.size());
    detail::require(n > 0, "mrope_params.sections", std::string_view("[]"), "needs one entry per axis");
    index_t sum = 0;
    std::string text = "[";
    for (index_t a = 0; a < n; ++a) text += (a ? ", " : "") + detail::to_text(p.sections[static_cast<std::size_t>(a)]);
    text += "]";
    for (const index_t s : p.sections) {
      detail::require(s > 0, "mrope_params.sections", text, "every entry must be > 0");
      sum += s;
    }
    detail::require(
        sum == half, "mrope_params.sections", text,
        "must sum to rotary_dim / 2 = " + detail::to_text(half) + " (the sum is " + detail::to_text(sum) + ")");
    axis_of_.resize(static_cast<std::size_t>(half));
    for (index_t k = 0; k < half; ++k) {
      index_t axis = 0;
      if (p.interleaved) {
        const index_t a = k % n;
        if (a > 0 && k < n * p.sections[static_cast<std::size_t>(a)]) axis = a;
      } else {
        for (index_t acc = p.sections[0]; k >= acc; acc += p.sections[static_cast<std::size_t>(axis)]) ++axis;
      }
      axis_of_[static_cast<std::size_t>(k)] = axis;
    }
    if (p.interleaved) {
      std::vector<index_t> count(static_cast<std::size_t>(n), 0);
      for (const index_t a : axis_of_) ++count[static_cast<std::size_t>(a)];
      detail::require(count == p.sections, "mrope_params.sections", text,
                      "interleaved over " + detail::to_text(half) + " pairs does not give each axis its count");
    }
    for (index_t k = 0; k < half;) {
      index_t e = k + 1;
      while (e < half && axis_of_[static_cast<std::size_t>(e)] == axis_of_[static_cast<std::size_t>(k)]) ++e;
      runs_.push_back({k, e - k, axis_of_[static_cast<std::size_t>(k)], k});
      k = e;
    }
  }

  /// "mrope" or "mrope-interleaved".
  std::string_view name() const { return p_.interleaved ? "mrope-interleaved" : "mrope"; }
  index_t head_dim() const { return rope_.head_dim(); }
  index_t rotary_dim() const { return rope_.rotary_dim(); }
  rope_layout layout() const { return rope_.layout(); }
  index_t axes() const { return static_cast<index_t>(p_.sections.size()); }
  const mrope_params& params() const { return p_; }
  std::span<const double> inv_freq() const { return rope_.inv_freq(); }
  double magnitude() const { return rope_.magnitude(); }
  /// The axis that pair `k` (`0 <= k < rotary_dim / 2`) turns by.
  index_t axis_of_pair(index_t k) const {
    POSENC_ASSERT(k >= 0 && k < rope_.rotary_dim() / 2, "mrope::axis_of_pair: pair ", k, " is not one of the ",
                  rope_.rotary_dim() / 2, " pairs");
    return axis_of_[static_cast<std::size_t>(k)];
  }
  /// The RoPE this equals on text tokens.
  const rope<T>& text_rope() const { return rope_; }

  /// Rotates every head of `x` (`[tokens, heads * head_dim]`, row-major, any row stride) in place:
  /// pair `k` of row `i` by `pos(i, axis_of_pair(k))`. Throws `precondition_error` unless
  /// `cols % head_dim == 0`, `pos.axes() == axes()` and `pos.size() == rows`. Rows are shared among
  /// the workers of `ex` as in `rope::rotate`; no allocation.
  template <matrix_argument M>
  void rotate(M&& x, const axis_positions& pos, executor* ex = nullptr, int threads = 0) const {
    detail::rotate_axis_runs<T>(std::forward<M>(x), pos, rope_, rope_.magnitude(), rope_.head_dim(), rope_.rotary_dim(),
                                rope_.layout(), runs_, axes(), ex, threads, "mrope::rotate");
  }

  /// Rotates text tokens (the same position on every axis): `rope::rotate`, the same bits as
  /// `rotate(x, pos)` with every axis equal to `pos`.
  template <matrix_argument M>
  void rotate(M&& x, positions pos, executor* ex = nullptr, int threads = 0) const {
    rope_.rotate(std::forward<M>(x), pos, ex, threads);
  }

  /// The text RoPE's tile rotator, for the attention kernel (one position per token).
  rope_tile_rotator<T> tile_rotator() const { return rope_.tile_rotator(); }

 private:
  mrope_params p_;
  rope<T> rope_;
  std::vector<index_t> axis_of_;
  std::vector<detail::axis_run> runs_;
};

/// Parameters of axial 2-D RoPE: `head_dim`, `rotary_dim` (0 = head_dim; a multiple of 4), the
/// base of the per-axis table (the vision encoders of the Qwen VL models use 10000) and the pair layout.
struct axial_rope_params {
  index_t head_dim = 64;
  index_t rotary_dim = 0;
  double base = 10000.0;
  rope_layout layout = rope_layout::half_split;
};

/// Axial 2-D RoPE for image patches, arithmetic type `T`. Positions are `(row, column)` per token
/// (`axis_positions` with 2 axes). Pair `k < r/4` turns by `row * base^(-4k/r)`, pair `r/4 + j` by
/// `column * base^(-4j/r)`. A 1-D position list does not describe a patch, so there is no
/// `rotate(x, positions)`: rotate queries and keys here, then attend with `no_position`.
/// Throws `std::invalid_argument` naming the field for `head_dim <= 0`, a `rotary_dim` that is not
/// a positive multiple of 4 and `<= head_dim`, or `base <= 0`.
template <class T>
class axial_rope {
 public:
  using scalar_type = T;
  static constexpr encoding_family family = encoding_family::rotation;

  explicit axial_rope(const axial_rope_params& p) : p_(p), table_(table_params(p)) {
    const index_t q = rotary_dim_ / 4;
    runs_[0] = {0, q, 0, 0};
    runs_[1] = {q, q, 1, 0};
  }

  std::string_view name() const { return "rope-2d"; }
  index_t head_dim() const { return p_.head_dim; }
  index_t rotary_dim() const { return rotary_dim_; }
  rope_layout layout() const { return p_.layout; }
  const axial_rope_params& params() const { return p_; }
  /// The `r/4` frequencies of each axis.
  std::span<const double> inv_freq() const { return table_.inv_freq(); }
  double magnitude() const { return 1.0; }

  /// Rotates every head of `x` (`[tokens, heads * head_dim]`) in place by `(row, column) =
  /// (pos(i, 0), pos(i, 1))`. Throws `precondition_error` unless `cols % head_dim == 0`,
  /// `pos.axes() == 2` and `pos.size() == rows`. No allocation.
  template <matrix_argument M>
  void rotate(M&& x, const axis_positions& pos, executor* ex = nullptr, int threads = 0) const {
    detail::rotate_axis_runs<T>(std::forward<M>(x), pos, table_, 1.0, p_.head_dim, rotary_dim_, p_.layout, runs_, 2, ex,
                                threads, "axial_rope::rotate");
  }

 private:
  rope_params table_params(const axial_rope_params& p) {
    detail::require(p.head_dim > 0, "axial_rope_params.head_dim", p.head_dim, "must be > 0");
    rotary_dim_ = p.rotary_dim == 0 ? p.head_dim : p.rotary_dim;
    detail::require(
        rotary_dim_ > 0 && rotary_dim_ % 4 == 0 && rotary_dim_ <= p.head_dim, "axial_rope_params.rotary_dim",
        rotary_dim_,
        "must be a positive multiple of 4 (half the pairs per axis) and <= head_dim = " + detail::to_text(p.head_dim));
    detail::require(std::isfinite(p.base) && p.base > 0, "axial_rope_params.base", p.base, "must be finite and > 0");
    return rope_params{.head_dim = rotary_dim_ / 2, .rotary_dim = rotary_dim_ / 2, .layout = p.layout, .base = p.base};
  }

  axial_rope_params p_;
  index_t rotary_dim_ = 0;
  rope<T> table_;
  detail::axis_run runs_[2] = {};
};

}  // namespace posenc
