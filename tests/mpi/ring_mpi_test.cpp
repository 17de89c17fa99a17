// The MPI ring against the simulator and single-process attention, run by ctest under
// `mpirun -np P` for P = 1..4 (tests/mpi/CMakeLists.txt).
//
// For each configuration every rank builds the same sequence, takes its shard, runs the MPI ring,
// and checks:
//   - its output shard equals the simulator's rows for the same P, layout and options, bit for
//     bit (and the log-sum-exp too);
//   - the output gathered on rank 0 equals single-process blockwise attention within the float
//     tolerance.
// Configurations: both layouts, causal and full, no encoding / RoPE / ALiBi / T5 / Shaw, lengths
// that P does not divide, and lengths shorter than the ring (empty shards).
//
// The backward (`mpi_ring::attention_backward`): every rank's dq, dk and dv equal the backward
// simulator's rows bit for bit; the parameter gradients (ALiBi slopes, T5 table, sinks), summed
// over the ranks, equal the simulator's within float rounding.
// SPDX-License-Identifier: Apache-2.0
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "posenc/attention/blockwise.hpp"
#include "posenc/distributed/mpi_ring.hpp"
#include "posenc/distributed/ring.hpp"
#include "posenc/distributed/ring_backward.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"

namespace {

using posenc::index_t;
using posenc::position;
using posenc::ring_layout;

constexpr index_t heads = 4, kv_heads = 2, head_dim = 16;
// The ring and the single-process kernel both compute in float; the ring reassociates the softmax
// sums through its merges. Outputs are O(1).
constexpr double tolerance_ulps = 64;

template <class T>
posenc::row_matrix<T> random_rows(index_t rows, index_t cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  posenc::row_matrix<T> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
  return m;
}

int failures = 0;

void fail(int rank, const char* what, const char* name, index_t n, ring_layout layout, bool causal, double detail) {
  ++failures;
  std::fprintf(stderr, "FAILED on rank %d: %s (%s, n %td, %s, causal %d): %g\n", rank, what, name, n,
               layout == ring_layout::zigzag ? "zigzag" : "contiguous", causal ? 1 : 0, detail);
}

template <class T, class E>
void check(const posenc::mpi_ring& ring, const char* name, const E& enc, index_t n, ring_layout layout, bool causal,
           index_t query_blocks) {
  const int P = ring.size(), rank = ring.rank();
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = causal, .k_tile = 16, .threads = 1};
  const posenc::ring_options o{.query_blocks = query_blocks};
  const auto q = random_rows<T>(n, heads * head_dim, 1), k = random_rows<T>(n, kv_heads * head_dim, 2),
             v = random_rows<T>(n, kv_heads * head_dim, 3);

  // This rank's shard through the MPI ring.
  const auto pos = ring.shard_positions(n, layout);
  const auto mq = posenc::ring_take_rows(q, pos), mk = posenc::ring_take_rows(k, pos),
             mv = posenc::ring_take_rows(v, pos);
  posenc::row_matrix<T> out(mq.rows(), mq.cols()), lse(mq.rows(), heads);
  ring.attention(mq, mk, mv, out, pos, pos, enc, p, o, lse);

  // Every device of the same ring, simulated; this rank's rows of it.
  posenc::row_matrix<T> simulated(n, heads * head_dim);
  posenc::ring_attention_simulate(q, k, v, simulated, P, layout, enc, p, o);
  const auto sim = posenc::ring_take_rows(simulated, pos);
  if (out.size() > 0 && std::memcmp(sim.data(), out.data(), static_cast<std::size_t>(out.size()) * sizeof(T)) != 0)
    fail(rank, "MPI output differs from the simulator's", name, n, layout, causal, (sim - out).cwiseAbs().maxCoeff());

  // The log-sum-exp against a single-process pass over this rank's queries.
  posenc::row_matrix<T> single_lse(mq.rows(), heads), single_shard(mq.rows(), mq.cols());
  posenc::attention(mq, k, v, single_shard, pos, posenc::arange(0, n), enc, p, single_lse);
  double lse_err = 0;
  for (index_t i = 0; i < lse.size(); ++i)
    lse_err = std::max(lse_err, std::abs(static_cast<double>(lse.data()[i]) - single_lse.data()[i]));
  if (!(lse_err <= tolerance_ulps * std::numeric_limits<T>::epsilon() * 10))
    fail(rank, "log-sum-exp differs from single-process attention", name, n, layout, causal, lse_err);

  // The gathered output against single-process attention.
  posenc::row_matrix<T> full(rank == 0 ? n : 0, heads * head_dim);
  ring.gather(out, pos, full);
  if (rank == 0) {
    posenc::row_matrix<T> single(n, heads * head_dim);
    posenc::attention(q, k, v, single, posenc::arange(0, n), posenc::arange(0, n), enc, p);
    const double scale = std::max<double>(1.0, single.cwiseAbs().maxCoeff());
    const double err = (full - single).cwiseAbs().maxCoeff();
    if (!(err <= tolerance_ulps * std::numeric_limits<T>::epsilon() * scale))
      fail(rank, "gathered output differs from single-process attention", name, n, layout, causal, err);
  }
}

template <class M>
bool same_bits(const M& a, const M& b) {
  return a.size() == b.size() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) == 0);
}

// The backward through the MPI ring against the backward simulator. `make_grads(table, slopes,
// sinks)` returns the encoder's parameter_gradients pointing into the zeroed buffers.
template <class T, class E, class G>
void check_backward(const posenc::mpi_ring& ring, const char* name, const E& enc, index_t n, ring_layout layout,
                    bool causal, bool with_sinks, G&& make_grads) {
  const int P = ring.size(), rank = ring.rank();
  static const std::vector<float> sink_logits = {0.25f, -0.5f, 1.0f, 0.0f};
  posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = causal, .k_tile = 16, .threads = 1};
  if (with_sinks) p.sinks = sink_logits;
  const auto q = random_rows<T>(n, heads * head_dim, 11), k = random_rows<T>(n, kv_heads * head_dim, 12),
             v = random_rows<T>(n, kv_heads * head_dim, 13), dout = random_rows<T>(n, heads * head_dim, 14);
  const auto all = posenc::arange(0, n);
  posenc::row_matrix<T> out(n, heads * head_dim), lse(n, heads);
  posenc::attention(q, k, v, out, all, all, enc, p, lse);

  // The simulator over the whole sequence.
  posenc::row_matrix<T> dq(n, heads * head_dim), dk(n, kv_heads * head_dim), dv(n, kv_heads * head_dim);
  posenc::row_matrix<T> table_sim = posenc::row_matrix<T>::Zero(16, heads);
  std::vector<double> slopes_sim(heads, 0.0);
  std::vector<float> sinks_sim(with_sinks ? heads : 0, 0.0f);
  posenc::ring_attention_backward_simulate(q, k, v, out, lse, dout, dq, dk, dv, P, layout, enc, p,
                                           make_grads(table_sim, slopes_sim, sinks_sim));

  // This rank's shards through the MPI ring.
  const auto pos = ring.shard_positions(n, layout);
  const auto take = [&](const auto& m) { return posenc::ring_take_rows(m, pos); };
  const auto mq = take(q), mk = take(k), mv = take(v), mo = take(out), ml = take(lse), mg = take(dout);
  posenc::row_matrix<T> mdq(mq.rows(), mq.cols()), mdk(mk.rows(), mk.cols()), mdv(mv.rows(), mv.cols());
  posenc::row_matrix<T> table = posenc::row_matrix<T>::Zero(16, heads);
  std::vector<double> slopes(heads, 0.0);
  std::vector<float> sinks(with_sinks ? heads : 0, 0.0f);
  ring.attention_backward(mq, mk, mv, mo, ml, mg, mdq, mdk, mdv, pos, pos, enc, p, make_grads(table, slopes, sinks));
  if (!same_bits(mdq, take(dq))) fail(rank, "backward dq differs from the simulator's", name, n, layout, causal, 0);
  if (!same_bits(mdk, take(dk))) fail(rank, "backward dk differs from the simulator's", name, n, layout, causal, 0);
  if (!same_bits(mdv, take(dv))) fail(rank, "backward dv differs from the simulator's", name, n, layout, causal, 0);
  double err = (table - table_sim).cwiseAbs().maxCoeff();
  for (std::size_t h = 0; h < slopes.size(); ++h) err = std::max(err, std::abs(slopes[h] - slopes_sim[h]));
  for (std::size_t h = 0; h < sinks.size(); ++h) err = std::max(err, double(std::abs(sinks[h] - sinks_sim[h])));
  if (!(err <= 1e-4)) fail(rank, "parameter gradients differ from the simulator's", name, n, layout, causal, err);
}

template <class T>
void check_backward_all(const posenc::mpi_ring& ring, index_t n, ring_layout layout, bool causal) {
  using table_t = posenc::row_matrix<T>;
  check_backward<T>(ring, "none", posenc::no_position<T>{}, n, layout, causal, true,
                    [](table_t&, std::vector<double>&, std::vector<float>& z) {
                      return posenc::parameter_gradients<posenc::no_position<T>>{.sinks = z};
                    });
  check_backward<T>(ring, "rope", posenc::rope<T>({.head_dim = head_dim}), n, layout, causal, false,
                    [](table_t&, std::vector<double>&, std::vector<float>&) {
                      return posenc::parameter_gradients<posenc::rope<T>>{};
                    });
  check_backward<T>(ring, "alibi", posenc::alibi<T>({.num_heads = heads}), n, layout, causal, false,
                    [](table_t&, std::vector<double>& s, std::vector<float>&) {
                      return posenc::parameter_gradients<posenc::alibi<T>>{.slopes = s};
                    });
  const auto table = random_rows<T>(16, heads, 4);
  check_backward<T>(ring, "t5",
                    posenc::t5_relative_bias<T>({.num_heads = heads, .num_buckets = 16, .max_distance = 50}, table), n,
                    layout, causal, false, [](table_t& t, std::vector<double>&, std::vector<float>&) {
                      return posenc::parameter_gradients<posenc::t5_relative_bias<T>>{.table = posenc::view_of(t)};
                    });
}

template <class T>
void check_all(const posenc::mpi_ring& ring, index_t n, ring_layout layout, bool causal) {
  check<T>(ring, "none", posenc::no_position<T>{}, n, layout, causal, 4);
  check<T>(ring, "rope", posenc::rope<T>({.head_dim = head_dim}), n, layout, causal, 3);
  check<T>(ring, "alibi", posenc::alibi<T>({.num_heads = heads}), n, layout, causal, 4);
  const auto table = random_rows<T>(16, heads, 4);
  check<T>(ring, "t5", posenc::t5_relative_bias<T>({.num_heads = heads, .num_buckets = 16, .max_distance = 50}, table),
           n, layout, causal, 2);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int total = 0, rank = 0, size = 0;
  {
    const posenc::mpi_ring ring;
    rank = ring.rank();
    size = ring.size();
    for (const index_t n : {index_t{3}, index_t{37}, index_t{301}})
      for (const ring_layout layout : {ring_layout::contiguous, ring_layout::zigzag})
        for (const bool causal : {true, false}) check_all<float>(ring, n, layout, causal);
    check<double>(ring, "none", posenc::no_position<double>{}, 101, ring_layout::zigzag, true, 4);
    const auto ak = random_rows<float>(9, head_dim, 5), av = random_rows<float>(9, head_dim, 6);
    check<float>(ring, "shaw", posenc::shaw_relative<float>({.head_dim = head_dim, .max_relative_position = 4}, ak, av),
                 101, ring_layout::zigzag, true, 4);
    for (const index_t n : {index_t{3}, index_t{37}})
      for (const ring_layout layout : {ring_layout::contiguous, ring_layout::zigzag})
        for (const bool causal : {true, false}) check_backward_all<float>(ring, n, layout, causal);
    check_backward_all<double>(ring, 29, ring_layout::zigzag, true);
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, ring.comm());
  }
  if (rank == 0) std::printf("ring_mpi_test: %d ranks, %d failures\n", size, total);
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}
