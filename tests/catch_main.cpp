// The Catch2 main, compiled once for every test executable.
//
// Calls that ask for more than one thread (`attention_params::threads`, `rope::rotate`) run on a
// pool of four workers installed as the default executor, more than the cores of a small CI
// machine, so that work items interleave as they do on a large one.
//
// POSENC_SIMD_CAP (portable, avx2, avx512 or neon, as for the benchmarks) caps the kernels every
// test uses by default, so one machine runs the whole suite on each kernel set it has; tests that
// compare the sets still raise the cap to each set in turn.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <utility>

#include "posenc/detail/cpu.hpp"
#include "posenc/executor.hpp"

namespace {

/// Applies POSENC_SIMD_CAP; false (with a message) for a name it does not know.
bool apply_simd_cap() {
  using posenc::detail::simd_level;
  const char* v = std::getenv("POSENC_SIMD_CAP");
  const std::string_view cap = v != nullptr ? v : "";
  if (cap.empty()) return true;
  constexpr std::pair<std::string_view, simd_level> names[] = {{"portable", simd_level::portable},
                                                               {"avx2", simd_level::avx2},
                                                               {"avx512", simd_level::avx512},
                                                               {"neon", simd_level::neon}};
  for (const auto& [name, level] : names) {
    if (name == cap) {
      posenc::detail::set_simd_cap(level);
      std::fprintf(stderr, "POSENC_SIMD_CAP=%s: kernels at level %d by default\n", v,
                  static_cast<int>(posenc::detail::simd_level_in_use()));
      return true;
    }
  }
  std::fprintf(stderr, "POSENC_SIMD_CAP=%s: expected portable, avx2, avx512 or neon\n", v);
  return false;
}

}  // namespace

int main(int argc, char* argv[]) {
  if (!apply_simd_cap()) return 2;
  posenc::thread_pool pool(4);
  posenc::set_default_executor(&pool);
  const int failed = Catch::Session().run(argc, argv);
  posenc::set_default_executor(nullptr);
  return failed;
}
