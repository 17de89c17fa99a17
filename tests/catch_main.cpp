// The Catch2 main, compiled once for every test executable.
//
// Calls that ask for more than one thread (`attention_params::threads`, `rope::rotate`) run on a
// pool of four workers installed as the default executor, more than the cores of a small CI
// machine, so that work items interleave as they do on a large one.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "posenc/executor.hpp"

int main(int argc, char* argv[]) {
  posenc::thread_pool pool(4);
  posenc::set_default_executor(&pool);
  const int failed = Catch::Session().run(argc, argv);
  posenc::set_default_executor(nullptr);
  return failed;
}
