// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/bias_table.hpp
/// Internal: a relative-position bias added to a float logits tile through one table of biases
/// shared by many rows, for encoders whose bias depends only on `k - q` (ALiBi, T5).
///
/// Where the keys of a tile are a range k0 .. k0 + n - 1, the bias of row i, column j depends only
/// on `k0 + j - q[i]`. Consecutive rows whose positions lie within `bias_table_floats - n` of each
/// other (lo .. hi) meet the relative positions `k0 - hi` up to `k0 + n - 1 - lo`. The encoder
/// writes their biases once, `table[v] = float(bias(query hi, key k0 + v))`, and row i adds
/// `table[hi - q[i] + j]`: one float addition per logit, with the bits of adding each logit's own
/// rounded bias. Keys go in chunks of `bias_table_keys`; the table is a 4 KiB stack array, so
/// nothing is allocated. Groups of fewer than `bias_table_min_rows` rows, and groups the encoder
/// declines (distances its arithmetic cannot take), go row by row through the encoder's own path.
///
/// The add-row kernel, `row[j] += src[j]` on floats, is one body over the float traits of
/// detail/simd_traits.hpp (AVX-512 with a masked tail, AVX2, NEON, portable): an addition per
/// element, the bits of the scalar loop.

#include <algorithm>
#include <cstdint>

#include "posenc/detail/cpu.hpp"
#include "posenc/detail/position_math.hpp"
#include "posenc/detail/simd_traits.hpp"
#include "posenc/types.hpp"

namespace posenc::detail {

/// An add-row kernel: `row[j] += src[j]` for `j < n` (see the file comment).
using add_row_kernel = void (*)(float* row, const float* src, index_t n);

/// The portable add-row kernel.
POSENC_STRICT_FP inline void add_row_portable(float* row, const float* src, index_t n) {
  POSENC_STRICT_FP_BODY
  for (index_t j = 0; j < n; ++j) row[j] += src[j];
}

#if POSENC_X86_DISPATCH || POSENC_NEON_KERNELS

#define POSENC_ADD_ROW_BODY(V)                                                              \
  constexpr index_t w = V::width;                                                           \
  index_t c = 0;                                                                            \
  for (; c + w <= n; c += w) V::store(row + c, V::add(V::load(row + c), V::load(src + c)));  \
  if constexpr (V::masked) {                                                                \
    if (c < n) V::store(row + c, V::add(V::load(row + c, n - c), V::load(src + c, n - c)), n - c); \
  } else {                                                                                  \
    for (; c < n; ++c) row[c] += src[c];                                                    \
  }

#if POSENC_X86_DISPATCH
POSENC_SIMD_WARNINGS_OFF
template <class V>
POSENC_TARGET_AVX512 POSENC_STRICT_FP void add_row_avx512(float* row, const float* src, index_t n) {
  POSENC_STRICT_FP_BODY
  POSENC_ADD_ROW_BODY(V)
}

template <class V>
POSENC_TARGET_AVX2 POSENC_STRICT_FP void add_row_avx2(float* row, const float* src, index_t n) {
  POSENC_STRICT_FP_BODY
  POSENC_ADD_ROW_BODY(V)
}
POSENC_SIMD_WARNINGS_ON
#endif  // POSENC_X86_DISPATCH

#if POSENC_NEON_KERNELS
template <class V>
POSENC_STRICT_FP void add_row_neon(float* row, const float* src, index_t n) {
  POSENC_STRICT_FP_BODY
  POSENC_ADD_ROW_BODY(V)
}
#endif  // POSENC_NEON_KERNELS

#undef POSENC_ADD_ROW_BODY

#endif  // POSENC_X86_DISPATCH || POSENC_NEON_KERNELS

/// The add-row kernel of the SIMD level in use now (chosen once per `add_bias_tile` call).
inline add_row_kernel select_add_row_kernel() {
#if POSENC_X86_DISPATCH
  switch (simd_level_in_use()) {
    case simd_level::avx512: return &add_row_avx512<avx512_f32>;
    case simd_level::avx2: return &add_row_avx2<avx2_f32>;
    default: break;
  }
#elif POSENC_NEON_KERNELS
  if (simd_level_in_use() == simd_level::neon) return &add_row_neon<neon_f32>;
#endif
  return &add_row_portable;
}

/// The table holds up to `bias_table_floats` biases; a chunk of `bias_table_keys` keys leaves room
/// for rows whose positions spread over `bias_table_floats - bias_table_keys`.
inline constexpr index_t bias_table_floats = 1024;
inline constexpr index_t bias_table_keys = 512;
/// Fewer rows than this share no table: each takes the encoder's row path.
inline constexpr index_t bias_table_min_rows = 4;

/// Adds a relative bias to the float tile view `t` (rows with positions `q`, keys the range
/// `k0 .. k0 + t.cols - 1`) through shared tables (see the file comment). The encoder supplies:
///   shareable(lo, hi, kf, kl)  whether one table may serve rows at positions in [lo, hi] and the
///                              keys kf .. kl (its arithmetic is exact for those distances)
///   fill(table, span, hi, kf)  writes table[v] = float(bias(query hi, key kf + v)) for v < span
///                              (kf + v may pass kl; the bias is still that of the distance)
///   by_row(i, j0, nc, kf)      adds the bias to columns [j0, j0 + nc) of row i, keys kf .. kf + nc - 1,
///                              its own way
/// `add_row` is the kernel of the level in use, chosen once by the caller.
template <class View, class Shareable, class Fill, class ByRow>
void add_bias_by_table(View& t, positions q, position k0, add_row_kernel add_row, Shareable&& shareable,
                       Fill&& fill, ByRow&& by_row) {
  alignas(64) float table[bias_table_floats];
  for (index_t j0 = 0; j0 < t.cols; j0 += bias_table_keys) {
    const index_t n = std::min(bias_table_keys, t.cols - j0);
    const position kf = k0 + static_cast<position>(j0);
    const position kl = kf + static_cast<position>(n - 1);
    const auto spread = static_cast<std::uint64_t>(bias_table_floats - n);
    for (index_t i = 0; i < t.rows;) {
      position lo = q[i], hi = q[i];
      index_t e = i + 1;
      for (; e < t.rows; ++e) {
        const position p = q[e];
        const position nlo = p < lo ? p : lo, nhi = p > hi ? p : hi;
        if (position_distance(nhi, nlo) > spread) break;
        lo = nlo;
        hi = nhi;
      }
      if (e - i < bias_table_min_rows || !shareable(lo, hi, kf, kl)) {
        for (; i < e; ++i) by_row(i, j0, n, kf);
        continue;
      }
      const index_t span = static_cast<index_t>(hi - lo) + n;
      fill(table, span, hi, kf);
      for (; i < e; ++i) add_row(t.row(i) + j0, table + (hi - q[i]), n);
    }
  }
}

}  // namespace posenc::detail
