// The attention backward (posenc::attention_backward) beside the forward of the same shape, with
// the machine's FMA peak in the same executable.
//
// Groups (the label of each point says group, pass, encoder, mask and shape):
//   backward/<n>/<d>/<causal>          prefill backward, 8 heads, d = 128, full and causal
//   backward_forward/<n>/<d>/<causal>  the forward of the same point, for the ratio of the two
//   backward/encoder/<enc>/<n>         causal backward with RoPE, ALiBi, T5 and Shaw
//
// FLOP counted: 2.5 times the forward's (FlashAttention's convention: five tile products against
// the forward's two), i.e. 10 d per visible (query, key) pair and head, whatever the kernel
// actually computes (the two-pass backward recomputes the logits in both passes). POSENC_BENCH_MODE
// (quick, default, full) sets the sizes.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "ceilings.hpp"
#include "common.hpp"
#include "posenc/attention/backward.hpp"

namespace {

using posenc_bench::encoder;
using posenc_bench::index_t;
using posenc_bench::shape;

std::string label(const char* group, const char* pass, encoder e, const shape& s) {
  return std::string("group=") + group + " pass=" + pass + " enc=" + std::string(posenc_bench::name_of(e)) +
         " mask=" + (s.causal ? "causal" : "full") + " n_q=" + std::to_string(s.n_q) +
         " n_kv=" + std::to_string(s.n_kv) + " heads=" + std::to_string(s.heads) +
         " kv_heads=" + std::to_string(s.kv_heads) + " d=" + std::to_string(s.d);
}

// One backward (or forward, `backward = false`) call per iteration on random inputs of shape `s`.
void run(benchmark::State& state, const char* group, bool backward, encoder e, shape s) {
  state.SetLabel(label(group, backward ? "backward" : "forward", e, s));
  const auto q = posenc_bench::random_matrix(s.n_q, s.heads * s.d, 1);
  const auto k = posenc_bench::random_matrix(s.n_kv, s.kv_heads * s.d, 2);
  const auto v = posenc_bench::random_matrix(s.n_kv, s.kv_heads * s.d, 3);
  const auto dout = posenc_bench::random_matrix(s.n_q, s.heads * s.d, 4);
  posenc::row_matrix<float> out(s.n_q, s.heads * s.d), lse(s.n_q, s.heads);
  posenc::row_matrix<float> dq(s.n_q, s.heads * s.d), dk(s.n_kv, s.kv_heads * s.d), dv(s.n_kv, s.kv_heads * s.d);
  const auto prm = s.params();
  double workspace = 0;
  posenc_bench::with_encoder(e, s.heads, s.d, s.n_kv, [&](const auto& enc) {
    posenc::attention_workspace ws;
    posenc::attention(q, k, v, out, s.qpos(), s.kpos(), enc, prm, lse, &ws);
    if (backward) {
      workspace = static_cast<double>(posenc::attention_backward_workspace_bytes<float>(prm, s.n_q, s.n_kv, s.d, enc));
      // One untimed call: the gradients' and the workspace's first-touch page faults (10 us each
      // on some VMs) are an engine's one-time cost, not the kernel's (the forward call above does
      // the same for the forward points).
      posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s.qpos(), s.kpos(), enc, prm, {}, &ws);
    }
    for (auto _ : state) {
      if (backward) {
        posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s.qpos(), s.kpos(), enc, prm, {}, &ws);
        benchmark::DoNotOptimize(dq.data());
      } else {
        posenc::attention(q, k, v, out, s.qpos(), s.kpos(), enc, prm, lse, &ws);
        benchmark::DoNotOptimize(out.data());
      }
      benchmark::ClobberMemory();
    }
  });
  const double iters = static_cast<double>(state.iterations());
  const double flop = posenc_bench::attention_flop(s) * (backward ? 2.5 : 1.0);
  state.counters["FLOPS"] = benchmark::Counter(flop * iters, benchmark::Counter::kIsRate);
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(s.n_q) * iters, benchmark::Counter::kIsRate);
  state.counters["workspace_bytes"] = workspace;
}

void add(const std::string& name, const char* group, bool backward, encoder e, shape s) {
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { run(st, group, backward, e, s); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

shape prefill(long n, long d, bool causal) {
  return {.n_q = n, .n_kv = n, .heads = 8, .kv_heads = 8, .d = d, .causal = causal};
}

bool register_all() {
  using posenc_bench::by_mode;
  benchmark::RegisterBenchmark("posenc_bench::fma_peak", posenc_bench::fma_peak)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  for (long causal : {0L, 1L})
    for (long n = 1024; n <= by_mode(1024, 4096, 16384); n *= 2) {
      std::string tail = "/";  // appended piece by piece: g++ 12 warns falsely on "/" + std::string
      tail += std::to_string(n);
      tail += "/128/";
      tail += std::to_string(causal);
      add(std::string("backward") + tail, "backward", true, encoder::none, prefill(n, 128, causal != 0));
      add(std::string("backward_forward") + tail, "backward", false, encoder::none, prefill(n, 128, causal != 0));
    }
  for (encoder e : {encoder::rope, encoder::alibi, encoder::t5, encoder::shaw})
    for (long n = 1024; n <= by_mode(1024, 2048, 8192); n *= 2)
    {
      std::string name = "backward/encoder/";
      name += posenc_bench::name_of(e);
      name += "/";
      name += std::to_string(n);
      add(name, "encoder", true, e, prefill(n, 128, true));
    }
  return true;
}

const bool registered = register_all();

}  // namespace
