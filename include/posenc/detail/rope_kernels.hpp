// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/rope_kernels.hpp
/// Internal: the inner loops of RoPE, one row (token) at a time, every head of the row.
///
/// A row kernel rotates `heads` heads of `head_dim` elements starting at `row`:
/// - half-split: pairs `(x[lo + k], x[hi + k])`, `k < n`, by `(c[k], s[k])`;
/// - interleaved: elements `x[lo + j]`, `j < n` (even), where `(x[lo + 2i], x[lo + 2i + 1])` is a
///   pair and `cs[2i] = cos`, `cs[2i + 1] = sin` (the second table is unused).
/// Pair `(a, b)` becomes `(a cos - b sin, b cos + a sin)`, each product rounded, then the sum:
/// all versions give the same bits (no FMA; see detail/cpu.hpp).
///
/// The x86 versions keep the cos/sin row in L1 across heads and stream the row once; the
/// interleaved one duplicates cos and sin within registers (`moveldup`/`movehdup`) and swaps the
/// pair's partners with an in-lane permute, so its table is no larger than the half-split one.

#include <concepts>

#include "posenc/detail/cpu.hpp"
#include "posenc/types.hpp"

namespace posenc::detail {

/// A row kernel for storage `S` computing in `T` (see the file comment).
template <class S, class T>
using rope_row_kernel = void (*)(S* row, index_t heads, index_t head_dim, index_t lo, index_t hi, index_t n,
                                 const T* a, const T* b);

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
      x[j] = static_cast<S>(a * cs[j] - b * cs[j + 1]);
      x[j + 1] = static_cast<S>(b * cs[j] + a * cs[j + 1]);
    }
  }
}

#if POSENC_X86_DISPATCH

// One traits struct per (instruction set, scalar): the few operations the kernels need.
// (The AVX-512 shuffles use the zero-masked intrinsics with a full mask: the same instructions,
// without g++ 12's false -Wmaybe-uninitialized on `_mm512_undefined_ps`.)
// `swap` exchanges the two elements of every pair; `dup_even` / `dup_odd` broadcast the first /
// second element of every pair; `addsub(p, q)` is `p - q` in even lanes and `p + q` in odd ones.

struct avx512_f32 {
  using scalar = float;
  using reg = __m512;
  static constexpr index_t width = 16;
  static constexpr bool masked = true;
  static constexpr __mmask16 all = 0xFFFF;
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg load(const float* p) { return _mm512_loadu_ps(p); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg load(const float* p, index_t n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static void store(float* p, reg v, index_t n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
  }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg swap(reg a) { return _mm512_maskz_permute_ps(all, a, 0xB1); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg dup_even(reg a) { return _mm512_maskz_moveldup_ps(all, a); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg dup_odd(reg a) { return _mm512_maskz_movehdup_ps(all, a); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg addsub(reg p, reg q) {
    return _mm512_mask_sub_ps(_mm512_add_ps(p, q), static_cast<__mmask16>(0x5555), p, q);
  }
};

struct avx512_f64 {
  using scalar = double;
  using reg = __m512d;
  static constexpr index_t width = 8;
  static constexpr bool masked = true;
  static constexpr __mmask8 all = 0xFF;
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg load(const double* p) { return _mm512_loadu_pd(p); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg load(const double* p, index_t n) {
    return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
  }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static void store(double* p, reg v, index_t n) {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), v);
  }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg swap(reg a) { return _mm512_maskz_permute_pd(all, a, 0x55); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg dup_even(reg a) { return _mm512_maskz_movedup_pd(all, a); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg dup_odd(reg a) { return _mm512_maskz_permute_pd(all, a, 0xFF); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg addsub(reg p, reg q) {
    return _mm512_mask_sub_pd(_mm512_add_pd(p, q), static_cast<__mmask8>(0x55), p, q);
  }
};

struct avx2_f32 {
  using scalar = float;
  using reg = __m256;
  static constexpr index_t width = 8;
  static constexpr bool masked = false;
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg load(const float* p) { return _mm256_loadu_ps(p); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg swap(reg a) { return _mm256_permute_ps(a, 0xB1); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg dup_even(reg a) { return _mm256_moveldup_ps(a); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg dup_odd(reg a) { return _mm256_movehdup_ps(a); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg addsub(reg p, reg q) { return _mm256_addsub_ps(p, q); }
};

struct avx2_f64 {
  using scalar = double;
  using reg = __m256d;
  static constexpr index_t width = 4;
  static constexpr bool masked = false;
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg load(const double* p) { return _mm256_loadu_pd(p); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg swap(reg a) { return _mm256_permute_pd(a, 0x5); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg dup_even(reg a) { return _mm256_movedup_pd(a); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg dup_odd(reg a) { return _mm256_permute_pd(a, 0xF); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg addsub(reg p, reg q) { return _mm256_addsub_pd(p, q); }
};

// The kernels, once per instruction set (a target attribute cannot depend on a template
// argument). The bodies are the same; the AVX2 tails fall back to scalar code.

#define POSENC_ROPE_HALF_BODY(V)                                                          \
  using T = typename V::scalar;                                                           \
  using reg = typename V::reg;                                                            \
  constexpr index_t w = V::width;                                                         \
  const index_t full = n - n % w;                                                         \
  for (index_t h = 0; h < heads; ++h) {                                                   \
    T* xl = row + h * head_dim + lo;                                                      \
    T* xh = row + h * head_dim + hi;                                                      \
    for (index_t k = 0; k < full; k += w) {                                               \
      const reg a = V::load(xl + k), b = V::load(xh + k);                                 \
      const reg cc = V::load(c + k), ss = V::load(s + k);                                 \
      V::store(xl + k, V::sub(V::mul(a, cc), V::mul(b, ss)));                             \
      V::store(xh + k, V::add(V::mul(b, cc), V::mul(a, ss)));                             \
    }                                                                                     \
    if constexpr (V::masked) {                                                            \
      if (full < n) {                                                                     \
        const index_t m = n - full;                                                       \
        const reg a = V::load(xl + full, m), b = V::load(xh + full, m);                   \
        const reg cc = V::load(c + full, m), ss = V::load(s + full, m);                   \
        V::store(xl + full, V::sub(V::mul(a, cc), V::mul(b, ss)), m);                     \
        V::store(xh + full, V::add(V::mul(b, cc), V::mul(a, ss)), m);                     \
      }                                                                                   \
    } else {                                                                              \
      for (index_t k = full; k < n; ++k) {                                                \
        const T a = xl[k], b = xh[k];                                                     \
        xl[k] = a * c[k] - b * s[k];                                                      \
        xh[k] = b * c[k] + a * s[k];                                                      \
      }                                                                                   \
    }                                                                                     \
  }

#define POSENC_ROPE_INTERLEAVED_BODY(V)                                                   \
  using T = typename V::scalar;                                                           \
  using reg = typename V::reg;                                                            \
  constexpr index_t w = V::width;                                                         \
  const index_t full = n - n % w;                                                         \
  for (index_t h = 0; h < heads; ++h) {                                                   \
    T* x = row + h * head_dim + lo;                                                       \
    for (index_t j = 0; j < full; j += w) {                                               \
      const reg v = V::load(x + j), t = V::load(cs + j);                                  \
      V::store(x + j, V::addsub(V::mul(v, V::dup_even(t)), V::mul(V::swap(v), V::dup_odd(t)))); \
    }                                                                                     \
    if constexpr (V::masked) {                                                            \
      if (full < n) {                                                                     \
        const index_t m = n - full;                                                       \
        const reg v = V::load(x + full, m), t = V::load(cs + full, m);                    \
        V::store(x + full, V::addsub(V::mul(v, V::dup_even(t)), V::mul(V::swap(v), V::dup_odd(t))), m); \
      }                                                                                   \
    } else {                                                                              \
      for (index_t j = full; j < n; j += 2) {                                             \
        const T a = x[j], b = x[j + 1];                                                   \
        x[j] = a * cs[j] - b * cs[j + 1];                                                 \
        x[j + 1] = b * cs[j] + a * cs[j + 1];                                             \
      }                                                                                   \
    }                                                                                     \
  }

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
POSENC_TARGET_AVX2 POSENC_STRICT_FP void rope_interleaved_avx2(typename V::scalar* row, index_t heads,
                                                               index_t head_dim, index_t lo, index_t /*hi*/, index_t n,
                                                               const typename V::scalar* cs,
                                                               const typename V::scalar* /*unused*/) {
  POSENC_STRICT_FP_BODY
  POSENC_ROPE_INTERLEAVED_BODY(V)
}

#undef POSENC_ROPE_HALF_BODY
#undef POSENC_ROPE_INTERLEAVED_BODY

#endif  // POSENC_X86_DISPATCH

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
      case simd_level::portable:
        break;
    }
  }
#endif
  return interleaved ? &rope_interleaved_portable<S, T> : &rope_half_portable<S, T>;
}

}  // namespace posenc::detail
