// One picture per encoder family, for the pages in docs/: what each encoder computes, from the
// library itself.
//   sinusoidal.csv  the table PE[pos, i] for positions 0..127, dim 64 (concatenated: sines, then cosines)
//   alibi.csv       ALiBi's bias -slope_h * (qpos - kpos) against the distance, for each of 8 heads
//   t5_bias.csv     T5's bucket of kpos - qpos (32 buckets, max distance 128), bidirectional and causal
//   shaw.csv        Shaw's table row clip(kpos - qpos, -K, K) + K for a 24 x 24 block, K = 4
//
// Usage: encoders OUTPUT_FOLDER
// SPDX-License-Identifier: Apache-2.0
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "picture_common.hpp"
#include "posenc/posenc.hpp"

int main(int argc, char** argv) try {
  using posenc::index_t;
  using posenc::position;
  const auto dir = pictures::output_folder(argc, argv);

  {
    constexpr index_t dim = 64, n = 128;
    const posenc::sinusoidal<double> s({.dim = dim, .layout = posenc::sinusoidal_layout::concatenated});
    posenc::row_matrix<double> table(n, dim);
    s.write_table(table, posenc::arange(0, n));
    std::vector<std::string> cols = {"position"};
    for (index_t i = 0; i < dim; ++i) cols.push_back(pictures::numbered("d", i));
    pictures::csv out(dir / "sinusoidal.csv", cols);
    for (index_t p = 0; p < n; ++p) {
      std::vector<double> row = {double(p)};
      for (index_t i = 0; i < dim; ++i) row.push_back(table(p, i));
      out.row(row);
    }
    out.finish();
  }
  {
    constexpr index_t heads = 8;
    const posenc::alibi<double> a({.num_heads = heads});
    std::vector<std::string> cols = {"distance"};
    for (index_t h = 0; h < heads; ++h) cols.push_back(pictures::numbered("h", h));
    pictures::csv out(dir / "alibi.csv", cols);
    for (position d = 0; d <= 64; ++d) {
      std::vector<double> row = {double(d)};
      for (index_t h = 0; h < heads; ++h) row.push_back(a.bias(h, d, 0));
      out.row(row);
    }
    out.finish();
  }
  {
    pictures::csv out(dir / "t5_bias.csv", {"relative", "bidirectional", "causal"});
    for (position r = -200; r <= 200; ++r)
      out.row({double(r), double(posenc::t5_relative_bias<float>::bucket(r, 32, 128, true)),
               double(posenc::t5_relative_bias<float>::bucket(r, 32, 128, false))});
    out.finish();
  }
  {
    constexpr index_t k = 4, d = 2, n = 24;
    const posenc::row_matrix<double> table = posenc::row_matrix<double>::Zero(2 * k + 1, d);
    const posenc::shaw_relative<double> s({.head_dim = d, .max_relative_position = k}, table, table);
    std::vector<std::string> cols = {"query"};
    for (index_t j = 0; j < n; ++j) cols.push_back(pictures::numbered("k", j));
    pictures::csv out(dir / "shaw.csv", cols);
    for (position i = 0; i < n; ++i) {
      std::vector<double> row = {double(i)};
      for (position j = 0; j < n; ++j) row.push_back(double(s.relative_index(i, j)));
      out.row(row);
    }
    out.finish();
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "encoders: %s\n", e.what());
  return 1;
}
