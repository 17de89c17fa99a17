// Helpers shared by the libFuzzer targets in tests/fuzz: a reader that turns the fuzzer's bytes
// into bounded parameters, and the failure report (a finding aborts the run, so libFuzzer saves
// the input as a crash artifact).
#pragma once

#include <bit>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string_view>

#include "posenc/types.hpp"

namespace posenc_fuzz {

/// Reads values from the front of the input; past its end every read gives zero bits, so every
/// input, even an empty one, describes a valid case. Ranges are inclusive.
class reader {
 public:
  reader(const std::uint8_t* data, std::size_t size) : p_(data), n_(size) {}

  std::uint64_t bits(int bytes) {
    std::uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= static_cast<std::uint64_t>(byte()) << (8 * i);
    return v;
  }
  std::uint8_t byte() { return at_ < n_ ? p_[at_++] : 0; }
  bool flag() { return (byte() & 1) != 0; }

  /// An integer in `[lo, hi]` from as few bytes as the range needs.
  template <class I>
  I in_range(I lo, I hi) {
    const auto span = static_cast<std::uint64_t>(hi) - static_cast<std::uint64_t>(lo);
    int bytes = 1;
    while (bytes < 8 && (span >> (8 * bytes)) != 0) ++bytes;
    const std::uint64_t v = bits(bytes);
    const std::uint64_t off = span == std::numeric_limits<std::uint64_t>::max() ? v : v % (span + 1);
    return static_cast<I>(static_cast<std::uint64_t>(lo) + off);
  }

  /// Any double, NaN and infinities included.
  double raw_double() { return std::bit_cast<double>(bits(8)); }

  /// A finite value in `[lo, hi]`.
  double uniform(double lo, double hi) { return lo + (hi - lo) * static_cast<double>(bits(2)) / 65535.0; }

  /// A parameter value for a constructor: a common value, a boundary, or raw bits.
  double parameter() {
    switch (byte() % 12) {
      case 0: return 0.0;
      case 1: return -1.0;
      case 2: return 1.0;
      case 3: return std::numeric_limits<double>::infinity();
      case 4: return std::numeric_limits<double>::quiet_NaN();
      case 5: return std::numeric_limits<double>::max();
      case 6: return std::numeric_limits<double>::denorm_min();
      case 7: return 1.0 + static_cast<double>(bits(1)) / 64.0;
      case 8: return std::ldexp(1.0, in_range(-1074, 1023));
      case 9: return static_cast<double>(in_range<std::int64_t>(-4, 1 << 20));
      case 10: return -std::ldexp(1.0, in_range(-60, 60));
      default: return raw_double();
    }
  }

  /// A token position: small, near 2^24, 2^31, 2^52, negative, up to +-`limit`.
  posenc::position position_value(posenc::position limit) {
    using posenc::position;
    position v = 0;
    switch (byte() % 8) {
      case 0: v = in_range<position>(0, 300); break;
      case 1: v = in_range<position>(-300, 300); break;
      case 2: v = (position{1} << 24) + in_range<position>(-300, 300); break;
      case 3: v = (position{1} << 31) + in_range<position>(-300, 300); break;
      case 4: v = -(position{1} << 31) + in_range<position>(-300, 300); break;
      case 5: v = (position{1} << 52) + in_range<position>(-300, 300); break;
      case 6: v = static_cast<position>(bits(8)); break;
      default: v = in_range<position>(-100000, 100000); break;
    }
    return v > limit ? limit : (v < -limit ? -limit : v);
  }

  std::size_t left() const { return at_ < n_ ? n_ - at_ : 0; }

 private:
  const std::uint8_t* p_;
  std::size_t n_;
  std::size_t at_ = 0;
};

/// A finding: prints what went wrong and aborts, so libFuzzer records the input.
[[noreturn]] inline void fail(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::fputs("posenc fuzz finding: ", stderr);
  std::vfprintf(stderr, fmt, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::abort();
}

/// An `std::invalid_argument` from a constructor must read "posenc: <param> = <value>: <what>".
inline void check_invalid_message(const std::invalid_argument& e) {
  const std::string_view m = e.what();
  if (m.rfind("posenc: ", 0) != 0 || m.find(" = ") == std::string_view::npos ||
      m.find(": ", 8) == std::string_view::npos)
    fail("invalid_argument without the parameter's name and value: \"%s\"", e.what());
}

}  // namespace posenc_fuzz
