// RoPE's long-term decay (Su et al. 2021, RoFormer section 3.4.3), from posenc's frequency tables.
//
// RoFormer bounds the logit between a query and a key r tokens apart by
//   |sum_j h_j S_j|  with  S_j = sum_{k<j} exp(i r theta_k),
// and plots the relative upper bound (1 / (d/2)) sum_{j=1..d/2} |S_j| against r for d = 128 and
// base 1e4: it decays as r grows. This program writes that curve for r = 0..8192 for plain RoPE and
// for the tables of four context-extension policies, each stretching a model trained on
// L0 = 2048 tokens to 4 L0: position interpolation, NTK-aware, YaRN and Llama 3. The angles
// r * theta_k are the library's own (rope::unit_cos_sin).
//
// Usage: rope_decay OUTPUT_FOLDER   (writes rope_decay.csv)
// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <cstdio>
#include <exception>
#include <vector>

#include "picture_common.hpp"
#include "posenc/posenc.hpp"

namespace {

constexpr posenc::index_t head_dim = 128;
constexpr double base = 1e4;
constexpr posenc::position trained = 2048;  // L0
constexpr int factor = 4;                   // extend to 4 L0
constexpr posenc::position max_distance = factor * trained;

/// RoFormer's relative upper bound at distance r for the encoder's frequency table.
double relative_bound(const posenc::rope<double>& rope, posenc::position r) {
  const auto pairs = static_cast<std::size_t>(rope.rotary_dim() / 2);
  std::vector<double> c(pairs), s(pairs);
  rope.unit_cos_sin(r, c.data(), s.data());
  double re = 0, im = 0, sum = 0;
  for (std::size_t k = 0; k < pairs; ++k) {  // after adding pair k, (re, im) is S_{k+1}
    re += c[k];
    im += s[k];
    sum += std::hypot(re, im);
  }
  return sum / static_cast<double>(pairs);
}

}  // namespace

int main(int argc, char** argv) try {
  const auto dir = pictures::output_folder(argc, argv);
  const posenc::rope_params plain{.head_dim = head_dim, .base = base};
  auto with = [&](posenc::rope_scaling s) {
    posenc::rope_params p = plain;
    p.scaling = s;
    return posenc::rope<double>(p);
  };
  const std::vector<posenc::rope<double>> tables = {
      posenc::rope<double>(plain),
      with(posenc::linear_scaling{.factor = factor}),
      with(posenc::ntk_aware_scaling{.alpha = factor}),
      with(posenc::yarn_scaling{.factor = factor, .original_max_position = trained}),
      with(posenc::llama3_scaling{
          .factor = factor, .low_freq_factor = 1, .high_freq_factor = 4, .original_max_position = trained}),
  };
  pictures::csv out(dir / "rope_decay.csv", {"distance", "rope", "linear", "ntk", "yarn", "llama3"});
  for (posenc::position r = 0; r <= max_distance; ++r) {
    std::vector<double> row = {static_cast<double>(r)};
    for (const auto& t : tables) row.push_back(relative_bound(t, r));
    out.row(row);
  }
  out.finish();
  // The bound starts at its maximum (d/2 + 1) / 2 = 32.5 and decays: a quick sanity check.
  const double at0 = relative_bound(tables[0], 0), at256 = relative_bound(tables[0], 256);
  std::printf("plain RoPE: bound %.2f at distance 0, %.2f at 256\n", at0, at256);
  return std::abs(at0 - 32.5) < 1e-9 && at256 < at0 / 2 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "rope_decay: %s\n", e.what());
  return 1;
}
