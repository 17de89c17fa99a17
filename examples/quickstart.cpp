// Quickstart: wrap an engine's row-major buffer as a posenc view and give it positions.
// SPDX-License-Identifier: Apache-2.0
#include <cstdio>

#include "posenc/concepts.hpp"
#include "posenc/types.hpp"

int main() {
  constexpr posenc::index_t tokens = 4, heads = 2, head_dim = 8;
  posenc::row_matrix<float> q = posenc::row_matrix<float>::Zero(tokens, heads * head_dim);

  // Head 1 of the queries, in place: a column block keeps the parent's row stride.
  auto head1 = posenc::view_of(q.middleCols(head_dim, head_dim));
  auto pos = posenc::arange(100, tokens);  // a query block at the end of a 100-token cache
  for (posenc::index_t i = 0; i < head1.rows; ++i) head1(i, 0) = static_cast<float>(pos[i]);

  static_assert(posenc::positional_encoding<posenc::no_position<float>>);
  std::printf("head 1 spans columns [%td, %td) with row stride %td; q(3, %td) = %g (position %lld)\n", head_dim,
              2 * head_dim, head1.stride, head_dim, static_cast<double>(q(3, head_dim)),
              static_cast<long long>(pos[3]));
  return q(3, head_dim) == 103.0f ? 0 : 1;
}
