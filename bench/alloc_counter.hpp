// Counts the heap: every byte the program asks malloc for (operator new and Eigen's aligned
// allocations both end there), so a benchmark can report the peak of its kernel's own
// allocations. Include this header in exactly one translation unit per executable: it defines
// the C allocation functions, which glibc lets a program replace ("Replacing malloc" in the
// glibc manual), forwarding to glibc's own implementation.
//
// Sizes are malloc_usable_size of each block (at least what was asked for, rounded up to the
// allocator's granularity), so that free can subtract exactly what malloc added.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#if !defined(__GLIBC__)
#error "bench/alloc_counter.hpp forwards to glibc's allocator"
#endif

#include <cerrno>
#include <cstdlib>
#include <malloc.h>
#if defined(__SSE__)
// Declares posix_memalign again (clang's copy without noexcept): it must come before the
// definition below, as it does when Eigen is included first.
#include <mm_malloc.h>
#endif

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}

namespace posenc_bench::heap {

namespace detail {
inline std::atomic<std::int64_t> current{0};
inline std::atomic<std::int64_t> peak{0};
inline std::atomic<std::int64_t> allocs{0};
inline std::atomic<std::int64_t> total{0};

inline void* added(void* p) {
  if (p == nullptr) return p;
  const auto n = static_cast<std::int64_t>(malloc_usable_size(p));
  const std::int64_t now = current.fetch_add(n, std::memory_order_relaxed) + n;
  std::int64_t seen = peak.load(std::memory_order_relaxed);
  while (now > seen && !peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
  }
  allocs.fetch_add(1, std::memory_order_relaxed);
  total.fetch_add(n, std::memory_order_relaxed);
  return p;
}

inline void removed(void* p) {
  if (p != nullptr) current.fetch_sub(static_cast<std::int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
}
}  // namespace detail

/// Bytes held now.
inline std::int64_t current() { return detail::current.load(std::memory_order_relaxed); }
/// Highest `current()` since the last `reset()`.
inline std::int64_t peak() { return detail::peak.load(std::memory_order_relaxed); }
/// Allocations since the last `reset()`.
inline std::int64_t allocations() { return detail::allocs.load(std::memory_order_relaxed); }
/// Bytes allocated since the last `reset()` (freed or not).
inline std::int64_t allocated() { return detail::total.load(std::memory_order_relaxed); }
/// Starts a new measurement: the peak drops to what is held now, the counts to zero.
inline void reset() {
  detail::peak.store(current(), std::memory_order_relaxed);
  detail::allocs.store(0, std::memory_order_relaxed);
  detail::total.store(0, std::memory_order_relaxed);
}

}  // namespace posenc_bench::heap

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer) || __has_feature(thread_sanitizer)
#define POSENC_BENCH_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define POSENC_BENCH_SANITIZED 1
#endif

// A sanitizer owns malloc: the counters then stay at zero.
#if !defined(POSENC_BENCH_SANITIZED)
extern "C" {
void* malloc(std::size_t n) noexcept { return posenc_bench::heap::detail::added(__libc_malloc(n)); }
void* calloc(std::size_t count, std::size_t n) noexcept { return posenc_bench::heap::detail::added(__libc_calloc(count, n)); }
void* realloc(void* p, std::size_t n) noexcept {
  // Counted as a free and a new block (realloc may move it or resize it in place).
  const auto before = p != nullptr ? static_cast<std::int64_t>(malloc_usable_size(p)) : 0;
  void* q = __libc_realloc(p, n);
  if (q == nullptr && n != 0) return q;  // p is untouched
  posenc_bench::heap::detail::current.fetch_sub(before, std::memory_order_relaxed);
  return posenc_bench::heap::detail::added(q);
}
void free(void* p) noexcept {
  posenc_bench::heap::detail::removed(p);
  __libc_free(p);
}
void* memalign(std::size_t align, std::size_t n) noexcept { return posenc_bench::heap::detail::added(__libc_memalign(align, n)); }
void* aligned_alloc(std::size_t align, std::size_t n) noexcept { return memalign(align, n); }
int posix_memalign(void** out, std::size_t align, std::size_t n) noexcept {
  if (align < sizeof(void*) || (align & (align - 1)) != 0) return EINVAL;
  void* p = memalign(align, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
void* valloc(std::size_t n) noexcept { return memalign(4096, n); }
void* pvalloc(std::size_t n) noexcept { return memalign(4096, (n + 4095) / 4096 * 4096); }
}  // extern "C"
#endif
