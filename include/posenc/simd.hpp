// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file simd.hpp
/// The instruction set posenc's kernels use, and the cap that lowers it.
///
/// Kernels come in several sets (portable C++, AVX2 + FMA, AVX-512, NEON on aarch64), chosen at
/// run time from a CPU check: a consumer's default build gets the best the machine has, with no
/// `-march`. Every set computes the same function (the RoPE kernels the same bits; attention
/// within float rounding). The cap lowers the set for the whole process, so one machine can test
/// and measure each set it has: `set_simd_cap(simd_level::avx2)` on an AVX-512 machine runs the
/// AVX2 kernels. The environment variable `POSENC_SIMD_CAP` (`portable`, `avx2`, `avx512`,
/// `neon`) does the same for programs that call `apply_simd_cap_from_environment()` at start-up:
/// posenc's tests, benchmarks and Python module do.
///
/// ```cpp
/// posenc::set_simd_cap(posenc::parse_simd_level("avx2"));
/// assert(posenc::simd_level_in_use() != posenc::simd_level::avx512);
/// ```

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

#include "posenc/detail/cpu.hpp"

namespace posenc {

/// A kernel set: `portable`, `avx2` (AVX2 + FMA + F16C), `avx512` (F, VL, BW, DQ), `neon`.
using simd_level = detail::simd_level;

/// The level's name: "portable", "avx2", "avx512" or "neon".
constexpr std::string_view simd_level_name(simd_level level) noexcept {
  switch (level) {
    case simd_level::portable: return "portable";
    case simd_level::avx2: return "avx2";
    case simd_level::avx512: return "avx512";
    case simd_level::neon: return "neon";
  }
  return "portable";
}

/// The level named `name` (as `simd_level_name` writes it). Throws `std::invalid_argument`, naming
/// `what` and the value, for any other name.
inline simd_level parse_simd_level(std::string_view name, std::string_view what = "simd level") {
  for (const simd_level l : {simd_level::portable, simd_level::avx2, simd_level::avx512, simd_level::neon})
    if (simd_level_name(l) == name) return l;
  throw std::invalid_argument("posenc: " + std::string(what) + " = '" + std::string(name) +
                              "' is not a kernel set; expected portable, avx2, avx512 or neon");
}

/// The best level this CPU and build support (the cap does not change it).
inline simd_level detected_simd_level() noexcept { return detail::detected_simd_level(); }

/// Whether this CPU has AVX512_BF16: where it does and the level in use is `avx512`, attention with
/// `attention_params::bf16_qk` computes Q K^T with its bf16 dot products (`vdpbf16ps`).
inline bool cpu_has_avx512_bf16() noexcept { return detail::cpu_has_avx512_bf16(); }

/// The level kernels use for calls that start now: the detected level lowered to the cap's tier.
/// A cap of `avx2` or `neon` allows the first vector set of either architecture (AVX2 on x86, NEON
/// on aarch64); `portable` forces the portable kernels; `avx512` (the default) caps nothing.
inline simd_level simd_level_in_use() noexcept { return detail::simd_level_in_use(); }

/// The cap (`avx512` when none was set).
inline simd_level simd_cap() noexcept { return static_cast<simd_level>(detail::simd_cap.load(std::memory_order_relaxed)); }

/// Sets the cap, process-wide, for calls that start after it returns (not for a call running on
/// another thread). It only lowers the level: a CPU without the named set uses the best it has.
inline void set_simd_cap(simd_level cap) noexcept { detail::set_simd_cap(cap); }

/// Applies `POSENC_SIMD_CAP` when it is set and not empty, and returns the level now in use.
/// Throws `std::invalid_argument` naming the variable and its value for a name it does not know,
/// so a typo does not silently test or measure another kernel set than the one asked for.
inline simd_level apply_simd_cap_from_environment() {
  const char* v = std::getenv("POSENC_SIMD_CAP");
  if (v != nullptr && *v != '\0') posenc::set_simd_cap(parse_simd_level(v, "POSENC_SIMD_CAP"));
  return simd_level_in_use();
}

/// Sets the cap for the lifetime of the object and restores the previous one after (tests and
/// benchmarks that run each kernel set in turn).
using scoped_simd_cap = detail::scoped_simd_cap;

}  // namespace posenc
