// The opt-in OpenMP executor (posenc/openmp.hpp), in a program compiled with OpenMP: attention and
// rope.rotate on it give the bits of the calling thread, every item runs once on a worker slot
// below the worker count, and an item's exception reaches the caller. Exit code 0 on success.
// SPDX-License-Identifier: Apache-2.0
#include <atomic>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "posenc/openmp.hpp"
#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAILED: %s\n", what);
  }
}

posenc::row_matrix<float> random_rows(index_t rows, index_t cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  posenc::row_matrix<float> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

bool same_bits(const posenc::row_matrix<float>& a, const posenc::row_matrix<float>& b) {
  return std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

}  // namespace

int main() {
  posenc::openmp_executor omp;
  posenc::serial_executor serial;

  std::vector<std::atomic<int>> seen(500);
  std::atomic<bool> bad_slot{false};
  auto body = [&](index_t i, int w) {
    if (w < 0 || w >= 3) bad_slot = true;
    seen[static_cast<std::size_t>(i)].fetch_add(1);
  };
  omp.parallel_for(500, 3, body);
  bool once = true;
  for (const auto& s : seen) once = once && s.load() == 1;
  check(once, "every item runs once");
  check(!bad_slot.load(), "worker slots are below the worker count");

  bool caught = false;
  try {
    auto failing = [](index_t i, int) {
      if (i == 7) throw std::runtime_error("item 7");
    };
    omp.parallel_for(100, 2, failing);
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "item 7";
  }
  check(caught, "an item's exception reaches the caller");

  constexpr index_t n = 400, heads = 4, kv_heads = 2, d = 32;
  const auto q = random_rows(n, heads * d, 1), k = random_rows(n, kv_heads * d, 2), v = random_rows(n, kv_heads * d, 3);
  const auto pos = posenc::arange(0, n);
  const posenc::rope<float> rope({.head_dim = d});
  posenc::row_matrix<float> a(n, heads * d), b(n, heads * d);
  posenc::attention(q, k, v, a, pos, pos, rope, {.heads = heads, .kv_heads = kv_heads, .causal = true, .executor = &serial});
  posenc::attention(q, k, v, b, pos, pos, rope,
                    {.heads = heads, .kv_heads = kv_heads, .causal = true, .threads = 2, .executor = &omp});
  check(same_bits(a, b), "attention on OpenMP gives the calling thread's bits");
  posenc::row_matrix<float> x = q, y = q;
  rope.rotate(x, pos, &serial);
  rope.rotate(y, pos, &omp, 2);
  check(same_bits(x, y), "rope.rotate on OpenMP gives the calling thread's bits");

  std::printf("openmp_executor: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
