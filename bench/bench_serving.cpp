// The engine step (docs/engine.md) as a serving engine runs it: one paged_attention call per layer
// and step, over a paged KV cache, GQA 32/8, d = 128, on the benchmarks' thread pool
// (posenc_bench::shape::pool()). scripts/bench runs every point; bench/report.py puts them in the
// report's "Serving" section, each figure beside its ratio to the ceilings bench_attention measures
// in the same run (docs/benchmarks.md, "Serving", explains the points and the formulas).
//
// Points (the label of each says point, role, storage, page size, encoder and the batch):
//   serving/decode/<fp32|bf16|fp16>/page:16       a batch of decode tokens, one per sequence, over
//                                                 caches of lengths spread geometrically (16
//                                                 sequences, 512-32k tokens by default)
//   serving/layout/<decode_fp32|decode_bf16|prefill_fp32>/<page:16|page:128|contiguous>
//                                                 the same decode batch, and a causal prefill
//                                                 (4 x 2048 tokens), over pages of 16 and 128 rows
//                                                 and over contiguous keys (attention_varlen)
//   serving/layout/<read_fp32|read_bf16>/<page:16|page:128|contiguous>
//                                                 no attention: the decode batch's K and V read in
//                                                 the order decode reads them (a page, or 16 rows,
//                                                 at a time), what the layout costs the memory
//   serving/multi_decode/<fp32|bf16>/seqs:<B>/n_kv:<n>/n_q:<4|16>
//                                                 4 or 16 query tokens per sequence (speculative
//                                                 decoding) at the end of B caches of n tokens
//   serving/mixed/<fp32|bf16>/<step|prefill_only|decode_only>
//                                                 2 prefill chunks of 512 tokens and 14 decode
//                                                 tokens over 4k-16k caches in one call, and each
//                                                 part alone over the same cache
//
// Caches are filled by paged_append in rounds of 1024 tokens per sequence. The decode,
// multi-token and mixed points keep keys rotated with Llama 3's RoPE as they were appended
// (cached_keys::rotated: the call rotates only the queries, as an engine's step does); the layout
// points run with no encoder, so that only the way keys are addressed differs between them. Pages
// are handed out in a shuffled order, as a long-running engine's free list leaves them. q and out
// have the cache's storage type. Every point reuses one attention_workspace, grown by a call before
// the timed loop (an engine's steady state), so Google Benchmark's memory figures
// (bench/memory_manager.hpp) count the step's own allocations per call. POSENC_BENCH_MODE (quick,
// default, full) sets the sizes.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "common.hpp"
#include "memory_manager.hpp"
#include "posenc/attention/batch.hpp"

namespace {

using posenc::index_t;
using posenc::position;

constexpr index_t heads = 32, kv_heads = 8, head_dim = 128, kv_cols = kv_heads * head_dim;

/// The element type of the cache, q and out (the kernel computes in float for all three).
enum class storage { fp32, bf16, fp16 };

const char* storage_name(storage st) { return st == storage::bf16 ? "bf16" : st == storage::fp16 ? "fp16" : "fp32"; }

/// One sequence of a step: `n_q` query tokens at the end of its `n_kv` cached tokens (positions
/// `n_kv - n_q ..`, this step's tokens already appended), so 1 is a decode token and `n_q = n_kv`
/// a prompt's first chunk.
struct sequence {
  index_t n_q = 1, n_kv = 0;
};

/// One engine step: the cache's sequences, how its keys are stored, and which of them the call
/// attends (the mixed step's parts attend a range of the same cache); `read_only`: no attention,
/// the cache's K and V read in decode's order (a page, or 16 rows, at a time).
struct step {
  std::vector<sequence> seqs;
  index_t page_size = 16;  ///< 0: contiguous keys, one sequence after another (attention_varlen)
  storage st = storage::fp32;
  bool rope = true;               ///< keys rotated with Llama 3's RoPE as appended; false: no encoder
  index_t first = 0, count = -1;  ///< the call attends sequences [first, first + count); -1: all
  bool read_only = false;
};

/// Reads rows [row, row + n) of `m` (every byte, as 64-bit words) and returns their sum.
template <class S>
std::uint64_t read_rows(const posenc::row_matrix<S>& m, index_t row, index_t n) {
  const auto* p = reinterpret_cast<const std::uint64_t*>(m.row(row).data());
  const std::size_t words = static_cast<std::size_t>(n * m.cols()) * sizeof(S) / sizeof(std::uint64_t);
  std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (std::size_t i = 0; i + 4 <= words; i += 4) s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
  return s0 + s1 + s2 + s3;
}

/// The blocks of rows decode reads for sequences `called` (first row, rows): each sequence's
/// pages in block-table order (a page at most 16 rows at a time), or 16 consecutive rows at a
/// time of a contiguous layout whose sequences follow one another.
std::vector<std::pair<index_t, index_t>> read_blocks(std::span<const sequence> called, index_t page_size,
                                                     std::span<const std::int32_t> table, index_t pages_per_sequence) {
  std::vector<std::pair<index_t, index_t>> blocks;
  index_t first = 0;
  for (std::size_t b = 0; b < called.size(); ++b) {
    for (index_t j = 0; j < called[b].n_kv;) {
      const index_t in_page = page_size > 0 ? page_size - j % page_size : called[b].n_kv - j;
      const index_t n = std::min({index_t{16}, in_page, called[b].n_kv - j});
      const index_t row = page_size > 0 ? index_t{table[b * static_cast<std::size_t>(pages_per_sequence) +
                                                        static_cast<std::size_t>(j / page_size)]} *
                                                  page_size +
                                              j % page_size
                                        : first + j;
      blocks.emplace_back(row, n);
      j += n;
    }
    first += called[b].n_kv;
  }
  return blocks;
}

/// `n` lengths spread geometrically over [lo, hi], both ends included, shortest first.
std::vector<index_t> geometric(index_t n, index_t lo, index_t hi) {
  std::vector<index_t> v;
  for (index_t i = 0; i < n; ++i) {
    const double t = n == 1 ? 0.0 : static_cast<double>(i) / static_cast<double>(n - 1);
    v.push_back(static_cast<index_t>(
        std::llround(static_cast<double>(lo) * std::pow(static_cast<double>(hi) / static_cast<double>(lo), t))));
  }
  return v;
}

/// (query, key) pairs a causal mask lets through in one head of `s`.
double visible_pairs(const sequence& s) {
  const double nq = static_cast<double>(s.n_q), before = static_cast<double>(s.n_kv - s.n_q);
  return nq * before + nq * (nq + 1) / 2;
}

/// A paged cache of `S` filled by paged_append, its pages in a shuffled order.
template <class S>
struct paged_cache {
  index_t page_size = 0, pages_per_sequence = 0;
  std::vector<std::int32_t> table, lengths;
  posenc::row_matrix<S> k, v;
  posenc::cached_keys keys = posenc::cached_keys::unspecified;

  /// Sequences [first, first + count) with lengths `lens` (one per sequence of the cache).
  posenc::paged_kv<S> view(std::span<const std::int32_t> lens, index_t first, index_t count) {
    return {posenc::view_of(k),
            posenc::view_of(v),
            page_size,
            std::span<const std::int32_t>(table).subspan(static_cast<std::size_t>(first * pages_per_sequence),
                                                         static_cast<std::size_t>(count * pages_per_sequence)),
            pages_per_sequence,
            lens.subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(count)),
            {},
            keys};
  }
};

template <class S, class E>
paged_cache<S> make_paged(const std::vector<sequence>& seqs, index_t page_size, const E& enc, posenc::cached_keys keys,
                          posenc::attention_workspace& ws) {
  paged_cache<S> c;
  c.page_size = page_size;
  c.keys = keys;
  const auto n = static_cast<index_t>(seqs.size());
  index_t pages = 0;
  for (const sequence& s : seqs) {
    const index_t p = (s.n_kv + page_size - 1) / page_size;
    pages += p;
    c.pages_per_sequence = std::max(c.pages_per_sequence, p);
  }
  std::vector<std::int32_t> order(static_cast<std::size_t>(pages));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 rng(2026);
  std::shuffle(order.begin(), order.end(), rng);
  c.table.assign(static_cast<std::size_t>(n * c.pages_per_sequence), 0);
  std::size_t next = 0;
  for (index_t b = 0; b < n; ++b)
    for (index_t blk = 0; blk * page_size < seqs[static_cast<std::size_t>(b)].n_kv; ++blk)
      c.table[static_cast<std::size_t>(b * c.pages_per_sequence + blk)] = order[next++];
  c.k.resize(pages * page_size, kv_cols);
  c.v.resize(pages * page_size, kv_cols);
  // Rounds of at most 1024 new tokens per sequence, as prefill chunks fill an engine's cache.
  constexpr index_t round = 1024;
  c.lengths.assign(seqs.size(), 0);
  for (unsigned r = 0;; ++r) {
    std::vector<std::int32_t> cu{0};
    for (std::size_t b = 0; b < seqs.size(); ++b) {
      const auto add = static_cast<std::int32_t>(std::min<index_t>(round, seqs[b].n_kv - c.lengths[b]));
      c.lengths[b] += add;
      cu.push_back(cu.back() + add);
    }
    if (cu.back() == 0) break;
    const posenc::row_matrix<float> kn = posenc_bench::random_matrix(cu.back(), kv_cols, 10 + 2 * r);
    const posenc::row_matrix<float> vn = posenc_bench::random_matrix(cu.back(), kv_cols, 11 + 2 * r);
    posenc::paged_append(c.view(c.lengths, 0, n), kn, vn, cu, enc, &ws);
  }
  return c;
}

/// `rows x cols` random values stored as `S`, made a slice at a time (no float copy of the whole).
template <class S>
posenc::row_matrix<S> random_rows(index_t rows, index_t cols, unsigned seed) {
  constexpr index_t slice = 16384;
  posenc::row_matrix<S> m(rows, cols);
  for (index_t r0 = 0; r0 < rows; r0 += slice) {
    const index_t nr = std::min(slice, rows - r0);
    m.middleRows(r0, nr) =
        posenc_bench::random_matrix(nr, cols, seed + static_cast<unsigned>(r0 / slice)).template cast<S>();
  }
  return m;
}

// One call per iteration: paged_attention over a paged cache, or attention_varlen over contiguous keys.
template <class S>
void run_step_as(benchmark::State& state, const char* point, const char* role, const step& sp) {
  const index_t count = sp.count < 0 ? static_cast<index_t>(sp.seqs.size()) - sp.first : sp.count;
  const std::span<const sequence> called(sp.seqs.data() + sp.first, static_cast<std::size_t>(count));
  std::vector<std::int32_t> cu_q{0};
  std::vector<position> qpos;
  double pairs = 0, keys = 0;
  index_t kv_min = called.front().n_kv, kv_max = 0, q_min = called.front().n_q, q_max = 0;
  for (const sequence& s : called) {
    for (index_t i = 0; i < s.n_q; ++i) qpos.push_back(s.n_kv - s.n_q + i);
    cu_q.push_back(cu_q.back() + static_cast<std::int32_t>(s.n_q));
    pairs += visible_pairs(s);
    keys += static_cast<double>(s.n_kv);
    kv_min = std::min(kv_min, s.n_kv), kv_max = std::max(kv_max, s.n_kv);
    q_min = std::min(q_min, s.n_q), q_max = std::max(q_max, s.n_q);
  }
  const index_t tokens = cu_q.back();
  state.SetLabel(std::string("group=serving point=") + point + " role=" + role + " storage=" + storage_name(sp.st) +
                 " page_size=" + std::to_string(sp.page_size) + " enc=" + (sp.rope ? "rope_llama3" : "none") +
                 " cache=" + (sp.rope ? "rotated" : "raw") + " seqs=" + std::to_string(count) +
                 " tokens=" + std::to_string(tokens) + " keys=" + std::to_string(static_cast<index_t>(keys)) +
                 " q_min=" + std::to_string(q_min) + " q_max=" + std::to_string(q_max) + " kv_min=" +
                 std::to_string(kv_min) + " kv_max=" + std::to_string(kv_max) + " heads=" + std::to_string(heads) +
                 " kv_heads=" + std::to_string(kv_heads) + " d=" + std::to_string(head_dim));

  const posenc::row_matrix<S> q = posenc_bench::random_matrix(tokens, heads * head_dim, 1).cast<S>();
  posenc::row_matrix<S> out(tokens, heads * head_dim);
  const posenc::attention_params prm{
      .heads = heads, .kv_heads = kv_heads, .causal = true, .executor = &posenc_bench::shape::pool()};
  posenc::attention_workspace ws;
  // A first call grows the workspace; the loop then runs what an engine's steady state runs.
  auto timed = [&](auto&& call) {
    call();
    posenc_bench::kernel_begins();
    for (auto _ : state) {
      call();
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
    posenc_bench::kernel_ends();
  };
  auto with_cache = [&](const auto& enc, posenc::cached_keys kind) {
    if (sp.read_only) {
      // Each worker reads whole sequences' blocks, in their order: what decode's items do.
      paged_cache<S> cache;
      if (sp.page_size > 0) {
        cache = make_paged<S>(sp.seqs, sp.page_size, enc, kind, ws);
      } else {
        index_t rows = 0;
        for (const sequence& s : called) rows += s.n_kv;
        cache.k = random_rows<S>(rows, kv_cols, 2);
        cache.v = random_rows<S>(rows, kv_cols, 3);
      }
      const auto blocks = read_blocks(called, sp.page_size, cache.table, cache.pages_per_sequence);
      std::vector<std::uint64_t> sums(static_cast<std::size_t>(posenc_bench::shape::pool().concurrency()));
      const auto nb = static_cast<index_t>(blocks.size());
      auto read_block = [&](index_t i, int w) {
        const auto [row, n] = blocks[static_cast<std::size_t>(i)];
        sums[static_cast<std::size_t>(w)] += read_rows(cache.k, row, n) + read_rows(cache.v, row, n);
      };
      timed([&] { posenc_bench::shape::pool().parallel_for(nb, static_cast<int>(sums.size()), read_block); });
      benchmark::DoNotOptimize(sums.data());
    } else if (sp.page_size > 0) {
      paged_cache<S> cache = make_paged<S>(sp.seqs, sp.page_size, enc, kind, ws);
      const posenc::paged_kv<const S> view = cache.view(cache.lengths, sp.first, count);
      timed([&] { posenc::paged_attention(q, view, out, cu_q, posenc::positions(qpos), enc, prm, nullptr, &ws); });
    } else {
      // Contiguous: each sequence's keys in consecutive rows, positions 0 .. n_kv - 1.
      std::vector<std::int32_t> cu_k{0};
      std::vector<position> kpos;
      for (const sequence& s : called) {
        cu_k.push_back(cu_k.back() + static_cast<std::int32_t>(s.n_kv));
        for (index_t j = 0; j < s.n_kv; ++j) kpos.push_back(j);
      }
      const posenc::row_matrix<S> k = random_rows<S>(cu_k.back(), kv_cols, 2);
      const posenc::row_matrix<S> v = random_rows<S>(cu_k.back(), kv_cols, 3);
      timed([&] {
        posenc::attention_varlen(q, k, v, out, cu_q, cu_k, posenc::positions(qpos), posenc::positions(kpos), enc, prm,
                                 nullptr, &ws);
      });
    }
  };
  if (sp.rope) {
    const index_t longest = std::max_element(sp.seqs.begin(), sp.seqs.end(), [](const sequence& a, const sequence& b) {
                              return a.n_kv < b.n_kv;
                            })->n_kv;
    with_cache(posenc::rope<float>(posenc_bench::rope_params_of(posenc_bench::encoder::rope_llama3, head_dim, longest)),
               posenc::cached_keys::rotated);
  } else {
    with_cache(posenc::no_position<float>{}, posenc::cached_keys::raw);
  }

  const double iters = static_cast<double>(state.iterations());
  // Every cached key is visible to the last query of its sequence: the call must read them all.
  const double kv_bytes = 2.0 * keys * static_cast<double>(kv_cols) * (sp.st == storage::fp32 ? 4.0 : 2.0);
  const double flop = 4.0 * static_cast<double>(head_dim * heads) * pairs;
  state.counters["FLOPS"] = benchmark::Counter(flop * iters, benchmark::Counter::kIsRate);
  state.counters["bytes_per_second"] = benchmark::Counter(kv_bytes * iters, benchmark::Counter::kIsRate);
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(tokens) * iters, benchmark::Counter::kIsRate);
  state.counters["kv_bytes"] = kv_bytes;
  state.counters["flop"] = flop;
  state.counters["workspace_bytes"] = static_cast<double>(ws.bytes());
}

void run_step(benchmark::State& state, const char* point, const char* role, const step& sp) {
  switch (sp.st) {
    case storage::bf16:
      run_step_as<Eigen::bfloat16>(state, point, role, sp);
      break;
    case storage::fp16:
      run_step_as<Eigen::half>(state, point, role, sp);
      break;
    default:
      run_step_as<float>(state, point, role, sp);
      break;
  }
}

void add(const std::string& name, const char* point, const char* role, const step& sp) {
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { run_step(st, point, role, sp); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

std::vector<sequence> decodes(index_t n, index_t lo, index_t hi) {
  std::vector<sequence> v;
  for (index_t len : geometric(n, lo, hi)) v.push_back({1, len});
  return v;
}

std::string page_name(index_t page_size) { return page_size > 0 ? "page:" + std::to_string(page_size) : "contiguous"; }

// Sizes per mode: posenc_bench::by_mode(quick, default, full).
bool register_all() {
  using posenc_bench::by_mode;
  // 1. Batched decode: one token per sequence, caches of geometrically spread lengths.
  const std::vector<sequence> decode_batch =
      decodes(by_mode(4, 16, 32), by_mode(256, 512, 512), by_mode(2048, 32768, 131072));
  for (storage st : {storage::fp32, storage::bf16, storage::fp16})
    add(std::string("serving/decode/") + storage_name(st) + "/page:16", "decode", "decode",
        {.seqs = decode_batch, .page_size = 16, .st = st});

  // 2. Paged against contiguous keys, no encoder: the decode batch and a causal prefill.
  const index_t prefill_len = by_mode(256, 2048, 4096);
  const std::vector<sequence> prefill_batch(static_cast<std::size_t>(by_mode(2, 4, 4)), {prefill_len, prefill_len});
  for (index_t page : {index_t{16}, index_t{128}, index_t{0}}) {
    for (storage st : {storage::fp32, storage::bf16}) {
      add(std::string("serving/layout/decode_") + storage_name(st) + "/" + page_name(page), "layout", "decode",
          {.seqs = decode_batch, .page_size = page, .st = st, .rope = false});
      add(std::string("serving/layout/read_") + storage_name(st) + "/" + page_name(page), "layout", "read",
          {.seqs = decode_batch, .page_size = page, .st = st, .rope = false, .read_only = true});
    }
    add("serving/layout/prefill_fp32/" + page_name(page), "layout", "prefill",
        {.seqs = prefill_batch, .page_size = page, .st = storage::fp32, .rope = false});
  }

  // 3. Multi-token decode: 4 and 16 query tokens per sequence.
  std::vector<std::pair<index_t, index_t>> multi = {{by_mode(2, 8, 8), by_mode(1024, 16384, 16384)}};
  if (posenc_bench::mode() == posenc_bench::run_mode::full) {
    multi.emplace_back(8, 65536);
    multi.emplace_back(1, 131072);
  }
  for (auto [seqs, n_kv] : multi)
    for (storage st : {storage::fp32, storage::bf16})
      for (index_t n_q : {index_t{4}, index_t{16}})
        add(std::string("serving/multi_decode/") + storage_name(st) + "/seqs:" + std::to_string(seqs) +
                "/n_kv:" + std::to_string(n_kv) + "/n_q:" + std::to_string(n_q),
            "multi_decode", "decode",
            {.seqs = std::vector<sequence>(static_cast<std::size_t>(seqs), {n_q, n_kv}), .page_size = 16, .st = st});

  // 4. A mixed step: two prompts' prefill chunks (the first chunk of one, the second of the other)
  // and decode tokens over longer caches, in one call and each part alone.
  const index_t chunk = by_mode(64, 512, 512);
  std::vector<sequence> mixed = {{chunk, chunk}, {chunk, 2 * chunk}};
  const index_t n_dec = by_mode(6, 14, 30);
  for (const sequence& s : decodes(n_dec, by_mode(512, 4096, 4096), by_mode(2048, 16384, 65536))) mixed.push_back(s);
  for (storage st : {storage::fp32, storage::bf16}) {
    const std::string base = std::string("serving/mixed/") + storage_name(st) + "/";
    add(base + "step", "mixed", "step", {.seqs = mixed, .page_size = 16, .st = st});
    add(base + "prefill_only", "mixed", "prefill_only",
        {.seqs = mixed, .page_size = 16, .st = st, .first = 0, .count = 2});
    add(base + "decode_only", "mixed", "decode_only",
        {.seqs = mixed, .page_size = 16, .st = st, .first = 2, .count = n_dec});
  }
  return true;
}

const bool registered = register_all();

}  // namespace
