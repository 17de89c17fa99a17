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
#include <stdexcept>
#include <string>

#include "posenc/executor.hpp"
#include "posenc/simd.hpp"

namespace {

/// Applies POSENC_SIMD_CAP (`posenc::apply_simd_cap_from_environment`); false, with the library's
/// message, for a name it does not know.
bool apply_simd_cap() {
  try {
    const posenc::simd_level in_use = posenc::apply_simd_cap_from_environment();
    if (const char* v = std::getenv("POSENC_SIMD_CAP"); v != nullptr && *v != '\0')
      std::fprintf(stderr, "POSENC_SIMD_CAP=%s: kernels at level %s by default\n", v,
                   std::string(posenc::simd_level_name(in_use)).c_str());
    return true;
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return false;
  }
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
