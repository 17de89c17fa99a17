// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/simd_traits.hpp
/// Internal: the vector operations the encoders' inner loops are written with (RoPE's row
/// kernels in detail/rope_kernels.hpp, ALiBi's bias rows in detail/alibi_kernels.hpp), one
/// traits struct per (instruction set, scalar). Each kernel body is a macro expanded once per
/// instruction set, in a function with that set's target attribute: a target attribute cannot
/// depend on a template argument, and GCC does not inline an intrinsic into a function compiled
/// without its target. Every operation is strict (`POSENC_STRICT_FP`: no fused multiply-add), so
/// each version gives the bits of the portable loop.

#include "posenc/detail/cpu.hpp"
#include "posenc/types.hpp"

namespace posenc::detail {

/// Requests the `d` columns of row `j` of `pf` (row stride `ld`) when `j < npf` (a hint: it never
/// faults and changes no result). The few-row attention kernels call it as they read row j of
/// their own keys or values, so that later rows (of the same head, wherever the caller's block
/// table puts them) arrive while this one is computed on; RoPE's tile rotator, for the row it
/// rotates a few rows later. Always inlined: a call from a kernel's loop would spill every vector
/// register it holds.
template <class T>
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void prefetch_row([[maybe_unused]] const T* pf, [[maybe_unused]] index_t ld, [[maybe_unused]] index_t j,
                         [[maybe_unused]] index_t npf, [[maybe_unused]] index_t d) {
#if defined(__GNUC__)
  if (pf == nullptr || j >= npf) return;
  const T* row = pf + j * ld;
  for (index_t c = 0; c < d; c += 64 / static_cast<index_t>(sizeof(T))) __builtin_prefetch(row + c, 0, 3);
#endif
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
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg set1(double x) { return _mm512_set1_pd(x); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg iota() { return _mm512_set_pd(7, 6, 5, 4, 3, 2, 1, 0); }
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static reg abs(reg a) { return _mm512_abs_pd(a); }
  /// `p[i] += float(v[i])` for the first `n` lanes (all by default), rounded to nearest as a cast.
  POSENC_TARGET_AVX512 POSENC_STRICT_FP static void add_narrowed(float* p, reg v, index_t n = 8) {
    const __mmask8 m = static_cast<__mmask8>((1u << n) - 1);
    _mm256_mask_storeu_ps(p, m, _mm256_add_ps(_mm256_maskz_loadu_ps(m, p), _mm512_cvtpd_ps(v)));
  }
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
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg set1(double x) { return _mm256_set1_pd(x); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg iota() { return _mm256_set_pd(3, 2, 1, 0); }
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static reg abs(reg a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
  /// `p[i] += float(v[i])` for the 4 lanes, rounded to nearest as a cast.
  POSENC_TARGET_AVX2 POSENC_STRICT_FP static void add_narrowed(float* p, reg v) {
    _mm_storeu_ps(p, _mm_add_ps(_mm_loadu_ps(p), _mm256_cvtpd_ps(v)));
  }
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
  POSENC_STRICT_FP static reg set1(double x) { return vdupq_n_f64(x); }
  POSENC_STRICT_FP static reg iota() { return vcombine_f64(vdup_n_f64(0.0), vdup_n_f64(1.0)); }
  POSENC_STRICT_FP static reg abs(reg a) { return vabsq_f64(a); }
  /// `p[i] += float(v[i])` for the 2 lanes, rounded to nearest as a cast (`fcvtn`).
  POSENC_STRICT_FP static void add_narrowed(float* p, reg v) { vst1_f32(p, vadd_f32(vld1_f32(p), vcvt_f32_f64(v))); }
  POSENC_STRICT_FP static reg swap(reg a) { return vextq_f64(a, a, 1); }
  POSENC_STRICT_FP static reg dup_even(reg a) { return vtrn1q_f64(a, a); }
  POSENC_STRICT_FP static reg dup_odd(reg a) { return vtrn2q_f64(a, a); }
  POSENC_STRICT_FP static reg neg_even(reg a) {
    return vreinterpretq_f64_u64(veorq_u64(vreinterpretq_u64_f64(a), vcombine_u64(vdup_n_u64(1ull << 63), vdup_n_u64(0))));
  }
};

#endif  // POSENC_NEON_KERNELS

}  // namespace posenc::detail
