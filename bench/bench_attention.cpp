// Blockwise attention against the naive materialising baseline (posenc::attention_reference),
// with the machine's ceilings (FMA peak, memory copy and read bandwidth) in the same executable; the Eigen
// SGEMM ceiling is bench_eigen_ceiling. scripts/bench runs every point and turns the JSON into
// the report (bench/report.py; docs/benchmarks.md explains the figures).
//
// Groups (the label of each point says group, path, encoder, mask and shape):
//   attention/blockwise, attention/naive   prefill, 8 heads, d = 128, full and causal
//   attention/encoder/<enc>/<path>         causal prefill with each encoder inside the kernel
//   attention/window/<path>                causal sliding window (Mistral's 4096)
//   attention/gqa/<path>                   causal prefill, 8 query heads sharing 2 kv heads
//   attention/decode, attention/decode_naive  n_q queries at the end of an n_kv-token cache
//   attention/decode_<bf16|fp16>           the same decode with q, K, V (and out) stored in bf16/fp16
//   attention/storage/<fp32|bf16|fp16>     causal GQA prefill with each storage type
//   attention/workspace/<reused|per_call>  the same call with and without a reused workspace
//
// FLOP counted: 4 d per visible (query, key) pair and head (q.k and p.v), so causal is about half
// of full and the naive path is credited with the same useful work although it computes every
// score. Memory: Google Benchmark's MemoryManager reports the kernel's own heap allocations
// ("max_bytes_used"); naive points whose memory would pass POSENC_BENCH_MEM_LIMIT_GIB (default 8)
// are skipped with "skipped: would need X GiB". POSENC_BENCH_MODE (quick, default, full) sets
// the sizes.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "ceilings.hpp"
#include "common.hpp"
#include "memory_manager.hpp"

namespace {

using posenc_bench::encoder;
using posenc_bench::index_t;
using posenc_bench::shape;

enum class path { blockwise, naive };

enum class workspace_use { reused, per_call };

/// The element type of q, k, v and out: fp32, or the half-precision caches engines keep (the
/// kernel computes in float for all three); `bf16_qk`: bf16 storage with
/// `attention_params::bf16_qk` (Q K^T from bf16 products, `vdpbf16ps` where the CPU has it).
enum class storage { fp32, bf16, fp16, bf16_qk };

const char* storage_name(storage st) {
  switch (st) {
    case storage::bf16: return "bf16";
    case storage::fp16: return "fp16";
    case storage::bf16_qk: return "bf16_qk";
    default: return "fp32";
  }
}

std::size_t storage_bytes(storage st) { return st == storage::fp32 ? 4 : 2; }

std::vector<long> powers_of_two(long lo, long hi) {
  std::vector<long> v;
  for (long n = lo; n <= hi; n *= 2) v.push_back(n);
  return v;
}

std::string label(const char* group, path p, encoder e, const shape& s, storage st) {
  const char* mask = s.window >= 0 ? "window" : s.causal ? "causal" : "full";
  return std::string("group=") + group + " path=" + (p == path::naive ? "naive" : "blockwise") +
         " enc=" + std::string(posenc_bench::name_of(e)) + " mask=" + mask + " n_q=" + std::to_string(s.n_q) +
         " n_kv=" + std::to_string(s.n_kv) + " heads=" + std::to_string(s.heads) +
         " kv_heads=" + std::to_string(s.kv_heads) + " d=" + std::to_string(s.d) +
         " window=" + std::to_string(s.window) + " storage=" + storage_name(st);
}

// One attention call per iteration on random inputs of shape `s`, stored as `S`.
template <class S>
void run_attention_as(benchmark::State& state, const char* group, path p, encoder e, shape s, workspace_use wu,
                      storage st) {
  state.SetLabel(label(group, p, e, s, st));
  const double need = posenc_bench::input_bytes(s) + (p == path::naive ? posenc_bench::naive_kernel_bytes(s) : 0.0);
  if (p == path::naive && need > posenc_bench::memory_limit()) {
    state.SkipWithError(posenc_bench::skip_message(need).c_str());
    return;
  }
  const posenc::row_matrix<S> q = posenc_bench::random_matrix(s.n_q, s.heads * s.d, 1).cast<S>();
  const posenc::row_matrix<S> k = posenc_bench::random_matrix(s.n_kv, s.kv_heads * s.d, 2).cast<S>();
  const posenc::row_matrix<S> v = posenc_bench::random_matrix(s.n_kv, s.kv_heads * s.d, 3).cast<S>();
  posenc::row_matrix<S> out(s.n_q, s.heads * s.d);
  auto prm = s.params();
  prm.bf16_qk = st == storage::bf16_qk;
  double workspace = 0;
  posenc_bench::with_encoder(e, s.heads, s.d, s.n_kv, [&](const auto& enc) {
    posenc::attention_workspace ws;
    posenc::attention_workspace* wsp = wu == workspace_use::reused ? &ws : nullptr;
    if (p == path::blockwise)
      workspace = static_cast<double>(posenc::attention_workspace_bytes<S>(prm, s.n_q, s.n_kv, s.d, enc));
    // The output is an engine's buffer, written before: its first-touch page faults (10 us each on
    // some VMs, 0.1 s for a 32 MiB output) are not the kernel's. One untimed blockwise call first
    // for the same reason (the workspace, the inputs' first reads); the naive path allocates its
    // logits on every call, so its calls are all alike.
    out.setZero();
    posenc_bench::kernel_begins();
    if (p == path::blockwise) posenc::attention(q, k, v, out, s.qpos(), s.kpos(), enc, prm, nullptr, wsp);
    posenc_bench::timed_loop_begins();
    for (auto _ : state) {
      if (p == path::blockwise) {
        posenc::attention(q, k, v, out, s.qpos(), s.kpos(), enc, prm, nullptr, wsp);
      } else {
        posenc::attention_reference(q, k, v, out, s.qpos(), s.kpos(), enc, prm);
      }
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
    posenc_bench::kernel_ends();
  });
  posenc_bench::heap_counters(state);
  const double iters = static_cast<double>(state.iterations());
  state.counters["FLOPS"] = benchmark::Counter(posenc_bench::attention_flop(s) * iters, benchmark::Counter::kIsRate);
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(s.n_q) * iters, benchmark::Counter::kIsRate);
  // Decode streams the cache: the K and V bytes it must read, for the read-bandwidth ceiling.
  const double kv_bytes = 2.0 * static_cast<double>(s.n_kv * s.kv_heads * s.d) * static_cast<double>(storage_bytes(st));
  state.counters["bytes_per_second"] = benchmark::Counter(kv_bytes * iters, benchmark::Counter::kIsRate);
  state.counters["workspace_bytes"] = workspace;
  state.counters["input_bytes"] = posenc_bench::input_bytes(s);
  // 1 where Q K^T ran on the AVX512_BF16 pair kernels (bf16_qk on a CPU that has them).
  state.counters["vdpbf16ps"] = prm.bf16_qk && posenc::detail::bf16_pair_kernels_in_use() != nullptr ? 1 : 0;
}

void run_attention(benchmark::State& state, const char* group, path p, encoder e, shape s,
                   workspace_use wu = workspace_use::reused, storage st = storage::fp32) {
  switch (st) {
    case storage::bf16:
    case storage::bf16_qk: run_attention_as<Eigen::bfloat16>(state, group, p, e, s, wu, st); break;
    case storage::fp16: run_attention_as<Eigen::half>(state, group, p, e, s, wu, st); break;
    default: run_attention_as<float>(state, group, p, e, s, wu, st); break;
  }
}

template <class... Args>
void add(const std::string& name, Args... args) {
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { run_attention(st, args...); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

const char* path_name(path p) { return p == path::naive ? "naive" : "blockwise"; }

shape prefill(long n, long d, bool causal, index_t heads = 8, index_t kv_heads = 8) {
  return {.n_q = n, .n_kv = n, .heads = heads, .kv_heads = kv_heads, .d = d, .causal = causal};
}

// Sizes per mode: posenc_bench::by_mode(quick, default, full). The naive path is timed over
// fewer sizes (its time grows as n^2 with a scalar exp per score); its memory is probed up to the
// limit by probe_memory.
bool register_all() {
  using posenc_bench::by_mode;
  benchmark::RegisterBenchmark("posenc_bench::fma_peak", posenc_bench::fma_peak)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("posenc_bench::copy_bandwidth", posenc_bench::copy_bandwidth)
      ->Arg(256L << 20)
      ->Arg(512L << 10)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("posenc_bench::read_bandwidth", posenc_bench::read_bandwidth)
      ->Arg(256L << 20)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);

  // Prefill, no encoder: names attention/<path>/<n>/<d>/<causal> as before.
  // d = 64 as well outside --quick: blockwise only by default (the naive baseline at d = 128
  // already shows its shape), both paths with --full.
  for (long d : by_mode(0, 1, 1) ? std::vector<long>{128, 64} : std::vector<long>{128})
    for (long causal : {0L, 1L})
      for (path p : {path::blockwise, path::naive}) {
        if (d == 64 && p == path::naive && !by_mode(0, 0, 1)) continue;
        const long hi = p == path::naive ? by_mode(1024, 8192, 16384)
                                         : causal ? by_mode(2048, 16384, 131072) : by_mode(2048, 16384, 65536);
        for (long n : powers_of_two(1024, hi))
          add(std::string("attention/") + path_name(p) + "/" + std::to_string(n) + "/" + std::to_string(d) + "/" +
                  std::to_string(causal),
              "prefill", p, encoder::none, prefill(n, d, causal != 0));
      }

  // Every encoder inside a causal prefill.
  for (int e = 0; e < static_cast<int>(encoder::count); ++e)
    for (path p : {path::blockwise, path::naive}) {
      const long hi = p == path::naive ? by_mode(512, 2048, 8192) : by_mode(512, 8192, 32768);
      for (long n : powers_of_two(by_mode(512, 1024, 1024), hi))
        add(std::string("attention/encoder/") + std::string(posenc_bench::name_of(static_cast<encoder>(e))) + "/" +
                path_name(p) + "/" + std::to_string(n),
            "encoder", p, static_cast<encoder>(e), prefill(n, 128, true));
    }

  // Sliding window: causal, keys at most `window` positions back.
  const long window = by_mode(512, 4096, 4096);
  for (path p : {path::blockwise, path::naive}) {
    const long hi = p == path::naive ? by_mode(1024, 8192, 16384) : by_mode(2048, 32768, 131072);
    for (long n : powers_of_two(by_mode(1024, 4096, 4096), hi)) {
      shape s = prefill(n, 128, true);
      s.window = window;
      add(std::string("attention/window/") + path_name(p) + "/" + std::to_string(n) + "/" + std::to_string(window),
          "window", p, encoder::none, s);
    }
  }

  // GQA: 8 query heads, 2 kv heads.
  for (path p : {path::blockwise, path::naive}) {
    const long hi = p == path::naive ? by_mode(1024, 4096, 8192) : by_mode(2048, 16384, 65536);
    for (long n : powers_of_two(1024, hi))
      add(std::string("attention/gqa/") + path_name(p) + "/" + std::to_string(n) + "/8/2", "gqa", p, encoder::none,
          prefill(n, 128, true, 8, 2));
  }

  // Decode against a long cache (GQA 8/2, d = 128): memory bound, K and V read once.
  const long max_kv = by_mode(16384, 131072, 1L << 20);
  for (path p : {path::blockwise, path::naive}) {
    std::vector<std::pair<long, long>> points;
    // The naive path at every other size: each call copies every head's keys and values.
    for (long n_kv : powers_of_two(4096, max_kv))
      if (p == path::blockwise || (n_kv / 4096) % 3 == 1) points.emplace_back(n_kv, 1);
    // 16 queries (speculative decoding): blockwise only; the naive path's Eigen product of a
    // [16, n_kv] by [n_kv, d] matrix takes most of a minute at 128k on 2 threads.
    if (p == path::blockwise) points.emplace_back(max_kv, 16);
    for (auto [n_kv, n_q] : points) {
      const shape s{.n_q = n_q, .n_kv = n_kv, .heads = 8, .kv_heads = 2, .d = 128, .causal = true};
      add(std::string(p == path::naive ? "attention/decode_naive" : "attention/decode") + "/n_kv:" +
              std::to_string(n_kv) + "/n_q:" + std::to_string(n_q),
          "decode", p, encoder::none, s);
    }
  }
  // The same decode from bf16 and fp16 caches (q and out in the same type, as an engine keeps
  // them): half the bytes of K and V per token.
  for (storage st : {storage::bf16, storage::fp16}) {
    std::vector<std::pair<long, long>> points;
    for (long n_kv : powers_of_two(4096, max_kv)) points.emplace_back(n_kv, 1);
    points.emplace_back(max_kv, 16);
    for (auto [n_kv, n_q] : points) {
      const shape s{.n_q = n_q, .n_kv = n_kv, .heads = 8, .kv_heads = 2, .d = 128, .causal = true};
      add(std::string("attention/decode_") + storage_name(st) + "/n_kv:" + std::to_string(n_kv) +
              "/n_q:" + std::to_string(n_q),
          "decode", path::blockwise, encoder::none, s, workspace_use::reused, st);
    }
  }

  // Causal GQA prefill with each storage type: half-precision tiles are converted to float once
  // per query tile, which costs next to the products. bf16_qk: bf16 storage with bf16 products.
  for (storage st : {storage::fp32, storage::bf16, storage::fp16, storage::bf16_qk})
    for (long n : powers_of_two(by_mode(1024, 4096, 4096), by_mode(1024, 4096, 16384)))
      add(std::string("attention/storage/") + storage_name(st) + "/" + std::to_string(n), "storage", path::blockwise,
          encoder::none, prefill(n, 128, true, 8, 2), workspace_use::reused, st);

  // The workspace reused across calls (an engine's steady state) or allocated by each call.
  for (long n : powers_of_two(1024, by_mode(1024, 4096, 16384)))
    for (workspace_use wu : {workspace_use::reused, workspace_use::per_call})
      add(std::string("attention/workspace/") + (wu == workspace_use::reused ? "reused/" : "per_call/") +
              std::to_string(n),
          wu == workspace_use::reused ? "workspace_reused" : "workspace_per_call", path::blockwise, encoder::none,
          prefill(n, 128, true), wu);
  return true;
}

const bool registered = register_all();

}  // namespace
