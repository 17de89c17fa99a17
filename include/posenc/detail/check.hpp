// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file detail/check.hpp
/// Internal: argument validation that throws `std::invalid_argument` naming the parameter and
/// its value. Used at construction, never in a hot loop.

#include <stdexcept>
#include <string>
#include <string_view>

#include "posenc/config.hpp"

namespace posenc::detail {

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
