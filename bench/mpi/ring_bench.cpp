// Ring attention across MPI ranks: memory per rank, step time, zigzag balance, hidden transfer.
//
//   mpirun -np P ring_bench --out FILE.json [--quick]
//
// Run once per P (with the flags of docs/ring_attention.md on a small machine). Rank 0 writes a
// JSON array of records, each with the ring size P:
//   ring_memory   fixed total n (causal, zigzag): peak resident memory per rank (getrusage
//                 ru_maxrss, max and min over ranks), the same minus the rank's resident memory
//                 before the run (MPI's own), and the bytes the ring and the shards hold. It must
//                 fall as 1/P. Measured first: ru_maxrss never goes down.
//   ring_step     fixed tokens per rank (causal, zigzag): wall time per ring step, slowest rank;
//                 with query_blocks = 16, 4 (MPI_Test between query blocks) and 1 (no test
//                 until the step's compute is done), each with the share of transfer time hidden
//                 behind compute: 1 - (time blocked on the transfer after compute) / (time the
//                 same ring pass takes with no compute).
//   ring_balance  fixed total n, causal, zigzag and contiguous: compute time of the slowest and
//                 the fastest rank. Processor time (std::clock), not wall time: with more ranks
//                 than cores, wall time measures the scheduler.
// Each rank makes only its own rows (each row from a hash of its position), so its memory holds
// its shard alone. One OpenMP thread per rank.
// SPDX-License-Identifier: Apache-2.0
#include <mpi.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "posenc/distributed/mpi_ring.hpp"
#include "posenc/encoders/rope.hpp"

namespace {

using posenc::index_t;
using posenc::position;
using posenc::ring_layout;

constexpr index_t heads = 8, kv_heads = 8, head_dim = 64;

// A uniform value in [-1, 1) from (position, column, matrix): splitmix64.
float hashed(position pos, index_t col, std::uint64_t which) {
  std::uint64_t z = static_cast<std::uint64_t>(pos) * 0x9E3779B97F4A7C15ull +
                    static_cast<std::uint64_t>(col) * 0xBF58476D1CE4E5B9ull + which * 0x94D049BB133111EBull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0);
}

posenc::row_matrix<float> rows_at(const std::vector<position>& pos, index_t cols, std::uint64_t which) {
  posenc::row_matrix<float> m(static_cast<index_t>(pos.size()), cols);
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t c = 0; c < cols; ++c) m(i, c) = hashed(pos[static_cast<std::size_t>(i)], c, which);
  return m;
}

double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) * 1024.0;  // KiB on Linux
}

struct minmax {
  double max, min;
};

minmax over_ranks(const posenc::mpi_ring& ring, double x) {
  double hi = x, lo = x;
  MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_DOUBLE, MPI_MAX, ring.comm());
  MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_DOUBLE, MPI_MIN, ring.comm());
  return {hi, lo};
}

const char* layout_name(ring_layout l) { return l == ring_layout::zigzag ? "zigzag" : "contiguous"; }

struct run_result {
  posenc::ring_stats stats;
  double shard_bytes;
};

// One ring pass over a causal sequence of n tokens with RoPE.
run_result run(const posenc::mpi_ring& ring, index_t n, ring_layout layout, index_t query_blocks) {
  const posenc::rope<float> rope({.head_dim = head_dim, .base = 5e5});
  const posenc::attention_params p{.heads = heads, .kv_heads = kv_heads, .causal = true, .threads = 1};
  const auto pos = ring.shard_positions(n, layout);
  const auto q = rows_at(pos, heads * head_dim, 0), k = rows_at(pos, kv_heads * head_dim, 1),
             v = rows_at(pos, kv_heads * head_dim, 2);
  posenc::row_matrix<float> out(q.rows(), q.cols());
  MPI_Barrier(ring.comm());
  const auto st = ring.attention(q, k, v, out, pos, pos, rope, p, {.query_blocks = query_blocks});
  const double shards = static_cast<double>(q.size() + k.size() + v.size() + out.size()) * sizeof(float);
  return {st, shards};
}

// Wall time of the ring's transfers alone: P - 1 steps of the same double-buffered exchange of
// `bytes`-byte messages, no compute (slowest rank).
double transfer_time(const posenc::mpi_ring& ring, std::size_t bytes) {
  const int P = ring.size(), r = ring.rank();
  if (P == 1) return 0;
  std::vector<char> a(bytes, 1), b(bytes, 2);
  char* buf[2] = {a.data(), b.data()};
  MPI_Barrier(ring.comm());
  const double t0 = MPI_Wtime();
  for (int s = 0; s + 1 < P; ++s) {
    MPI_Request req[2];
    MPI_Irecv(buf[(s + 1) % 2], static_cast<int>(bytes), MPI_BYTE, (r + P - 1) % P, s, ring.comm(), &req[0]);
    MPI_Isend(buf[s % 2], static_cast<int>(bytes), MPI_BYTE, (r + 1) % P, s, ring.comm(), &req[1]);
    MPI_Waitall(2, req, MPI_STATUSES_IGNORE);
  }
  return over_ranks(ring, MPI_Wtime() - t0).max;
}

struct json_out {
  std::string text = "[\n";
  bool first = true;
  void record(const std::string& fields) {
    text += (first ? "  {" : ",\n  {") + fields + "}";
    first = false;
  }
};

std::string field(const char* name, double v) {
  char b[96];
  std::snprintf(b, sizeof b, "\"%s\": %.6g", name, v);
  return b;
}
std::string field(const char* name, const char* v) { return std::string("\"") + name + "\": \"" + v + "\""; }

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  std::string out_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
      out_path = argv[++i];
    } else {
      std::fprintf(stderr, "usage: mpirun -np P ring_bench --out FILE.json [--quick]\n");
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
  }
  int status = 0;
  {
    const posenc::mpi_ring ring;
    const int P = ring.size();
    const index_t n_memory = quick ? 4096 : 16384, per_rank = quick ? 512 : 2048, n_balance = quick ? 4096 : 8192;
    json_out json;
    auto common = [&](const char* name, ring_layout layout, index_t n) {
      return field("name", name) + ", " + field("P", P) + ", " + field("layout", layout_name(layout)) + ", " +
             field("n_total", static_cast<double>(n)) + ", " + field("tokens_per_rank", static_cast<double>(n) / P) +
             ", " + field("heads", heads) + ", " + field("kv_heads", kv_heads) + ", " + field("head_dim", head_dim);
    };

    // Memory at a fixed total length; first, because ru_maxrss only grows.
    {
      const double before = peak_rss_bytes();
      const auto r = run(ring, n_memory, ring_layout::zigzag, 16);
      const double peak = peak_rss_bytes();
      const auto rss = over_ranks(ring, peak), above = over_ranks(ring, peak - before),
                 held = over_ranks(ring, static_cast<double>(r.stats.bytes) + r.shard_bytes);
      json.record(common("ring_memory", ring_layout::zigzag, n_memory) + ", " + field("peak_rss_bytes_max", rss.max) +
                  ", " + field("peak_rss_bytes_min", rss.min) + ", " +
                  field("rss_above_baseline_bytes_max", above.max) + ", " +
                  field("rss_above_baseline_bytes_min", above.min) + ", " + field("ring_bytes_max", held.max) + ", " +
                  field("ring_bytes_min", held.min));
    }

    // Step time at a fixed number of tokens per rank, and the transfer time hidden.
    for (const index_t chunks : {index_t{16}, index_t{4}, index_t{1}}) {
      const index_t n = per_rank * P;
      const auto r = run(ring, n, ring_layout::zigzag, chunks);
      const auto step = over_ranks(ring, r.stats.total_s / P);
      const auto wait = over_ranks(ring, r.stats.wait_s);
      const auto compute = over_ranks(ring, r.stats.compute_cpu_s);
      const double transfer = transfer_time(ring, r.stats.message_bytes);
      const double hidden = transfer > 0 ? std::clamp(1.0 - wait.max / transfer, 0.0, 1.0) : 1.0;
      const double done = P > 1 ? over_ranks(ring, r.stats.transfers_hidden).min / (P - 1) : 1.0;
      json.record(common("ring_step", ring_layout::zigzag, n) + ", " +
                  field("query_blocks", static_cast<double>(chunks)) + ", " + field("step_time_s", step.max) + ", " +
                  field("compute_s_slowest", compute.max) + ", " + field("compute_s_fastest", compute.min) + ", " +
                  field("message_bytes", static_cast<double>(r.stats.message_bytes)) + ", " +
                  field("transfer_s", transfer) + ", " + field("wait_s", wait.max) + ", " +
                  field("transfer_hidden_share", hidden) + ", " + field("transfers_done_during_compute", done));
    }

    // Balance of causal work: zigzag against contiguous at the same total length.
    for (const ring_layout layout : {ring_layout::zigzag, ring_layout::contiguous}) {
      const auto r = run(ring, n_balance, layout, 16);
      const auto compute = over_ranks(ring, r.stats.compute_cpu_s);
      json.record(common("ring_balance", layout, n_balance) + ", " + field("compute_s_slowest", compute.max) + ", " +
                  field("compute_s_fastest", compute.min) + ", " +
                  field("compute_ratio", compute.min > 0 ? compute.max / compute.min : 1.0));
    }

    if (ring.rank() == 0) {
      json.text += "\n]\n";
      std::FILE* f = out_path.empty() ? stdout : std::fopen(out_path.c_str(), "w");
      if (!f) {
        std::fprintf(stderr, "ring_bench: cannot write %s\n", out_path.c_str());
        status = 1;
      } else {
        std::fputs(json.text.c_str(), f);
        if (f != stdout) std::fclose(f);
      }
    }
  }
  MPI_Finalize();
  return status;
}
