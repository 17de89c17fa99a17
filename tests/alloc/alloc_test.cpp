// Hot paths allocate nothing once the caller reuses a workspace: every heap allocation of the
// process is counted (bench/alloc_counter.hpp replaces malloc), and the second of two identical
// calls must make none. Covers prefill and decode (key chunks merged by log-sum-exp) with every
// encoder family, RoPE rotated inside the kernel included, on the calling thread and on a thread
// pool; the engine step (`attention_varlen`, `paged_append` and `paged_attention` over fp32 and
// bf16 pages, prefill chunks and decode tokens mixed); the backward of the prefill; `rope::rotate`
// with and without a cache, `rope::rotate_backward`; `merge_partial`. Exit code 0 on success, 77
// (skipped) in a sanitizer build, whose allocator cannot be counted.
// SPDX-License-Identifier: Apache-2.0
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../../bench/alloc_counter.hpp"
#include "posenc/posenc.hpp"

#if defined(POSENC_BENCH_SANITIZED)
int main() {
  std::printf("skipped: a sanitizer owns malloc, so allocations cannot be counted\n");
  return 77;
}
#else
namespace {

using posenc::index_t;
template <class T>
using mat = posenc::row_matrix<T>;

int failures = 0;

mat<float> random_rows(index_t rows, index_t cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  mat<float> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

// Runs `f` once to warm up (workspaces grow, tables are made), then again while counting.
void expect_no_allocation(const std::string& what, const std::function<void()>& f) {
  f();
  posenc_bench::heap::reset();
  f();
  const auto n = posenc_bench::heap::allocations();
  if (n != 0) {
    ++failures;
    std::fprintf(stderr, "FAILED: %s: %lld allocations (%lld bytes) on a repeated call\n", what.c_str(),
                 static_cast<long long>(n), static_cast<long long>(posenc_bench::heap::allocated()));
  } else {
    std::printf("ok: %s\n", what.c_str());
  }
}

}  // namespace

int main() {
  constexpr index_t heads = 8, kv_heads = 2, d = 64, prompt = 512, cache = 16384;
  posenc::thread_pool pool(2);
  posenc::serial_executor serial;

  const posenc::rope<float> rope({.head_dim = d, .base = 500000.0});
  const posenc::alibi<float> alibi({.num_heads = heads});
  const posenc::t5_relative_bias<float> t5({.num_heads = heads}, random_rows(32, heads, 1));
  const posenc::shaw_relative<float> shaw({.head_dim = d, .max_relative_position = 8}, random_rows(17, d, 2),
                                          random_rows(17, d, 3));

  const mat<float> q = random_rows(prompt, heads * d, 4);
  const mat<float> k = random_rows(cache, kv_heads * d, 5), v = random_rows(cache, kv_heads * d, 6);
  mat<float> out(prompt, heads * d), lse(prompt, heads);
  posenc::attention_workspace ws;
  const mat<float> dout = random_rows(prompt, heads * d, 8);
  mat<float> dq(prompt, heads * d), dk(prompt, kv_heads * d), dv(prompt, kv_heads * d);
  posenc::attention_workspace ws_backward;

  auto run_all = [&](const auto& enc, const char* name) {
    for (posenc::executor* ex : {static_cast<posenc::executor*>(&serial), static_cast<posenc::executor*>(&pool)}) {
      const std::string on = ex == &serial ? " on the calling thread" : " on a thread pool";
      const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true, .executor = ex};
      expect_no_allocation(std::string("prefill, ") + name + on, [&] {
        posenc::attention(q, k.topRows(prompt), v.topRows(prompt), out, posenc::arange(0, prompt),
                          posenc::arange(0, prompt), enc, p, lse, &ws);
      });
      expect_no_allocation(std::string("decode against 16k keys, ") + name + on, [&] {
        posenc::attention(q.topRows(1), k, v, out.topRows(1), posenc::arange(cache - 1, 1), posenc::arange(0, cache),
                          enc, p, lse.topRows(1), &ws);
      });
      // The backward of the prefill (after a prefill forward, for its output and lse).
      posenc::attention(q, k.topRows(prompt), v.topRows(prompt), out, posenc::arange(0, prompt),
                        posenc::arange(0, prompt), enc, p, lse, &ws);
      expect_no_allocation(std::string("backward, ") + name + on, [&] {
        posenc::attention_backward(q, k.topRows(prompt), v.topRows(prompt), out, lse, dout, dq, dk, dv,
                                   posenc::arange(0, prompt), posenc::arange(0, prompt), enc, p, {}, &ws_backward);
      });
    }
  };
  run_all(posenc::no_position<float>{}, "no encoding");
  run_all(rope, "RoPE in the kernel");
  run_all(alibi, "ALiBi");
  run_all(t5, "T5 bias");
  run_all(shaw, "Shaw");

  // The engine step: 3 sequences (a prefill chunk of 100 tokens over 300 cached, 2 decode tokens
  // over 2000 and 5000), pages of 16 rows handed out in reverse order.
  {
    const std::vector<std::int32_t> lengths{300, 2000, 5000}, cu_new{0, 100, 101, 102};
    const index_t pages_per_sequence = 5000 / 16 + 1, pages = 3 * pages_per_sequence;
    std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
    for (index_t i = 0; i < pages; ++i) table[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(pages - 1 - i);
    std::vector<posenc::position> qpos;
    for (index_t i = 200; i < 300; ++i) qpos.push_back(i);
    qpos.push_back(1999);
    qpos.push_back(4999);
    const mat<float> qs = random_rows(102, heads * d, 8), kn = random_rows(102, kv_heads * d, 9),
                     vn = random_rows(102, kv_heads * d, 10);
    mat<float> os(102, heads * d), lses(102, heads);
    auto step = [&](auto storage, const char* name) {
      using S = decltype(storage);
      mat<S> kc = mat<S>::Zero(pages * 16, kv_heads * d), vc = mat<S>::Zero(pages * 16, kv_heads * d);
      const posenc::paged_kv<S> pages_of{
          posenc::view_of(kc),         posenc::view_of(vc), 16, table, pages_per_sequence, lengths, {},
          posenc::cached_keys::rotated};
      for (posenc::executor* ex : {static_cast<posenc::executor*>(&serial), static_cast<posenc::executor*>(&pool)}) {
        const std::string on = ex == &serial ? " on the calling thread" : " on a thread pool";
        const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true, .executor = ex};
        expect_no_allocation(std::string("paged_append, ") + name + on,
                             [&] { posenc::paged_append(pages_of, kn, vn, cu_new, rope, &ws); });
        expect_no_allocation(std::string("paged_attention, RoPE, ") + name + on, [&] {
          posenc::paged_attention(qs, posenc::paged_kv<const S>(pages_of), os, cu_new, posenc::positions(qpos), rope, p,
                                  lses, &ws);
        });
      }
    };
    step(float{}, "fp32 pages");
    step(Eigen::bfloat16{}, "bf16 pages");
    const std::vector<std::int32_t> cu_q{0, 100, 101}, cu_k{0, 300, 2000};
    std::vector<posenc::position> kpos;
    for (index_t i = 0; i < 300; ++i) kpos.push_back(i);
    for (index_t i = 0; i < 1700; ++i) kpos.push_back(i);
    std::vector<posenc::position> vq(qpos.begin(), qpos.begin() + 101);
    vq[100] = 1699;
    const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true, .executor = &pool};
    expect_no_allocation("attention_varlen, ALiBi, on a thread pool", [&] {
      posenc::attention_varlen(qs.topRows(101), k.topRows(2000), v.topRows(2000), os.topRows(101), cu_q, cu_k,
                               posenc::positions(vq), posenc::positions(kpos), alibi, p, lses.topRows(101), &ws);
    });
  }

  mat<float> x = random_rows(prompt, heads * d, 7);
  const auto table = rope.make_cache(0, prompt);
  expect_no_allocation("rope.rotate on a thread pool", [&] { rope.rotate(x, posenc::arange(0, prompt), &pool); });
  expect_no_allocation("rope.rotate_backward on a thread pool",
                       [&] { rope.rotate_backward(x, posenc::arange(0, prompt), &pool); });
  expect_no_allocation("rope.rotate with a cache", [&] { rope.rotate(x, posenc::arange(0, prompt), table, &pool); });
  mat<float> part = out, part_lse = lse;
  expect_no_allocation("merge_partial", [&] { posenc::merge_partial(out, lse, part, part_lse); });

  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
#endif
