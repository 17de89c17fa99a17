// Peak memory of one attention call in a fresh process: scripts/bench runs this once per
// (path, encoder, n) so that each figure is that size's own peak, not the largest one seen so far
// by a long-running benchmark process.
//
//   probe_memory --path naive|blockwise|backward --encoder NAME --n N [--heads H] [--d D] [--causal 0|1]
//                [--mem-limit-gib G]
//
// Paths: naive (attention_reference, the n x n scores), blockwise (posenc::attention), backward
// (posenc::attention_backward after a forward that saves out and the log-sum-exp; the process
// also holds dout, dq, dk and dv, so its inputs are twice the forward's).
//
// Prints one JSON object: the process's resident set at start, its peak resident set (VmHWM)
// after the inputs were filled and after the call; the peak of the call's own heap allocations
// (bench/alloc_counter.hpp); the naive path's estimate; and the time. A naive call whose memory
// (inputs + scores + copies) would pass the limit (default 8 GiB) is not run: its status is
// "skipped: would need X GiB".
#include <sys/resource.h>

#include <chrono>
#include <cstring>
#include <string>

#include "alloc_counter.hpp"
#include "common.hpp"
#include "posenc/attention/backward.hpp"

namespace {

using posenc_bench::index_t;

// A field of /proc/self/status in bytes ("VmRSS": resident now, "VmHWM": the peak), or -1.
double status_bytes(const char* field) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return -1;
  char line[256];
  double kib = -1;
  const std::size_t len = std::strlen(field);
  while (std::fgets(line, sizeof line, f) != nullptr)
    if (std::strncmp(line, field, len) == 0 && line[len] == ':') kib = std::atof(line + len + 1);
  std::fclose(f);
  return kib * 1024.0;
}

// The peak resident set of this program. VmHWM, not getrusage's ru_maxrss: Linux carries
// ru_maxrss across exec, so it would report the parent's size when the parent that forked this
// process was larger than this program.
double peak_rss_bytes() {
  const double hwm = status_bytes("VmHWM");
  if (hwm >= 0) return hwm;
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) * 1024.0;  // KiB on Linux
}

double rss_now_bytes() {
  const double rss = status_bytes("VmRSS");
  return rss >= 0 ? rss : peak_rss_bytes();
}

int usage(const char* why) {
  std::fprintf(stderr,
               "probe_memory: %s\nusage: probe_memory --path naive|blockwise|backward --encoder NAME --n N [--heads H] [--d D] "
               "[--causal 0|1] [--mem-limit-gib G]\n",
               why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const double rss_start = rss_now_bytes();
  std::string path = "blockwise", enc_name = "none";
  posenc_bench::shape s{.heads = 1, .kv_heads = 1, .d = 64, .causal = true};
  index_t n = 0;
  double limit = posenc_bench::memory_limit();
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--path") path = value;
    else if (key == "--encoder") enc_name = value;
    else if (key == "--n") n = std::atol(value.c_str());
    else if (key == "--heads") s.heads = s.kv_heads = std::atol(value.c_str());
    else if (key == "--d") s.d = std::atol(value.c_str());
    else if (key == "--causal") s.causal = value != "0";
    else if (key == "--mem-limit-gib") limit = std::atof(value.c_str()) * posenc_bench::gib;
    else return usage(("unknown option " + key).c_str());
  }
  if (argc % 2 == 0) return usage("every option takes a value");
  posenc_bench::encoder enc{};
  if (!posenc_bench::parse_encoder(enc_name, enc)) return usage(("unknown encoder " + enc_name).c_str());
  if (path != "naive" && path != "blockwise" && path != "backward") return usage(("unknown path " + path).c_str());
  if (n <= 0 || s.heads <= 0 || s.d <= 0) return usage("--n, --heads and --d must be positive");
  s.n_q = s.n_kv = n;

  const bool naive = path == "naive", backward = path == "backward";
  // The backward's process also holds dout, dq, dk and dv (as large as q, k, v and out) and the lse.
  const double inputs = posenc_bench::input_bytes(s) * (backward ? 2.0 : 1.0) +
                        (backward ? 4.0 * static_cast<double>(n * s.heads) : 0.0);
  const double estimate = inputs + (naive ? posenc_bench::naive_kernel_bytes(s) : 0.0);
  std::printf("{\"path\": \"%s\", \"encoder\": \"%s\", \"n\": %ld, \"heads\": %ld, \"d\": %ld, \"causal\": %d, ",
              path.c_str(), enc_name.c_str(), static_cast<long>(n), static_cast<long>(s.heads), static_cast<long>(s.d),
              s.causal ? 1 : 0);
  std::printf("\"input_bytes\": %.0f, \"estimate_bytes\": %.0f, \"limit_bytes\": %.0f, ", inputs, estimate, limit);
  if (naive && estimate > limit) {
    std::printf("\"status\": \"%s\"}\n", posenc_bench::skip_message(estimate).c_str());
    return 0;
  }

  const auto q = posenc_bench::random_matrix(n, s.heads * s.d, 1), k = posenc_bench::random_matrix(n, s.kv_heads * s.d, 2),
             v = posenc_bench::random_matrix(n, s.kv_heads * s.d, 3);
  posenc::row_matrix<float> out = posenc::row_matrix<float>::Zero(n, s.heads * s.d);
  posenc::row_matrix<float> lse, dout, dq, dk, dv;
  if (backward) {
    lse.setZero(n, s.heads);
    dout = posenc_bench::random_matrix(n, s.heads * s.d, 4);
    dq.setZero(n, s.heads * s.d);
    dk.setZero(n, s.kv_heads * s.d);
    dv.setZero(n, s.kv_heads * s.d);
  }
  double seconds = 0, workspace = 0;
  std::int64_t heap_peak = 0, allocs = 0;
  posenc_bench::with_encoder(enc, s.heads, s.d, n, [&](const auto& e) {
    const auto p = s.params();
    // The forward the backward needs (out and the log-sum-exp) runs first and is not measured: its
    // workspace is freed before the backward starts.
    if (backward) posenc::attention(q, k, v, out, s.qpos(), s.kpos(), e, p, lse);
    const double rss_inputs = peak_rss_bytes();
    if (backward)
      workspace = static_cast<double>(posenc::attention_backward_workspace_bytes<float>(p, s.n_q, n, s.d, e));
    else if (!naive) workspace = static_cast<double>(posenc::attention_workspace_bytes<float>(p, s.n_q, n, s.d, e));
    const std::int64_t before = posenc_bench::heap::current();
    posenc_bench::heap::reset();
    const auto t0 = std::chrono::steady_clock::now();
    if (naive) posenc::attention_reference(q, k, v, out, s.qpos(), s.kpos(), e, p);
    else if (backward) posenc::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s.qpos(), s.kpos(), e, p);
    else posenc::attention(q, k, v, out, s.qpos(), s.kpos(), e, p);
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    heap_peak = posenc_bench::heap::peak() - before;
    allocs = posenc_bench::heap::allocations();
    std::printf("\"rss_start_bytes\": %.0f, \"rss_inputs_bytes\": %.0f, ", rss_start, rss_inputs);
  });
  volatile float sink = backward ? dq(0, 0) + dk(0, 0) + dv(0, 0) : out(0, 0);
  (void)sink;
  std::printf("\"rss_peak_bytes\": %.0f, \"heap_peak_bytes\": %lld, \"allocations\": %lld, \"workspace_bytes\": %.0f, "
              "\"seconds\": %.6f, \"status\": \"ok\"}\n",
              peak_rss_bytes(), static_cast<long long>(heap_peak), static_cast<long long>(allocs), workspace, seconds);
  return 0;
}
