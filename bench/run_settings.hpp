// The run settings scripts/bench passes to every benchmark executable through the environment;
// a bare run of an executable gets the defaults.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

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

}  // namespace posenc_bench
