// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/cpu.hpp
/// Internal: run-time choice of a SIMD code path.
///
/// posenc is header-only, so it is compiled with its includer's flags, often the x86-64 baseline
/// (SSE2). Hot kernels therefore come in several versions: a portable one in plain C++, and x86
/// versions compiled for AVX2 or AVX-512 through function-level target attributes
/// (`POSENC_TARGET_AVX2`, `POSENC_TARGET_AVX512`). `simd_level_in_use()` picks one at run time
/// from a CPU check, so one binary runs everywhere and uses what the machine has. On aarch64 the
/// 128-bit Advanced SIMD unit (NEON) is part of the base architecture: every aarch64 CPU has it, so
/// the NEON versions need neither a target attribute nor a CPU check.
///
/// Every version of a kernel must give the same bits as the portable one: kernels are written
/// without fused multiply-add (which rounds once instead of twice) and marked
/// `POSENC_STRICT_FP` / `POSENC_STRICT_FP_BODY` so the compiler does not contract `a*b - c*d`
/// into an FMA behind their back. (Only an explicit `-ffp-contract=fast` or `-ffast-math` from the
/// user can still change the bits.) `set_simd_cap` lowers the level, so tests compare the paths
/// and benchmarks measure each.
///
/// Define `POSENC_NO_SIMD_DISPATCH` to compile the portable paths only.

#include <atomic>
#include <cstddef>
#include <span>

#if !defined(POSENC_NO_SIMD_DISPATCH) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define POSENC_X86_DISPATCH 1
#include <cpuid.h>
#include <immintrin.h>
/// Marks a function compiled for AVX2 + FMA + F16C (Haswell and later, Zen). F16C (fp16 <-> fp32
/// conversion, `vcvtph2ps`) predates AVX2 (Ivy Bridge, Piledriver): every AVX2 CPU has it.
#define POSENC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
/// Marks a function compiled for AVX-512 F/VL/BW/DQ (Skylake-SP and later, Zen 4).
#define POSENC_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
/// Marks a function compiled for AVX-512 with AVX512_BF16 (`vdpbf16ps`; Cooper Lake, Sapphire
/// Rapids, Zen 4 and later).
#define POSENC_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")))
#else
#define POSENC_X86_DISPATCH 0
#endif

// NEON kernels: little-endian aarch64 (the lane shuffles assume its lane order), GCC or clang.
#if !defined(POSENC_NO_SIMD_DISPATCH) && defined(__aarch64__) && defined(__AARCH64EL__) && defined(__ARM_NEON) && \
    (defined(__GNUC__) || defined(__clang__))
#define POSENC_NEON_KERNELS 1
#include <arm_neon.h>
#else
#define POSENC_NEON_KERNELS 0
#endif

// GCC 12 reports its own `_mm*_undefined_*` placeholders as uninitialised when intrinsics are
// used under a target attribute rather than -m flags; the values are never read. Kernels that
// use intrinsics sit between these two macros.
#if defined(__GNUC__) && !defined(__clang__)
#define POSENC_SIMD_WARNINGS_OFF                                   \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define POSENC_SIMD_WARNINGS_ON _Pragma("GCC diagnostic pop")
#else
#define POSENC_SIMD_WARNINGS_OFF
#define POSENC_SIMD_WARNINGS_ON
#endif

#if defined(__clang__)
#define POSENC_STRICT_FP
/// First statement of a kernel body: no FMA contraction in this function (clang).
#define POSENC_STRICT_FP_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
/// Function attribute: no FMA contraction in this function (g++ contracts across statements
/// under its default `-ffp-contract=fast` in GNU modes).
#define POSENC_STRICT_FP __attribute__((optimize("fp-contract=off")))
#define POSENC_STRICT_FP_BODY
#else
#define POSENC_STRICT_FP
#define POSENC_STRICT_FP_BODY
#endif

namespace posenc::detail {

/// Code paths. On x86 they are in increasing order of capability (portable < avx2 < avx512); NEON
/// is the aarch64 counterpart of AVX2 (see `simd_tier`). The values are stable: benchmarks and the
/// test suite name levels by them.
enum class simd_level : int {
  portable = 0,  ///< plain C++, any CPU
  avx2 = 1,      ///< AVX2 + FMA + F16C
  avx512 = 2,    ///< AVX-512 F, VL, BW, DQ
  neon = 3,      ///< aarch64 Advanced SIMD (128-bit, with FMA and fp16 conversion)
};

/// The tier of a level, which is what a cap compares: 0 for portable, 1 for the first vector set of
/// an architecture (AVX2 + FMA, NEON), 2 for AVX-512. So a cap of `avx2` (or `neon`) allows NEON on
/// aarch64 and AVX2 on x86, and `portable` forces the portable path everywhere.
constexpr int simd_tier(simd_level level) noexcept {
  switch (level) {
    case simd_level::portable: return 0;
    case simd_level::avx2: return 1;
    case simd_level::avx512: return 2;
    case simd_level::neon: return 1;
  }
  return 0;
}

/// The best level this CPU (and operating system) supports and this build can target. Cached.
inline simd_level detected_simd_level() noexcept {
#if POSENC_X86_DISPATCH
  static const simd_level level = [] {
    __builtin_cpu_init();
    // Both x86 levels use F16C too; checked rather than assumed, for emulators and hypervisors that
    // hide features one by one. By CPUID (leaf 1, ECX bit 29): clang before 16 has no "f16c" in
    // __builtin_cpu_supports.
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return simd_level::avx512;
    }
    if (avx2) return simd_level::avx2;
    return simd_level::portable;
  }();
  return level;
#elif POSENC_NEON_KERNELS
  return simd_level::neon;
#else
  return simd_level::portable;
#endif
}

/// Whether the CPU has AVX512_BF16 (CPUID leaf 7, sub-leaf 1, EAX bit 5) besides the `avx512`
/// level (whose check includes the operating system's support of the AVX-512 registers). Cached.
inline bool cpu_has_avx512_bf16() noexcept {
#if POSENC_X86_DISPATCH
  static const bool has = [] {
    if (detected_simd_level() != simd_level::avx512) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax & (1u << 5)) != 0;
  }();
  return has;
#else
  return false;
#endif
}

/// The highest level kernels may use; `set_simd_cap` lowers it (process-wide).
inline std::atomic<int> simd_cap{static_cast<int>(simd_level::avx512)};

/// Caps the level kernels use (tests force the portable path with `simd_level::portable`).
/// Process-wide; affects calls that start after it returns.
inline void set_simd_cap(simd_level cap) noexcept { simd_cap.store(static_cast<int>(cap), std::memory_order_relaxed); }

/// The level kernels use now: the detected level, lowered to the cap's tier (`simd_tier`): the
/// best level of this CPU's architecture whose tier is at most the cap's.
inline simd_level simd_level_in_use() noexcept {
  const simd_level detected = detected_simd_level();
  const int cap = simd_tier(static_cast<simd_level>(simd_cap.load(std::memory_order_relaxed)));
  if (simd_tier(detected) <= cap) return detected;
  // Only AVX-512 (tier 2) has a level between it and portable.
  return cap >= 1 && detected == simd_level::avx512 ? simd_level::avx2 : simd_level::portable;
}

/// The levels this CPU can run, lowest first (always `portable` first): each is the level in use
/// under a cap of itself, so tests and benchmarks run every kernel set by capping to each in turn.
inline std::span<const simd_level> available_simd_levels() noexcept {
#if POSENC_X86_DISPATCH
  static constexpr simd_level all[] = {simd_level::portable, simd_level::avx2, simd_level::avx512};
#elif POSENC_NEON_KERNELS
  static constexpr simd_level all[] = {simd_level::portable, simd_level::neon};
#else
  static constexpr simd_level all[] = {simd_level::portable};
#endif
  const simd_level top = detected_simd_level();
  std::size_t n = 1;
  while (n < std::size(all) && all[n - 1] != top) ++n;
  return {all, all[n - 1] == top ? n : 1};
}

/// Sets the cap for the lifetime of the object and restores the previous one after.
class scoped_simd_cap {
 public:
  explicit scoped_simd_cap(simd_level cap) noexcept : previous_(simd_cap.load(std::memory_order_relaxed)) {
    set_simd_cap(cap);
  }
  ~scoped_simd_cap() { simd_cap.store(previous_, std::memory_order_relaxed); }
  scoped_simd_cap(const scoped_simd_cap&) = delete;
  scoped_simd_cap& operator=(const scoped_simd_cap&) = delete;

 private:
  int previous_;
};

}  // namespace posenc::detail
