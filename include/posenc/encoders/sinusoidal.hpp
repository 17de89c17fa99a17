// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file encoders/sinusoidal.hpp
/// Absolute sinusoidal position encoding (Vaswani et al. 2017), added to token embeddings.
///
///     f_i = base^(-i / D),  i < dim/2,   D = dim/2 (Vaswani) or dim/2 - 1 (tensor2tensor, fairseq)
///     interleaved:   PE[p] = [sin(p f_0), cos(p f_0), sin(p f_1), cos(p f_1), ...]
///     concatenated:  PE[p] = [sin(p f_0), ..., sin(p f_{h-1}), cos(p f_0), ..., cos(p f_{h-1})]
///
/// With D = dim/2 the interleaved layout is the paper's `PE[p, 2i] = sin(p / 10000^(2i/dim))`,
/// `PE[p, 2i+1] = cos(...)`. Code bases that use the concatenated layout usually also use
/// `D = dim/2 - 1` and count positions from an offset (fairseq starts at padding_idx + 1): both are
/// options here, so a table matches the model it came from.

#include <cmath>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "posenc/concepts.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/detail/position_math.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// Where the sines and cosines of one frequency go in a row.
enum class sinusoidal_layout {
  interleaved,   ///< `[s0 c0 s1 c1 ...]` (the paper's formula)
  concatenated,  ///< `[s0 s1 ... c0 c1 ...]` (tensor2tensor, fairseq, many diffusion codes)
};

/// Parameters of `sinusoidal`; every field has the paper's default.
struct sinusoidal_params {
  index_t dim = 512;                                        ///< embedding width; even
  double base = 10000.0;                                    ///< wavelength base; > 0
  sinusoidal_layout layout = sinusoidal_layout::interleaved;
  bool shifted_denominator = false;  ///< exponent denominator dim/2 - 1 instead of dim/2; needs dim >= 4
  position position_offset = 0;      ///< added to every position before encoding
};

/// Sinusoidal absolute position encoding: an `additive_input` encoder.
///
/// Angles are `(pos + offset) * f_i` in double and their sine and cosine are taken in double,
/// then rounded, so positions far beyond 2^24 keep full accuracy. `pos + offset` is the exact sum
/// rounded once to double, for any int64 values (it may pass the int64 range). Immutable after construction;
/// one object may be used from several threads at once.
template <class T>
class sinusoidal {
  static_assert(std::same_as<T, float> || std::same_as<T, double>, "posenc::sinusoidal<T>: T is float or double");

 public:
  using scalar_type = T;
  static constexpr encoding_family family = encoding_family::additive_input;

  /// Validates `p` (std::invalid_argument naming the field) and precomputes the frequencies.
  /// Allocates dim/2 doubles.
  explicit sinusoidal(const sinusoidal_params& p) : p_(p) {
    detail::require(p.dim > 0, "sinusoidal_params.dim", p.dim, "must be positive");
    detail::require(p.dim % 2 == 0, "sinusoidal_params.dim", p.dim, "must be even (a sine and a cosine per frequency)");
    detail::require(std::isfinite(p.base) && p.base > 0, "sinusoidal_params.base", p.base, "must be finite and > 0");
    detail::require(p.layout == sinusoidal_layout::interleaved || p.layout == sinusoidal_layout::concatenated,
                    "sinusoidal_params.layout", static_cast<int>(p.layout), "unknown sinusoidal_layout");
    detail::require(!p.shifted_denominator || p.dim >= 4, "sinusoidal_params.dim", p.dim,
                    "must be >= 4 with shifted_denominator (the denominator dim/2 - 1 would be 0)");
    const index_t half = p.dim / 2;
    const double denom = static_cast<double>(p.shifted_denominator ? half - 1 : half);
    freq_.resize(static_cast<std::size_t>(half));
    for (index_t i = 0; i < half; ++i) {
      const double f = std::pow(p.base, -static_cast<double>(i) / denom);
      // A base far below 1 (1e-300) gives frequencies so large that angles `(pos + offset) f`
      // (|pos + offset| <= 2^64) overflow, and their sines would be NaN.
      detail::require(f <= std::numeric_limits<double>::max() / 0x1p64, "sinusoidal_params.base", p.base,
                      "gives a frequency too large for a finite angle (base^(-i/D) with base far below 1)");
      freq_[static_cast<std::size_t>(i)] = f;
    }
  }

  static constexpr std::string_view name() { return "sinusoidal"; }
  index_t dim() const { return p_.dim; }
  const sinusoidal_params& params() const { return p_; }
  /// The frequencies `f_i`, `dim/2` of them.
  std::span<const double> frequencies() const { return freq_; }

  /// `x[i] += PE[pos[i]]` in place.
  ///
  /// \param x    `[tokens, dim]` row-major, any row stride, storage float/double/bf16/fp16 (bf16 and
  ///             fp16 are computed in float and rounded once).
  /// \param pos  one position per row of `x`.
  /// Does not allocate.
  template <matrix_argument M>
  void add_to(M&& x, positions pos) const {
    auto v = view_of(std::forward<M>(x));
    check_shape(v, pos, "sinusoidal::add_to");
    for (index_t t = 0; t < v.rows; ++t) {
      encode_row(pos[t], v.row(t), [](auto& dst, T val) { dst = static_cast<std::remove_reference_t<decltype(dst)>>(static_cast<T>(dst) + val); });
    }
  }

  /// Writes `PE[pos[i]]` into row `i` of `out` (`[tokens, dim]`, any row stride). Does not allocate.
  template <matrix_argument M>
  void write_table(M&& out, positions pos) const {
    auto v = view_of(std::forward<M>(out));
    check_shape(v, pos, "sinusoidal::write_table");
    for (index_t t = 0; t < v.rows; ++t) {
      encode_row(pos[t], v.row(t), [](auto& dst, T val) { dst = static_cast<std::remove_reference_t<decltype(dst)>>(val); });
    }
  }

  /// The table `PE[pos[i]]` as a new `[pos.size(), dim]` matrix (allocates it).
  row_matrix<T> table(positions pos) const {
    row_matrix<T> out(pos.size(), p_.dim);
    write_table(out, pos);
    return out;
  }

 private:
  template <class S>
  void check_shape(const strided_view<S>& v, positions pos, const char* /*where*/) const {
    static_assert(!std::is_const_v<S>, "posenc::sinusoidal: the output matrix must be writable");
    static_assert(storage_for<S, T>, "posenc::sinusoidal<T>: storage must compute in T (double for double, float otherwise)");
    POSENC_ASSERT(v.cols == p_.dim, "sinusoidal: the matrix has ", v.cols, " columns but dim = ", p_.dim);
    POSENC_ASSERT(pos.size() == v.rows, "sinusoidal: ", pos.size(), " positions for ", v.rows,
                  " rows (one per row is needed)");
  }

  template <class S, class Op>
  void encode_row(position p, S* row, Op op) const {
    // Exact, then rounded once: an offset near the int64 limits neither overflows nor rounds twice.
    const double pd = detail::position_sum(p, p_.position_offset);
    const index_t half = p_.dim / 2;
    const bool inter = p_.layout == sinusoidal_layout::interleaved;
    for (index_t i = 0; i < half; ++i) {
      const double a = pd * freq_[static_cast<std::size_t>(i)];
      const T s = static_cast<T>(std::sin(a));
      const T c = static_cast<T>(std::cos(a));
      op(row[inter ? 2 * i : i], s);
      op(row[inter ? 2 * i + 1 : half + i], c);
    }
  }

  sinusoidal_params p_;
  std::vector<double> freq_;
};

}  // namespace posenc
