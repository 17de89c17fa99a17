// Long context for real: causal blockwise attention over n = 131072 tokens, 1 head, head_dim 64,
// float, on all cores; sampled rows checked against a double-precision evaluation of the formula
// written here, and the process's peak memory checked against a bound that the O(n^2) score
// matrix (64 GiB in float) could never meet.
//
// Its own executable (not the Catch2 one) so that the peak resident set it reads through
// getrusage belongs to this computation alone. Exit code 0 on success.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/encoders/rope.hpp"

namespace {

using posenc::index_t;

constexpr index_t n = 131072;
constexpr index_t d = 64;

#if defined(__SANITIZE_ADDRESS__)
#define POSENC_LONG_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define POSENC_LONG_SANITIZED 1
#endif
#endif

// Under AddressSanitizer (clang -O1) the full causal pass takes minutes, so that build keeps every
// key within 4096 positions of its query (a sliding window): the same 131072-token sequence,
// tiles and memory, a sixteenth of the arithmetic. The release build runs the full causal pass.
//
// Peak resident set (MiB) the run may reach: q, k, v and out are 4 x 32 MiB; the kernel adds a
// fixed per-thread workspace. Sanitizer builds keep shadow memory and a quarantine of freed blocks
// on top, hence their larger bound.
#if defined(POSENC_LONG_SANITIZED)
constexpr posenc::position window = 4095;
constexpr long peak_bound_mib = 512;
#else
constexpr posenc::position window = -1;
constexpr long peak_bound_mib = 256;
#endif

long peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024;  // kilobytes on Linux
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(2026);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  posenc::row_matrix<float> q(n, d), k(n, d), v(n, d), out(n, d);
  for (auto* m : {&q, &k, &v})
    for (index_t i = 0; i < m->size(); ++i) m->data()[i] = normal(rng);

  // RoPE inside the kernel, as a long-context model runs it (Llama 3 base).
  const posenc::rope<float> rope({.head_dim = d, .base = 500000.0});
  posenc::thread_pool pool;  // every core: the call's work items share them
  const posenc::attention_params p{.heads = 1, .causal = true, .window_left = window, .executor = &pool};
  posenc::attention(q, k, v, out, posenc::arange(0, n), posenc::arange(0, n), rope, p);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const long peak = peak_rss_mib();  // before the check below allocates anything

  // Sampled rows: the first, the last, tile edges, and random ones, against the formula in double
  // (RoPE angles in long double, the softmax over every visible key).
  std::vector<index_t> rows = {0, 1, 127, 128, 255, 256, 4095, 65535, 65536, n - 2, n - 1};
  std::uniform_int_distribution<index_t> any(0, n - 1);
  for (int i = 0; i < 21; ++i) rows.push_back(any(rng));
  std::vector<long double> inv(d / 2);
  for (index_t i = 0; i < d / 2; ++i) inv[i] = std::pow(500000.0L, -2.0L * i / d);
  auto rotated = [&](const posenc::row_matrix<float>& m, index_t row) {
    std::vector<double> r(d);
    for (index_t i = 0; i < d / 2; ++i) {
      const long double a = std::fmod(static_cast<long double>(row) * inv[i], 6.283185307179586476925286766559005768L);
      const double c = static_cast<double>(std::cos(a)), s = static_cast<double>(std::sin(a));
      const double x = m(row, i), y = m(row, i + d / 2);
      r[i] = x * c - y * s;
      r[i + d / 2] = y * c + x * s;
    }
    return r;
  };
  // One pass over the keys, each rotated once, updating an online softmax per sampled row.
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const std::size_t nr = rows.size();
  std::vector<std::vector<double>> qr(nr), acc(nr, std::vector<double>(d, 0.0));
  std::vector<double> mx(nr, -INFINITY), sum(nr, 0.0);
  for (std::size_t r = 0; r < nr; ++r) qr[r] = rotated(q, rows[r]);
  for (index_t j = 0; j < n; ++j) {
    const auto kj = rotated(k, j);
    for (std::size_t r = 0; r < nr; ++r) {
      if (j > rows[r] || (window >= 0 && rows[r] - j > window)) continue;
      double s = 0;
      for (index_t c = 0; c < d; ++c) s += qr[r][c] * kj[c];
      s *= scale;
      const double m = std::max(mx[r], s), a = std::exp(mx[r] - m), e = std::exp(s - m);
      sum[r] = sum[r] * a + e;
      for (index_t c = 0; c < d; ++c) acc[r][c] = acc[r][c] * a + e * v(j, c);
      mx[r] = m;
    }
  }
  double worst = 0;
  index_t worst_row = 0;
  for (std::size_t r = 0; r < nr; ++r)
    for (index_t c = 0; c < d; ++c) {
      const double err = std::abs(static_cast<double>(out(rows[r], c)) - acc[r][c] / sum[r]);
      if (!(err <= worst)) worst = err, worst_row = rows[r];
    }
  // Float logits of |s| <~ 10 carry ~1e-6 of error; averages over up to 131072 keys add ~1e-6.
  constexpr double tolerance = 1e-5;
  std::printf("long context: n = %td, d = %td, causal (window %lld), RoPE: %.1f s; %zu sampled rows, worst |error| %.3g "
              "(row %td, tolerance %.0e); peak RSS %ld MiB (bound %ld MiB)\n",
              n, d, static_cast<long long>(window), seconds, rows.size(), worst, worst_row, tolerance, peak, peak_bound_mib);
  if (!(worst <= tolerance)) {
    std::printf("FAIL: sampled rows differ from the double reference\n");
    return 1;
  }
  if (peak > peak_bound_mib) {
    std::printf("FAIL: peak memory above the bound\n");
    return 1;
  }
  return 0;
}
