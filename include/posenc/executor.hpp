// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file executor.hpp
/// Where posenc's parallel work runs: a small parallel-for interface the host may implement on
/// its own thread pool, and two implementations (the calling thread only, and a pool of
/// `std::thread`s). OpenMP is a third, opt-in one in `posenc/openmp.hpp`.
///
/// Every parallel entry point (`attention`, ring attention, `rope::rotate`) cuts its work into
/// items whose results do not depend on which worker runs them or when, so the output is the same,
/// bit for bit, on any executor and any number of workers. An entry point takes an `executor*`
/// (`attention_params::executor`, or an argument); `nullptr` means `default_executor()`, which is
/// the calling thread alone until the host installs another with `set_default_executor`. posenc
/// itself never starts a thread: a `thread_pool` starts its threads when the host constructs it.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/types.hpp"

namespace posenc {

/// A non-owning reference to a callable `void(index_t item, int worker)`: what `parallel_for`
/// runs. Cheap to copy, never allocates; the callable must outlive it.
class work_ref {
 public:
  template <class F>
    requires(!std::same_as<std::remove_cvref_t<F>, work_ref> && std::is_invocable_v<F&, index_t, int>)
  work_ref(F& f) noexcept  // NOLINT(google-explicit-constructor): a reference wrapper
      : obj_(static_cast<void*>(std::addressof(f))), call_([](void* o, index_t item, int worker) {
          (*static_cast<F*>(o))(item, worker);
        }) {}

  void operator()(index_t item, int worker) const { call_(obj_, item, worker); }

 private:
  void* obj_;
  void (*call_)(void*, index_t, int);
};

/// Runs the items of a parallel loop. Implement it to run posenc on the host's own thread pool.
class executor {
 public:
  virtual ~executor() = default;

  /// How many workers may run items at once (>= 1), the calling thread included.
  virtual int concurrency() const noexcept = 0;

  /// Calls `body(item, worker)` once for every `item` in `[0, items)` and returns when all calls
  /// have returned. `worker` identifies the worker running the call, in `[0, min(workers,
  /// concurrency()))`: calls that run at the same time never share it (posenc gives each worker
  /// its own scratch memory). Items may run in any order, on any thread, the caller's included.
  /// If a call throws, items not yet started may be skipped, and the first exception is rethrown
  /// here once every started call has returned. `workers >= 1`.
  virtual void parallel_for(index_t items, int workers, work_ref body) = 0;
};

/// Runs every item on the calling thread, in order.
class serial_executor final : public executor {
 public:
  int concurrency() const noexcept override { return 1; }
  void parallel_for(index_t items, int, work_ref body) override {
    for (index_t i = 0; i < items; ++i) body(i, 0);
  }
};

/// A fixed pool of `std::thread`s, started by the constructor and joined by the destructor; the
/// thread that calls `parallel_for` works too, so a pool of `n` has `n - 1` threads of its own.
///
/// `parallel_for` allocates nothing. Waiting threads spin briefly, then sleep on a condition
/// variable. Calls from several threads at once take turns; a `parallel_for` called from inside
/// an item of the same pool runs its items on the calling thread (no deadlock).
class thread_pool final : public executor {
 public:
  /// A pool of `threads` workers in all (the caller included); 0 means
  /// `std::thread::hardware_concurrency()`. Throws `std::invalid_argument` for `threads < 0` and
  /// `std::system_error` when a thread cannot be started.
  explicit thread_pool(int threads = 0) {
    detail::require(threads >= 0, "thread_pool threads", threads, "must be >= 0 (0 = one per hardware thread)");
    const unsigned hw = std::thread::hardware_concurrency();
    size_ = threads > 0 ? threads : static_cast<int>(std::max(1u, hw));
    threads_.reserve(static_cast<std::size_t>(size_ - 1));
    try {
      for (int t = 1; t < size_; ++t) threads_.emplace_back([this] { serve(); });
    } catch (...) {
      stop();
      throw;
    }
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() override { stop(); }

  int concurrency() const noexcept override { return size_; }

  void parallel_for(index_t items, int workers, work_ref body) override {
    workers = std::min({workers, size_, static_cast<int>(std::min<index_t>(items, size_))});
    if (workers <= 1 || inside_ == this) {
      for (index_t i = 0; i < items; ++i) body(i, 0);
      return;
    }
    const std::lock_guard<std::mutex> turn(turn_);  // one loop at a time
    {
      const std::lock_guard<std::mutex> lock(m_);
      job_ = job{&body, items, workers};
      next_.store(0, std::memory_order_relaxed);
      slots_.store(1, std::memory_order_relaxed);  // slot 0 is the caller's
      failed_.store(false, std::memory_order_relaxed);
      error_ = nullptr;
      active_ = 0;
      open_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(m_);
    open_ = false;  // threads that wake from now on stay out
    done_.wait(lock, [this] { return active_ == 0; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  struct job {
    const work_ref* body = nullptr;
    index_t items = 0;
    int workers = 0;
  };

  // Takes items until none is left.
  void work(int slot) {
    const executor* outer = inside_;
    inside_ = this;
    for (;;) {
      const index_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= job_.items || failed_.load(std::memory_order_relaxed)) break;
      try {
        (*job_.body)(i, slot);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(m_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true, std::memory_order_relaxed);
      }
    }
    inside_ = outer;
  }

  void serve() {
    std::uint64_t seen = 0;
    for (;;) {
      // Spin a little: items of consecutive calls often follow each other closely.
      for (int spin = 0; spin < 2000 && generation_.load(std::memory_order_acquire) == seen && !quit_.load(); ++spin)
        std::this_thread::yield();
      std::unique_lock<std::mutex> lock(m_);
      wake_.wait(lock, [&] { return quit_.load() || generation_.load(std::memory_order_relaxed) != seen; });
      if (quit_.load()) return;
      seen = generation_.load(std::memory_order_relaxed);
      if (!open_) continue;
      const int slot = slots_.fetch_add(1, std::memory_order_relaxed);
      if (slot >= job_.workers) continue;
      ++active_;
      lock.unlock();
      work(slot);
      lock.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  void stop() {
    {
      const std::lock_guard<std::mutex> lock(m_);
      quit_.store(true);
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }

  static inline thread_local const executor* inside_ = nullptr;

  int size_ = 1;
  std::vector<std::thread> threads_;
  std::mutex turn_;
  std::mutex m_;
  std::condition_variable wake_, done_;
  job job_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<index_t> next_{0};
  std::atomic<int> slots_{0};
  std::atomic<bool> failed_{false};
  std::atomic<bool> quit_{false};
  std::exception_ptr error_;
  int active_ = 0;
  bool open_ = false;
};

namespace detail {
inline serial_executor& serial_instance() {
  static serial_executor e;
  return e;
}
inline std::atomic<executor*>& default_executor_slot() {
  static std::atomic<executor*> slot{nullptr};
  return slot;
}
}  // namespace detail

/// The executor used when a call is given none: the calling thread alone, unless the host
/// installed another with `set_default_executor`.
inline executor& default_executor() noexcept {
  executor* e = detail::default_executor_slot().load(std::memory_order_acquire);
  return e ? *e : detail::serial_instance();
}

/// Makes `e` the executor of calls given none (`nullptr`: back to the calling thread). The host
/// keeps `e` alive while it is installed. Takes effect for calls that start after it returns.
inline void set_default_executor(executor* e) noexcept {
  detail::default_executor_slot().store(e, std::memory_order_release);
}

namespace detail {

/// The executor a call runs on, and how many workers it may use: `requested` (0 = all of them).
struct workers_of {
  executor* ex;
  int count;
  workers_of(executor* e, int requested) : ex(e ? e : &default_executor()) {
    const int c = std::max(1, ex->concurrency());
    count = requested > 0 ? std::min(requested, c) : c;
  }
};

}  // namespace detail
}  // namespace posenc
