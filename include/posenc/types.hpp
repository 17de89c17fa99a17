// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file types.hpp
/// Vocabulary types: strided row-major matrix views, per-token positions, storage types.
///
/// Shape contract used throughout posenc: a sequence of tokens for several heads is a row-major
/// matrix `[tokens, heads * head_dim]`; head `h` is the column block `[h*head_dim, (h+1)*head_dim)`.
/// Rows may be further apart than their length (an outer stride), so an engine's buffer, or a
/// slice of a fused QKV buffer, is used in place. posenc never copies a matrix argument.

#include <Eigen/Core>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <ranges>
#include <span>
#include <type_traits>

#include "posenc/config.hpp"

namespace posenc {

/// Signed index type for rows, columns and counts (Eigen's).
using index_t = std::ptrdiff_t;

/// A token position. Always a 64-bit integer: bf16 cannot count past 256 exactly, fp32 past 2^24.
using position = std::int64_t;

/// Element types a matrix argument may hold. bf16 and fp16 are storage only: arithmetic on them
/// runs in float.
template <class S>
concept storage_scalar = std::same_as<S, float> || std::same_as<S, double> || std::same_as<S, Eigen::bfloat16> ||
                         std::same_as<S, Eigen::half>;

/// The arithmetic type used for a storage type: double for double, float for everything else.
template <storage_scalar S>
using compute_t = std::conditional_t<std::same_as<S, double>, double, float>;

/// `S` can be processed by an encoder whose arithmetic type is `T` (float, double).
template <class S, class T>
concept storage_for = storage_scalar<std::remove_const_t<S>> && std::same_as<compute_t<std::remove_const_t<S>>, T>;

/// A non-owning view of a row-major matrix with unit column stride and any row stride (>= cols).
/// Element `(i, j)` is `data[i * stride + j]`. Constness of the elements follows `S`.
template <class S>
struct strided_view {
  S* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t stride = 0;  ///< distance between the starts of two consecutive rows, in elements

  strided_view() = default;
  strided_view(S* d, index_t r, index_t c, index_t s) : data(d), rows(r), cols(c), stride(s) {
    POSENC_ASSERT(r >= 0 && c >= 0, "strided_view: negative shape [", r, ", ", c, "]");
    POSENC_ASSERT(s >= c || r <= 1, "strided_view: row stride ", s, " is smaller than the row length ", c);
  }
  /// A dense matrix: stride equals cols.
  strided_view(S* d, index_t r, index_t c) : strided_view(d, r, c, c) {}
  /// A view of mutable elements converts to a view of const elements.
  template <class U>
    requires(std::is_const_v<S> && std::same_as<std::remove_const_t<S>, U>)
  strided_view(const strided_view<U>& o) : data(o.data), rows(o.rows), cols(o.cols), stride(o.stride) {}

  S* row(index_t i) const { return data + i * stride; }
  S& operator()(index_t i, index_t j) const { return data[i * stride + j]; }

  /// Rows `[first, first + count)`.
  strided_view middle_rows(index_t first, index_t count) const {
    POSENC_ASSERT(first >= 0 && count >= 0 && first <= rows && count <= rows - first, "strided_view: rows [", first,
                  ", ", first, " + ", count, ") are not inside the view's ", rows, " rows");
    return {data + first * stride, count, cols, stride};
  }
  /// Columns `[first, first + count)` (a head's block, for example).
  strided_view middle_cols(index_t first, index_t count) const {
    POSENC_ASSERT(first >= 0 && count >= 0 && first <= cols && count <= cols - first, "strided_view: columns [",
                  first, ", ", first, " + ", count, ") are not inside the view's ", cols, " columns");
    return {data + first, rows, count, stride};
  }
};

/// Per-token positions: either an explicit list (a span of int64, borrowed, not copied) or the
/// contiguous range `[start, start + size)`. Cheap to copy; the span's storage must outlive it.
class positions {
 public:
  positions() = default;
  /// Borrow an explicit list (KV cache slots, left padding, zigzag shards, packed sequences).
  positions(std::span<const position> list) : list_(list.data()), size_(static_cast<index_t>(list.size())) {}
  /// Borrow any contiguous range of int64 (a `std::vector<std::int64_t>`, an array). Like a span,
  /// the range must outlive this object.
  template <std::ranges::contiguous_range R>
    requires(std::same_as<std::ranges::range_value_t<R>, position> &&
             !std::same_as<std::remove_cvref_t<R>, std::span<const position>> && std::ranges::sized_range<R>)
  positions(const R& list) : positions(std::span<const position>(std::ranges::data(list), std::ranges::size(list))) {}
  /// The contiguous range `[start, start + count)`.
  static positions range(position start, index_t count) {
    POSENC_ASSERT(count >= 0, "positions::range: count = ", count, " is negative");
    POSENC_ASSERT(count == 0 || start <= std::numeric_limits<position>::max() - static_cast<position>(count - 1),
                  "positions::range: the last position start + count - 1 = ", start, " + ", count,
                  " - 1 overflows int64");
    positions p;
    p.start_ = start;
    p.size_ = count;
    return p;
  }

  index_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  bool is_range() const { return list_ == nullptr; }
  /// First position of a range (meaningful only when `is_range()`).
  position start() const { return start_; }
  position operator[](index_t i) const { return list_ ? list_[i] : start_ + static_cast<position>(i); }

  /// Positions `[first, first + count)` of this set.
  positions subset(index_t first, index_t count) const {
    POSENC_ASSERT(first >= 0 && count >= 0 && first <= size_ && count <= size_ - first, "positions::subset: [", first,
                  ", ", first, " + ", count, ") is not inside the ", size_, " positions");
    positions p;
    if (list_) {
      p.list_ = list_ + first;
    } else {
      p.start_ = start_ + static_cast<position>(first);
    }
    p.size_ = count;
    return p;
  }

 private:
  const position* list_ = nullptr;
  position start_ = 0;
  index_t size_ = 0;
};

/// The contiguous positions `[start, start + count)`; shorthand for `positions::range`.
inline positions arange(position start, index_t count) { return positions::range(start, count); }

namespace detail {

template <class M>
using eigen_plain_t = std::remove_cvref_t<M>;

template <class M>
concept eigen_dense = std::derived_from<eigen_plain_t<M>, Eigen::DenseBase<eigen_plain_t<M>>>;

template <class M>
struct is_strided_view : std::false_type {};
template <class S>
struct is_strided_view<strided_view<S>> : std::true_type {};

}  // namespace detail

/// What a matrix argument may be: a `strided_view`, or an Eigen dense object with direct access
/// (a `Matrix`, `Map`, `Ref`, or a `block()` of one), row-major, whose scalar is a storage type.
template <class M>
concept matrix_argument = detail::is_strided_view<detail::eigen_plain_t<M>>::value || detail::eigen_dense<M>;

/// Wraps a matrix argument as a `strided_view`, without copying.
///
/// A column-major Eigen argument is a compile error: posenc would have to copy it, and never does
/// so silently. The elements are const when `M` is (`const Matrix&`, `Map<const ...>`).
template <class M>
auto view_of(M&& m) {
  using D = detail::eigen_plain_t<M>;
  if constexpr (detail::is_strided_view<D>::value) {
    return D(m);
  } else {
    static_assert(detail::eigen_dense<M>, "posenc: a matrix argument must be a posenc::strided_view or an Eigen dense object");
    using Scalar = typename D::Scalar;
    static_assert(storage_scalar<Scalar>,
                  "posenc: matrix elements must be float, double, Eigen::bfloat16 or Eigen::half");
    static_assert(D::IsRowMajor || D::ColsAtCompileTime == 1,
                  "posenc: matrix arguments must be row-major ([tokens, heads * head_dim], Eigen::RowMajor); "
                  "a column-major matrix would need a copy, which posenc never makes silently");
    static_assert(bool(Eigen::internal::traits<D>::Flags & Eigen::DirectAccessBit),
                  "posenc: a matrix argument must expose its memory (a Matrix, Map, Ref or block of one), "
                  "not an expression; evaluate it first");
    constexpr bool read_only = std::is_const_v<std::remove_reference_t<M>> ||
                               !bool(Eigen::internal::traits<D>::Flags & Eigen::LvalueBit);
    using S = std::conditional_t<read_only, const Scalar, Scalar>;
    S* data = const_cast<S*>(m.data());
    if constexpr (D::ColsAtCompileTime == 1 && !D::IsRowMajor) {
      POSENC_ASSERT(m.cols() == 1, "view_of: a column vector was expected, got ", m.cols(), " columns");
      POSENC_ASSERT(m.rows() <= 1 || m.innerStride() >= 1, "view_of: element stride ", m.innerStride(),
                    " of a column vector must be positive");
      return strided_view<S>(data, m.rows(), 1, m.rows() <= 1 ? 1 : m.innerStride());
    } else {
      POSENC_ASSERT(m.innerStride() == 1 || m.cols() <= 1, "view_of: the columns of a row must be contiguous (inner "
                    "stride 1), got inner stride ", m.innerStride());
      return strided_view<S>(data, m.rows(), m.cols(), m.rows() <= 1 ? m.cols() : m.outerStride());
    }
  }
}

/// Row-major dynamic Eigen matrix, the natural owner type for posenc arguments and results.
template <class S>
using row_matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace posenc
