// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file attention/workspace.hpp
/// `attention_workspace`: the scratch memory of the blockwise kernel, sized once per call and
/// reusable across calls so an engine pays for the allocation (and its page faults) once.

#include <cstddef>
#include <memory>
#include <new>

namespace posenc {

/// Scratch memory for `attention`: one tile workspace per thread, 64-byte aligned.
///
/// Its size depends on the tile sizes, head_dim and thread count, never on the sequence length.
/// Pass the same object to successive calls to reuse it; it only grows. Not thread-safe: one
/// workspace per concurrent call.
class attention_workspace {
 public:
  attention_workspace() = default;

  /// Bytes currently held.
  std::size_t bytes() const { return bytes_; }

  /// Makes room for at least `n` bytes (keeps the buffer when it is large enough) and returns it.
  std::byte* reserve(std::size_t n) {
    if (n > bytes_) {
      buf_.reset(static_cast<std::byte*>(::operator new(n, std::align_val_t{alignment})));
      bytes_ = n;
    }
    return buf_.get();
  }

  static constexpr std::size_t alignment = 64;

 private:
  struct deleter {
    void operator()(std::byte* p) const { ::operator delete(p, std::align_val_t{alignment}); }
  };
  std::unique_ptr<std::byte[], deleter> buf_;
  std::size_t bytes_ = 0;
};

}  // namespace posenc
