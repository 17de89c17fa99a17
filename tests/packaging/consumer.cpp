// A downstream program, built by the packaging tests against posenc consumed each supported way
// (find_package of an install or of a build tree, add_subdirectory, FetchContent).
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "posenc/posenc.hpp"

int main() {
  // An engine-owned [tokens, heads * head_dim] buffer, head 1 of 2 viewed in place.
  std::vector<float> buffer(3 * 8, 0.0f);
  Eigen::Map<posenc::row_matrix<float>> q(buffer.data(), 3, 8);
  auto head1 = posenc::view_of(q.middleCols(4, 4));
  const auto pos = posenc::arange(10, 3);
  for (posenc::index_t i = 0; i < head1.rows; ++i) head1(i, 0) = static_cast<float>(pos[i]);

  static_assert(posenc::positional_encoding<posenc::no_position<double>>);
  bool ok = head1.stride == 8 && buffer[2 * 8 + 4] == 12.0f && posenc::no_position<>::name() == "none";

  const std::string version = std::to_string(POSENC_VERSION_MAJOR) + "." + std::to_string(POSENC_VERSION_MINOR) +
                              "." + std::to_string(POSENC_VERSION_PATCH);
#ifdef POSENC_CONSUMER_EXPECT_VERSION
  // The headers found must be those of the package CMake found.
  ok = ok && version == POSENC_CONSUMER_EXPECT_VERSION;
#endif
  std::printf("posenc %s consumer (%s): %s\n", version.c_str(), POSENC_CONSUMER_MODE, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
