// Thread safety: one encoder object, built once, used from several threads at once gives every
// thread the bits a single thread gets (docs/numerics.md lists what is immutable after
// construction). Each thread owns its matrices, caches' copies, scratch and workspaces; only the
// encoder (and, for RoPE, one shared cache) is shared. Under the sanitizer build a race that
// corrupts memory is reported; the ThreadSanitizer suite of scripts/test (clang-tsan) checks the rest.
#include <catch2/catch.hpp>

#include "support.hpp"
#include <thread>
#include <type_traits>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/sinusoidal.hpp"
#include "posenc/encoders/t5_bias.hpp"

using posenc::index_t;
template <class S>
using mat = posenc::row_matrix<S>;

namespace {

constexpr int k_threads = 4;
constexpr int k_rounds = 8;  // each thread repeats its work, so calls overlap

// Runs `work(t)` on k_threads threads at once, k_rounds times each, and checks every result
// against `work` run alone on the calling thread first.
template <class F>
void same_bits_from_every_thread(F work) {
  const auto expected = work(0);
  std::vector<std::vector<std::remove_const_t<decltype(expected)>>> got(k_threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < k_threads; ++t)
    pool.emplace_back([&, t] {
      for (int r = 0; r < k_rounds; ++r) got[static_cast<std::size_t>(t)].push_back(work(t));
    });
  for (auto& th : pool) th.join();
  for (int t = 0; t < k_threads; ++t)
    for (int r = 0; r < k_rounds; ++r) {
      INFO("thread " << t << ", round " << r);
      CHECK(got[static_cast<std::size_t>(t)][static_cast<std::size_t>(r)] == expected);
    }
}

}  // namespace

TEMPLATE_TEST_CASE("one rope, its cache and its tile rotator serve several threads at once", "[threads][rope]",
                   float, double) {
  using T = TestType;
  const posenc::rope<T> rope({.head_dim = 64, .base = 5e5, .scaling = posenc::yarn_scaling{.factor = 4}});
  const auto cache = rope.make_cache(1000, 64);
  const auto x = posenc_test::random_normal<T>(64, 4 * 64, 1);
  same_bits_from_every_thread([&](int) {
    mat<T> a = x, b = x;
    rope.rotate(a, posenc::arange(1000, 64));
    rope.rotate(b, posenc::arange(1000, 64), cache);
    const auto rot = rope.tile_rotator();
    std::vector<T> scratch(static_cast<std::size_t>(rot.scratch_size()));
    mat<T> c = x.leftCols(64);
    rot.rotate(posenc::view_of(c), posenc::arange(1000, 64), scratch.data());
    mat<T> all(64, 9 * 64);
    all << a, b, c;
    return all;
  });
}

TEMPLATE_TEST_CASE("one ALiBi, T5, Shaw and sinusoidal encoder serve several threads at once", "[threads][bias]",
                   float, double) {
  using T = TestType;
  const posenc::alibi<T> alibi({.num_heads = 12, .head_offset = 4});
  const mat<T> t5_table = posenc_test::random_normal<T>(32, 8, 2);
  const posenc::t5_relative_bias<T> t5({.num_heads = 8}, t5_table);
  const mat<T> ak = posenc_test::random_normal<T>(9, 16, 3), av = posenc_test::random_normal<T>(9, 16, 4);
  const posenc::shaw_relative<T> shaw({.head_dim = 16, .max_relative_position = 4}, ak, av);
  const posenc::sinusoidal<T> sin({.dim = 128});
  const std::vector<posenc::position> kpos = {5, 900, -3, 77, 4096, 12, 13, 2'000'000'000};
  const auto q = posenc_test::random_normal<T>(40, 16, 5);
  same_bits_from_every_thread([&](int) {
    mat<T> tiles = mat<T>::Zero(40, 3 * 8);
    alibi.add_bias_tile(tiles.leftCols(8), 3, posenc::arange(0, 40), posenc::positions(kpos));
    t5.add_bias_tile(tiles.middleCols(8, 8), 5, posenc::arange(0, 40), posenc::positions(kpos));
    mat<T> g(40, 9), w = mat<T>::Zero(40, 9), out = mat<T>::Zero(40, 16);
    shaw.query_terms(q, g);
    shaw.add_bias_tile(tiles.rightCols(8), g, posenc::arange(0, 40), posenc::positions(kpos));
    shaw.accumulate_value_weights(tiles.rightCols(8), posenc::arange(0, 40), posenc::positions(kpos), w);
    shaw.add_value_term(w, out);
    mat<T> all(40, 24 + 16 + 128);
    all << tiles, out, sin.table(posenc::arange(1'000'000, 40));
    return all;
  });
}

TEST_CASE("attention calls on several threads share one encoder and get the single-thread bits",
          "[threads][attention]") {
  const index_t n = 96, d = 32;
  const posenc::rope<float> rope({.head_dim = d});
  const posenc::alibi<float> alibi({.num_heads = 4});
  const auto q = posenc_test::random_normal<float>(n, 4 * d, 6), k = posenc_test::random_normal<float>(n, 2 * d, 7),
             v = posenc_test::random_normal<float>(n, 2 * d, 8);
  // Each call on one thread of its own (threads = 1) and its own workspace: a workspace is the one
  // object that must not be shared by concurrent calls.
  const posenc::attention_params p{.heads = 4, .kv_heads = 2, .causal = true, .q_tile = 32, .k_tile = 32, .threads = 1};
  same_bits_from_every_thread([&](int) {
    posenc::attention_workspace ws;
    mat<float> a(n, 4 * d), b(n, 4 * d);
    posenc::attention(q, k, v, a, posenc::arange(0, n), posenc::arange(0, n), rope, p, nullptr, &ws);
    posenc::attention(q, k, v, b, posenc::arange(0, n), posenc::arange(0, n), alibi, p, nullptr, &ws);
    mat<float> all(n, 8 * d);
    all << a, b;
    return all;
  });
}
