// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/attention_kernels.hpp
/// Internal: the tile operations of blockwise attention, in a portable version and, on x86-64,
/// AVX-512 and AVX2 versions chosen at run time.
///
/// A header-only library is compiled with its includer's flags, often the x86-64 baseline (SSE2)
/// and never -ffast-math, so the fast path cannot come from the compiler: the AVX-512 functions
/// carry `target` attributes, are selected by a CPU check once per process, and compute `exp`
/// with their own polynomial that needs no fast-math. The AVX2 versions have the same structure
/// with 8 lanes and 16 registers: smaller register blocks (6 query rows by 16 keys for QK^T,
/// 6 rows by 16 columns for PV) and 8x8 transposes.
///
/// Buffers (all row-major, of the compute type):
/// - `kt`  `[d, ldkt]` the key tile transposed, `ldkt` a multiple of 32, columns past `nk` zero;
/// - `s`   `[nq, ldkt]` logits, then probabilities;
/// - `acc` `[nq, ldacc]` the unnormalised output, `ldacc` >= `d` rounded up to 16;
/// - `v`   `[nk, ldv]` value rows, readable up to `d` rounded up to 16 columns.
///
/// Keys and values stored in half precision (`Eigen::half`, IEEE fp16; `Eigen::bfloat16`) are read
/// in place by the few-row (decode) kernels `qk_rows_f16`, `qk_rows_bf16`, `pv_f16` and `pv_bf16`,
/// which widen each vector as they load it: decode is bound by the bytes of K and V it reads, and a
/// half-precision cache has half of them. Widening is exact (every fp16 and bf16 value is a
/// float), so these kernels give the bits of `qk_rows` and `pv` on the keys and values converted to
/// float first. `convert_f16` / `convert_bf16` widen whole tiles for the other paths.

#include <algorithm>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "posenc/types.hpp"

#include "posenc/detail/cpu.hpp"
#include "posenc/detail/simd_traits.hpp"

// Where the SIMD kernel tables are compiled (README, "Compile time"). By default every
// translation unit that calls attention compiles them (inline functions, merged by the linker).
// A program whose translation units all define POSENC_EXTERN_KERNELS sees only their declarations,
// and the one translation unit that also defines POSENC_DEFINE_KERNELS compiles them once.
#if defined(POSENC_DEFINE_KERNELS)
#define POSENC_KERNEL_TABLES 1
#define POSENC_KERNEL_TABLE
#elif defined(POSENC_EXTERN_KERNELS)
#define POSENC_KERNEL_TABLES 0
#else
#define POSENC_KERNEL_TABLES 1
#define POSENC_KERNEL_TABLE inline
#endif

#if POSENC_X86_DISPATCH
#define POSENC_HAVE_X86_KERNELS 1
#include <immintrin.h>
#else
#define POSENC_HAVE_X86_KERNELS 0
#endif

namespace posenc::detail {

/// The tile operations on compute type `C`, as function pointers so the choice is made once per
/// process.
template <class C>
struct tile_kernels {
  /// `kt[c][j] = k[j][c]` for `j < nk`, zero for `nk <= j < ldkt`.
  void (*pack_kt)(const C* k, index_t ldk, index_t nk, index_t d, C* kt, index_t ldkt);
  /// `s[i][j] = sum_c q[i][c] kt[c][j]` for `i < nq`, `j < ncols` (a multiple of 32, at most
  /// `ldkt`: a strip that sees only the first keys of the tile computes only those); row stride of
  /// `s` `ldkt`.
  void (*qk)(const C* q, index_t ldq, index_t nq, index_t d, const C* kt, index_t ldkt, index_t ncols, C* s);
  /// `s[i][j] = sum_c q[i][c] k[j][c]` for `i < nq`, `j < nk`, reading the key rows in place (row
  /// stride `ldk`): for a few query rows (decode) transposing the key tile costs more than it saves.
  /// `pf`: rows of later keys (same stride), of which the call requests row j's `d` columns ahead of
  /// their use as it reads key j, for j < `npf` (null, 0: none); a hint that changes no result.
  void (*qk_rows)(const C* q, index_t ldq, index_t nq, index_t d, const C* k, index_t ldk, index_t nk, C* s,
                  index_t lds, const C* pf, index_t npf);
  /// Online-softmax step on rows of `s` (`nk` valid columns, masked ones `-inf`): updates the
  /// running max `m` and sum `l`, writes `exp(s - m_new)` into `s` and the rescale factor of the
  /// previous state into `alpha` (0 when the previous state was empty).
  void (*softmax)(C* s, index_t lds, index_t nq, index_t nk, C* m, C* l, C* alpha);
  /// `acc[i] = alpha[i] acc[i] + sum_j p[i][j] v[j]` over `nk` keys and `d` columns.
  /// `pf`, `npf`: later value rows to request, as for `qk_rows`.
  void (*pv)(const C* p, index_t ldp, index_t nq, index_t nk, const C* v, index_t ldv, index_t d,
             const C* alpha, C* acc, index_t ldacc, const C* pf, index_t npf);
  /// `qk_rows` with the keys stored as fp16 / bf16 (row stride `ldk` in elements of that type).
  void (*qk_rows_f16)(const C* q, index_t ldq, index_t nq, index_t d, const Eigen::half* k, index_t ldk, index_t nk,
                      C* s, index_t lds, const Eigen::half* pf, index_t npf);
  void (*qk_rows_bf16)(const C* q, index_t ldq, index_t nq, index_t d, const Eigen::bfloat16* k, index_t ldk,
                       index_t nk, C* s, index_t lds, const Eigen::bfloat16* pf, index_t npf);
  /// `pv` with the values stored as fp16 / bf16.
  void (*pv_f16)(const C* p, index_t ldp, index_t nq, index_t nk, const Eigen::half* v, index_t ldv, index_t d,
                 const C* alpha, C* acc, index_t ldacc, const Eigen::half* pf, index_t npf);
  void (*pv_bf16)(const C* p, index_t ldp, index_t nq, index_t nk, const Eigen::bfloat16* v, index_t ldv, index_t d,
                  const C* alpha, C* acc, index_t ldacc, const Eigen::bfloat16* pf, index_t npf);
  /// `dst[i][c] = factor * src[i][c]` for `i < n`, `c < d`: rows of fp16 / bf16 widened to `C`
  /// (row strides `lds`, `ldd`).
  void (*convert_f16)(const Eigen::half* src, index_t lds, index_t n, index_t d, C factor, C* dst, index_t ldd);
  void (*convert_bf16)(const Eigen::bfloat16* src, index_t lds, index_t n, index_t d, C factor, C* dst, index_t ldd);
  const char* name;
};

/// The bf16 Q K^T of `attention_params::bf16_qk` where the CPU has AVX512_BF16: rows of
/// pairs of bf16 (a 32-bit word each, the even column in its low half).
struct bf16_pair_kernels {
  /// A packed key tile of bf16 values into rows of pairs, in place.
  void (*pair_rows)(float* kt, index_t ldkt, index_t d);
  /// `tile_kernels::qk` on rows of pairs: `d` is the number of pairs, `ldq` in words.
  void (*qk)(const float* q, index_t ldq, index_t nq, index_t d, const float* kt, index_t ldkt, index_t ncols,
             float* s);
};

/// Half-precision storage types, which the float kernels widen as they load.
template <class S>
concept half_storage = std::same_as<S, Eigen::half> || std::same_as<S, Eigen::bfloat16>;

/// Rows stored as `S` that the kernels of compute type `C` read in place: `C` itself, and fp16 /
/// bf16 for float.
template <class C, class S>
concept kernel_readable = std::same_as<S, C> || (std::same_as<C, float> && half_storage<S>);

/// `kern.qk_rows` on key rows stored as `S` (`kernel_readable`).
template <class C, class S>
void qk_rows_of(const tile_kernels<C>& kern, const C* q, index_t ldq, index_t nq, index_t d, const S* k, index_t ldk,
                index_t nk, C* s, index_t lds, const S* pf = nullptr, index_t npf = 0) {
  if constexpr (std::same_as<S, C>) {
    kern.qk_rows(q, ldq, nq, d, k, ldk, nk, s, lds, pf, npf);
  } else if constexpr (std::same_as<S, Eigen::half>) {
    kern.qk_rows_f16(q, ldq, nq, d, k, ldk, nk, s, lds, pf, npf);
  } else {
    static_assert(std::same_as<S, Eigen::bfloat16>, "qk_rows_of: keys must be the compute type, fp16 or bf16");
    kern.qk_rows_bf16(q, ldq, nq, d, k, ldk, nk, s, lds, pf, npf);
  }
}

/// `kern.pv` on value rows stored as `S` (`kernel_readable`).
template <class C, class S>
void pv_of(const tile_kernels<C>& kern, const C* p, index_t ldp, index_t nq, index_t nk, const S* v, index_t ldv,
           index_t d, const C* alpha, C* acc, index_t ldacc, const S* pf = nullptr, index_t npf = 0) {
  if constexpr (std::same_as<S, C>) {
    kern.pv(p, ldp, nq, nk, v, ldv, d, alpha, acc, ldacc, pf, npf);
  } else if constexpr (std::same_as<S, Eigen::half>) {
    kern.pv_f16(p, ldp, nq, nk, v, ldv, d, alpha, acc, ldacc, pf, npf);
  } else {
    static_assert(std::same_as<S, Eigen::bfloat16>, "pv_of: values must be the compute type, fp16 or bf16");
    kern.pv_bf16(p, ldp, nq, nk, v, ldv, d, alpha, acc, ldacc, pf, npf);
  }
}

/// `static_cast<C>` of a stored value: exact for every pair of types the kernels see.
template <class C, class S>
C widen(S x) {
  if constexpr (std::same_as<S, C>) {
    return x;
  } else {
    return static_cast<C>(static_cast<float>(x));
  }
}

// ---------------------------------------------------------------------------------------------
// Portable versions: plain loops the compiler vectorises with whatever flags it has.

template <class C>
void pack_kt_portable(const C* k, index_t ldk, index_t nk, index_t d, C* kt, index_t ldkt) {
  for (index_t c = 0; c < d; ++c) {
    C* dst = kt + c * ldkt;
    for (index_t j = 0; j < nk; ++j) dst[j] = k[j * ldk + c];
    for (index_t j = nk; j < ldkt; ++j) dst[j] = C(0);
  }
}

template <class C>
void qk_portable(const C* q, index_t ldq, index_t nq, index_t d, const C* kt, index_t ldkt, index_t ncols, C* s) {
  for (index_t i = 0; i < nq; ++i) {
    C* srow = s + i * ldkt;
    for (index_t j = 0; j < ncols; ++j) srow[j] = C(0);
    for (index_t c = 0; c < d; ++c) {
      const C a = q[i * ldq + c];
      const C* krow = kt + c * ldkt;
      for (index_t j = 0; j < ncols; ++j) srow[j] += a * krow[j];
    }
  }
}

// One body for keys and values of the compute type and of fp16 / bf16 (`widen` is a no-op for the
// former), so that both compile to the same arithmetic: the half-precision versions give the bits
// of the float ones on widened data. The dot product is strict: where fused multiply-add is part
// of the target (aarch64, x86 built with -mfma), g++ contracts `dot += q * k` across statements
// into `fmadd` in some unrolled or peeled iterations and not in others, differently for each key
// type (seen on aarch64); `pv_portable`'s single-statement update is contracted the same way for
// every value type.
template <class C, class K = C>
POSENC_STRICT_FP void qk_rows_portable(const C* q, index_t ldq, index_t nq, index_t d, const K* k, index_t ldk,
                                       index_t nk, C* s, index_t lds, const K*, index_t) {
  POSENC_STRICT_FP_BODY
  for (index_t i = 0; i < nq; ++i)
    for (index_t j = 0; j < nk; ++j) {
      C dot = 0;
      for (index_t c = 0; c < d; ++c) dot += q[i * ldq + c] * widen<C>(k[j * ldk + c]);
      s[i * lds + j] = dot;
    }
}

template <class C, class S>
void convert_portable(const S* src, index_t lds, index_t n, index_t d, C factor, C* dst, index_t ldd) {
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < d; ++c) dst[i * ldd + c] = factor * widen<C>(src[i * lds + c]);
}

/// `x` rounded to the nearest bf16 (ties to even; past the largest bf16 to infinity), a NaN kept a
/// (quiet) NaN: the operands of `attention_params::bf16_qk`. From the bits, branch-free, so row
/// loops vectorise: adding 0x7fff plus the lowest kept bit carries into the kept half exactly
/// when the dropped half is above one half, or equal to it with the kept half odd.
inline float round_to_bf16(float x) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const std::uint32_t nan = (u | 0x00400000u) & 0xffff0000u;
  return std::bit_cast<float>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/// A double through float: the value the float kernels would round.
inline double round_to_bf16(double x) { return round_to_bf16(static_cast<float>(x)); }

/// `round_to_bf16` on rows `[n, d]` of stride `ld`, in place.
template <class C>
void round_rows_to_bf16(C* p, index_t n, index_t d, index_t ld) {
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < d; ++c) p[i * ld + c] = round_to_bf16(p[i * ld + c]);
}

/// Dense rows `[n, d]` of float bf16 values into rows of pairs (`(d + 1) / 2` words each, the even
/// column in the low half, 0 past `d`), in place: word (i, c) is written after the floats it
/// reads, (i, 2c) and (i, 2c + 1), which lie at or after it.
inline void pair_dense_rows(float* p, index_t n, index_t d) {
  const index_t pairs = (d + 1) / 2;
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < pairs; ++c) {
      std::uint32_t even = 0, odd = 0;
      std::memcpy(&even, p + i * d + 2 * c, sizeof even);
      if (2 * c + 1 < d) std::memcpy(&odd, p + i * d + 2 * c + 1, sizeof odd);
      const std::uint32_t word = (even >> 16) | (odd & 0xffff0000u);
      std::memcpy(p + i * pairs + c, &word, sizeof word);
    }
}

/// Shared by every version: the scalar part of the online-softmax update of one row, given the
/// tile's row maximum. Returns the new max, or -inf when nothing is visible yet.
template <class C>
C softmax_row_begin(C tile_max, C& m, C& alpha) {
  constexpr C neg_inf = -std::numeric_limits<C>::infinity();
  const C m_new = std::max(m, tile_max);
  alpha = m == neg_inf ? C(0) : std::exp(m - m_new);
  if (m_new != neg_inf) m = m_new;
  return m_new;
}

/// Shared by every version: a row whose tile maximum is -inf sees no key of the tile. Its
/// weights become 0 and its state is kept (alpha = 1). The maximum skips NaN, so a row of NaN and
/// masked logits also lands here: by the NaN policy (docs/numerics.md) its sum, and so its
/// output, becomes NaN.
template <class C>
void softmax_row_empty(C* row, index_t nk, C& l, C& alpha) {
  if (std::any_of(row, row + nk, [](C x) { return std::isnan(x); })) l = std::numeric_limits<C>::quiet_NaN();
  std::fill(row, row + nk, C(0));
  alpha = C(1);
}

template <class C>
void softmax_portable(C* s, index_t lds, index_t nq, index_t nk, C* m, C* l, C* alpha) {
  constexpr C neg_inf = -std::numeric_limits<C>::infinity();
  for (index_t i = 0; i < nq; ++i) {
    C* row = s + i * lds;
    C tile_max = neg_inf;
    for (index_t j = 0; j < nk; ++j) tile_max = std::max(tile_max, row[j]);
    const C m_new = softmax_row_begin(tile_max, m[i], alpha[i]);
    if (m_new == neg_inf) {
      softmax_row_empty(row, nk, l[i], alpha[i]);
      continue;
    }
    C sum = 0;
    for (index_t j = 0; j < nk; ++j) {
      // exp(-inf) is 0 here; written out so a masked entry is exactly 0 on every libm.
      const C e = row[j] == neg_inf ? C(0) : std::exp(row[j] - m_new);
      row[j] = e;
      sum += e;
    }
    l[i] = alpha[i] * l[i] + sum;
  }
}

template <class C, class V = C>
void pv_portable(const C* p, index_t ldp, index_t nq, index_t nk, const V* v, index_t ldv, index_t d, const C* alpha,
                 C* acc, index_t ldacc, const V*, index_t) {
  for (index_t i = 0; i < nq; ++i) {
    C* arow = acc + i * ldacc;
    const C a = alpha[i];
    if (a != C(1))
      for (index_t c = 0; c < d; ++c) arow[c] *= a;
    for (index_t j = 0; j < nk; ++j) {
      const C w = p[i * ldp + j];
      if (w == C(0)) continue;
      const V* vrow = v + j * ldv;
      for (index_t c = 0; c < d; ++c) arow[c] += w * widen<C>(vrow[c]);
    }
  }
}

template <class C>
const tile_kernels<C>& portable_kernels() {
  static const tile_kernels<C> k{pack_kt_portable<C>,
                                 qk_portable<C>,
                                 qk_rows_portable<C>,
                                 softmax_portable<C>,
                                 pv_portable<C>,
                                 qk_rows_portable<C, Eigen::half>,
                                 qk_rows_portable<C, Eigen::bfloat16>,
                                 pv_portable<C, Eigen::half>,
                                 pv_portable<C, Eigen::bfloat16>,
                                 convert_portable<C, Eigen::half>,
                                 convert_portable<C, Eigen::bfloat16>,
                                 "portable"};
  return k;
}

#if POSENC_HAVE_X86_KERNELS || POSENC_NEON_KERNELS

/// Degree-6 Taylor coefficients of 2^f = sum (f ln 2)^k / k!, highest first, shared by the
/// AVX-512, AVX2 and NEON exp (relative error about 1.5e-7 on [-1/2, 1/2]).
inline constexpr float exp2_poly[7] = {1.540353039338161e-4f, 1.333355814642844e-3f, 9.618129107628477e-3f,
                                       5.550410866482158e-2f, 2.402265069591007e-1f, 6.931471805599453e-1f,
                                       1.0f};

// ---------------------------------------------------------------------------------------------
// Kernels written once over a vector helper type `V` (one per instruction set, float lanes):
//   reg, width                    the register type and its number of floats
//   zero(), set1(x)
//   load(p), store(p, v)          `width` floats at `p`; load(h) of `width` fp16 / bf16 values,
//                                 widened exactly (every fp16 and bf16 value is a float)
//   load_spare(p)                 load(p) for loops with a vector register to spare: the same
//                                 values, in fewer operations where that needs a constant register
//   load_part(p, n)               the first n < width values (float, fp16 or bf16), other lanes 0;
//                                 reads nothing past them, so a tail never touches the next row
//   load_or(p, n, fill)           the first n < width floats, other lanes `fill`
//   store(p, v, n)                the first n < width lanes
//   add, sub, mul, max            lane-wise; max is the instruction set's own (which operand a NaN
//                                 yields differs between sets; the NaN policy rests on the sums)
//   exp(x)                        e^x for x <= 0 from `exp2_poly`; below -87.3 (and -inf) exactly 0,
//                                 NaN stays NaN
//   reduce_add, reduce_max        across lanes, in a fixed order of the set
//   reduce_add4(a0, a1, a2, a3, p, n)  the sums across lanes of four vectors, each in one fixed
//                                 order of the set, the first n <= 4 of them stored at p
//   transpose(r)                  `width` registers of `width` lanes transposed in place
// A target attribute cannot depend on a template argument, and GCC does not inline an intrinsic into
// a function compiled without its target, so each body is a macro expanded in one function per
// instruction set (as in detail/rope_kernels.hpp). Full vectors take plain loads and stores, the
// tail of a row one partial load and store.

/// The online-softmax step of `tile_kernels::softmax`: every row's maximum, then `exp(s - m_new)`
/// and its sum. Masked-off lanes of a tail read -inf, whose exp is 0, so they add nothing.
#define POSENC_SOFTMAX_ROWS_BODY(V)                                                          \
  using reg = typename V::reg;                                                               \
  constexpr index_t w = V::width;                                                            \
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();                         \
  for (index_t i = 0; i < nq; ++i) {                                                         \
    float* row = s + i * lds;                                                                \
    reg mx = V::set1(neg_inf);                                                               \
    index_t j = 0;                                                                           \
    for (; j + w <= nk; j += w) mx = V::max(mx, V::load(row + j));                           \
    if (j < nk) mx = V::max(mx, V::load_or(row + j, nk - j, neg_inf));                       \
    const float m_new = softmax_row_begin<float>(V::reduce_max(mx), m[i], alpha[i]);         \
    if (m_new == neg_inf) {                                                                  \
      softmax_row_empty(row, nk, l[i], alpha[i]);                                            \
      continue;                                                                              \
    }                                                                                        \
    const reg vm = V::set1(m_new);                                                           \
    reg sum = V::zero();                                                                     \
    for (j = 0; j + w <= nk; j += w) {                                                       \
      const reg e = V::exp(V::sub(V::load(row + j), vm));                                    \
      V::store(row + j, e);                                                                  \
      sum = V::add(sum, e);                                                                  \
    }                                                                                        \
    if (j < nk) {                                                                            \
      const reg e = V::exp(V::sub(V::load_or(row + j, nk - j, neg_inf), vm));                \
      V::store(row + j, e, nk - j);                                                          \
      sum = V::add(sum, e);                                                                  \
    }                                                                                        \
    l[i] = alpha[i] * l[i] + V::reduce_add(sum);                                             \
  }

/// `tile_kernels::convert_f16` / `convert_bf16`: `factor * x`, one rounding, as the portable loop.
#define POSENC_CONVERT_ROWS_BODY(V)                                                          \
  using reg = typename V::reg;                                                               \
  constexpr index_t w = V::width;                                                            \
  const reg f = V::set1(factor);                                                             \
  for (index_t i = 0; i < n; ++i) {                                                          \
    const S* from = src + i * lds;                                                           \
    float* to = dst + i * ldd;                                                               \
    index_t c = 0;                                                                           \
    for (; c + w <= d; c += w) V::store(to + c, V::mul(f, V::load(from + c)));               \
    if (c < d) V::store(to + c, V::mul(f, V::load_part(from + c, d - c)), d - c);            \
  }

// The register blocks below must be unrolled completely, or their accumulator arrays live on the
// stack and every FMA becomes a load and a store.
#define POSENC_UNROLL _Pragma("GCC unroll 16")

/// `p + n`, or null for a null `p` (an absent prefetch target).
template <class T>
inline const T* advance_or_null(const T* p, index_t n) {
  return p ? p + n : nullptr;
}

/// The register block of `tile_kernels::qk`, in a function `template <int R, int C>` with the
/// arguments (q, ldq, d, kt, ldkt, s): R query rows against C vectors of packed keys, R * C
/// accumulators, C loads and R broadcasts per column of q.
#define POSENC_QK_BLOCK_BODY(V)                                                              \
  using reg = typename V::reg;                                                               \
  constexpr index_t w = V::width;                                                            \
  reg acc[R][C];                                                                             \
  POSENC_UNROLL                                                                              \
  for (int r = 0; r < R; ++r) {                                                              \
    POSENC_UNROLL                                                                            \
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();                                       \
  }                                                                                          \
  for (index_t col = 0; col < d; ++col) {                                                    \
    reg b[C];                                                                                \
    POSENC_UNROLL                                                                            \
    for (int c = 0; c < C; ++c) b[c] = V::load(kt + col * ldkt + c * w);                     \
    POSENC_UNROLL                                                                            \
    for (int r = 0; r < R; ++r) {                                                            \
      const reg a = V::set1(q[r * ldq + col]);                                               \
      POSENC_UNROLL                                                                          \
      for (int c = 0; c < C; ++c) acc[r][c] = V::fma(a, b[c], acc[r][c]);                    \
    }                                                                                        \
  }                                                                                          \
  POSENC_UNROLL                                                                              \
  for (int r = 0; r < R; ++r) {                                                              \
    POSENC_UNROLL                                                                            \
    for (int c = 0; c < C; ++c) V::store(s + r * ldkt + c * w, acc[r][c]);                   \
  }

/// The register block of `tile_kernels::pv`, in a function `template <int R, int C, class S>` with
/// the arguments (p, ldp, nk, v, ldv, alpha, acc, ldacc, pf, npf): R rows of the accumulator, C
/// vectors of columns, R * C accumulators, C loads (values of float, fp16 or bf16, widened as
/// they load) and R broadcasts per key.
#define POSENC_PV_BLOCK_BODY(V)                                                              \
  using reg = typename V::reg;                                                               \
  constexpr index_t w = V::width;                                                            \
  reg a[R][C];                                                                               \
  POSENC_UNROLL                                                                              \
  for (int r = 0; r < R; ++r) {                                                              \
    const reg al = V::set1(alpha[r]);                                                        \
    POSENC_UNROLL                                                                            \
    for (int c = 0; c < C; ++c) a[r][c] = V::mul(al, V::load(acc + r * ldacc + c * w));      \
  }                                                                                          \
  for (index_t j = 0; j < nk; ++j) {                                                         \
    prefetch_row(pf, ldv, j, npf, C * w);                                                    \
    reg b[C];                                                                                \
    POSENC_UNROLL                                                                            \
    for (int c = 0; c < C; ++c) b[c] = V::load(v + j * ldv + c * w);                         \
    POSENC_UNROLL                                                                            \
    for (int r = 0; r < R; ++r) {                                                            \
      const reg x = V::set1(p[r * ldp + j]);                                                 \
      POSENC_UNROLL                                                                          \
      for (int c = 0; c < C; ++c) a[r][c] = V::fma(x, b[c], a[r][c]);                        \
    }                                                                                        \
  }                                                                                          \
  POSENC_UNROLL                                                                              \
  for (int r = 0; r < R; ++r) {                                                              \
    POSENC_UNROLL                                                                            \
    for (int c = 0; c < C; ++c) V::store(acc + r * ldacc + c * w, a[r][c]);                  \
  }

// The register blocks and the row and column dispatch around them are inlined into the loop
// that calls them (a call per block costs a prologue and an epilogue, which the few-row kernels,
// a block per 16 keys, feel: AVX2 bf16 decode took 6% longer with calls).
#define POSENC_INLINE_BLOCK __attribute__((always_inline)) inline

/// `tile_kernels::pack_kt`, in a function with the arguments (k, ldk, nk, d, kt, ldkt): blocks of
/// `width` keys by `width` columns loaded as rows, transposed in registers (`V::transpose`) and
/// stored as columns; the columns past the last whole block of columns, the keys past the last
/// whole block of keys and the zeros past `nk` element by element.
#define POSENC_PACK_KT_BODY(V)                                                               \
  using reg = typename V::reg;                                                               \
  constexpr index_t w = V::width;                                                            \
  const index_t nkw = nk / w * w, dw = d / w * w;                                            \
  for (index_t j0 = 0; j0 < nkw; j0 += w) {                                                  \
    for (index_t c0 = 0; c0 < dw; c0 += w) {                                                 \
      reg r[w];                                                                              \
      POSENC_UNROLL                                                                          \
      for (int i = 0; i < int{w}; ++i) r[i] = V::load(k + (j0 + i) * ldk + c0);              \
      V::transpose(r);                                                                       \
      POSENC_UNROLL                                                                          \
      for (int i = 0; i < int{w}; ++i) V::store(kt + (c0 + i) * ldkt + j0, r[i]);            \
    }                                                                                        \
    for (index_t c = dw; c < d; ++c)                                                         \
      for (index_t j = j0; j < j0 + w; ++j) kt[c * ldkt + j] = k[j * ldk + c];               \
  }                                                                                          \
  for (index_t c = 0; c < d; ++c) {                                                          \
    float* dst = kt + c * ldkt;                                                              \
    for (index_t j = nkw; j < nk; ++j) dst[j] = k[j * ldk + c];                              \
    for (index_t j = nk; j < ldkt; ++j) dst[j] = 0.0f;                                       \
  }

/// Keys per group of the one-row block of `tile_kernels::qk_rows` (see POSENC_KEY_KERNELS).
inline constexpr int qk_rows_one_row_keys = 8;

/// The register block of `tile_kernels::qk_rows` (decode), in a function `template <int R, class K>`
/// with the arguments (q, ldq, d, k, ldk, nk, s, lds, pf, npf): R query rows against the key rows
/// read in place (float, fp16 or bf16, widened as they load, by `V::load_spare`), KEYS (1-3, or a
/// multiple of 4: a reduction per four) keys at a time, each key vector loaded once and multiplied into every
/// query row: R * KEYS accumulators. Every dot
/// product accumulates its columns in order (whole vectors, then the tail through `load_part`, zero
/// past the row in q and in the key) and is summed across lanes by `V::reduce_add4`, which reduces
/// each of its four vectors in the same fixed order: a key's sum has the same bits whichever keys and
/// how many query rows share its call. Missing keys of the last group read the group's first row
/// again (nothing past the key rows); their sums are not stored. The rows requested ahead (`pf`) are
/// spread over the loop, one cache line of each at a time beside the loads.
#define POSENC_QK_ROWS_BLOCK_BODY(V, KEYS)                                                   \
  using reg = typename V::reg;                                                               \
  constexpr index_t w = V::width;                                                            \
  constexpr int nkeys = KEYS;                                                                \
  static_assert(nkeys >= 1 && (nkeys < 4 || nkeys % 4 == 0), "qk_rows: 1-3 keys or a multiple of 4"); \
  constexpr index_t per_line = 64 / static_cast<index_t>(sizeof(K));                         \
  const index_t dw = d / w * w;                                                              \
  for (index_t j = 0; j < nk; j += nkeys) {                                                  \
    const index_t keys = std::min<index_t>(nkeys, nk - j);                                   \
    reg acc[R][nkeys];                                                                       \
    POSENC_UNROLL                                                                            \
    for (int r = 0; r < R; ++r) {                                                            \
      POSENC_UNROLL                                                                          \
      for (int t = 0; t < nkeys; ++t) acc[r][t] = V::zero();                                 \
    }                                                                                        \
    const K* kr[nkeys];                                                                      \
    POSENC_UNROLL                                                                            \
    for (int t = 0; t < nkeys; ++t) kr[t] = k + (t < keys ? j + t : j) * ldk;                \
    const K* ahead = pf != nullptr && j < npf ? pf + j * ldk : nullptr;                      \
    const index_t ahead_rows = ahead ? std::min(keys, npf - j) : 0;                          \
    for (index_t c = 0; c < dw; c += w) {                                                    \
      if (c % per_line == 0)                                                                 \
        for (index_t t = 0; t < ahead_rows; ++t) __builtin_prefetch(ahead + t * ldk + c, 0, 3); \
      reg qv[R];                                                                             \
      POSENC_UNROLL                                                                          \
      for (int r = 0; r < R; ++r) qv[r] = V::load(q + r * ldq + c);                          \
      POSENC_UNROLL                                                                          \
      for (int t = 0; t < nkeys; ++t) {                                                      \
        const reg kv = V::load_spare(kr[t] + c);                                             \
        POSENC_UNROLL                                                                        \
        for (int r = 0; r < R; ++r) acc[r][t] = V::fma(qv[r], kv, acc[r][t]);                \
      }                                                                                      \
    }                                                                                        \
    for (index_t t = 0; t < ahead_rows; ++t) prefetch_row(ahead + t * ldk + dw, ldk, 0, 1, d - dw); \
    if (dw < d) {                                                                            \
      POSENC_UNROLL                                                                          \
      for (int t = 0; t < nkeys; ++t) {                                                      \
        const reg kv = V::load_part(kr[t] + dw, d - dw);                                     \
        POSENC_UNROLL                                                                        \
        for (int r = 0; r < R; ++r)                                                          \
          acc[r][t] = V::fma(V::load_part(q + r * ldq + dw, d - dw), kv, acc[r][t]);         \
      }                                                                                      \
    }                                                                                        \
    /* Fewer than four keys per group: the last one fills the other operands (not stored). */ \
    POSENC_UNROLL                                                                            \
    for (int r = 0; r < R; ++r) {                                                            \
      POSENC_UNROLL                                                                          \
      for (int t0 = 0; t0 < nkeys; t0 += 4) {                                                \
        const int last = std::min(t0 + 3, nkeys - 1);                                        \
        if (t0 < keys)                                                                       \
          V::reduce_add4(acc[r][t0], acc[r][std::min(t0 + 1, last)], acc[r][std::min(t0 + 2, last)], \
                         acc[r][last], s + r * lds + j + t0, std::min<index_t>(4, keys - t0)); \
      }                                                                                      \
    }                                                                                        \
  }

/// The key kernels of one instruction set, from the two bodies above: `pack_kt_<ISA>` and
/// `qk_rows_<ISA><K>` (keys of float, fp16 or bf16), every function marked `TARGET`. `qk_rows`
/// takes `QKR_ROWS` query rows against `QKR_KEYS` keys at a time (fewer rows at the end from
/// template recursion); a block of one row takes 8 keys, whose 8 accumulators keep the set's
/// multiply-adds in flight where 4 would wait on their latency (AVX2, 4 query rows as 3 + 1, 16
/// keys in L1, Zen 5: float keys 0.83 -> 0.85 of the multiply-add peak, fp16 0.80 -> 0.84). Only the
/// first block of rows requests the rows ahead.
#define POSENC_KEY_KERNELS(ISA, TARGET, V, QKR_ROWS, QKR_KEYS)                                                 \
  TARGET inline void pack_kt_##ISA(const float* k, index_t ldk, index_t nk, index_t d, float* kt, index_t ldkt) { \
    POSENC_PACK_KT_BODY(V)                                                                                     \
  }                                                                                                            \
  template <int R, class K>                                                                                    \
  TARGET inline void qk_rows_block_##ISA(const float* q, index_t ldq, index_t d, const K* k,                   \
                                                      index_t ldk, index_t nk, float* s, index_t lds,          \
                                                      const K* pf, index_t npf) {                              \
    POSENC_QK_ROWS_BLOCK_BODY(V, (R == 1 ? qk_rows_one_row_keys : QKR_KEYS))                                   \
  }                                                                                                            \
  /* `rows` <= R query rows: the block of exactly that many. */                                                \
  template <int R, class K>                                                                                    \
  TARGET POSENC_INLINE_BLOCK void qk_rows_fewer_##ISA(index_t rows, const float* q, index_t ldq, index_t d,     \
                                                      const K* k, index_t ldk, index_t nk, float* s,           \
                                                      index_t lds, const K* pf, index_t npf) {                 \
    if constexpr (R > 1) {                                                                                     \
      if (rows < R) {                                                                                          \
        qk_rows_fewer_##ISA<R - 1, K>(rows, q, ldq, d, k, ldk, nk, s, lds, pf, npf);                           \
        return;                                                                                                \
      }                                                                                                        \
    }                                                                                                          \
    qk_rows_block_##ISA<R, K>(q, ldq, d, k, ldk, nk, s, lds, pf, npf);                                         \
  }                                                                                                            \
  template <class K>                                                                                           \
  TARGET inline void qk_rows_##ISA(const float* q, index_t ldq, index_t nq, index_t d, const K* k, index_t ldk, \
                                   index_t nk, float* s, index_t lds, const K* pf, index_t npf) {              \
    for (index_t i0 = 0; i0 < nq; i0 += QKR_ROWS)                                                              \
      qk_rows_fewer_##ISA<QKR_ROWS, K>(std::min<index_t>(QKR_ROWS, nq - i0), q + i0 * ldq, ldq, d, k, ldk, nk, \
                                       s + i0 * lds, lds, i0 == 0 ? pf : nullptr, npf);                        \
  }

/// `tile_kernels::pv` with at most `pv_chunk_rows` query rows (decode) goes over the keys in chunks
/// of `pv_chunk_keys`, every column block of a chunk before the next chunk, so that the chunk's
/// value rows are read from memory once and stay in L1 for the other column blocks. Going over the
/// whole tile once per block re-reads it from L2 each time: an engine's value rows are 1-4 KiB
/// apart, a stride at which rows share a few L1 sets, so not even 128 of them stay in L1. The
/// accumulators go through memory between chunks (exactly: the sums are the same), and the previous
/// state's rescale factor applies to the first chunk only. AVX2 (then 16-column blocks), 1 query, 128k
/// keys, GQA 8/2, one thread on Zen 5: fp32 15.9 -> 11.1 ms, bf16 8.3 -> 6.6 ms.
inline constexpr index_t pv_chunk_rows = 4;
inline constexpr index_t pv_chunk_keys = 16;

/// The prefill tile products of one instruction set, from the two bodies above: `qk_<ISA>` and
/// `pv_<ISA><S>` (values of float, fp16 or bf16), with their register blocks and the
/// blocking around them, every function marked `TARGET` (the set's target attribute, or nothing)
/// so that the blocks inline into the loops that call them. QK^T takes `QK_ROWS` query rows
/// against `QK_VECS` vectors of keys at a time; PV `PV_ROWS` rows by `PV_VECS` vectors of columns,
/// then the rest of the columns in whole vectors (the buffers are readable and writable up to d
/// rounded up to 16); the chunks of decode (`pv_chunk_rows` rows or fewer) take `PVD_VECS` vectors of
/// columns instead. Smaller row and column counts at the edges come from template recursion, and
/// one vector more than a block (3 + 1) goes as two blocks of about half (2 + 2): a block of a
/// single vector has too few accumulators to keep the multiply-adds in flight.
#define POSENC_TILE_PRODUCTS(ISA, TARGET, V, QK_ROWS, QK_VECS, PV_ROWS, PV_VECS, PVD_VECS)                     \
  template <int R, int C>                                                                                      \
  TARGET POSENC_INLINE_BLOCK void qk_block_##ISA(const float* q, index_t ldq, index_t d, const float* kt, index_t ldkt,      \
                                    float* s) {                                                                \
    POSENC_QK_BLOCK_BODY(V)                                                                                    \
  }                                                                                                            \
  /* `rows` <= R query rows: the block of exactly that many. */                                                \
  template <int R>                                                                                             \
  TARGET POSENC_INLINE_BLOCK void qk_rows_of_##ISA(index_t rows, const float* q, index_t ldq, index_t d, const float* kt,    \
                                      index_t ldkt, float* s) {                                                \
    if constexpr (R > 1) {                                                                                     \
      if (rows < R) {                                                                                          \
        qk_rows_of_##ISA<R - 1>(rows, q, ldq, d, kt, ldkt, s);                                                 \
        return;                                                                                                \
      }                                                                                                        \
    }                                                                                                          \
    qk_block_##ISA<R, QK_VECS>(q, ldq, d, kt, ldkt, s);                                                        \
  }                                                                                                            \
  TARGET inline void qk_##ISA(const float* q, index_t ldq, index_t nq, index_t d, const float* kt, index_t ldkt, \
                              index_t ncols, float* s) {                                                       \
    constexpr index_t keys = QK_VECS * V::width;                                                               \
    for (index_t i0 = 0; i0 < nq; i0 += QK_ROWS)                                                               \
      for (index_t j0 = 0; j0 < ncols; j0 += keys)                                                             \
        qk_rows_of_##ISA<QK_ROWS>(std::min<index_t>(QK_ROWS, nq - i0), q + i0 * ldq, ldq, d, kt + j0, ldkt,     \
                                  s + i0 * ldkt + j0);                                                         \
  }                                                                                                            \
  template <int R, int C, class S>                                                                             \
  TARGET POSENC_INLINE_BLOCK void pv_block_##ISA(const float* p, index_t ldp, index_t nk, const S* v, index_t ldv,           \
                                    const float* alpha, float* acc, index_t ldacc, const S* pf, index_t npf) {  \
    POSENC_PV_BLOCK_BODY(V)                                                                                    \
  }                                                                                                            \
  /* `rows` <= R rows, C vectors of columns. */                                                                \
  template <int R, int C, class S>                                                                             \
  TARGET POSENC_INLINE_BLOCK void pv_rows_of_##ISA(index_t rows, const float* p, index_t ldp, index_t nk, const S* v,        \
                                      index_t ldv, const float* alpha, float* acc, index_t ldacc, const S* pf,  \
                                      index_t npf) {                                                           \
    if constexpr (R > 1) {                                                                                     \
      if (rows < R) {                                                                                          \
        pv_rows_of_##ISA<R - 1, C, S>(rows, p, ldp, nk, v, ldv, alpha, acc, ldacc, pf, npf);                    \
        return;                                                                                                \
      }                                                                                                        \
    }                                                                                                          \
    pv_block_##ISA<R, C, S>(p, ldp, nk, v, ldv, alpha, acc, ldacc, pf, npf);                                    \
  }                                                                                                            \
  /* Every row, C vectors of columns; only the first block of rows requests the rows ahead. */                 \
  template <int C, class S>                                                                                    \
  TARGET POSENC_INLINE_BLOCK void pv_cols_##ISA(const float* p, index_t ldp, index_t nq, index_t nk, const S* v, index_t ldv, \
                                   const float* alpha, float* acc, index_t ldacc, const S* pf, index_t npf) {   \
    index_t i = 0;                                                                                             \
    for (; i + PV_ROWS <= nq; i += PV_ROWS)                                                                    \
      pv_block_##ISA<PV_ROWS, C, S>(p + i * ldp, ldp, nk, v, ldv, alpha + i, acc + i * ldacc, ldacc,            \
                                    i == 0 ? pf : nullptr, npf);                                               \
    if (i < nq)                                                                                                \
      pv_rows_of_##ISA<PV_ROWS - 1, C, S>(nq - i, p + i * ldp, ldp, nk, v, ldv, alpha + i, acc + i * ldacc,     \
                                          ldacc, i == 0 ? pf : nullptr, npf);                                  \
  }                                                                                                            \
  /* `vecs` <= C vectors of columns. */                                                                        \
  template <int C, class S>                                                                                    \
  TARGET POSENC_INLINE_BLOCK void pv_vecs_of_##ISA(index_t vecs, const float* p, index_t ldp, index_t nq, index_t nk,        \
                                      const S* v, index_t ldv, const float* alpha, float* acc, index_t ldacc,   \
                                      const S* pf, index_t npf) {                                              \
    if constexpr (C > 1) {                                                                                     \
      if (vecs < C) {                                                                                          \
        pv_vecs_of_##ISA<C - 1, S>(vecs, p, ldp, nq, nk, v, ldv, alpha, acc, ldacc, pf, npf);                   \
        return;                                                                                                \
      }                                                                                                        \
    }                                                                                                          \
    pv_cols_##ISA<C, S>(p, ldp, nq, nk, v, ldv, alpha, acc, ldacc, pf, npf);                                    \
  }                                                                                                            \
  template <int C, class S>                                                                                    \
  TARGET inline void pv_##ISA##_tiles(const float* p, index_t ldp, index_t nq, index_t nk, const S* v,          \
                                      index_t ldv, index_t d, const float* alpha, float* acc, index_t ldacc,    \
                                      const S* pf, index_t npf) {                                              \
    constexpr index_t w = V::width, step = C * w;                                                              \
    index_t c0 = 0;                                                                                            \
    for (; c0 + step <= d; c0 += step) {                                                                       \
      if (C >= 3 && d - c0 == step + w) {                                                                      \
        constexpr int half = (C + 1) / 2;                                                                      \
        pv_cols_##ISA<half, S>(p, ldp, nq, nk, v + c0, ldv, alpha, acc + c0, ldacc, advance_or_null(pf, c0), npf); \
        c0 += half * w;                                                                                        \
        pv_cols_##ISA<C + 1 - half, S>(p, ldp, nq, nk, v + c0, ldv, alpha, acc + c0, ldacc, advance_or_null(pf, c0), \
                                       npf);                                                                   \
        return;                                                                                                \
      }                                                                                                        \
      pv_cols_##ISA<C, S>(p, ldp, nq, nk, v + c0, ldv, alpha, acc + c0, ldacc, advance_or_null(pf, c0), npf);   \
    }                                                                                                          \
    if (c0 < d)                                                                                                \
      pv_vecs_of_##ISA<C, S>((d - c0 + w - 1) / w, p, ldp, nq, nk, v + c0, ldv, alpha, acc + c0, ldacc,         \
                             advance_or_null(pf, c0), npf);                                                    \
  }                                                                                                            \
  /* `tile_kernels::pv`: few rows (decode) go over the keys in chunks (see pv_chunk_keys). */                  \
  template <class S>                                                                                           \
  TARGET inline void pv_##ISA(const float* p, index_t ldp, index_t nq, index_t nk, const S* v, index_t ldv,     \
                              index_t d, const float* alpha, float* acc, index_t ldacc, const S* pf,           \
                              index_t npf) {                                                                   \
    if (nq > pv_chunk_rows) {                                                                                  \
      pv_##ISA##_tiles<PV_VECS, S>(p, ldp, nq, nk, v, ldv, d, alpha, acc, ldacc, pf, npf);                     \
      return;                                                                                                  \
    }                                                                                                          \
    const float ones[pv_chunk_rows] = {1.0f, 1.0f, 1.0f, 1.0f};                                                \
    for (index_t j0 = 0; j0 < nk; j0 += pv_chunk_keys)                                                         \
      pv_##ISA##_tiles<PVD_VECS, S>(p + j0, ldp, nq, std::min(pv_chunk_keys, nk - j0), v + j0 * ldv, ldv, d,   \
                          j0 == 0 ? alpha : ones, acc, ldacc, pf != nullptr && j0 < npf ? pf + j0 * ldv : nullptr, \
                          npf - j0);                                                                           \
  }

#endif  // POSENC_HAVE_X86_KERNELS || POSENC_NEON_KERNELS

#if POSENC_HAVE_X86_KERNELS

POSENC_SIMD_WARNINGS_OFF
#define POSENC_AVX512 POSENC_TARGET_AVX512

/// exp(x) for x <= 0 (logits minus their running max), 16 lanes: 2^(x log2 e) split into an
/// integer power, applied with scalef, and a degree-6 polynomial for 2^f on [-1/2, 1/2]
/// (relative error about 1.5e-7). Inputs below -87.3 (including -inf) give exactly 0; NaN gives NaN.
POSENC_AVX512 inline __m512 exp_avx512(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  // NaN stays NaN: it counts as live (not less than -126, unordered) and max_ps returns its
  // second operand when either is NaN.
  const __mmask16 live = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 tc = _mm512_max_ps(_mm512_set1_ps(-126.0f), t);
  const __m512 n = _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(tc, n);
  __m512 p = _mm512_set1_ps(exp2_poly[0]);
  POSENC_UNROLL
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(exp2_poly[k]));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

POSENC_AVX512 inline __mmask16 tail_mask(index_t n) {
  return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

/// 16 stored values at `p` as floats (`mask`: the lanes to read, the others 0; masked-off lanes
/// are not read, so a tail never touches memory past its row). fp16 is widened by `vcvtph2ps`,
/// bf16 by moving its 16 bits to the top of a 32-bit lane (bf16 is the high half of a float):
/// both exact, so the kernels give the bits of the float kernels on widened data.
POSENC_AVX512 inline __m512 widen16(__m256i h, const Eigen::half*) { return _mm512_cvtph_ps(h); }
POSENC_AVX512 inline __m512 widen16(__m256i h, const Eigen::bfloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
POSENC_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
POSENC_AVX512 inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
template <half_storage H>
POSENC_AVX512 inline __m512 load16(const H* p) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), p);
}
template <half_storage H>
POSENC_AVX512 inline __m512 load16(const H* p, __mmask16 mask) {
  return widen16(_mm256_maskz_loadu_epi16(mask, p), p);
}

POSENC_AVX512 __attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  POSENC_UNROLL
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  POSENC_UNROLL
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), e = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));      // column 4k   of rows 4i..4i+3
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));  // column 4k+1
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));  // column 4k+2
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));  // column 4k+3
  }
  __m512 v[16];
  POSENC_UNROLL
  for (int h = 0; h < 2; ++h)
    POSENC_UNROLL
    for (int m = 0; m < 4; ++m) {
      v[8 * h + m] = _mm512_shuffle_f32x4(u[8 * h + m], u[8 * h + 4 + m], 0x88);
      v[8 * h + 4 + m] = _mm512_shuffle_f32x4(u[8 * h + m], u[8 * h + 4 + m], 0xdd);
    }
  POSENC_UNROLL
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(v[c], v[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v[c], v[8 + c], 0xdd);
  }
}

/// The sums of four vectors, in lanes 0-3 of the result: each one as ((x0 + x8) + (x4 + x12)),
/// then the four partial sums pairwise, (t0 + t2) + (t1 + t3), in every lane of the same arithmetic,
/// so a key's sum is the same bits whichever keys share its call (pages and blocks of any length).
POSENC_AVX512 inline __m128 sum4_avx512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  const __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD));
  const __m512 w = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));
  const __m512 x = _mm512_add_ps(w, _mm512_permute_ps(w, 0xB1));
  const __m512i lanes = _mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, x));
}

/// The vector helper type of AVX-512 (see POSENC_SOFTMAX_ROWS_BODY): 16 lanes, tails masked.
struct avx512_f32x16 {
  using reg = __m512;
  static constexpr index_t width = 16;
  POSENC_AVX512 static reg zero() { return _mm512_setzero_ps(); }
  POSENC_AVX512 static reg set1(float x) { return _mm512_set1_ps(x); }
  POSENC_AVX512 static reg load(const float* p) { return _mm512_loadu_ps(p); }
  template <half_storage H>
  POSENC_AVX512 static reg load(const H* p) {
    return load16(p);
  }
  template <class S>
  POSENC_AVX512 static reg load_spare(const S* p) {
    return load(p);
  }
  template <class S>
  POSENC_AVX512 static reg load_part(const S* p, index_t n) {
    return load16(p, tail_mask(n));
  }
  POSENC_AVX512 static reg load_or(const float* p, index_t n, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), tail_mask(n), p);
  }
  POSENC_AVX512 static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  POSENC_AVX512 static void store(float* p, reg v, index_t n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
  POSENC_AVX512 static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  POSENC_AVX512 static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  POSENC_AVX512 static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  POSENC_AVX512 static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  POSENC_AVX512 static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  POSENC_AVX512 static reg exp(reg x) { return exp_avx512(x); }
  POSENC_AVX512 static float reduce_add(reg x) { return _mm512_reduce_add_ps(x); }
  POSENC_AVX512 static float reduce_max(reg x) { return _mm512_reduce_max_ps(x); }
  POSENC_AVX512 __attribute__((always_inline)) static void transpose(reg r[16]) { transpose16(r); }
  /// The sums of `a0` .. `a3` (`sum4_avx512`'s order), the first `n` of them stored at `p`.
  POSENC_AVX512 __attribute__((always_inline)) static void reduce_add4(reg a0, reg a1, reg a2, reg a3, float* p,
                                                                       index_t n) {
    _mm_mask_storeu_ps(p, static_cast<__mmask8>((1u << n) - 1u), sum4_avx512(a0, a1, a2, a3));
  }
};

POSENC_AVX512 inline void softmax_avx512(float* s, index_t lds, index_t nq, index_t nk, float* m, float* l,
                                         float* alpha) {
  POSENC_SOFTMAX_ROWS_BODY(avx512_f32x16)
}

// QK^T: 8 query rows against 32 keys (16 accumulators of the 32 registers); PV: 6 rows by 64
// columns (24 accumulators).
POSENC_TILE_PRODUCTS(avx512, POSENC_AVX512, avx512_f32x16, 8, 2, 6, 4, 4)

// Decode QK^T: 4 query rows against 4 keys (16 accumulators, 4 query vectors and a key vector).
POSENC_KEY_KERNELS(avx512, POSENC_AVX512, avx512_f32x16, 4, 4)

/// `convert_f16` / `convert_bf16`: 16 columns per step, the tail masked.
template <class S>
POSENC_AVX512 inline void convert_avx512(const S* src, index_t lds, index_t n, index_t d, float factor, float* dst,
                                         index_t ldd) {
  POSENC_CONVERT_ROWS_BODY(avx512_f32x16)
}

#undef POSENC_AVX512

#if POSENC_KERNEL_TABLES
POSENC_KERNEL_TABLE const tile_kernels<float>& avx512_float_kernels() {
  static const tile_kernels<float> k{pack_kt_avx512,
                                     qk_avx512,
                                     qk_rows_avx512<float>,
                                     softmax_avx512,
                                     pv_avx512<float>,
                                     qk_rows_avx512<Eigen::half>,
                                     qk_rows_avx512<Eigen::bfloat16>,
                                     pv_avx512<Eigen::half>,
                                     pv_avx512<Eigen::bfloat16>,
                                     convert_avx512<Eigen::half>,
                                     convert_avx512<Eigen::bfloat16>,
                                     "avx512"};
  return k;
}
#else
const tile_kernels<float>& avx512_float_kernels();
#endif

// ---------------------------------------------------------------------------------------------
// AVX512_BF16: Q K^T on bf16 values (`attention_params::bf16_qk`) from pairs. A 32-bit word holds
// two bf16 values, the even column in its low half; `vdpbf16ps` multiplies the two pairs of each
// lane and adds both products (exact in float) to the float accumulator, so the QK^T block body
// runs unchanged on rows of pairs: the query's pairs broadcast, 16 keys' pairs per vector, half
// the instructions of the float block for the same products.
#define POSENC_AVX512_BF16 POSENC_TARGET_AVX512_BF16

/// `avx512_f32x16` whose lanes hold bf16 pairs, `fma` the pairs' dot product.
struct avx512_bf16_pairs : avx512_f32x16 {
  POSENC_AVX512_BF16 static reg fma(reg a, reg b, reg c) {
    return _mm512_dpbf16_ps(c, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
};

// 8 query rows against 32 keys, as the float block; the PV products are not used.
POSENC_TILE_PRODUCTS(avx512bf16, POSENC_AVX512_BF16, avx512_bf16_pairs, 8, 2, 6, 4, 4)

/// The packed key tile `kt` (`[d, ldkt]`, `ldkt` a multiple of 16, every value a bf16 already)
/// into rows of pairs, in place: row c of the result holds the pairs of rows 2c and 2c + 1 (0 past
/// `d`), the high halves of their floats. Row c is written after rows 2c and 2c + 1 are read.
POSENC_AVX512_BF16 inline void pair_rows_avx512bf16(float* kt, index_t ldkt, index_t d) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (index_t c = 0; 2 * c < d; ++c) {
    const float* even = kt + 2 * c * ldkt;
    const float* odd = 2 * c + 1 < d ? even + ldkt : nullptr;
    for (index_t j = 0; j < ldkt; j += 16) {
      const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(even + j)), 16);
      const __m512i hi = odd ? _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(odd + j)), high)
                             : _mm512_setzero_si512();
      _mm512_storeu_ps(kt + c * ldkt + j, _mm512_castsi512_ps(_mm512_or_si512(lo, hi)));
    }
  }
}

#undef POSENC_AVX512_BF16

#if POSENC_KERNEL_TABLES
POSENC_KERNEL_TABLE const bf16_pair_kernels& avx512bf16_pair_kernels() {
  static const bf16_pair_kernels k{pair_rows_avx512bf16, qk_avx512bf16};
  return k;
}
#else
const bf16_pair_kernels& avx512bf16_pair_kernels();
#endif

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 lanes, 16 registers.
#define POSENC_AVX2 POSENC_TARGET_AVX2

/// exp(x) for x <= 0, 8 lanes: as `exp_avx512`, with 2^n built in the exponent bits (n is in
/// [-126, 0], so 2^n is a normal float). Inputs below -87.3 (including -inf) give exactly 0;
/// NaN gives NaN.
POSENC_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 live = _mm256_cmp_ps(t, _mm256_set1_ps(-126.0f), _CMP_NLT_UQ);  // NaN stays NaN, as above
  const __m256 tc = _mm256_max_ps(_mm256_set1_ps(-126.0f), t);
  const __m256 n = _mm256_round_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(tc, n);
  __m256 p = _mm256_set1_ps(exp2_poly[0]);
  POSENC_UNROLL
  for (int k = 1; k < 7; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(exp2_poly[k]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

/// Lanes `[0, min(n, 8))` set, as a mask for `_mm256_maskload_ps` / `_mm256_maskstore_ps`.
POSENC_AVX2 inline __m256i tail_mask_avx2(index_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<index_t>(n, 8))), lanes);
}

/// 8 stored values at `p` as floats, as `load16`: fp16 through F16C's `vcvtph2ps`, bf16 by a shift.
POSENC_AVX2 inline __m256 widen8(__m128i h, const Eigen::half*) { return _mm256_cvtph_ps(h); }
POSENC_AVX2 inline __m256 widen8(__m128i h, const Eigen::bfloat16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
POSENC_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
template <half_storage H>
POSENC_AVX2 inline __m256 load8(const H* p) {
  return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), p);
}
/// `load8` of bf16 in one shuffle instead of two operations: the 16 bytes broadcast to both
/// halves (a load, no arithmetic) and `vpshufb` moving each value to the top of its lane, zeros
/// below. The same floats, one operation fewer per 8 values, but the shuffle's control takes a
/// register (see `avx2_f32x8::load_spare`).
POSENC_AVX2 inline __m256 load8_bf16_shuffled(const Eigen::bfloat16* p) {
  const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i to_high = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,  //
                                           -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(x, to_high));
}
/// The first `n` < 8 values at `p` (`mask` = `tail_mask_avx2(n)`), the other lanes 0, reading
/// nothing past them.
POSENC_AVX2 inline __m256 load8(const float* p, __m256i mask, index_t) { return _mm256_maskload_ps(p, mask); }
template <half_storage H>
POSENC_AVX2 inline __m256 load8(const H* p, __m256i, index_t n) {
  // AVX2 has no 16-bit masked load: the tail goes through a zeroed vector on the stack.
  alignas(16) std::uint16_t lanes[8] = {};
  std::memcpy(lanes, p, static_cast<std::size_t>(n) * sizeof(H));
  return widen8(_mm_load_si128(reinterpret_cast<const __m128i*>(lanes)), p);
}

POSENC_AVX2 inline float reduce_add_avx2(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

POSENC_AVX2 inline float reduce_max_avx2(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

POSENC_AVX2 __attribute__((always_inline)) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  POSENC_UNROLL
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  POSENC_UNROLL
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  POSENC_UNROLL
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

/// The vector helper type of AVX2 (see POSENC_SOFTMAX_ROWS_BODY): 8 lanes, float tails through
/// `vmaskmovps`, half-precision tails through a zeroed vector on the stack.
struct avx2_f32x8 {
  using reg = __m256;
  static constexpr index_t width = 8;
  POSENC_AVX2 static reg zero() { return _mm256_setzero_ps(); }
  POSENC_AVX2 static reg set1(float x) { return _mm256_set1_ps(x); }
  POSENC_AVX2 static reg load(const float* p) { return _mm256_loadu_ps(p); }
  template <half_storage H>
  POSENC_AVX2 static reg load(const H* p) {
    return load8(p);
  }
  template <class S>
  POSENC_AVX2 static reg load_spare(const S* p) {
    if constexpr (std::same_as<S, Eigen::bfloat16>) {
      return load8_bf16_shuffled(p);
    } else {
      return load(p);
    }
  }
  template <class S>
  POSENC_AVX2 static reg load_part(const S* p, index_t n) {
    return load8(p, tail_mask_avx2(n), n);
  }
  POSENC_AVX2 static reg load_or(const float* p, index_t n, float fill) {
    const __m256i mk = tail_mask_avx2(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, mk), _mm256_castsi256_ps(mk));
  }
  POSENC_AVX2 static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  POSENC_AVX2 static void store(float* p, reg v, index_t n) { _mm256_maskstore_ps(p, tail_mask_avx2(n), v); }
  POSENC_AVX2 static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  POSENC_AVX2 static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  POSENC_AVX2 static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  POSENC_AVX2 static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  POSENC_AVX2 static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  POSENC_AVX2 static reg exp(reg x) { return exp_avx2(x); }
  POSENC_AVX2 static float reduce_add(reg x) { return reduce_add_avx2(x); }
  POSENC_AVX2 static float reduce_max(reg x) { return reduce_max_avx2(x); }
  POSENC_AVX2 __attribute__((always_inline)) static void transpose(reg r[8]) { transpose8(r); }
  /// The sums of `a0` .. `a3`, the first `n` of them stored at `p`: each one in `reduce_add_avx2`'s
  /// order, ((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7)), so a key's sum has the bits of one
  /// vector's reduction. The 128-bit halves of all four are added (c = lo + hi), then c0 + c2 and
  /// c1 + c3 of the four together by unpacking, then their sums.
  POSENC_AVX2 __attribute__((always_inline)) static void reduce_add4(reg a0, reg a1, reg a2, reg a3, float* p,
                                                                     index_t n) {
    // [c(a0) | c(a1)], [c(a2) | c(a3)]
    const __m256 u01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
    const __m256 u23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
    // Lanes (e0, e2, o0, o2 | e1, e3, o1, o3): e_k = c_k[0] + c_k[2], o_k = c_k[1] + c_k[3] of key k.
    const __m256 eo = _mm256_add_ps(_mm256_unpacklo_ps(u01, u23), _mm256_unpackhi_ps(u01, u23));
    const __m128 lo = _mm256_castps256_ps128(eo), hi = _mm256_extractf128_ps(eo, 1);
    const __m128 sums = _mm_add_ps(_mm_unpacklo_ps(lo, hi), _mm_unpackhi_ps(lo, hi));  // e_k + o_k
    if (n >= 4) {
      _mm_storeu_ps(p, sums);
    } else {
      _mm_maskstore_ps(p, _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n)), _mm_setr_epi32(0, 1, 2, 3)), sums);
    }
  }
};

POSENC_AVX2 inline void softmax_avx2(float* s, index_t lds, index_t nq, index_t nk, float* m, float* l,
                                     float* alpha) {
  POSENC_SOFTMAX_ROWS_BODY(avx2_f32x8)
}

// QK^T: 6 query rows against 16 keys (12 accumulators of the 16 registers); PV: 6 rows by 16
// columns (12 accumulators); the PV of decode 4 rows by 24 columns (12 accumulators, 3 value
// vectors, a broadcast: 16 registers; d = 128 as 24 x 4 + 16 x 2 columns). Against 4 x 16
// columns: float, fp16 and bf16 values 0.77-0.80 -> 0.84-0.87 of the multiply-add peak (4 rows,
// 16 keys in L1, Zen 5).
POSENC_TILE_PRODUCTS(avx2, POSENC_AVX2, avx2_f32x8, 6, 2, 6, 2, 3)

// Decode QK^T: 3 query rows against 4 keys (12 accumulators, 3 query vectors and a key vector: all
// 16 registers, none spilled; 4 rows would need 16 accumulators). The compiler takes one query
// row from memory, leaving a register for the bf16 shuffle of `load_spare` (bf16 keys 0.69 -> 0.75
// of the multiply-add peak with the one-row blocks of 8 keys; 0.72 with them alone).
POSENC_KEY_KERNELS(avx2, POSENC_AVX2, avx2_f32x8, 3, 4)

/// `convert_f16` / `convert_bf16`: 8 columns per step, the tail masked.
template <class S>
POSENC_AVX2 inline void convert_avx2(const S* src, index_t lds, index_t n, index_t d, float factor, float* dst,
                                     index_t ldd) {
  POSENC_CONVERT_ROWS_BODY(avx2_f32x8)
}

#undef POSENC_AVX2
POSENC_SIMD_WARNINGS_ON

#if POSENC_KERNEL_TABLES
POSENC_KERNEL_TABLE const tile_kernels<float>& avx2_float_kernels() {
  static const tile_kernels<float> k{pack_kt_avx2,
                                     qk_avx2,
                                     qk_rows_avx2<float>,
                                     softmax_avx2,
                                     pv_avx2<float>,
                                     qk_rows_avx2<Eigen::half>,
                                     qk_rows_avx2<Eigen::bfloat16>,
                                     pv_avx2<Eigen::half>,
                                     pv_avx2<Eigen::bfloat16>,
                                     convert_avx2<Eigen::half>,
                                     convert_avx2<Eigen::bfloat16>,
                                     "avx2"};
  return k;
}
#else
const tile_kernels<float>& avx2_float_kernels();
#endif

#endif  // POSENC_HAVE_X86_KERNELS

#if POSENC_NEON_KERNELS

// ---------------------------------------------------------------------------------------------
// aarch64 Advanced SIMD (NEON): 4 lanes, 32 registers, every aarch64 CPU. Every tile operation
// (the prefill tile products, the key transpose, the few-row (decode) dot products, softmax and the
// half-precision widening) is NEON, from the bodies the x86 sets use.

/// exp(x) for x <= 0, 4 lanes: `exp_avx2`'s steps (`frintn` rounds to nearest even, as
/// `vroundps`; the polynomial by `fmla`), so the same value in every lane.
inline float32x4_t exp_neon(float32x4_t x) {
  const float32x4_t t = vmulq_f32(x, vdupq_n_f32(1.44269504088896341f));
  // Lanes below -126 give 0; NaN is not below it, so it stays live and comes out NaN.
  const uint32x4_t live = vmvnq_u32(vcltq_f32(t, vdupq_n_f32(-126.0f)));
  const float32x4_t tc = vmaxq_f32(vdupq_n_f32(-126.0f), t);
  const float32x4_t n = vrndnq_f32(tc);
  const float32x4_t f = vsubq_f32(tc, n);
  float32x4_t p = vdupq_n_f32(exp2_poly[0]);
  for (int k = 1; k < 7; ++k) p = vfmaq_f32(vdupq_n_f32(exp2_poly[k]), p, f);
  const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vreinterpretq_f32_u32(vandq_u32(live, vreinterpretq_u32_f32(vmulq_f32(p, vreinterpretq_f32_s32(bits)))));
}

/// The vector helper type of NEON (see POSENC_SOFTMAX_ROWS_BODY): 4 lanes; no masked loads, so a
/// tail goes through a 4-lane buffer on the stack. fp16 widens by `fcvtl`, bf16 by `shll #16`.
struct neon_f32x4 {
  using reg = float32x4_t;
  static constexpr index_t width = 4;
  static reg zero() { return vdupq_n_f32(0.0f); }
  static reg set1(float x) { return vdupq_n_f32(x); }
  static reg load(const float* p) { return vld1q_f32(p); }
  static reg widen(uint16x4_t h, const Eigen::half*) { return vcvt_f32_f16(vreinterpret_f16_u16(h)); }
  static reg widen(uint16x4_t h, const Eigen::bfloat16*) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }
  template <half_storage H>
  static reg load(const H* p) {
    return widen(vld1_u16(reinterpret_cast<const std::uint16_t*>(p)), p);
  }
  template <class S>
  static reg load_spare(const S* p) {
    return load(p);
  }
  static reg load_part(const float* p, index_t n) { return load_or(p, n, 0.0f); }
  template <half_storage H>
  static reg load_part(const H* p, index_t n) {
    std::uint16_t lanes[4] = {0, 0, 0, 0};
    std::memcpy(lanes, p, static_cast<std::size_t>(n) * sizeof(H));
    return widen(vld1_u16(lanes), p);
  }
  static reg load_or(const float* p, index_t n, float fill) {
    float lanes[4] = {fill, fill, fill, fill};
    std::memcpy(lanes, p, static_cast<std::size_t>(n) * sizeof(float));
    return vld1q_f32(lanes);
  }
  static void store(float* p, reg v) { vst1q_f32(p, v); }
  static void store(float* p, reg v, index_t n) {
    float lanes[4];
    vst1q_f32(lanes, v);
    std::memcpy(p, lanes, static_cast<std::size_t>(n) * sizeof(float));
  }
  static reg add(reg a, reg b) { return vaddq_f32(a, b); }
  static reg sub(reg a, reg b) { return vsubq_f32(a, b); }
  static reg mul(reg a, reg b) { return vmulq_f32(a, b); }
  static reg fma(reg a, reg b, reg c) { return vfmaq_f32(c, a, b); }
  static reg max(reg a, reg b) { return vmaxq_f32(a, b); }
  static reg exp(reg x) { return exp_neon(x); }
  static float reduce_add(reg x) { return vaddvq_f32(x); }
  static float reduce_max(reg x) { return vmaxvq_f32(x); }
  /// 4 x 4 in registers: `trn1` / `trn2` of 32-bit lanes of row pairs, then of 64-bit halves.
  __attribute__((always_inline)) static void transpose(reg r[4]) {
    const float64x2_t a0 = vreinterpretq_f64_f32(vtrn1q_f32(r[0], r[1]));  // r0[0] r1[0] r0[2] r1[2]
    const float64x2_t a1 = vreinterpretq_f64_f32(vtrn2q_f32(r[0], r[1]));  // r0[1] r1[1] r0[3] r1[3]
    const float64x2_t b0 = vreinterpretq_f64_f32(vtrn1q_f32(r[2], r[3]));
    const float64x2_t b1 = vreinterpretq_f64_f32(vtrn2q_f32(r[2], r[3]));
    r[0] = vreinterpretq_f32_f64(vtrn1q_f64(a0, b0));
    r[1] = vreinterpretq_f32_f64(vtrn1q_f64(a1, b1));
    r[2] = vreinterpretq_f32_f64(vtrn2q_f64(a0, b0));
    r[3] = vreinterpretq_f32_f64(vtrn2q_f64(a1, b1));
  }
  /// The sums of `a0` .. `a3`, the first `n` of them stored at `p`: each (x0 + x1) + (x2 + x3)
  /// (`faddp` twice, the order of `vaddvq_f32`).
  __attribute__((always_inline)) static void reduce_add4(reg a0, reg a1, reg a2, reg a3, float* p, index_t n) {
    const reg sums = vpaddq_f32(vpaddq_f32(a0, a1), vpaddq_f32(a2, a3));
    if (n >= 4) {
      vst1q_f32(p, sums);
    } else {
      store(p, sums, n);
    }
  }
};

inline void softmax_neon(float* s, index_t lds, index_t nq, index_t nk, float* m, float* l, float* alpha) {
  POSENC_SOFTMAX_ROWS_BODY(neon_f32x4)
}

template <class S>
inline void convert_neon(const S* src, index_t lds, index_t n, index_t d, float factor, float* dst, index_t ldd) {
  POSENC_CONVERT_ROWS_BODY(neon_f32x4)
}

// QK^T: 5 query rows against 16 keys; PV: 5 rows by 16 columns. Either takes 20 accumulators, 4
// key or value vectors and 5 query values or weights (multiplied by lane, `fmla v.4s, v.4s, v.s[0]`)
// of the 32 registers; with 6 rows GCC spills two accumulators in the loop.
POSENC_TILE_PRODUCTS(neon, , neon_f32x4, 5, 4, 5, 4, 4)

// Decode QK^T: 4 query rows against 4 keys: 16 accumulators, 4 key and 4 query vectors (`fmla`
// takes no memory operand) of the 32 registers.
POSENC_KEY_KERNELS(neon, , neon_f32x4, 4, 4)

#if POSENC_KERNEL_TABLES
POSENC_KERNEL_TABLE const tile_kernels<float>& neon_float_kernels() {
  static const tile_kernels<float> k{pack_kt_neon,
                                     qk_neon,
                                     qk_rows_neon<float>,
                                     softmax_neon,
                                     pv_neon<float>,
                                     qk_rows_neon<Eigen::half>,
                                     qk_rows_neon<Eigen::bfloat16>,
                                     pv_neon<Eigen::half>,
                                     pv_neon<Eigen::bfloat16>,
                                     convert_neon<Eigen::half>,
                                     convert_neon<Eigen::bfloat16>,
                                     "neon"};
  return k;
}
#else
const tile_kernels<float>& neon_float_kernels();
#endif

#endif  // POSENC_NEON_KERNELS

#undef POSENC_SOFTMAX_ROWS_BODY
#undef POSENC_CONVERT_ROWS_BODY
#undef POSENC_QK_BLOCK_BODY
#undef POSENC_PV_BLOCK_BODY
#undef POSENC_PACK_KT_BODY
#undef POSENC_QK_ROWS_BLOCK_BODY
#undef POSENC_KEY_KERNELS
#undef POSENC_UNROLL
#undef POSENC_TILE_PRODUCTS
#undef POSENC_INLINE_BLOCK
#undef POSENC_KERNEL_TABLES
#undef POSENC_KERNEL_TABLE

/// The bf16 pair kernels when the CPU has AVX512_BF16 and the level in use is AVX-512; null
/// otherwise (the float kernels then multiply the rounded values).
inline const bf16_pair_kernels* bf16_pair_kernels_in_use() {
#if POSENC_HAVE_X86_KERNELS
  if (simd_level_in_use() == simd_level::avx512 && cpu_has_avx512_bf16()) return &avx512bf16_pair_kernels();
#endif
  return nullptr;
}

/// The kernels for compute type `C`: for float, AVX-512 or AVX2 (x86) or NEON (aarch64) where the
/// CPU has it and the process-wide cap allows it (`detail::scoped_simd_cap`); portable otherwise.
template <class C>
const tile_kernels<C>& kernels_for() {
#if POSENC_HAVE_X86_KERNELS
  if constexpr (std::same_as<C, float>) {
    switch (simd_level_in_use()) {
      case simd_level::avx512: return avx512_float_kernels();
      case simd_level::avx2: return avx2_float_kernels();
      default: break;
    }
  }
#elif POSENC_NEON_KERNELS
  if constexpr (std::same_as<C, float>) {
    if (simd_level_in_use() == simd_level::neon) return neon_float_kernels();
  }
#endif
  return portable_kernels<C>();
}

}  // namespace posenc::detail
