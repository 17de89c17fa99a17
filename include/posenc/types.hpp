// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file types.hpp
/// Vocabulary types: strided row-major matrix views, views of heads with any strides (`heads_view`),
/// per-token positions, storage types.
///
/// Shape contract used throughout posenc: a sequence of tokens for several heads is a row-major
/// matrix `[tokens, heads * head_dim]`; head `h` is the column block `[h*head_dim, (h+1)*head_dim)`.
/// Rows may be further apart than their length (an outer stride), so an engine's buffer, or a
/// slice of a fused QKV buffer, is used in place. posenc never copies a matrix argument.

#include <Eigen/Core>
#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <limits>
#include <ranges>
#include <span>
#include <type_traits>
#include <utility>

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

/// A non-owning view of a batch of equally long sequences of several heads, with any strides:
/// the `head_dim` elements of batch item `b`, token `t`, head `h` start at
/// `data + b * batch_stride + t * token_stride + h * head_stride` and are contiguous. It names
/// every layout a framework hands over without a copy:
/// - `[tokens, heads * head_dim]` with a row stride (posenc's matrices, a slice of a fused QKV
///   projection): `heads_view::rows(data, tokens, heads, head_dim, row_stride)`;
/// - `[batch, tokens, heads, head_dim]` (a projection's output viewed, FlashAttention's layout):
///   `heads_view::bthd(...)`;
/// - `[batch, heads, tokens, head_dim]` (PyTorch's `scaled_dot_product_attention`) and
///   `[heads, tokens, head_dim]`: `heads_view::bhtd(...)` (batch 1 for the latter);
/// - anything else (a transposed or sliced tensor) through the constructor with its strides.
/// Strides are in elements and non-negative; a stride of 0 repeats an item, token or head (an
/// expanded tensor): allowed for inputs, refused for outputs, whose elements must not overlap.
template <class S>
struct heads_view {
  S* data = nullptr;
  index_t batch = 1, tokens = 0, heads = 0, head_dim = 0;
  index_t batch_stride = 0, token_stride = 0, head_stride = 0;

  heads_view() = default;
  heads_view(S* d, index_t batch_, index_t tokens_, index_t heads_, index_t head_dim_, index_t batch_stride_,
             index_t token_stride_, index_t head_stride_)
      : data(d), batch(batch_), tokens(tokens_), heads(heads_), head_dim(head_dim_), batch_stride(batch_stride_),
        token_stride(token_stride_), head_stride(head_stride_) {
    POSENC_ASSERT(batch_ >= 0 && tokens_ >= 0 && heads_ >= 0 && head_dim_ >= 0, "heads_view: negative shape [batch ",
                  batch_, ", tokens ", tokens_, ", heads ", heads_, ", head_dim ", head_dim_, "]");
    POSENC_ASSERT(batch_stride_ >= 0 && token_stride_ >= 0 && head_stride_ >= 0, "heads_view: negative stride (batch ",
                  batch_stride_, ", token ", token_stride_, ", head ", head_stride_, ")");
  }
  /// A view of mutable elements converts to a view of const elements.
  template <class U>
    requires(std::is_const_v<S> && std::same_as<std::remove_const_t<S>, U>)
  heads_view(const heads_view<U>& o)
      : data(o.data), batch(o.batch), tokens(o.tokens), heads(o.heads), head_dim(o.head_dim),
        batch_stride(o.batch_stride), token_stride(o.token_stride), head_stride(o.head_stride) {}

  /// `[tokens, heads * head_dim]`, rows `row_stride` elements apart (>= heads * head_dim).
  static heads_view rows(S* d, index_t tokens, index_t heads, index_t head_dim, index_t row_stride) {
    POSENC_ASSERT(row_stride >= heads * head_dim || tokens <= 1, "heads_view::rows: row stride ", row_stride,
                  " is smaller than heads * head_dim = ", heads * head_dim);
    return {d, 1, tokens, heads, head_dim, tokens * row_stride, row_stride, head_dim};
  }
  /// A matrix `[tokens, heads * head_dim]` split into `heads` heads (which must divide its columns).
  static heads_view rows(strided_view<S> m, index_t heads) {
    POSENC_ASSERT(heads > 0 && m.cols % heads == 0, "heads_view::rows: ", m.cols, " columns are not ", heads,
                  " heads of equal size");
    return rows(m.data, m.rows, heads, m.cols / heads, m.rows <= 1 ? m.cols : m.stride);
  }
  /// Dense `[batch, tokens, heads, head_dim]`.
  static heads_view bthd(S* d, index_t batch, index_t tokens, index_t heads, index_t head_dim) {
    return {d, batch, tokens, heads, head_dim, tokens * heads * head_dim, heads * head_dim, head_dim};
  }
  /// Dense `[batch, heads, tokens, head_dim]` (batch 1: `[heads, tokens, head_dim]`).
  static heads_view bhtd(S* d, index_t batch, index_t heads, index_t tokens, index_t head_dim) {
    return {d, batch, tokens, heads, head_dim, heads * tokens * head_dim, head_dim, tokens * head_dim};
  }

  /// The first element of batch item `b`, token `t`, head `h` (`head_dim` contiguous elements).
  S* at(index_t b, index_t t, index_t h) const { return data + (b * batch_stride + t * token_stride + h * head_stride); }
  /// Head `h` of batch item `b` as a `[tokens, head_dim]` matrix.
  strided_view<S> head(index_t b, index_t h) const {
    return {at(b, 0, h), tokens, head_dim, tokens <= 1 ? head_dim : std::max(token_stride, head_dim)};
  }
  /// Whether every token's heads lie `head_dim` apart in one row of the `[tokens, heads * head_dim]`
  /// matrix of each batch item.
  bool row_packed() const { return (heads <= 1 || head_stride == head_dim) && (tokens <= 1 || token_stride >= heads * head_dim); }
  /// Whether no two elements share memory (required of an output): sorted by stride, every axis
  /// steps past the span of the axes below it.
  bool disjoint() const {
    if (batch == 0 || tokens == 0 || heads == 0 || head_dim == 0) return true;
    std::pair<index_t, index_t> axes[3] = {{batch_stride, batch}, {token_stride, tokens}, {head_stride, heads}};
    std::sort(std::begin(axes), std::end(axes));
    index_t span = head_dim;
    for (const auto& [stride, extent] : axes) {
      if (extent <= 1) continue;
      if (stride < span) return false;
      span += stride * (extent - 1);
    }
    return true;
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

/// One operand of a call (q, k, v, out, lse) as the engine reads it: head `h` of row `r` (a row of
/// the packed queries of a batch's sequences, or a K/V row) starts at `at(r, h)`. The rows of one
/// sequence are `stride` apart; a batch of equally long sequences (`heads_view` with batch > 1)
/// puts the rows `[b * seq_rows, (b + 1) * seq_rows)` of sequence `b` at `b * seq_stride`. A run
/// of rows the engine reads at once never crosses from one sequence into the next.
template <class S>
struct head_rows {
  S* data = nullptr;
  index_t stride = 0, head_stride = 0;
  index_t seq_rows = 0, seq_stride = 0;  ///< 0 rows: one sequence (or a cache's rows)

  S* at(index_t r, index_t h) const {
    index_t offset = h * head_stride;
    if (seq_rows > 0) {
      const index_t b = r / seq_rows;
      offset += b * seq_stride;
      r -= b * seq_rows;
    }
    return data + (offset + r * stride);
  }
};

/// A `[rows, heads * d]` matrix, head h in columns `[h * d, (h + 1) * d)`.
template <class S>
head_rows<S> head_rows_of(strided_view<S> m, index_t d) {
  return {m.data, m.stride, d};
}
/// Every batch item's tokens as consecutive rows.
template <class S>
head_rows<S> head_rows_of(const heads_view<S>& v) {
  return {v.data, v.token_stride, v.head_stride, v.batch > 1 ? v.tokens : 0, v.batch_stride};
}

template <class M>
struct is_heads_view : std::false_type {};
template <class S>
struct is_heads_view<heads_view<S>> : std::true_type {};
template <class M>
inline constexpr bool is_heads_view_v = is_heads_view<M>::value;

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
