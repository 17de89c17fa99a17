// Recency and "lost in the middle": how much attention a needle gets, by where it sits.
//
// n = 1024 random keys at positions 0 .. n-1 and one query at the last position; the key at position
// p is replaced by the needle, a copy of the query (the one key that matches it). The weight the
// needle receives is the attention output for a value that is 1 at the needle and 0 elsewhere,
// computed by the library's blockwise attention for each encoding: none, RoPE (base 1e4), ALiBi
// (8 heads, one slope each) and a T5 causal bucket bias. T5's table is learned in a real model; here
// it is illustrative, -0.25 per bucket (32 buckets, max distance 128), to show the bucket structure.
// d = 64, queries and keys standard normal, mean over 16 draws, every 8th position.
//
// Usage: needle OUTPUT_FOLDER   (writes needle.csv)
// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <cstdio>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "picture_common.hpp"
#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
constexpr index_t n = 1024, head_dim = 64, alibi_heads = 8, step = 8;
constexpr int draws = 16;

/// Weight on the key at `needle` for a query at position n-1, per head: q is `[1, heads * d]`,
/// keys `[n, heads * d]` (their row `needle` already holds the needle).
template <class E>
std::vector<double> needle_weight(const posenc::row_matrix<float>& q, const posenc::row_matrix<float>& keys,
                                  index_t needle, index_t heads, const E& enc) {
  posenc::row_matrix<float> v = posenc::row_matrix<float>::Zero(n, heads * head_dim);
  for (index_t h = 0; h < heads; ++h) v(needle, h * head_dim) = 1;  // column 0 of every head
  posenc::row_matrix<float> out(1, heads * head_dim);
  posenc::attention(q, keys, v, out, posenc::arange(n - 1, 1), posenc::arange(0, n), enc,
                    {.heads = heads, .causal = true, .threads = 1});
  std::vector<double> w(static_cast<std::size_t>(heads));
  for (index_t h = 0; h < heads; ++h) w[static_cast<std::size_t>(h)] = out(0, h * head_dim);
  return w;
}

}  // namespace

int main(int argc, char** argv) try {
  const auto dir = pictures::output_folder(argc, argv);
  const posenc::rope<float> rope({.head_dim = head_dim, .base = 1e4});
  const posenc::alibi<float> alibi({.num_heads = alibi_heads});
  constexpr index_t buckets = 32;
  posenc::row_matrix<float> table(buckets, 1);
  for (index_t b = 0; b < buckets; ++b) table(b, 0) = -0.25f * static_cast<float>(b);
  const posenc::t5_relative_bias<float> t5(
      {.num_heads = 1, .num_buckets = buckets, .max_distance = 128, .bidirectional = false}, table);

  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  constexpr index_t points = n / step;
  std::vector<std::vector<double>> mean(points, std::vector<double>(3 + alibi_heads, 0.0));
  posenc::row_matrix<float> q(1, head_dim), keys(n, head_dim), q8(1, alibi_heads * head_dim),
      keys8(n, alibi_heads * head_dim);
  for (int draw = 0; draw < draws; ++draw) {
    for (index_t j = 0; j < head_dim; ++j) q(0, j) = normal(rng);
    for (index_t i = 0; i < keys.size(); ++i) keys.data()[i] = normal(rng);
    for (index_t h = 0; h < alibi_heads; ++h) q8.middleCols(h * head_dim, head_dim) = q;  // same query per head
    for (index_t h = 0; h < alibi_heads; ++h) keys8.middleCols(h * head_dim, head_dim) = keys;
    for (index_t i = 0; i < points; ++i) {
      // Positions step-1, 2 step-1, ..., n-1: the last point is the needle at the query's own position.
      const index_t p = (i + 1) * step - 1;
      const auto saved = keys.row(p).eval();
      keys.row(p) = q;
      for (index_t h = 0; h < alibi_heads; ++h) keys8.block(p, h * head_dim, 1, head_dim) = q;
      auto& m = mean[static_cast<std::size_t>(i)];
      m[0] += needle_weight(q, keys, p, 1, posenc::no_position<float>{})[0] / draws;
      m[1] += needle_weight(q, keys, p, 1, rope)[0] / draws;
      m[2] += needle_weight(q, keys, p, 1, t5)[0] / draws;
      const auto a = needle_weight(q8, keys8, p, alibi_heads, alibi);
      for (index_t h = 0; h < alibi_heads; ++h)
        m[static_cast<std::size_t>(3 + h)] += a[static_cast<std::size_t>(h)] / draws;
      keys.row(p) = saved;
      for (index_t h = 0; h < alibi_heads; ++h) keys8.block(p, h * head_dim, 1, head_dim) = saved;
    }
  }

  std::vector<std::string> columns = {"position", "none", "rope", "t5"};
  for (index_t h = 0; h < alibi_heads; ++h) columns.push_back(pictures::numbered("alibi_h", h));
  pictures::csv out(dir / "needle.csv", columns);
  for (index_t i = 0; i < points; ++i) {
    std::vector<double> row = {static_cast<double>((i + 1) * step - 1)};
    for (double w : mean[static_cast<std::size_t>(i)]) row.push_back(w);
    out.row(row);
  }
  out.finish();

  const auto& first = mean.front();
  const auto& last = mean.back();
  std::printf(
      "needle weight at p = %td / at p = %td: none %.3g / %.3g, RoPE %.3g / %.3g, T5 %.3g / %.3g, "
      "ALiBi head 0 %.3g / %.3g, head 7 %.3g / %.3g\n",
      step - 1, n - 1, first[0], last[0], first[1], last[1], first[2], last[2], first[3], last[3], first[10], last[10]);
  // Without an encoding the weight does not depend on the position (up to the draws' noise); every
  // encoding favours the near needle.
  const bool ok = std::abs(first[0] - last[0]) < 0.25 * last[0] && last[1] > 10 * first[1] && last[2] > first[2] &&
                  last[3] > 10 * first[3];
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "needle: %s\n", e.what());
  return 1;
}
