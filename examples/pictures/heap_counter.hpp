// SPDX-License-Identifier: Apache-2.0
// Measures the heap: replaces the C allocation functions (glibc allows a program to, see "Replacing
// malloc" in its manual) with ones that forward to glibc's own and keep a count of the bytes held
// and their peak. operator new and Eigen's aligned allocations both end in these functions, so
// every byte the library allocates is seen. Include in exactly one translation unit; glibc only,
// and not under AddressSanitizer (which replaces the same functions).
#pragma once

#if !defined(__GLIBC__)
#error "heap_counter.hpp forwards to glibc's allocator"
#endif

#include <malloc.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}

namespace heap {

inline std::atomic<std::int64_t> held{0};
inline std::atomic<std::int64_t> high{0};

/// Bytes held now (malloc_usable_size of every live block).
inline std::int64_t current() { return held.load(); }
/// Highest `current()` since the last `reset_peak()`.
inline std::int64_t peak() { return high.load(); }
/// Starts a new peak measurement from the bytes held now.
inline void reset_peak() { high.store(held.load()); }

inline void* counted(void* p) {
  if (p) {
    const std::int64_t now = held.fetch_add(static_cast<std::int64_t>(malloc_usable_size(p))) +
                             static_cast<std::int64_t>(malloc_usable_size(p));
    std::int64_t seen = high.load();
    while (now > seen && !high.compare_exchange_weak(seen, now)) {
    }
  }
  return p;
}
inline void uncounted(void* p) {
  if (p) held.fetch_sub(static_cast<std::int64_t>(malloc_usable_size(p)));
}

}  // namespace heap

extern "C" {
void* malloc(std::size_t n) noexcept { return heap::counted(__libc_malloc(n)); }
void* calloc(std::size_t n, std::size_t size) noexcept { return heap::counted(__libc_calloc(n, size)); }
void free(void* p) noexcept {
  heap::uncounted(p);
  __libc_free(p);
}
void* realloc(void* p, std::size_t n) noexcept {
  if (!p) return malloc(n);
  const auto old = static_cast<std::int64_t>(malloc_usable_size(p));
  void* q = __libc_realloc(p, n);
  if (q || n == 0) {
    heap::held.fetch_sub(old);
    heap::counted(q);
  }
  return q;
}
void* memalign(std::size_t align, std::size_t n) noexcept { return heap::counted(__libc_memalign(align, n)); }
void* aligned_alloc(std::size_t align, std::size_t n) noexcept { return memalign(align, n); }
int posix_memalign(void** out, std::size_t align, std::size_t n) noexcept {
  void* p = memalign(align, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
}
