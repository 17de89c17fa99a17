// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/rope_kernels.hpp
/// Internal: the inner loops of RoPE, one row (token) at a time, every head of the row.
///
/// A row kernel rotates `heads` heads of `head_dim` elements starting at `row`:
/// - half-split: pairs `(x[lo + k], x[hi + k])`, `k < n`, by `(c[k], s[k])`;
/// - interleaved: elements `x[lo + j]`, `j < n` (even, `n <= k_rope_max_chunk`), where
///   `(x[lo + 2i], x[lo + 2i + 1])` is a pair and `cs[2i] = cos`, `cs[2i + 1] = sin` (the second
///   table is unused).
/// Pair `(a, b)` becomes `(a cos - b sin, b cos + a sin)`, each product rounded, then the sum
/// (`a cos + b (-sin)` is the same number): all versions give the same bits (no FMA; see
/// detail/cpu.hpp).
///
/// The SIMD versions (AVX-512, AVX2, NEON) keep the cos/sin row in L1 across heads and stream the row once. (Peeling a
/// head so the stores are aligned was measured slower on Zen 4 than the split stores it avoids,
/// for 16-byte aligned rows of 128-dim heads.) The interleaved one
/// expands the packed row once per call into `[c c ...]` and `[-s s ...]`, so each head costs
/// one in-lane swap, two products and a sum per vector; its table stays as small as the
/// half-split one.

#include <concepts>

#include "posenc/detail/cpu.hpp"
#include "posenc/detail/simd_traits.hpp"
#include "posenc/types.hpp"

namespace posenc::detail {

/// The most elements an interleaved row kernel takes in one call (its expanded row lives on the
/// stack).
inline constexpr index_t k_rope_max_chunk = 256;

/// A row kernel for storage `S` computing in `T` (see the file comment).
template <class S, class T>
using rope_row_kernel = void (*)(S* row, index_t heads, index_t head_dim, index_t lo, index_t hi, index_t n, const T* a,
                                 const T* b);

/// One half-split float row of `rope_tile_rotator`, pairs `k0 <= k < half` (see
/// `POSENC_ROPE_TILE_ROW_BODY` below).
POSENC_STRICT_FP inline void rope_tile_row_portable(const float* from, float* to, const float* hc, const float* hs,
                                                    const float* lc, index_t half, index_t k0 = 0) {
  POSENC_STRICT_FP_BODY
  const float* ls = lc + half;
  for (index_t k = k0; k < half; ++k) {
    const float c = hc[k] * lc[k] - hs[k] * ls[k];
    const float s = hs[k] * lc[k] + hc[k] * ls[k];
    const float a = from[k], b = from[half + k];
    to[k] = a * c - b * s;
    to[half + k] = b * c + a * s;
  }
}

/// A half-split float row kernel of `rope_tile_rotator` (null: the rotator's own loop).
using rope_tile_row_kernel = void (*)(const float* from, float* to, const float* hc, const float* hs, const float* lc,
                                      index_t half);

template <class S, class T>
POSENC_STRICT_FP void rope_half_portable(S* row, index_t heads, index_t head_dim, index_t lo, index_t hi, index_t n,
                                         const T* c, const T* s) {
  POSENC_STRICT_FP_BODY
  for (index_t h = 0; h < heads; ++h) {
    S* xl = row + h * head_dim + lo;
    S* xh = row + h * head_dim + hi;
    for (index_t k = 0; k < n; ++k) {
      const T a = static_cast<T>(xl[k]);
      const T b = static_cast<T>(xh[k]);
      xl[k] = static_cast<S>(a * c[k] - b * s[k]);
      xh[k] = static_cast<S>(b * c[k] + a * s[k]);
    }
  }
}

template <class S, class T>
POSENC_STRICT_FP void rope_interleaved_portable(S* row, index_t heads, index_t head_dim, index_t lo, index_t /*hi*/,
                                                index_t n, const T* cs, const T* /*unused*/) {
  POSENC_STRICT_FP_BODY
  for (index_t h = 0; h < heads; ++h) {
    S* x = row + h * head_dim + lo;
    for (index_t j = 0; j < n; j += 2) {
      const T a = static_cast<T>(x[j]);
      const T b = static_cast<T>(x[j + 1]);
      x[j] = static_cast<S>(a * cs[j] + b * -cs[j + 1]);
      x[j + 1] = static_cast<S>(b * cs[j] + a * cs[j + 1]);
    }
  }
}


#if POSENC_X86_DISPATCH || POSENC_NEON_KERNELS

// The kernels, once per instruction set (a target attribute cannot depend on a template
// argument). The bodies are the same; the AVX-512 tails are masked, the AVX2 and NEON ones scalar.

#define POSENC_ROPE_HALF_STEP(V, k, m)                          \
  {                                                             \
    const reg a = V::load(xl + (k)m), b = V::load(xh + (k)m);   \
    const reg cc = V::load(c + (k)m), ss = V::load(s + (k)m);   \
    V::store(xl + (k), V::sub(V::mul(a, cc), V::mul(b, ss)) m); \
    V::store(xh + (k), V::add(V::mul(b, cc), V::mul(a, ss)) m); \
  }

// Scalar tails are macros, not lambdas: g++'s optimize attribute (no FMA
// contraction) does not reach into lambdas.
#define POSENC_ROPE_HALF_SCALAR(k) \
  {                                \
    const T a = xl[k], b = xh[k];  \
    xl[k] = a * c[k] - b * s[k];   \
    xh[k] = b * c[k] + a * s[k];   \
  }

#define POSENC_ROPE_INTERLEAVED_SCALAR(j)           \
  {                                                 \
    const T a = x[j], b = x[(j) + 1];               \
    x[j] = a * cc[j] + b * ss[j];                   \
    x[(j) + 1] = b * cc[(j) + 1] + a * ss[(j) + 1]; \
  }

#define POSENC_ROPE_HALF_BODY(V)                                 \
  using T = typename V::scalar;                                  \
  using reg = typename V::reg;                                   \
  constexpr index_t w = V::width;                                \
  for (index_t h = 0; h < heads; ++h) {                          \
    T* xl = row + h * head_dim + lo;                             \
    T* xh = row + h * head_dim + hi;                             \
    index_t k = 0;                                               \
    for (; k + w <= n; k += w) POSENC_ROPE_HALF_STEP(V, k, )     \
    if constexpr (V::masked) {                                   \
      if (k < n) POSENC_ROPE_HALF_STEP(V, k, POSENC_COMMA n - k) \
    } else {                                                     \
      for (; k < n; ++k) POSENC_ROPE_HALF_SCALAR(k)              \
    }                                                            \
  }

#define POSENC_ROPE_INTERLEAVED_STEP(V, j, m)             \
  {                                                       \
    const reg v = V::load(x + (j)m);                      \
    const reg p = V::mul(v, V::load(cc + (j)m));          \
    const reg q = V::mul(V::swap(v), V::load(ss + (j)m)); \
    V::store(x + (j), V::add(p, q) m);                    \
  }

#define POSENC_ROPE_INTERLEAVED_BODY(V)                                         \
  using T = typename V::scalar;                                                 \
  using reg = typename V::reg;                                                  \
  constexpr index_t w = V::width;                                               \
  /* The row expanded once: cc = [c0 c0 c1 c1 ..], ss = [-s0 s0 -s1 s1 ..]. */  \
  POSENC_ASSERT(n <= k_rope_max_chunk && n % 2 == 0, "rope kernel: chunk of ", n, " values (internal; please report it)"); \
  alignas(64) T cc[k_rope_max_chunk];                                           \
  alignas(64) T ss[k_rope_max_chunk];                                           \
  {                                                                             \
    index_t j = 0;                                                              \
    for (; j + w <= n; j += w) {                                                \
      const reg t = V::load(cs + j);                                            \
      V::store(cc + j, V::dup_even(t));                                         \
      V::store(ss + j, V::neg_even(V::dup_odd(t)));                             \
    }                                                                           \
    for (; j < n; j += 2) {                                                     \
      cc[j] = cc[j + 1] = cs[j];                                                \
      ss[j] = -cs[j + 1];                                                       \
      ss[j + 1] = cs[j + 1];                                                    \
    }                                                                           \
  }                                                                             \
  for (index_t h = 0; h < heads; ++h) {                                         \
    T* x = row + h * head_dim + lo;                                             \
    index_t j = 0;                                                              \
    for (; j + w <= n; j += w) POSENC_ROPE_INTERLEAVED_STEP(V, j, )             \
    if constexpr (V::masked) {                                                  \
      if (j < n) POSENC_ROPE_INTERLEAVED_STEP(V, j, POSENC_COMMA n - j)         \
    } else {                                                                    \
      for (; j < n; j += 2) POSENC_ROPE_INTERLEAVED_SCALAR(j)                   \
    }                                                                           \
  }

#define POSENC_COMMA ,

#if POSENC_X86_DISPATCH
template <class V>
POSENC_TARGET_AVX512 POSENC_STRICT_FP void rope_half_avx512(typename V::scalar* row, index_t heads, index_t head_dim,
                                                            index_t lo, index_t hi, index_t n,
                                                            const typename V::scalar* c, const typename V::scalar* s) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_HALF_BODY(V)
}

template <class V>
POSENC_TARGET_AVX512 POSENC_STRICT_FP void rope_interleaved_avx512(typename V::scalar* row, index_t heads,
                                                                   index_t head_dim, index_t lo, index_t /*hi*/,
                                                                   index_t n, const typename V::scalar* cs,
                                                                   const typename V::scalar* /*unused*/) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_INTERLEAVED_BODY(V)
}

template <class V>
POSENC_TARGET_AVX2 POSENC_STRICT_FP void rope_half_avx2(typename V::scalar* row, index_t heads, index_t head_dim,
                                                        index_t lo, index_t hi, index_t n, const typename V::scalar* c,
                                                        const typename V::scalar* s) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_HALF_BODY(V)
}

template <class V>
POSENC_TARGET_AVX2 POSENC_STRICT_FP void rope_interleaved_avx2(typename V::scalar* row, index_t heads, index_t head_dim,
                                                               index_t lo, index_t /*hi*/, index_t n,
                                                               const typename V::scalar* cs,
                                                               const typename V::scalar* /*unused*/) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_INTERLEAVED_BODY(V)
}
#endif  // POSENC_X86_DISPATCH

#if POSENC_NEON_KERNELS
template <class V>
POSENC_STRICT_FP void rope_half_neon(typename V::scalar* row, index_t heads, index_t head_dim, index_t lo, index_t hi,
                                     index_t n, const typename V::scalar* c, const typename V::scalar* s) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_HALF_BODY(V)
}

template <class V>
POSENC_STRICT_FP void rope_interleaved_neon(typename V::scalar* row, index_t heads, index_t head_dim, index_t lo,
                                            index_t /*hi*/, index_t n, const typename V::scalar* cs,
                                            const typename V::scalar* /*unused*/) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_INTERLEAVED_BODY(V)
}
#endif  // POSENC_NEON_KERNELS

// One half-split row of `rope_tile_rotator` (encoders/rope.hpp), `half` pairs of floats:
//   c = hc lc - hs ls,  s = hs lc + hc ls  (the angle addition; ls = lc + half),
//   (a, b) = (from[k], from[half + k])  ->  (a c - b s, b c + a s)  into `to` (may be `from`),
// each product rounded, then the sum: the bits of the rotator's scalar loop.
#define POSENC_ROPE_TILE_STEP(V, k, m)                                               \
  {                                                                                 \
    const reg vhc = V::load(hc + (k)m), vhs = V::load(hs + (k)m);                   \
    const reg vlc = V::load(lc + (k)m), vls = V::load(ls + (k)m);                   \
    const reg c = V::sub(V::mul(vhc, vlc), V::mul(vhs, vls));                       \
    const reg s = V::add(V::mul(vhs, vlc), V::mul(vhc, vls));                       \
    const reg a = V::load(from + (k)m), b = V::load(from + half + (k)m);            \
    V::store(to + (k), V::sub(V::mul(a, c), V::mul(b, s)) m);                       \
    V::store(to + half + (k), V::add(V::mul(b, c), V::mul(a, s)) m);                \
  }

#define POSENC_ROPE_TILE_ROW_BODY(V)                                                 \
  using reg = typename V::reg;                                                      \
  constexpr index_t w = V::width;                                                   \
  const float* ls = lc + half;                                                      \
  index_t k = 0;                                                                    \
  for (; k + w <= half; k += w) POSENC_ROPE_TILE_STEP(V, k, )                       \
  if constexpr (V::masked) {                                                        \
    if (k < half) POSENC_ROPE_TILE_STEP(V, k, POSENC_COMMA half - k)                \
  } else if (k < half) {                                                            \
    rope_tile_row_portable(from, to, hc, hs, lc, half, k);                          \
  }

#if POSENC_X86_DISPATCH
template <class V>
POSENC_TARGET_AVX512 POSENC_STRICT_FP void rope_tile_row_avx512(const float* from, float* to, const float* hc,
                                                                       const float* hs, const float* lc,
                                                                       index_t half) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_TILE_ROW_BODY(V)
}

template <class V>
POSENC_TARGET_AVX2 POSENC_STRICT_FP void rope_tile_row_avx2(const float* from, float* to, const float* hc,
                                                                   const float* hs, const float* lc, index_t half) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_TILE_ROW_BODY(V)
}
#endif  // POSENC_X86_DISPATCH

#if POSENC_NEON_KERNELS
template <class V>
POSENC_STRICT_FP void rope_tile_row_neon(const float* from, float* to, const float* hc, const float* hs,
                                                const float* lc, index_t half) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_TILE_ROW_BODY(V)
}
#endif  // POSENC_NEON_KERNELS

#undef POSENC_ROPE_TILE_STEP
#undef POSENC_ROPE_TILE_ROW_BODY
#undef POSENC_COMMA
#undef POSENC_ROPE_HALF_SCALAR
#undef POSENC_ROPE_INTERLEAVED_SCALAR
#undef POSENC_ROPE_HALF_STEP
#undef POSENC_ROPE_HALF_BODY
#undef POSENC_ROPE_INTERLEAVED_STEP
#undef POSENC_ROPE_INTERLEAVED_BODY

#endif  // POSENC_X86_DISPATCH || POSENC_NEON_KERNELS

/// The half-split float row kernel of `rope_tile_rotator` at the SIMD level in use now, or null
/// where there is none (the rotator's scalar loop; chosen once per call).
inline rope_tile_row_kernel select_rope_tile_row_kernel() {
#if POSENC_X86_DISPATCH
  switch (simd_level_in_use()) {
    case simd_level::avx512: return &rope_tile_row_avx512<avx512_f32>;
    case simd_level::avx2: return &rope_tile_row_avx2<avx2_f32>;
    default: break;
  }
#elif POSENC_NEON_KERNELS
  if (simd_level_in_use() == simd_level::neon) return &rope_tile_row_neon<neon_f32>;
#endif
  return nullptr;
}

/// The row kernel for storage `S`, arithmetic `T` and the pair layout (`interleaved` or not),
/// at the SIMD level in use now. bf16/fp16 storage takes the portable path.
template <class S, class T>
rope_row_kernel<S, T> select_rope_kernel(bool interleaved) {
#if POSENC_X86_DISPATCH
  if constexpr (std::same_as<S, T>) {
    using f512 = std::conditional_t<std::same_as<T, float>, avx512_f32, avx512_f64>;
    using f256 = std::conditional_t<std::same_as<T, float>, avx2_f32, avx2_f64>;
    switch (simd_level_in_use()) {
      case simd_level::avx512:
        return interleaved ? &rope_interleaved_avx512<f512> : &rope_half_avx512<f512>;
      case simd_level::avx2:
        return interleaved ? &rope_interleaved_avx2<f256> : &rope_half_avx2<f256>;
      default:
        break;
    }
  }
#elif POSENC_NEON_KERNELS
  if constexpr (std::same_as<S, T>) {
    using f128 = std::conditional_t<std::same_as<T, float>, neon_f32, neon_f64>;
    if (simd_level_in_use() == simd_level::neon) return interleaved ? &rope_interleaved_neon<f128> : &rope_half_neon<f128>;
  }
#endif
  return interleaved ? &rope_interleaved_portable<S, T> : &rope_half_portable<S, T>;
}

}  // namespace posenc::detail
