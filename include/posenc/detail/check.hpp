// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/check.hpp
/// Internal: argument validation that throws `std::invalid_argument` naming the parameter and
/// its value. Used at construction, never in a hot loop.

#include <charconv>
#include <concepts>
#include <stdexcept>
#include <string>
#include <string_view>

namespace posenc::detail {

/// Shortest text that reads back to the same value.
template <class V>
std::string to_text(const V& v) {
  if constexpr (std::same_as<V, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_arithmetic_v<V>) {
    char buf[64];
    auto res = std::to_chars(buf, buf + sizeof buf, v);
    return std::string(buf, res.ptr);
  } else {
    return std::string(v);
  }
}

/// Throws `std::invalid_argument("posenc: <param> = <value>: <what>")`.
template <class V>
[[noreturn]] void invalid(std::string_view param, const V& value, std::string_view what) {
  throw std::invalid_argument("posenc: " + std::string(param) + " = " + to_text(value) + ": " + std::string(what));
}

/// Throws the error of `invalid` unless `ok`.
template <class V>
void require(bool ok, std::string_view param, const V& value, std::string_view what) {
  if (!ok) invalid(param, value, what);
}

}  // namespace posenc::detail
