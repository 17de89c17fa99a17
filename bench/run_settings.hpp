// The run settings scripts/bench passes to every benchmark executable through the environment;
// a bare run of an executable gets the defaults.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

#include "posenc/detail/cpu.hpp"
#include "posenc/simd.hpp"

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

inline std::string_view simd_name(posenc::simd_level level) { return posenc::simd_level_name(level); }

/// The highest SIMD level the kernels may use: POSENC_SIMD_CAP = portable, avx2, avx512 or neon
/// (unset or empty: avx512, no cap; `neon` is the tier of `avx2`, see `posenc::simd_level_in_use`).
/// It only lowers the level: a CPU without the named set uses the best it has. An unknown name
/// ends the program with the library's message, so that a typo does not measure another
/// instruction set than the one asked for.
inline posenc::simd_level simd_cap_setting() {
  const char* v = std::getenv("POSENC_SIMD_CAP");
  if (v == nullptr || *v == '\0') return posenc::simd_level::avx512;
  try {
    return posenc::parse_simd_level(v, "POSENC_SIMD_CAP");
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s\n", e.what());
    std::exit(2);
  }
}

/// Applies POSENC_SIMD_CAP to the library (`posenc::set_simd_cap`). Runs once at start-up,
/// through `simd_cap_applied`, before any benchmark is registered or run.
inline bool apply_simd_cap() {
  posenc::set_simd_cap(simd_cap_setting());
  return true;
}

inline const bool simd_cap_applied = apply_simd_cap();

}  // namespace posenc_bench
