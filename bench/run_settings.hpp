// The run settings scripts/bench passes to every benchmark executable through the environment;
// a bare run of an executable gets the defaults.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "posenc/detail/cpu.hpp"

namespace posenc_bench {

/// Size of the sweep: POSENC_BENCH_MODE = quick, default or full.
enum class run_mode { quick, normal, full };

inline run_mode mode() {
  const char* m = std::getenv("POSENC_BENCH_MODE");
  const std::string_view s = m != nullptr ? m : "";
  return s == "quick" ? run_mode::quick : s == "full" ? run_mode::full : run_mode::normal;
}

/// quick / default / full.
inline long by_mode(long quick, long normal, long full) {
  switch (mode()) {
    case run_mode::quick: return quick;
    case run_mode::full: return full;
    default: return normal;
  }
}

constexpr double gib = 1024.0 * 1024.0 * 1024.0;

/// Memory a naive point may need, in bytes: POSENC_BENCH_MEM_LIMIT_GIB (default 8).
inline double memory_limit() {
  const char* v = std::getenv("POSENC_BENCH_MEM_LIMIT_GIB");
  const double g = v != nullptr ? std::atof(v) : 0.0;
  return (g > 0 ? g : 8.0) * gib;
}

/// "skipped: would need 16 GiB" (the figure rounded to 2 significant digits).
inline std::string skip_message(double bytes) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "skipped: would need %.2g GiB", bytes / gib);
  return buf;
}

// ---- instruction set ----

/// The names POSENC_SIMD_CAP takes, in the order of `posenc::detail::simd_level` (lowest first).
inline constexpr std::string_view simd_names[] = {"portable", "avx2", "avx512", "neon"};

inline std::string_view simd_name(posenc::detail::simd_level level) { return simd_names[static_cast<int>(level)]; }

/// The highest SIMD level the kernels may use: POSENC_SIMD_CAP = portable, avx2, avx512 or neon
/// (unset or empty: avx512, no cap; `neon` is the tier of `avx2`, see `posenc::detail::simd_tier`). It only lowers the level: a CPU without the named set uses the best
/// it has. An unknown name ends the program with a message, so that a typo does not measure
/// another instruction set than the one asked for.
inline posenc::detail::simd_level simd_cap_setting() {
  const char* v = std::getenv("POSENC_SIMD_CAP");
  const std::string_view s = v != nullptr ? v : "";
  if (s.empty()) return posenc::detail::simd_level::avx512;
  for (int i = 0; i < static_cast<int>(std::size(simd_names)); ++i)
    if (simd_names[i] == s) return static_cast<posenc::detail::simd_level>(i);
  std::fprintf(stderr, "POSENC_SIMD_CAP=%s: expected portable, avx2, avx512 or neon\n", v);
  std::exit(2);
}

/// Applies POSENC_SIMD_CAP to the library (`posenc::detail::set_simd_cap`). Runs once at start-up,
/// through `simd_cap_applied`, before any benchmark is registered or run.
inline bool apply_simd_cap() {
  posenc::detail::set_simd_cap(simd_cap_setting());
  return true;
}

inline const bool simd_cap_applied = apply_simd_cap();

}  // namespace posenc_bench
