// libFuzzer target: the engine step (attention/batch.hpp). A batch of 1-6 sequences over a paged
// cache of arbitrary page size, block table (shuffled, shared pages allowed), lengths, query
// counts and positions (slots or stored per row), masks, soft-capping, sinks, GQA and encoders
// (none, ALiBi, RoPE on raw cached keys), on one or two workers; sometimes a corrupted block
// table or length.
//
// A finding: a crash or sanitizer report; an invalid batch that is not refused with a posenc
// exception before any work, or a valid one that is; an output that differs from the naive
// reference in double, run on each sequence alone with its keys taken from the pages, by more
// than the bound below; an output that is not finite although every row a sequence reaches is
// (every other row of the cache holds NaN, so reading one shows).
//
// Bound: logits of inputs drawn in [-1, 1] with head_dim <= 20 stay below 4 in magnitude (RoPE
// keeps norms; ALiBi and the sinks are bounded below), so float rounding of the logits, the
// exponentials and the sums moves an output by less than 1e-4.
// SPDX-License-Identifier: Apache-2.0
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "fuzz_common.hpp"
#include "posenc/attention/batch.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/executor.hpp"

namespace {

using posenc::index_t;
using posenc::position;
template <class T>
using mat = posenc::row_matrix<T>;

constexpr double bound = 1e-4;

posenc::thread_pool& fuzz_pool() {
  static posenc::thread_pool pool(2);
  return pool;
}

struct sequence {
  index_t n_q = 0, n_kv = 0;
};

template <class E, class ED>
void run(posenc_fuzz::reader& in, const E& enc, const ED& enc_d, index_t heads, index_t kv_heads, index_t d) {
  const index_t seqs = in.in_range<index_t>(1, 6);
  std::vector<sequence> batch(static_cast<std::size_t>(seqs));
  index_t longest = 0;
  for (auto& s : batch) {
    s.n_kv = in.in_range<index_t>(0, 60);
    s.n_q = in.in_range<index_t>(0, std::min<index_t>(s.n_kv + 2, 20));
    longest = std::max(longest, s.n_kv);
  }
  const index_t page_size = in.in_range<index_t>(1, 17);
  const index_t pages_per_seq = (longest + page_size - 1) / page_size + in.in_range<index_t>(0, 2);
  const index_t num_pages = std::max<index_t>(1, seqs * pages_per_seq + in.in_range<index_t>(0, 3));
  // A shuffled table; a page may appear twice (a shared prefix) when the input says so.
  std::vector<std::int32_t> table(static_cast<std::size_t>(seqs * pages_per_seq));
  for (std::size_t i = 0; i < table.size(); ++i)
    table[i] = static_cast<std::int32_t>(in.flag() ? in.in_range<index_t>(0, num_pages - 1)
                                                   : static_cast<index_t>((i * 7 + 3) % static_cast<std::size_t>(num_pages)));
  std::vector<std::int32_t> lengths;
  for (const auto& s : batch) lengths.push_back(static_cast<std::int32_t>(s.n_kv));
  // Sometimes a corrupted table or length: refused before any work.
  const int corrupt = in.byte() % 8;
  if (corrupt == 0 && !table.empty()) table[in.in_range<std::size_t>(0, table.size() - 1)] = in.flag() ? -1 : 1 << 20;
  if (corrupt == 1) lengths[in.in_range<std::size_t>(0, lengths.size() - 1)] = static_cast<std::int32_t>(pages_per_seq * page_size + 1);

  // Every row no sequence reaches holds NaN.
  const index_t rows = num_pages * page_size, width = kv_heads * d;
  mat<float> kc = mat<float>::Constant(rows, width, std::numeric_limits<float>::quiet_NaN()), vc = kc;
  std::vector<position> row_pos(static_cast<std::size_t>(rows), 0);
  const bool stored_positions = in.flag();
  for (std::size_t b = 0; b < batch.size(); ++b)
    for (index_t j = 0; j < batch[b].n_kv && j < lengths[b]; ++j) {
      const std::size_t blk = b * static_cast<std::size_t>(pages_per_seq) + static_cast<std::size_t>(j / page_size);
      const std::int32_t page = table[blk];
      if (page < 0 || page >= num_pages) continue;
      const index_t r = page * page_size + j % page_size;
      for (index_t c = 0; c < width; ++c) {
        kc(r, c) = static_cast<float>(in.uniform(-1, 1));
        vc(r, c) = static_cast<float>(in.uniform(-1, 1));
      }
      row_pos[static_cast<std::size_t>(r)] = stored_positions ? in.in_range<position>(-50, 80) : j;
    }
  std::vector<std::int32_t> cu{0};
  std::vector<position> qpos;
  for (const auto& s : batch) {
    cu.push_back(cu.back() + static_cast<std::int32_t>(s.n_q));
    for (index_t i = 0; i < s.n_q; ++i) qpos.push_back(in.flag() ? in.in_range<position>(-50, 80) : s.n_kv - s.n_q + i);
  }
  const mat<float> q = [&] {
    mat<float> m(cu.back(), heads * d);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(in.uniform(-1, 1));
    return m;
  }();
  posenc::attention_params p{.heads = heads, .kv_heads = kv_heads};
  p.causal = in.flag();
  if (in.flag()) p.window_left = in.in_range<position>(0, 30);
  if (in.flag()) p.softcap = in.uniform(0.5, 20);
  std::vector<float> sinks;
  if (in.flag())
    for (index_t h = 0; h < heads; ++h) sinks.push_back(static_cast<float>(in.uniform(-2, 2)));
  p.sinks = sinks;
  p.threads = in.flag() ? 2 : 1;
  p.executor = &fuzz_pool();
  if (in.flag()) p.chunk_size = in.in_range<position>(1, 40);  // chunked attention, drawn last of the knobs

  const posenc::paged_kv<const float> cache{posenc::view_of(std::as_const(kc)), posenc::view_of(std::as_const(vc)),
                                            page_size, table, pages_per_seq, lengths,
                                            stored_positions ? std::span<const position>(row_pos)
                                                             : std::span<const position>(),
                                            posenc::cached_keys::raw};
  mat<float> out = mat<float>::Constant(q.rows(), q.cols(), 7.0f), lse(q.rows(), heads);
  try {
    posenc::paged_attention(q, cache, out, cu, posenc::positions(qpos), enc, p, lse);
  } catch (const std::invalid_argument& e) {
    if (corrupt > 1) posenc_fuzz::fail("a valid batch was refused: %s", e.what());
    if (std::string_view(e.what()).substr(0, 8) != "posenc: ") posenc_fuzz::fail("message without posenc: %s", e.what());
    if ((out.array() != 7.0f).any()) posenc_fuzz::fail("a refused batch wrote its output");
    return;
  }
  if (corrupt <= 1) {
    // A corruption past a sequence's length (a block it does not reach) is not an error.
    bool reached = false;
    for (std::size_t b = 0; b < batch.size(); ++b) {
      if (lengths[b] > pages_per_seq * page_size) reached = true;
      for (index_t blk = 0; blk * page_size < lengths[b]; ++blk) {
        const std::int32_t page = table[b * static_cast<std::size_t>(pages_per_seq) + static_cast<std::size_t>(blk)];
        if (page < 0 || page >= num_pages) reached = true;
      }
    }
    if (reached) posenc_fuzz::fail("an invalid block table or length was accepted");
  }

  // Each sequence alone, its keys gathered from the pages, in double.
  posenc::attention_params pd = p;
  pd.executor = nullptr;
  for (std::size_t b = 0; b < batch.size(); ++b) {
    const index_t n_q = batch[b].n_q, n_kv = batch[b].n_kv;
    if (n_q == 0) continue;
    mat<double> k(n_kv, width), v(n_kv, width), o(n_q, heads * d), l(n_q, heads);
    std::vector<position> kp(static_cast<std::size_t>(n_kv));
    for (index_t j = 0; j < n_kv; ++j) {
      const index_t r = table[b * static_cast<std::size_t>(pages_per_seq) + static_cast<std::size_t>(j / page_size)] *
                            page_size + j % page_size;
      k.row(j) = kc.row(r).cast<double>();
      v.row(j) = vc.row(r).cast<double>();
      kp[static_cast<std::size_t>(j)] = stored_positions ? row_pos[static_cast<std::size_t>(r)] : j;
    }
    const mat<double> qd = q.middleRows(cu[b], n_q).cast<double>();
    posenc::attention_reference(qd, k, v, o, posenc::positions(std::span<const position>(qpos.data() + cu[b], n_q)),
                                posenc::positions(kp), enc_d, pd, l);
    for (index_t i = 0; i < n_q; ++i)
      for (index_t c = 0; c < heads * d; ++c) {
        const double got = out(cu[b] + i, c), want = o(i, c);
        if (!std::isfinite(got) || std::abs(got - want) > bound)
          posenc_fuzz::fail("sequence %zu row %td col %td: %.9g, reference %.9g (page size %td)", b, i, c, got, want,
                            page_size);
      }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  posenc_fuzz::reader in(data, size);
  const index_t kv_heads = in.in_range<index_t>(1, 2), group = index_t{1} << in.in_range<int>(0, 2);
  const index_t heads = kv_heads * group;
  const index_t d = 4 * in.in_range<index_t>(1, 5);
  switch (in.byte() % 3) {
    case 0:
      run(in, posenc::no_position<float>{}, posenc::no_position<double>{}, heads, kv_heads, d);
      break;
    case 1:
      run(in, posenc::alibi<float>({.num_heads = heads}), posenc::alibi<double>({.num_heads = heads}), heads, kv_heads,
          d);
      break;
    default:
      run(in, posenc::rope<float>({.head_dim = d}), posenc::rope<double>({.head_dim = d}), heads, kv_heads, d);
      break;
  }
  return 0;
}
