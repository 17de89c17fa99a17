// Ring attention simulated in one process (distributed/ring.hpp): layouts, the balance of the
// zigzag layout, and the ring's output against the double-precision naive reference over the
// whole sequence, for P = 1..4 devices, both layouts, full and causal masks, every encoder
// family, uneven and empty shards.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/distributed/ring.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "support.hpp"

using posenc::index_t;
using posenc::position;
using posenc::ring_layout;

namespace {

template <class T>
constexpr double eps = std::numeric_limits<T>::epsilon();

// The ring's outputs differ from the reference by the kernel's rounding plus that of up to a few
// dozen log-sum-exp merges per row; outputs are O(1).
constexpr double ring_tolerance_ulps = 32;

constexpr index_t heads = 2, kv_heads = 1, head_dim = 16;

// Which chunk of 2P holds position i, from the layout's definition: chunk c is
// [floor(c n / 2P), floor((c + 1) n / 2P)).
index_t chunk_of(index_t i, index_t n, index_t chunks) {
  for (index_t c = 0; c < chunks; ++c)
    if (i >= c * n / chunks && i < (c + 1) * n / chunks) return c;
  return -1;
}

// The encoders of every family, for T and for the double reference, handed to `f(name, enc_t, enc_d)`.
template <class T, class F>
void for_each_encoder(F&& f) {
  f("none", posenc::no_position<T>{}, posenc::no_position<double>{});
  const posenc::rope_params rp{.head_dim = head_dim, .base = 10000.0};
  f("rope", posenc::rope<T>(rp), posenc::rope<double>(rp));
  const posenc::alibi_params ap{.num_heads = heads};
  f("alibi", posenc::alibi<T>(ap), posenc::alibi<double>(ap));
  const posenc::t5_bias_params tp{.num_heads = heads, .num_buckets = 16, .max_distance = 64};
  const auto table = posenc_test::random_normal<double>(16, heads, 7);
  f("t5", posenc::t5_relative_bias<T>(tp, table.cast<T>().eval()), posenc::t5_relative_bias<double>(tp, table));
  const posenc::shaw_params sp{.head_dim = head_dim, .max_relative_position = 6};
  const auto ak = posenc_test::random_normal<double>(13, head_dim, 8, 0.3);
  const auto av = posenc_test::random_normal<double>(13, head_dim, 9, 0.3);
  f("shaw", posenc::shaw_relative<T>(sp, ak.cast<T>().eval(), av.cast<T>().eval()),
    posenc::shaw_relative<double>(sp, ak, av));
}

struct inputs {
  posenc::row_matrix<double> q, k, v;
  explicit inputs(index_t n)
      : q(posenc_test::random_normal<double>(n, heads * head_dim, 21)),
        k(posenc_test::random_normal<double>(n, kv_heads * head_dim, 22)),
        v(posenc_test::random_normal<double>(n, kv_heads * head_dim, 23)) {}
};

// The ring over the whole sequence with each P and layout against the double reference.
template <class T, class ET, class ED>
void check_ring(const char* name, const inputs& in, const posenc::attention_params& p, const ET& enc_t, const ED& enc_d,
                std::initializer_list<int> ranks, std::initializer_list<ring_layout> layouts) {
  const index_t n = in.q.rows();
  posenc::row_matrix<double> ref(n, heads * head_dim);
  posenc::attention_reference(in.q, in.k, in.v, ref, posenc::arange(0, n), posenc::arange(0, n), enc_d, p);
  const posenc::row_matrix<T> q = in.q.cast<T>(), k = in.k.cast<T>(), v = in.v.cast<T>();
  const double tol = ring_tolerance_ulps * eps<T> * std::max(1.0, ref.cwiseAbs().maxCoeff());
  for (const int P : ranks) {
    for (const ring_layout layout : layouts) {
      posenc::row_matrix<T> out = posenc::row_matrix<T>::Constant(n, heads * head_dim, T(123));
      posenc::ring_attention_simulate(q, k, v, out, P, layout, enc_t, p);
      index_t where = -1;
      const double err = posenc_test::max_abs_diff(out, ref, &where);
      INFO(name << ": n " << n << " P " << P << " layout " << (layout == ring_layout::zigzag ? "zigzag" : "contiguous")
                << " causal " << p.causal << " window " << p.window_left << ": error " << err << " at row "
                << where / (heads * head_dim) << " col " << where % (heads * head_dim) << ", tolerance " << tol);
      CHECK(err <= tol);
    }
  }
}

}  // namespace

TEST_CASE("ring layouts partition the sequence into balanced shards", "[ring]") {
  for (index_t n : {0, 1, 3, 5, 37, 1000}) {
    for (int P = 1; P <= 5; ++P) {
      for (const ring_layout layout : {ring_layout::contiguous, ring_layout::zigzag}) {
        std::vector<int> owner(static_cast<std::size_t>(n), -1);
        index_t smallest = n, largest = 0;
        for (int r = 0; r < P; ++r) {
          const auto pos = posenc::ring_shard_positions(n, P, r, layout);
          smallest = std::min<index_t>(smallest, static_cast<index_t>(pos.size()));
          largest = std::max<index_t>(largest, static_cast<index_t>(pos.size()));
          INFO("n " << n << " P " << P << " rank " << r << " zigzag " << (layout == ring_layout::zigzag));
          CHECK(std::is_sorted(pos.begin(), pos.end()));
          for (const position i : pos) {
            REQUIRE((i >= 0 && i < n));
            CHECK(owner[static_cast<std::size_t>(i)] == -1);
            owner[static_cast<std::size_t>(i)] = r;
            if (layout == ring_layout::contiguous) {
              CHECK(chunk_of(i, n, P) == r);
            } else {
              const index_t c = chunk_of(i, n, 2 * P);
              CHECK((c == r || c == 2 * P - 1 - r));
            }
          }
        }
        INFO("n " << n << " P " << P);
        CHECK(std::count(owner.begin(), owner.end(), -1) == 0);
        CHECK(largest - smallest <= (layout == ring_layout::zigzag ? 2 : 1));
      }
    }
  }
  CHECK_INVALID(posenc::ring_shard_positions(10, 0, 0, ring_layout::zigzag), "ring ranks");
  CHECK_INVALID(posenc::ring_shard_positions(10, 2, 2, ring_layout::zigzag), "ring rank");
  CHECK_INVALID(posenc::ring_shard_positions(-1, 2, 0, ring_layout::zigzag), "ring n");
}

TEST_CASE("zigzag gives every device the same causal work; contiguous does not", "[ring]") {
  // Visible (query, key) pairs per device, counted pair by pair from the causal rule kpos <= qpos.
  auto work = [](index_t n, int P, ring_layout layout) {
    std::vector<double> pairs;
    for (int r = 0; r < P; ++r) {
      double count = 0;
      for (const position qp : posenc::ring_shard_positions(n, P, r, layout)) count += static_cast<double>(qp + 1);
      pairs.push_back(count);
    }
    return *std::max_element(pairs.begin(), pairs.end()) / *std::min_element(pairs.begin(), pairs.end());
  };
  for (int P = 2; P <= 4; ++P) {
    INFO("P " << P);
    CHECK(work(4096, P, ring_layout::zigzag) <= 1.001);  // exactly 1 when 2P divides n
    CHECK(work(4800, P, ring_layout::zigzag) == 1.0);
    CHECK(work(1000, P, ring_layout::zigzag) <= 1.01);
    CHECK(work(4096, P, ring_layout::contiguous) >= 2 * P - 1.01);
  }
}

TEMPLATE_TEST_CASE("ring equals single-process attention for P = 1..4, both layouts, every encoder", "[ring]", float,
                   double) {
  using T = TestType;
  const std::initializer_list<ring_layout> both{ring_layout::contiguous, ring_layout::zigzag};
  // The double kernel has no SIMD fast path: a shorter second length keeps the test quick.
  for (const index_t n : {index_t{37}, std::is_same_v<T, float> ? index_t{1000} : index_t{300}}) {
    const inputs in(n);
    for_each_encoder<T>([&](const char* name, const auto& enc_t, const auto& enc_d) {
      check_ring<T>(name, in, {.heads = heads, .kv_heads = kv_heads}, enc_t, enc_d, {1, 2, 3, 4}, both);
      check_ring<T>(name, in, {.heads = heads, .kv_heads = kv_heads, .causal = true, .k_tile = 32}, enc_t, enc_d,
                    {1, 2, 3, 4}, both);
    });
  }
  // A causal sliding window: pairs of shards that it hides entirely are skipped.
  const inputs in(1000);
  check_ring<T>("none", in, {.heads = heads, .kv_heads = kv_heads, .causal = true, .window_left = 100},
                posenc::no_position<T>{}, posenc::no_position<double>{}, {3, 4}, both);
}

TEST_CASE("ring at n = 4096: causal RoPE and full ALiBi", "[ring]") {
  const inputs in(4096);
  const posenc::rope_params rp{.head_dim = head_dim};
  check_ring<float>("rope", in, {.heads = heads, .kv_heads = kv_heads, .causal = true}, posenc::rope<float>(rp),
                    posenc::rope<double>(rp), {2, 4}, {ring_layout::zigzag, ring_layout::contiguous});
  const posenc::alibi_params ap{.num_heads = heads, .form = posenc::alibi_form::symmetric};
  check_ring<float>("alibi", in, {.heads = heads, .kv_heads = kv_heads}, posenc::alibi<float>(ap),
                    posenc::alibi<double>(ap), {3}, {ring_layout::contiguous});
}

TEST_CASE("ring on a tensor-parallel shard of heads keeps ALiBi's global slopes", "[ring]") {
  // Heads 2..3 of a 4-head model, each with its own kv head, over a 3-device ring: the shard's
  // encoder has num_heads = 4 and head_offset = 2, and its output must equal those heads' columns
  // of the whole model's reference (slopes 1/8 and 1/16, not the 2-head slopes 1/2 and 1/4).
  const index_t n = 150, all_heads = 4;
  const auto q = posenc_test::random_normal<double>(n, all_heads * head_dim, 31);
  const auto k = posenc_test::random_normal<double>(n, all_heads * head_dim, 32);
  const auto v = posenc_test::random_normal<double>(n, all_heads * head_dim, 33);
  posenc::row_matrix<double> ref(n, all_heads * head_dim);
  posenc::attention_reference(q, k, v, ref, posenc::arange(0, n), posenc::arange(0, n),
                              posenc::alibi<double>({.num_heads = all_heads}), {.heads = all_heads, .causal = true});
  const posenc::row_matrix<float> qs = q.rightCols(2 * head_dim).cast<float>(),
                                  ks = k.rightCols(2 * head_dim).cast<float>(),
                                  vs = v.rightCols(2 * head_dim).cast<float>();
  posenc::row_matrix<float> out(n, 2 * head_dim);
  posenc::ring_attention_simulate(qs, ks, vs, out, 3, ring_layout::zigzag,
                                  posenc::alibi<float>({.num_heads = all_heads, .head_offset = 2}),
                                  {.heads = 2, .causal = true});
  const posenc::row_matrix<double> want = ref.rightCols(2 * head_dim);
  index_t where = -1;
  const double err = posenc_test::max_abs_diff(out, want, &where);
  INFO("error " << err << " at flat index " << where);
  CHECK(err <= ring_tolerance_ulps * eps<float> * std::max(1.0, want.cwiseAbs().maxCoeff()));
}

TEST_CASE("ring with empty shards and more devices than tokens", "[ring]") {
  for (const index_t n : {1, 3, 5}) {
    const inputs in(n);
    for_each_encoder<float>([&](const char* name, const auto& enc_t, const auto& enc_d) {
      check_ring<float>(name, in, {.heads = heads, .kv_heads = kv_heads, .causal = true}, enc_t, enc_d, {4},
                        {ring_layout::contiguous, ring_layout::zigzag});
    });
  }
}

TEST_CASE("ring devices may hold queries without keys and keys without queries", "[ring]") {
  // Device 0: queries at 0..19, no keys; device 1: every key, no queries; device 2: nothing.
  const index_t n = 20;
  const inputs in(n);
  posenc::row_matrix<double> ref(n, heads * head_dim);
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true};
  const posenc::no_position<double> none;
  posenc::attention_reference(in.q, in.k, in.v, ref, posenc::arange(0, n), posenc::arange(0, n), none, p);
  const posenc::row_matrix<double> empty_q(0, heads * head_dim), empty_kv(0, kv_heads * head_dim);
  posenc::row_matrix<double> out(n, heads * head_dim), no_out(0, heads * head_dim), no_out2(0, heads * head_dim);
  std::vector<position> all(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) all[static_cast<std::size_t>(i)] = i;
  const std::vector<position> none_pos;
  using device = posenc::ring_device<double>;
  const std::vector<device> devices{
      {posenc::view_of(in.q), posenc::view_of(empty_kv), posenc::view_of(empty_kv), all, none_pos,
       posenc::view_of(out)},
      {posenc::view_of(empty_q), posenc::view_of(in.k), posenc::view_of(in.v), none_pos, all, posenc::view_of(no_out)},
      {posenc::view_of(empty_q), posenc::view_of(empty_kv), posenc::view_of(empty_kv), none_pos, none_pos,
       posenc::view_of(no_out2)}};
  posenc::ring_attention_simulate(std::span<const device>(devices), none, p);
  index_t where = -1;
  const double err = posenc_test::max_abs_diff(out, ref, &where);
  INFO("error " << err << " at flat index " << where);
  CHECK(err <= ring_tolerance_ulps * eps<double>);
}

TEST_CASE("ring devices with scattered positions (a round-robin split)", "[ring]") {
  // Device r holds the tokens at positions r, r + P, r + 2P, ...: no runs of consecutive positions,
  // so each device's queries and keys are attended as one set, masked position by position.
  const index_t n = 200;
  const int P = 3;
  const inputs in(n);
  const posenc::no_position<double> none;
  for (const posenc::attention_params& p :
       {posenc::attention_params{.heads = heads, .kv_heads = kv_heads, .causal = true, .k_tile = 16},
        posenc::attention_params{.heads = heads, .kv_heads = kv_heads, .window_left = 30, .window_right = 10}}) {
    posenc::row_matrix<double> ref(n, heads * head_dim), out(n, heads * head_dim);
    posenc::attention_reference(in.q, in.k, in.v, ref, posenc::arange(0, n), posenc::arange(0, n), none, p);
    std::vector<std::vector<position>> pos(P);
    for (index_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i % P)].push_back(i);
    std::vector<posenc::row_matrix<double>> qs, ks, vs, outs;
    std::vector<posenc::ring_device<double>> devices;
    for (int r = 0; r < P; ++r) {
      qs.push_back(posenc::ring_take_rows(in.q, pos[r]));
      ks.push_back(posenc::ring_take_rows(in.k, pos[r]));
      vs.push_back(posenc::ring_take_rows(in.v, pos[r]));
      outs.emplace_back(qs.back().rows(), qs.back().cols());
    }
    for (int r = 0; r < P; ++r)
      devices.push_back({posenc::view_of(qs[r]), posenc::view_of(ks[r]), posenc::view_of(vs[r]), pos[r], pos[r],
                         posenc::view_of(outs[r])});
    posenc::ring_attention_simulate(std::span<const posenc::ring_device<double>>(devices), none, p);
    for (int r = 0; r < P; ++r) posenc::ring_put_rows(outs[r], pos[r], out);
    index_t where = -1;
    const double err = posenc_test::max_abs_diff(out, ref, &where);
    INFO("causal " << p.causal << ": error " << err << " at flat index " << where);
    CHECK(err <= ring_tolerance_ulps * eps<double>);
  }
}

TEST_CASE("one device and one query block: the ring is the blockwise kernel, bit for bit", "[ring]") {
  // Merging a partial result into the empty accumulator is exact (weights 0 and 1), so with one
  // attention call per row the ring's output must be the kernel's to the last bit.
  const index_t n = 300;
  const inputs in(n);
  const posenc::row_matrix<float> q = in.q.cast<float>(), k = in.k.cast<float>(), v = in.v.cast<float>();
  const posenc::rope<float> rope({.head_dim = head_dim});
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true};
  posenc::row_matrix<float> ring(n, heads * head_dim), kernel(n, heads * head_dim);
  posenc::ring_attention_simulate(q, k, v, ring, 1, ring_layout::contiguous, rope, p, {.query_blocks = 1});
  posenc::row_matrix<float> qr = q, kr = k;
  rope.rotate(qr, posenc::arange(0, n));
  rope.rotate(kr, posenc::arange(0, n));
  std::vector<position> pos(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = i;
  posenc::attention(qr, kr, v, kernel, posenc::positions(pos), posenc::positions(pos), posenc::no_position<float>{}, p);
  CHECK(std::memcmp(ring.data(), kernel.data(), static_cast<std::size_t>(ring.size()) * sizeof(float)) == 0);
  // RoPE given to the kernel rotates each tile with its tile rotator, whose cos and sin are a few
  // ulp from rope.rotate's: the same result to float rounding, not to the bit.
  posenc::row_matrix<float> in_kernel(n, heads * head_dim);
  posenc::attention(q, k, v, in_kernel, posenc::positions(pos), posenc::positions(pos), rope, p);
  CHECK((in_kernel - ring).cwiseAbs().maxCoeff() <= 2e-6f);
  // A bias acts inside the kernel's logits in both: the same bits.
  const posenc::alibi<float> alibi({.num_heads = heads});
  posenc::ring_attention_simulate(q, k, v, ring, 1, ring_layout::contiguous, alibi, p, {.query_blocks = 1});
  posenc::attention(q, k, v, kernel, posenc::positions(pos), posenc::positions(pos), alibi, p);
  CHECK(std::memcmp(ring.data(), kernel.data(), static_cast<std::size_t>(ring.size()) * sizeof(float)) == 0);
}

TEST_CASE("ring: invalid options and shapes", "[ring]") {
  const inputs in(10);
  const posenc::row_matrix<float> q = in.q.cast<float>(), k = in.k.cast<float>(), v = in.v.cast<float>();
  posenc::row_matrix<float> out(10, heads * head_dim), short_out(9, heads * head_dim);
  const posenc::no_position<float> none;
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads};
  CHECK_INVALID(posenc::ring_attention_simulate(q, k, v, out, 0, ring_layout::zigzag, none, p), "ring ranks");
  CHECK_INVALID(posenc::ring_attention_simulate(q, k, v, out, 2, ring_layout::zigzag, none, p, {.query_blocks = 0}),
                "ring_options.query_blocks");
  CHECK_THROWS_AS(posenc::ring_attention_simulate(q, k, v, short_out, 2, ring_layout::zigzag, none, p),
                  posenc::precondition_error);
  CHECK_THROWS_AS(
      posenc::ring_attention_simulate(q, k, v, out, 2, ring_layout::zigzag, none, posenc::attention_params{.heads = 3}),
      posenc::precondition_error);
}
