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
#include "posenc/types.hpp"

namespace posenc::detail {

/// The most elements an interleaved row kernel takes in one call (its expanded row lives on the
/// stack).
inline constexpr index_t k_rope_max_chunk = 256;

/// A row kernel for storage `S` computing in `T` (see the file comment).
template <class S, class T>
using rope_row_kernel = void (*)(S* row, index_t heads, index_t head_dim, index_t lo, index_t hi, index_t n, const T* a,
                                 const T* b);

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

#if POSENC_X86_DISPATCH

// One traits struct per (instruction set, scalar): the few operations the kernels need.
// (The AVX-512 shuffles use the zero-masked intrinsics with a full mask: the same instructions,
// without g++ 12's false -Wmaybe-uninitialized on `_mm512_undefined_ps`.)
// `swap` exchanges the two elements of every pair; `dup_even` / `dup_odd` broadcast the first /
// second element of every pair; `neg_even` flips the sign of the even lanes (exact).

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
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg neg_even(reg a) {
    return _mm512_xor_ps(a, _mm512_castsi512_ps(_mm512_set1_epi64(0x80000000ll)));
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
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg neg_even(reg a) {
    return _mm512_xor_pd(a,
                         _mm512_castsi512_pd(_mm512_set_epi64(0, 1ll << 63, 0, 1ll << 63, 0, 1ll << 63, 0, 1ll << 63)));
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
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg neg_even(reg a) {
    return _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi64x(0x80000000ll)));
  }
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
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg neg_even(reg a) {
    return _mm256_xor_pd(a, _mm256_castsi256_pd(_mm256_set_epi64x(0, 1ll << 63, 0, 1ll << 63)));
  }
};

#endif  // POSENC_X86_DISPATCH

#if POSENC_NEON_KERNELS

// aarch64 Advanced SIMD: 128-bit registers, 4 floats or 2 doubles. No masked loads, so the tails
// are scalar, as for AVX2. `vrev64q_f32` swaps the two floats of every 64-bit pair; `vtrn1q` /
// `vtrn2q` of a register with itself broadcast the first / second element of every pair. GCC's
// `vmulq` / `vaddq` are plain vector arithmetic that it would fuse into `fmla` under its default
// contraction, hence `POSENC_STRICT_FP` here too (docs/isa.md lists the instructions the loops
// compile to).

struct neon_f32 {
  using scalar = float;
  using reg = float32x4_t;
  static constexpr index_t width = 4;
  static constexpr bool masked = false;
  POSENC_STRICT_FP static reg load(const float* p) { return vld1q_f32(p); }
  POSENC_STRICT_FP static void store(float* p, reg v) { vst1q_f32(p, v); }
  POSENC_STRICT_FP static reg mul(reg a, reg b) { return vmulq_f32(a, b); }
  POSENC_STRICT_FP static reg add(reg a, reg b) { return vaddq_f32(a, b); }
  POSENC_STRICT_FP static reg sub(reg a, reg b) { return vsubq_f32(a, b); }
  POSENC_STRICT_FP static reg swap(reg a) { return vrev64q_f32(a); }
  POSENC_STRICT_FP static reg dup_even(reg a) { return vtrn1q_f32(a, a); }
  POSENC_STRICT_FP static reg dup_odd(reg a) { return vtrn2q_f32(a, a); }
  POSENC_STRICT_FP static reg neg_even(reg a) {
    return vreinterpretq_f32_u64(veorq_u64(vreinterpretq_u64_f32(a), vdupq_n_u64(0x80000000ull)));
  }
};

struct neon_f64 {
  using scalar = double;
  using reg = float64x2_t;
  static constexpr index_t width = 2;
  static constexpr bool masked = false;
  POSENC_STRICT_FP static reg load(const double* p) { return vld1q_f64(p); }
  POSENC_STRICT_FP static void store(double* p, reg v) { vst1q_f64(p, v); }
  POSENC_STRICT_FP static reg mul(reg a, reg b) { return vmulq_f64(a, b); }
  POSENC_STRICT_FP static reg add(reg a, reg b) { return vaddq_f64(a, b); }
  POSENC_STRICT_FP static reg sub(reg a, reg b) { return vsubq_f64(a, b); }
  POSENC_STRICT_FP static reg swap(reg a) { return vextq_f64(a, a, 1); }
  POSENC_STRICT_FP static reg dup_even(reg a) { return vtrn1q_f64(a, a); }
  POSENC_STRICT_FP static reg dup_odd(reg a) { return vtrn2q_f64(a, a); }
  POSENC_STRICT_FP static reg neg_even(reg a) {
    return vreinterpretq_f64_u64(veorq_u64(vreinterpretq_u64_f64(a), vcombine_u64(vdup_n_u64(1ull << 63), vdup_n_u64(0))));
  }
};

#endif  // POSENC_NEON_KERNELS

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

#undef POSENC_COMMA
#undef POSENC_ROPE_HALF_SCALAR
#undef POSENC_ROPE_INTERLEAVED_SCALAR
#undef POSENC_ROPE_HALF_STEP
#undef POSENC_ROPE_HALF_BODY
#undef POSENC_ROPE_INTERLEAVED_STEP
#undef POSENC_ROPE_INTERLEAVED_BODY

#endif  // POSENC_X86_DISPATCH || POSENC_NEON_KERNELS

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
