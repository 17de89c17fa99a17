// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/alibi_kernels.hpp
/// Internal: ALiBi's bias row, `row[j] += float(neg_slope * (d0 - j))` (or of `|d0 - j|`) for
/// `j < n`, the inner loop of `alibi::add_bias_tile` on float logits whose keys are a range.
/// The distance and the product are computed in double lanes (every distance below 2^53 is
/// exact, so each product is the scalar loop's), narrowed to float with the cast's rounding and
/// added: every version gives the bits of the portable loop, at the speed an attention kernel
/// needs (the bias is added to every logit). One body over the double traits of
/// detail/simd_traits.hpp: AVX-512 (8 lanes, masked tail), AVX2 (4 lanes) and NEON (2 lanes),
/// scalar tails for the last two.
/// The same kernel fills the table of biases that rows share (detail/bias_table.hpp).

#include <cmath>

#include "posenc/detail/cpu.hpp"
#include "posenc/detail/simd_traits.hpp"
#include "posenc/types.hpp"

namespace posenc::detail {

/// A bias-row kernel (see the file comment).
using alibi_row_kernel = void (*)(float* row, index_t n, double neg_slope, double d0, bool symmetric);

/// The portable bias row, for float and double logits (`E`).
template <class E>
POSENC_STRICT_FP void alibi_row_portable(E* row, index_t n, double neg_slope, double d0, bool symmetric) {
  POSENC_STRICT_FP_BODY
  if (symmetric) {
    for (index_t j = 0; j < n; ++j) row[j] += static_cast<E>(neg_slope * std::abs(d0 - static_cast<double>(j)));
  } else {
    for (index_t j = 0; j < n; ++j) row[j] += static_cast<E>(neg_slope * (d0 - static_cast<double>(j)));
  }
}

#if POSENC_X86_DISPATCH || POSENC_NEON_KERNELS

#define POSENC_ALIBI_ROW_BODY(V)                                                     \
  using reg = typename V::reg;                                                       \
  constexpr index_t w = V::width;                                                    \
  const reg vs = V::set1(neg_slope), vd0 = V::set1(d0), step = V::set1(double(w));  \
  reg j = V::iota();                                                                 \
  index_t c = 0;                                                                     \
  for (; c + w <= n; c += w) {                                                       \
    reg diff = V::sub(vd0, j);                                                       \
    if (symmetric) diff = V::abs(diff);                                              \
    V::add_narrowed(row + c, V::mul(vs, diff));                                      \
    j = V::add(j, step);                                                             \
  }                                                                                  \
  if constexpr (V::masked) {                                                         \
    if (c < n) {                                                                     \
      reg diff = V::sub(vd0, j);                                                     \
      if (symmetric) diff = V::abs(diff);                                            \
      V::add_narrowed(row + c, V::mul(vs, diff), n - c);                             \
    }                                                                                \
  } else if (c < n) {                                                                \
    alibi_row_portable(row + c, n - c, neg_slope, d0 - static_cast<double>(c), symmetric); \
  }

#if POSENC_X86_DISPATCH
POSENC_SIMD_WARNINGS_OFF
template <class V>
POSENC_TARGET_AVX512 POSENC_STRICT_FP void alibi_row_avx512(float* row, index_t n, double neg_slope, double d0,
                                                                   bool symmetric) {
  POSENC_STRICT_FP_BODY
  POSENC_ALIBI_ROW_BODY(V)
}

template <class V>
POSENC_TARGET_AVX2 POSENC_STRICT_FP void alibi_row_avx2(float* row, index_t n, double neg_slope, double d0,
                                                               bool symmetric) {
  POSENC_STRICT_FP_BODY
  POSENC_ALIBI_ROW_BODY(V)
}
POSENC_SIMD_WARNINGS_ON
#endif  // POSENC_X86_DISPATCH

#if POSENC_NEON_KERNELS
template <class V>
POSENC_STRICT_FP void alibi_row_neon(float* row, index_t n, double neg_slope, double d0, bool symmetric) {
  POSENC_STRICT_FP_BODY
  POSENC_ALIBI_ROW_BODY(V)
}
#endif  // POSENC_NEON_KERNELS

#undef POSENC_ALIBI_ROW_BODY

#endif  // POSENC_X86_DISPATCH || POSENC_NEON_KERNELS

/// The bias-row kernel of the SIMD level in use now (chosen once per `add_bias_tile` call).
inline alibi_row_kernel select_alibi_row_kernel() {
#if POSENC_X86_DISPATCH
  switch (simd_level_in_use()) {
    case simd_level::avx512: return &alibi_row_avx512<avx512_f64>;
    case simd_level::avx2: return &alibi_row_avx2<avx2_f64>;
    default: break;
  }
#elif POSENC_NEON_KERNELS
  if (simd_level_in_use() == simd_level::neon) return &alibi_row_neon<neon_f64>;
#endif
  return &alibi_row_portable<float>;
}

}  // namespace posenc::detail
