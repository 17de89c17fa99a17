// posenc: positional-encoding primitives for long-context transformers.
// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file config.hpp
/// Version, the precondition macro `POSENC_ASSERT`, and the exception types.
///
/// Two kinds of error, two channels:
/// - values that may come from a model's config (a base <= 0, an odd rotary dim, an unknown
///   scaling name) throw `std::invalid_argument` at construction, off the hot path;
/// - caller shape bugs in the hot path (a matrix with the wrong column count, too few positions)
///   go through `POSENC_ASSERT(cond, msg)`.
///
/// `POSENC_ASSERT` is on by default and calls `std::abort` after printing the message to stderr.
/// A user may define it before including any posenc header. Defining `POSENC_ASSERT_THROWS`
/// makes it throw `posenc::assertion_error` (the test suite does this, so preconditions can be
/// tested); defining `POSENC_NO_ASSERT` compiles the checks out.

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#define POSENC_VERSION_MAJOR 0
#define POSENC_VERSION_MINOR 1
#define POSENC_VERSION_PATCH 0

namespace posenc {

/// Thrown by `POSENC_ASSERT` when `POSENC_ASSERT_THROWS` is defined: a violated precondition of a
/// hot-path call (a shape, a stride, a position count).
class assertion_error : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {

[[noreturn]] inline void assertion_failed(const char* expr, const char* msg, const char* file, int line) {
#if defined(POSENC_ASSERT_THROWS)
  throw assertion_error(std::string("posenc: ") + msg + " (" + expr + ") at " + file + ":" + std::to_string(line));
#else
  std::fprintf(stderr, "posenc: precondition failed: %s (%s) at %s:%d\n", msg, expr, file, line);
  std::abort();
#endif
}

}  // namespace detail
}  // namespace posenc

#ifndef POSENC_ASSERT
#if defined(POSENC_NO_ASSERT)
#define POSENC_ASSERT(cond, msg) ((void)0)
#else
/// Checks a hot-path precondition; see the file comment for how to change what it does.
#define POSENC_ASSERT(cond, msg) \
  ((cond) ? (void)0 : ::posenc::detail::assertion_failed(#cond, msg, __FILE__, __LINE__))
#endif
#endif
