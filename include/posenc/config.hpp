// posenc: positional-encoding primitives for long-context transformers.
// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file config.hpp
/// Version, the exception types, and the precondition check `POSENC_ASSERT`.
///
/// Every mistake a caller can make at run time is a catchable exception, never an abort:
/// - a value that may come from a model's config (a base <= 0, an odd rotary dim, an unknown
///   scaling name, a size that overflows) throws `std::invalid_argument` with the message
///   `posenc: <parameter> = <value>: <what is wrong>`;
/// - a call whose matrices or positions do not fit together (a caller's shape bug) throws
///   `posenc::precondition_error`, also a `std::invalid_argument`, with the sizes involved:
///   `posenc: attention: k has 48 columns but kv_heads * head_dim = 2 * 16 = 32 are needed`.
///
/// The checks cost a few comparisons per call (none per element) and are always on: there is no
/// macro that turns them off or into aborts, so every translation unit of a program compiles the
/// same inline functions (an opt-out that differs between translation units would break the
/// one-definition rule). A server catches `std::invalid_argument` around one request and lives on.

#include <charconv>
#include <concepts>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#define POSENC_VERSION_MAJOR 0
#define POSENC_VERSION_MINOR 2
#define POSENC_VERSION_PATCH 0

#if defined(POSENC_ASSERT)
#error "posenc: POSENC_ASSERT is posenc's own check and cannot be redefined (every check throws posenc::precondition_error)"
#endif
#if defined(POSENC_NO_ASSERT)
#error "posenc: POSENC_NO_ASSERT is gone: the checks are per call, always on, and throw posenc::precondition_error"
#endif

namespace posenc {

/// Thrown when a call's arguments do not fit together: a matrix with the wrong column count, too
/// few positions, a view that does not describe memory, a cache that does not cover a position.
/// The message names the function, the argument and the sizes. A `std::invalid_argument`, so one
/// `catch` handles every bad-input error posenc reports.
class precondition_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// Shortest text that reads back to the same value (numbers), or the text itself.
template <class V>
std::string to_text(const V& v) {
  if constexpr (std::same_as<V, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_arithmetic_v<V>) {
    char buf[64];
    auto res = std::to_chars(buf, buf + sizeof buf, v);
    return std::string(buf, res.ptr);
  } else if constexpr (std::is_enum_v<V>) {
    return to_text(static_cast<std::underlying_type_t<V>>(v));
  } else {
    return std::string(v);
  }
}

/// Throws `precondition_error("posenc: " + parts...)`, each part a string or a number.
template <class... Parts>
[[noreturn]] void precondition_failed(const Parts&... parts) {
  std::string s = "posenc: ";
  (s += ... += to_text(parts));
  throw precondition_error(s);
}

}  // namespace detail
}  // namespace posenc

/// Checks a precondition of a call; on failure throws `posenc::precondition_error` whose message
/// is the remaining arguments (strings and numbers) joined. They are evaluated only on failure.
#define POSENC_ASSERT(cond, ...) ((cond) ? (void)0 : ::posenc::detail::precondition_failed(__VA_ARGS__))
