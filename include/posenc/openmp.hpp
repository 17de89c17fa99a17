// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file openmp.hpp
/// `openmp_executor`: posenc's parallel loops on the OpenMP runtime, for hosts that already use
/// OpenMP. Opt-in: include this header only in code compiled with OpenMP (`-fopenmp`, or CMake's
/// `OpenMP::OpenMP_CXX`), and pass the executor to the calls or install it with
/// `posenc::set_default_executor`. No other posenc header uses OpenMP, so linking posenc never
/// adds `-fopenmp` to a program.

#if !defined(_OPENMP)
#error "posenc/openmp.hpp needs OpenMP: compile with -fopenmp (CMake: link OpenMP::OpenMP_CXX), or use posenc::thread_pool"
#endif

#include <omp.h>

#include <atomic>
#include <exception>
#include <mutex>

#include "posenc/executor.hpp"

namespace posenc {

/// Runs the items of a parallel loop in an OpenMP parallel region (`schedule(dynamic, 1)`),
/// worker `omp_get_thread_num()`. `concurrency()` is `omp_get_max_threads()` at the time of the
/// call. An exception thrown by an item is caught inside the region and rethrown after it.
class openmp_executor final : public executor {
 public:
  int concurrency() const noexcept override { return omp_get_max_threads(); }

  void parallel_for(index_t items, int workers, work_ref body) override {
    std::exception_ptr error;
    std::mutex m;
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(workers)
    {
      const int slot = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
      for (index_t i = 0; i < items; ++i) {
        if (failed.load(std::memory_order_relaxed)) continue;
        try {
          body(i, slot);
        } catch (...) {
          const std::lock_guard<std::mutex> lock(m);
          if (!error) error = std::current_exception();
          failed.store(true, std::memory_order_relaxed);
        }
      }
    }
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace posenc
