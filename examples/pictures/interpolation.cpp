// Interpolation versus extrapolation (Chen et al. 2023, "Extending context window of large language
// models via positional interpolation", section 2.3).
//
// A model trained on L0 = 2048 tokens has only seen RoPE logits q . R(r) k at distances r < L0. The
// pairs whose wavelength 2 pi / theta_i exceeds L0 (23 of 64 for d = 128, base 1e4) never complete a
// turn in training: their part of the logit has only traced an arc. Read at r up to 4 L0 with the
// plain table (extrapolation) they turn further than ever seen, and the logit leaves the range it
// took in training; with the table divided by 4 (position interpolation) distance r turns every pair
// by the angle of r / 4, a point between distances seen in training.
//
// For 256 random unit query/key pairs (d = 128, base 1e4), rotated by the library, this program
// writes per distance r = 0 .. 4 (L0 - 1): for the first pair, the slow pairs' part of its logit both
// ways and the range that part took for r < L0; over all pairs, the fraction whose logit (whole, and
// slow part) lies outside that pair's own training range, extrapolated and interpolated.
//
// Usage: interpolation OUTPUT_FOLDER   (writes interpolation.csv)
// SPDX-License-Identifier: Apache-2.0
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <random>
#include <vector>

#include "picture_common.hpp"
#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
constexpr index_t head_dim = 128;
constexpr index_t trained = 2048;                     // L0: distances 0 .. L0-1 were seen
constexpr index_t distances = 4 * (trained - 1) + 1;  // r = 0 .. 4 (L0 - 1)
constexpr int pairs = 256;

/// Logits q . R(r) k for r = 0 .. distances-1, rotating copies of q with the library.
std::vector<double> logits(const posenc::rope<double>& rope, const posenc::rope_cache<double>& cache,
                           const std::vector<double>& q, const std::vector<double>& k, posenc::row_matrix<double>& x) {
  for (index_t r = 0; r < distances; ++r) std::copy(q.begin(), q.end(), x.row(r).data());
  rope.rotate(x, posenc::arange(0, distances), cache);
  std::vector<double> out(distances);
  for (index_t r = 0; r < distances; ++r) {
    double dot = 0;
    for (index_t j = 0; j < head_dim; ++j) dot += x(r, j) * k[static_cast<std::size_t>(j)];
    out[static_cast<std::size_t>(r)] = dot;
  }
  return out;
}

/// Logits of one query/key pair, extrapolated and interpolated, and the range seen in training.
struct curves {
  std::vector<double> extrapolated, interpolated;
  double lo = 0, hi = 0;
  bool outside(double v) const { return v < lo || v > hi; }
};

}  // namespace

int main(int argc, char** argv) try {
  const auto dir = pictures::output_folder(argc, argv);
  const posenc::rope<double> plain({.head_dim = head_dim, .base = 1e4});
  const posenc::rope<double> interpolated(
      {.head_dim = head_dim, .base = 1e4, .scaling = posenc::linear_scaling{.factor = 4}});
  const auto plain_cache = plain.make_cache(0, distances);
  const auto interp_cache = interpolated.make_cache(0, distances);

  // Half-split layout: pair i is dims (i, i + d/2). Slow pairs never complete a turn within L0.
  const double two_pi = 6.283185307179586;
  std::vector<double> slow_mask(head_dim, 0.0);
  int slow = 0;
  for (index_t i = 0; i < head_dim / 2; ++i) {
    if (two_pi / plain.inv_freq()[static_cast<std::size_t>(i)] > static_cast<double>(trained)) {
      slow_mask[static_cast<std::size_t>(i)] = slow_mask[static_cast<std::size_t>(i + head_dim / 2)] = 1;
      ++slow;
    }
  }

  std::mt19937_64 rng(2023);
  std::normal_distribution<double> normal;
  auto unit = [&] {
    std::vector<double> v(head_dim);
    double norm = 0;
    for (auto& e : v) {
      e = normal(rng);
      norm += e * e;
    }
    for (auto& e : v) e /= std::sqrt(norm);
    return v;
  };
  posenc::row_matrix<double> scratch(distances, head_dim);
  auto both_ways = [&](const std::vector<double>& q, const std::vector<double>& k) {
    curves c{logits(plain, plain_cache, q, k, scratch), logits(interpolated, interp_cache, q, k, scratch)};
    const auto [lo, hi] = std::minmax_element(c.extrapolated.begin(), c.extrapolated.begin() + trained);
    c.lo = *lo;
    c.hi = *hi;
    return c;
  };

  // Fractions of pairs outside their training range: whole logit and slow part, each both ways.
  std::vector<double> whole_e(distances), whole_i(distances), slow_e(distances), slow_i(distances);
  curves first;
  for (int p = 0; p < pairs; ++p) {
    const auto q = unit(), k = unit();
    auto qs = q, ks = k;
    for (std::size_t j = 0; j < qs.size(); ++j) {
      qs[j] *= slow_mask[j];
      ks[j] *= slow_mask[j];
    }
    const curves whole = both_ways(q, k), part = both_ways(qs, ks);
    for (std::size_t r = 0; r < distances; ++r) {
      whole_e[r] += whole.outside(whole.extrapolated[r]) / double(pairs);
      whole_i[r] += whole.outside(whole.interpolated[r]) / double(pairs);
      slow_e[r] += part.outside(part.extrapolated[r]) / double(pairs);
      slow_i[r] += part.outside(part.interpolated[r]) / double(pairs);
    }
    if (p == 0) first = part;
  }

  pictures::csv out(dir / "interpolation.csv",
                    {"distance", "seen_min", "seen_max", "extrapolated", "interpolated", "outside_extrapolated",
                     "outside_interpolated", "slow_outside_extrapolated", "slow_outside_interpolated"});
  for (std::size_t r = 0; r < distances; ++r)
    out.row({static_cast<double>(r), first.lo, first.hi, first.extrapolated[r], first.interpolated[r], whole_e[r],
             whole_i[r], slow_e[r], slow_i[r]});
  out.finish();

  auto far_mean = [&](const std::vector<double>& v) {  // over the last L0 distances
    double m = 0;
    for (std::size_t r = distances - trained; r < distances; ++r) m += v[r] / trained;
    return m;
  };
  std::printf("%d of %d pairs turn less than once within L0 = %td\n", slow, int(head_dim / 2), trained);
  std::printf(
      "pairs outside their training range at 3 L0 .. 4 L0: whole logit extrapolated %.3f, interpolated "
      "%.3f; slow part extrapolated %.3f, interpolated %.3f\n",
      far_mean(whole_e), far_mean(whole_i), far_mean(slow_e), far_mean(slow_i));
  return far_mean(slow_e) > 0.25 && far_mean(slow_i) < 0.01 && far_mean(whole_e) > 5 * far_mean(whole_i) ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "interpolation: %s\n", e.what());
  return 1;
}
