// Safety of the calls an engine makes: the encoder given to attention is applied once, positions
// anywhere in int64 mask the same way in every path, sizes that overflow are refused, mistakes
// are exceptions with the sizes in the message, and the executor decides where work runs.
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/distributed/ring.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/executor.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::position;
template <class T>
using mat = posenc::row_matrix<T>;

namespace {

__extension__ typedef __int128 i128;  // exact differences and products of int64 values

constexpr position big = position{1} << 60;

bool same_bits(const mat<float>& a, const mat<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

// Softmax attention in double, one head of width d per column block, no encoding, with the mask
// written from its definition in 128-bit integers: causal k <= q, q - k <= left, k - q <= right.
mat<double> formula(const mat<double>& q, const mat<double>& k, const mat<double>& v, const std::vector<position>& qp,
                    const std::vector<position>& kp, index_t heads, bool causal, position left, position right) {
  const index_t d = q.cols() / heads;
  mat<double> out = mat<double>::Zero(q.rows(), q.cols());
  for (index_t h = 0; h < heads; ++h)
    for (index_t i = 0; i < q.rows(); ++i) {
      std::vector<double> s;
      std::vector<index_t> seen;
      for (index_t j = 0; j < k.rows(); ++j) {
        const i128 diff = static_cast<i128>(qp[i]) - static_cast<i128>(kp[j]);  // q - k
        if (causal && diff < 0) continue;
        if (left >= 0 && diff > left) continue;
        if (right >= 0 && -diff > right) continue;
        s.push_back(q.row(i).segment(h * d, d).dot(k.row(j).segment(h * d, d)) / std::sqrt(double(d)));
        seen.push_back(j);
      }
      if (s.empty()) continue;
      const double m = *std::max_element(s.begin(), s.end());
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - m));
      for (std::size_t t = 0; t < s.size(); ++t) out.row(i).segment(h * d, d) += s[t] / l * v.row(seen[t]).segment(h * d, d);
    }
  return out;
}

}  // namespace

// ---- the encoder given to attention is applied by it, once ------------------------------------

// Telling attention that q and k are rotated already was a flag whose default rotated them again.
// There is no such flag: pre-rotated inputs are attended with no_position.
template <class P>
concept has_rotation_flag = requires(P p) { p.rotation; };
static_assert(!has_rotation_flag<posenc::attention_params>,
              "attention_params must not have a rotation mode: the encoder passed is always applied");

TEST_CASE("RoPE given to attention rotates once; rotated inputs are attended with no_position", "[safety][rope]") {
  const index_t n = 96, heads = 2, d = 32;
  const posenc::rope<float> rope({.head_dim = d});
  const mat<float> q = posenc_test::random_normal<float>(n, heads * d, 1);
  const mat<float> k = posenc_test::random_normal<float>(n, heads * d, 2);
  const mat<float> v = posenc_test::random_normal<float>(n, heads * d, 3);
  const auto pos = posenc::arange(5, n);
  const posenc::attention_params p{.heads = heads, .causal = true};

  mat<float> in_call(n, heads * d), rotated_first(n, heads * d), twice(n, heads * d);
  posenc::attention(q, k, v, in_call, pos, pos, rope, p);
  mat<float> qr = q, kr = k;
  rope.rotate(qr, pos);
  rope.rotate(kr, pos);
  posenc::attention(qr, kr, v, rotated_first, pos, pos, posenc::no_position<float>{}, p);
  CHECK((in_call - rotated_first).cwiseAbs().maxCoeff() <= 2e-6f);
  // The mistake the old flag allowed, written out: rotated inputs given the rope again. It is a
  // different computation (two rotations), not a near-equal one, which is why the API has no
  // default that does it.
  posenc::attention(qr, kr, v, twice, pos, pos, rope, p);
  CHECK((twice - rotated_first).cwiseAbs().maxCoeff() > 1e-2f);
}

// ---- one visibility rule: the ring at positions past 2^53 --------------------------------------

TEST_CASE("ring at positions near 2^60 sees exactly the keys attention sees", "[safety][ring][positions]") {
  // Positions near 2^60 are 256 apart in double: deciding the ring's visible rows in double
  // dropped queries that see a key (a difference of 0.027 from one process).
  const index_t n = 64, heads = 2, d = 16;
  const mat<double> qd = posenc_test::random_normal<double>(n, heads * d, 11);
  const mat<double> kd = posenc_test::random_normal<double>(n, heads * d, 12);
  const mat<double> vd = posenc_test::random_normal<double>(n, heads * d, 13);
  const mat<float> q = qd.cast<float>(), k = kd.cast<float>(), v = vd.cast<float>();
  std::vector<position> pos(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = big + 3 * i;  // a strided grid
  for (const posenc::attention_params& p : {posenc::attention_params{.heads = heads, .causal = true, .window_left = 7},
                                           posenc::attention_params{.heads = heads, .window_left = 4, .window_right = 9},
                                           posenc::attention_params{.heads = heads, .causal = true}}) {
    const mat<double> want = formula(qd, kd, vd, pos, pos, heads, p.causal, p.window_left, p.window_right);
    for (const int P : {2, 3}) {
      // Contiguous shards, each device holding its own rows and positions.
      std::vector<mat<float>> outs;
      std::vector<posenc::ring_device<float>> devices;
      outs.reserve(static_cast<std::size_t>(P));
      for (int r = 0; r < P; ++r) {
        const index_t lo = r * n / P, hi = (r + 1) * n / P;
        outs.emplace_back(hi - lo, heads * d);
        const posenc::positions pr(std::span<const position>(pos.data() + lo, static_cast<std::size_t>(hi - lo)));
        devices.push_back({posenc::view_of(q.middleRows(lo, hi - lo)), posenc::view_of(k.middleRows(lo, hi - lo)),
                           posenc::view_of(v.middleRows(lo, hi - lo)), pr, pr, posenc::view_of(outs.back())});
      }
      posenc::ring_attention_simulate(std::span<const posenc::ring_device<float>>(devices),
                                      posenc::no_position<float>{}, p);
      mat<float> ring(n, heads * d);
      for (int r = 0; r < P; ++r) ring.middleRows(r * n / P, outs[static_cast<std::size_t>(r)].rows()) = outs[r];
      INFO("P " << P << " causal " << p.causal << " window (" << p.window_left << ", " << p.window_right << ")");
      CHECK((ring.cast<double>() - want).cwiseAbs().maxCoeff() <= 1e-5);
    }
  }
}

TEST_CASE("the masking rule decides with exact integers at the int64 extremes", "[safety][positions]") {
  using posenc::detail::mask_rule;
  constexpr position lo = std::numeric_limits<position>::min(), hi = std::numeric_limits<position>::max();
  const mask_rule window{.causal = false, .left = 3, .right = 2};
  CHECK(window.visible(hi, hi - 3));
  CHECK_FALSE(window.visible(hi, hi - 4));
  CHECK(window.visible(lo, lo + 2));
  CHECK_FALSE(window.visible(lo, lo + 3));
  CHECK_FALSE(window.visible(lo, hi));
  CHECK_FALSE(window.visible(hi, lo));
  // Queries that see a key range: clamped bounds, no overflow.
  const auto s = window.queries_for(lo, lo + 1);
  CHECK(s.lo == lo);
  CHECK(s.hi == lo + 4);
  const mask_rule causal{.causal = true};
  CHECK(causal.visible(hi, lo));
  CHECK_FALSE(causal.visible(lo, hi));
  CHECK(causal.queries_for(hi, hi).lo == hi);
  CHECK(causal.queries_for(hi, hi).hi == hi);
}

// ---- sizes that overflow are refused, tiles never exceed the call ------------------------------

TEST_CASE("tile sizes larger than the call are the call; huge thread counts are the executor's", "[safety][sizes]") {
  const index_t heads = 2, d = 16, n_kv = 5, n_q = 3;
  const mat<float> q = posenc_test::random_normal<float>(n_q, heads * d, 21);
  const mat<float> k = posenc_test::random_normal<float>(n_kv, heads * d, 22);
  const mat<float> v = posenc_test::random_normal<float>(n_kv, heads * d, 23);
  const auto qp = posenc::arange(n_kv - n_q, n_q), kp = posenc::arange(0, n_kv);
  const posenc::no_position<float> none;
  mat<float> plain(n_q, heads * d), huge(n_q, heads * d), lse(n_q, heads);
  posenc::attention(q, k, v, plain, qp, kp, none, {.heads = heads, .causal = true});
  const posenc::attention_params p{.heads = heads, .causal = true, .q_tile = index_t{1} << 62,
                                   .k_tile = index_t{1} << 62, .threads = INT_MAX};
  posenc::attention(q, k, v, huge, qp, kp, none, p, lse);
  CHECK(same_bits(plain, huge));
  CHECK(lse.allFinite());
  // Its workspace is sized by the call (five keys), not by the tile asked for.
  CHECK(posenc::attention_workspace_bytes<float>(p, n_q, n_kv, d, none) < (1u << 20));
}

TEST_CASE("sizes that overflow are std::invalid_argument, never a wrapped size", "[safety][sizes]") {
  const posenc::no_position<float> none;
  const posenc::attention_params p{.heads = 1};
  // A head so wide that its tiles cannot be addressed.
  CHECK_THROWS_AS(posenc::attention_workspace_bytes<float>(p, 4, 4, index_t{1} << 60, none), std::invalid_argument);
  CHECK_THROWS_AS(posenc::attention_workspace_bytes<float>(p, 1 << 20, 1 << 20, index_t{1} << 55, none),
                  std::invalid_argument);
  // A cos/sin table of 2^58 positions x 64 pairs does not fit an index.
  const posenc::rope<float> rope({.head_dim = 128});
  CHECK_INVALID(rope.make_cache(0, index_t{1} << 58), "rope::make_cache count");
  // A shard list that cannot be allocated is an exception, not an empty shard.
  CHECK_THROWS(posenc::ring_shard_positions(index_t{1} << 62, 1, 0, posenc::ring_layout::contiguous));
}

TEST_CASE("ring shards are exact for sequences up to INT64_MAX", "[safety][ring][sizes]") {
  // Chunk c of `parts` is [floor(c n / parts), floor((c + 1) n / parts)), in 128-bit arithmetic.
  auto boundary = [](index_t c, index_t n, index_t parts) {
    return static_cast<index_t>(static_cast<i128>(c) * n / parts);
  };
  for (const index_t n : {std::numeric_limits<index_t>::max(), std::numeric_limits<index_t>::max() - 1,
                          (index_t{1} << 62) + 12345, index_t{1000}}) {
    for (const int ranks : {1, 2, 3, 7, INT_MAX}) {
      for (const int rank : {0, 1, ranks / 2, ranks - 1}) {
        if (rank >= ranks) continue;
        const auto contiguous = posenc::ring_shard_runs(n, ranks, rank, posenc::ring_layout::contiguous);
        const index_t a = boundary(rank, n, ranks), b = boundary(rank + 1, n, ranks);
        INFO("n " << n << " ranks " << ranks << " rank " << rank);
        REQUIRE(contiguous.size() == (b > a ? 1u : 0u));
        if (b > a) {
          CHECK(contiguous[0].start == a);
          CHECK(contiguous[0].count == b - a);
        }
        // Zigzag: chunks rank and 2P - 1 - rank of 2P, the empty ones left out.
        const auto zigzag = posenc::ring_shard_runs(n, ranks, rank, posenc::ring_layout::zigzag);
        const index_t parts = 2 * index_t{ranks};
        std::vector<posenc::position_run> want;
        for (const index_t c : {index_t{rank}, parts - 1 - rank}) {
          const index_t c0 = boundary(c, n, parts), c1 = boundary(c + 1, n, parts);
          if (c1 > c0) want.push_back({c0, c1 - c0});
        }
        REQUIRE(zigzag.size() == want.size());
        for (std::size_t i = 0; i < want.size(); ++i) {
          CHECK(zigzag[i].start == want[i].start);
          CHECK(zigzag[i].count == want[i].count);
        }
      }
    }
  }
}

// ---- validation before any work, with the sizes in the message --------------------------------

TEST_CASE("ring attention refuses bad knobs as attention does, even with empty shards", "[safety][ring][errors]") {
  const posenc::no_position<float> none;
  mat<float> q(0, 32), k(0, 32), out(0, 32);
  const posenc::ring_device<float> empty{posenc::view_of(std::as_const(q)), posenc::view_of(std::as_const(k)),
                                         posenc::view_of(std::as_const(k)), posenc::arange(0, 0), posenc::arange(0, 0),
                                         posenc::view_of(out)};
  const std::vector<posenc::ring_device<float>> devices{empty, empty};
  const std::span<const posenc::ring_device<float>> all(devices);
  CHECK_INVALID(posenc::ring_attention_simulate(all, none, {.heads = 0}), "attention_params.heads = 0");
  CHECK_INVALID(posenc::ring_attention_simulate(all, none, {.heads = 4, .kv_heads = 3}),
                "attention_params.kv_heads = 3");
  const mat<float> seq = posenc_test::random_normal<float>(8, 32, 31);
  mat<float> seq_out(8, 32);
  CHECK_INVALID(posenc::ring_attention_simulate(seq, seq, seq, seq_out, 2, posenc::ring_layout::zigzag, none,
                                                {.heads = 0}),
                "attention_params.heads = 0");
}

TEST_CASE("shape mistakes are precondition_error with the sizes, catchable as std::invalid_argument",
          "[safety][errors]") {
  using Catch::Contains;
  const mat<float> q = posenc_test::random_normal<float>(4, 4 * 16, 41);
  const mat<float> k48 = posenc_test::random_normal<float>(4, 48, 42);
  const mat<float> k32 = posenc_test::random_normal<float>(4, 32, 43);
  mat<float> out(4, 4 * 16);
  const auto pos = posenc::arange(0, 4);
  const posenc::no_position<float> none;
  CHECK_THROWS_AS(posenc::attention(q, k48, k32, out, pos, pos, none, {.heads = 4, .kv_heads = 2}),
                  posenc::precondition_error);
  CHECK_THROWS_WITH(posenc::attention(q, k48, k32, out, pos, pos, none, {.heads = 4, .kv_heads = 2}),
                    Contains("k has 48 columns but kv_heads * head_dim = 2 * 16 = 32 are needed"));
  CHECK_THROWS_AS(posenc::attention(q, k32, k32, out, pos, posenc::arange(0, 3), none, {.heads = 4, .kv_heads = 2}),
                  std::invalid_argument);
  CHECK_THROWS_WITH(posenc::attention(q, k32, k32, out, pos, posenc::arange(0, 3), none, {.heads = 4, .kv_heads = 2}),
                    Contains("3 key positions for 4 rows of k"));
  mat<float> x(3, 40);
  CHECK_THROWS_WITH(posenc::rope<float>({.head_dim = 16}).rotate(x, posenc::arange(0, 3)),
                    Contains("x has 40 columns, not a multiple of head_dim = 16"));
  const position top = std::numeric_limits<position>::max();
  CHECK_THROWS_WITH(posenc::arange(top - 1, 3), Contains("start + count - 1 = ") && Contains("overflows int64"));
}

// ---- executors ---------------------------------------------------------------------------------

namespace {

// An executor of the host's: runs items on its own threads and counts what it was asked.
class counting_executor final : public posenc::executor {
 public:
  int concurrency() const noexcept override { return 3; }
  void parallel_for(index_t items, int workers, posenc::work_ref body) override {
    ++loops;
    total_items += items;
    max_workers = std::max(max_workers, workers);
    std::vector<std::thread> threads;
    std::atomic<index_t> next{0};
    for (int w = 0; w < workers; ++w)
      threads.emplace_back([&, w] {
        for (index_t i; (i = next.fetch_add(1)) < items;) body(i, w);
      });
    for (auto& t : threads) t.join();
  }
  int loops = 0;
  index_t total_items = 0;
  int max_workers = 0;
};

}  // namespace

TEST_CASE("a thread pool runs every item once, on distinct worker slots", "[safety][executor]") {
  posenc::thread_pool pool(3);
  CHECK(pool.concurrency() == 3);
  for (const index_t items : {0, 1, 2, 7, 1000}) {
    std::vector<std::atomic<int>> seen(static_cast<std::size_t>(items));
    std::vector<std::atomic<int>> busy(3);
    std::atomic<bool> clash{false}, bad_slot{false};
    auto body = [&](index_t i, int w) {
      if (w < 0 || w >= 3) {
        bad_slot = true;
        return;
      }
      if (busy[static_cast<std::size_t>(w)].fetch_add(1) != 0) clash = true;
      seen[static_cast<std::size_t>(i)].fetch_add(1);
      busy[static_cast<std::size_t>(w)].fetch_sub(1);
    };
    pool.parallel_for(items, 3, body);
    CHECK_FALSE(clash.load());
    CHECK_FALSE(bad_slot.load());
    CHECK(std::all_of(seen.begin(), seen.end(), [](const auto& s) { return s.load() == 1; }));
  }
}

TEST_CASE("a thread pool passes an item's exception to the caller and stays usable", "[safety][executor]") {
  posenc::thread_pool pool(2);
  auto failing = [](index_t i, int) {
    if (i == 5) throw std::runtime_error("item 5");
  };
  CHECK_THROWS_WITH(pool.parallel_for(50, 2, failing), "item 5");
  std::atomic<index_t> sum{0};
  auto add = [&](index_t i, int) { sum += i; };
  pool.parallel_for(100, 2, add);
  CHECK(sum.load() == 4950);
  // A loop started from inside an item of the same pool runs on that thread, not into a deadlock.
  std::atomic<int> inner{0};
  auto nested = [&](index_t, int) {
    auto leaf = [&](index_t, int) { ++inner; };
    pool.parallel_for(4, 2, leaf);
  };
  pool.parallel_for(3, 2, nested);
  CHECK(inner.load() == 12);
}

TEST_CASE("attention runs on the host's executor with the same bits as on the calling thread", "[safety][executor]") {
  const index_t n = 300, heads = 4, kv_heads = 2, d = 32;
  const mat<float> q = posenc_test::random_normal<float>(n, heads * d, 51);
  const mat<float> k = posenc_test::random_normal<float>(n, kv_heads * d, 52);
  const mat<float> v = posenc_test::random_normal<float>(n, kv_heads * d, 53);
  const auto pos = posenc::arange(0, n);
  const posenc::rope<float> rope({.head_dim = d});
  posenc::serial_executor serial;
  counting_executor host;
  mat<float> a(n, heads * d), b(n, heads * d);
  posenc::attention(q, k, v, a, pos, pos, rope,
                    {.heads = heads, .kv_heads = kv_heads, .causal = true, .q_tile = 32, .executor = &serial});
  posenc::attention(q, k, v, b, pos, pos, rope,
                    {.heads = heads, .kv_heads = kv_heads, .causal = true, .q_tile = 32, .executor = &host});
  CHECK(same_bits(a, b));
  CHECK(host.loops == 1);
  CHECK(host.total_items == kv_heads * ((n + 15) / 16));  // 32-row tiles hold 16 tokens of a group of 2
  CHECK(host.max_workers == 3);
  // threads limits the workers taken from the executor.
  posenc::attention(q, k, v, b, pos, pos, rope,
                    {.heads = heads, .kv_heads = kv_heads, .causal = true, .threads = 2, .executor = &host});
  CHECK(host.max_workers == 3);
  counting_executor limited;
  posenc::attention(q, k, v, b, pos, pos, rope,
                    {.heads = heads, .kv_heads = kv_heads, .causal = true, .threads = 2, .executor = &limited});
  CHECK(limited.max_workers == 2);
  CHECK(same_bits(a, b));
}

TEST_CASE("rope.rotate shares rows among workers with the same bits", "[safety][executor][rope]") {
  const posenc::rope<float> rope({.head_dim = 64, .base = 500000.0});
  const mat<float> x = posenc_test::random_normal<float>(1000, 4 * 64, 61);
  std::vector<position> pos(1000);
  for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<position>(i * 7919 % 100003);
  mat<float> one = x, many = x, cached = x;
  posenc::serial_executor serial;
  rope.rotate(one, posenc::positions(pos), &serial);
  counting_executor host;
  rope.rotate(many, posenc::positions(pos), &host);
  CHECK(host.loops == 1);
  CHECK(host.total_items > 1);
  CHECK(same_bits(one, many));
  const auto cache = rope.make_cache(0, 100003);
  rope.rotate(cached, posenc::positions(pos), cache, &host);
  CHECK(same_bits(one, cached));
  CHECK_INVALID(rope.rotate(many, posenc::positions(pos), &host, -1), "threads");
}

TEST_CASE("the default executor is the calling thread until the host installs one", "[safety][executor]") {
  posenc::executor* const installed = &posenc::default_executor();  // the test runner's pool
  posenc::set_default_executor(nullptr);
  CHECK(posenc::default_executor().concurrency() == 1);
  counting_executor host;
  posenc::set_default_executor(&host);
  const posenc::rope<float> rope({.head_dim = 16});
  mat<float> x = posenc_test::random_normal<float>(500, 16, 71);
  rope.rotate(x, posenc::arange(0, 500));
  CHECK(host.loops == 1);
  posenc::set_default_executor(installed);
}

// ---- packed sequences and left padding: what works today ---------------------------------------

TEST_CASE("packed sequences and left padding: one call per sequence on row slices, no copies",
          "[safety][positions]") {
  // Two sequences packed in one buffer, each at positions 0..n-1. One call attends one sequence:
  // each sequence is a row slice of the packed buffer with its own positions.
  const index_t n1 = 40, n2 = 25, heads = 2, d = 16;
  const mat<float> q = posenc_test::random_normal<float>(n1 + n2, heads * d, 81);
  const mat<float> k = posenc_test::random_normal<float>(n1 + n2, heads * d, 82);
  const mat<float> v = posenc_test::random_normal<float>(n1 + n2, heads * d, 83);
  const posenc::alibi<float> alibi({.num_heads = heads});
  const posenc::attention_params p{.heads = heads, .causal = true};
  mat<float> packed(n1 + n2, heads * d), first(n1, heads * d), second(n2, heads * d);
  posenc::attention(q.topRows(n1), k.topRows(n1), v.topRows(n1), packed.topRows(n1), posenc::arange(0, n1),
                    posenc::arange(0, n1), alibi, p);
  posenc::attention(q.bottomRows(n2), k.bottomRows(n2), v.bottomRows(n2), packed.bottomRows(n2), posenc::arange(0, n2),
                    posenc::arange(0, n2), alibi, p);
  const mat<float> q1 = q.topRows(n1), k1 = k.topRows(n1), v1 = v.topRows(n1);
  const mat<float> q2 = q.bottomRows(n2), k2 = k.bottomRows(n2), v2 = v.bottomRows(n2);
  posenc::attention(q1, k1, v1, first, posenc::arange(0, n1), posenc::arange(0, n1), alibi, p);
  posenc::attention(q2, k2, v2, second, posenc::arange(0, n2), posenc::arange(0, n2), alibi, p);
  CHECK(same_bits(packed.topRows(n1), first));
  CHECK(same_bits(packed.bottomRows(n2), second));

  // Both sequences in one call with their own positions 0..n-1 are one sequence to attention:
  // masks compare positions only, so tokens of the second see keys of the first.
  std::vector<position> both;
  for (index_t i = 0; i < n1; ++i) both.push_back(i);
  for (index_t i = 0; i < n2; ++i) both.push_back(i);
  mat<float> mixed(n1 + n2, heads * d);
  posenc::attention(q, k, v, mixed, posenc::positions(both), posenc::positions(both), alibi, p);
  CHECK((mixed.bottomRows(n2) - second).cwiseAbs().maxCoeff() > 1e-3f);

  // Left padding: a batch row [pad pad pad t0 t1 ...] is attended as the slice of its real tokens.
  const index_t pad = 7;
  mat<float> padded_out = mat<float>::Zero(n1, heads * d);
  posenc::attention(q.middleRows(pad, n1 - pad), k.middleRows(pad, n1 - pad), v.middleRows(pad, n1 - pad),
                    padded_out.middleRows(pad, n1 - pad), posenc::arange(0, n1 - pad), posenc::arange(0, n1 - pad),
                    alibi, p);
  const mat<float> qs = q.middleRows(pad, n1 - pad), ks = k.middleRows(pad, n1 - pad), vs = v.middleRows(pad, n1 - pad);
  mat<float> alone(n1 - pad, heads * d);
  posenc::attention(qs, ks, vs, alone, posenc::arange(0, n1 - pad), posenc::arange(0, n1 - pad), alibi, p);
  CHECK(same_bits(padded_out.middleRows(pad, n1 - pad), alone));
}
