// A toy continuous-batching loop, as a serving engine runs one attention layer: 8 requests arrive
// at different steps, each prompt is prefilled in chunks, then tokens are decoded one at a time;
// every step is one paged_append and one paged_attention over a paged KV cache shared by all
// requests (pages handed out from a free list, bf16 pages, keys rotated with Llama 3.1's RoPE as
// they enter the cache). Each request's outputs are checked against the naive reference run on
// that request alone. Weights and token embeddings are random.
// SPDX-License-Identifier: Apache-2.0
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "posenc/posenc.hpp"

namespace {

using posenc::index_t;
using posenc::position;
template <class T>
using mat = posenc::row_matrix<T>;

constexpr index_t heads = 8, kv_heads = 2, head_dim = 32, model = 128;
constexpr index_t page_size = 16, pages = 64, chunk = 24;  // prefill chunk: at most 24 tokens per step

mat<float> random_rows(index_t rows, index_t cols, std::mt19937& rng, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  mat<float> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

struct request {
  index_t arrives = 0;  // the step at which it arrives
  index_t prompt = 0, new_tokens = 0;
  mat<float> x;         // embeddings of every token it will have: prompt, then generated
  mat<float> q, k, v;   // their projections (a token's do not depend on the step it runs in)
  index_t done = 0;     // tokens whose keys are in the cache
  std::vector<std::int32_t> blocks;  // its pages, in order
  mat<float> out;       // the attention output of each of its tokens, as the loop computed it
};

}  // namespace

int main() {
  std::mt19937 rng(2026);
  const mat<float> wq = random_rows(model, heads * head_dim, rng, 0.1f);
  const mat<float> wk = random_rows(model, kv_heads * head_dim, rng, 0.1f);
  const mat<float> wv = random_rows(model, kv_heads * head_dim, rng, 0.1f);

  std::vector<request> reqs;
  for (index_t r = 0; r < 8; ++r) {
    const index_t prompt = 10 + static_cast<index_t>(rng() % 90), new_tokens = 5 + static_cast<index_t>(rng() % 20);
    request req;
    req.arrives = 2 * r;
    req.prompt = prompt;
    req.new_tokens = new_tokens;
    req.x = random_rows(prompt + new_tokens, model, rng, 1.0f);
    req.q = req.x * wq;
    req.k = req.x * wk;
    req.v = req.x * wv;
    req.out = mat<float>::Zero(prompt + new_tokens, heads * head_dim);
    reqs.push_back(std::move(req));
  }

  // The cache: bf16 pages of [page_size, kv_heads * head_dim], a free list, a block table row
  // per request. Keys are rotated as they are appended (cached_keys::rotated).
  mat<Eigen::bfloat16> k_pages = mat<Eigen::bfloat16>::Zero(pages * page_size, kv_heads * head_dim), v_pages = k_pages;
  std::vector<std::int32_t> free_pages(pages);
  for (index_t p = 0; p < pages; ++p) free_pages[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(pages - 1 - p);
  const index_t pages_per_seq = 8;
  const posenc::rope<float> rope({.head_dim = head_dim, .base = 500000.0},
                                 {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                                  {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}});
  posenc::thread_pool pool;
  posenc::attention_workspace ws;  // reused by every step: no allocation once it has grown
  const posenc::attention_params params{.heads = heads, .kv_heads = kv_heads, .causal = true, .executor = &pool};

  index_t steps = 0, rows_done = 0;
  for (index_t step = 0;; ++step) {
    // This step's batch: each running request's next prefill chunk, or its next token.
    std::vector<request*> batch;
    std::vector<index_t> take;
    for (request& r : reqs) {
      const index_t total = r.prompt + r.new_tokens;
      if (r.arrives > step || r.done == total) continue;
      const index_t n = r.done < r.prompt ? std::min(chunk, r.prompt - r.done) : 1;
      // Pages for the tokens it is about to append.
      while (static_cast<index_t>(r.blocks.size()) * page_size < r.done + n) {
        r.blocks.push_back(free_pages.back());
        free_pages.pop_back();
      }
      batch.push_back(&r);
      take.push_back(n);
    }
    if (batch.empty()) {
      if (std::all_of(reqs.begin(), reqs.end(), [](const request& r) { return r.done == r.prompt + r.new_tokens; }))
        break;
      continue;
    }
    // Packed rows of the step: queries, new keys and values, positions, cu_seqlens, lengths.
    std::vector<std::int32_t> cu{0}, lengths, table(batch.size() * pages_per_seq, 0);
    std::vector<position> qpos;
    for (std::size_t b = 0; b < batch.size(); ++b) {
      cu.push_back(cu.back() + static_cast<std::int32_t>(take[b]));
      lengths.push_back(static_cast<std::int32_t>(batch[b]->done + take[b]));
      std::copy(batch[b]->blocks.begin(), batch[b]->blocks.end(), table.begin() + static_cast<std::ptrdiff_t>(b * pages_per_seq));
      for (index_t t = 0; t < take[b]; ++t) qpos.push_back(batch[b]->done + t);
    }
    mat<float> q(cu.back(), heads * head_dim), k(cu.back(), kv_heads * head_dim), v(cu.back(), kv_heads * head_dim);
    for (std::size_t b = 0; b < batch.size(); ++b) {
      q.middleRows(cu[b], take[b]) = batch[b]->q.middleRows(batch[b]->done, take[b]);
      k.middleRows(cu[b], take[b]) = batch[b]->k.middleRows(batch[b]->done, take[b]);
      v.middleRows(cu[b], take[b]) = batch[b]->v.middleRows(batch[b]->done, take[b]);
    }
    mat<float> out(q.rows(), q.cols());

    const posenc::paged_kv<Eigen::bfloat16> cache{posenc::view_of(k_pages), posenc::view_of(v_pages), page_size, table,
                                                  pages_per_seq, lengths, {}, posenc::cached_keys::rotated};
    posenc::paged_append(cache, k, v, cu, rope, &ws);
    posenc::paged_attention(q, cache, out, cu, posenc::positions(qpos), rope, params, nullptr, &ws);

    for (std::size_t b = 0; b < batch.size(); ++b) {
      batch[b]->out.middleRows(batch[b]->done, take[b]) = out.middleRows(cu[b], take[b]);
      batch[b]->done += take[b];
      rows_done += take[b];
      if (batch[b]->done == batch[b]->prompt + batch[b]->new_tokens)  // finished: its pages go back
        for (const std::int32_t p : batch[b]->blocks) free_pages.push_back(p);
    }
    ++steps;
  }

  // Each request alone: every token against its own earlier tokens, naive, from the values the
  // cache holds (keys rotated, then rounded to bf16; values rounded).
  float worst = 0;
  for (const request& r : reqs) {
    const auto pos = posenc::arange(0, r.x.rows());
    mat<float> q = r.q, k = r.k;
    rope.rotate(q, pos);
    rope.rotate(k, pos);
    k = k.cast<Eigen::bfloat16>().cast<float>();
    const mat<float> v = r.v.cast<Eigen::bfloat16>().cast<float>();
    mat<float> ref(q.rows(), q.cols());
    posenc::attention_reference(q, k, v, ref, pos, pos, posenc::no_position<float>{},
                                {.heads = heads, .kv_heads = kv_heads, .causal = true});
    worst = std::max(worst, (ref - r.out).cwiseAbs().maxCoeff());
  }
  std::printf("serving loop: %td requests, %td steps, %td query rows; largest difference from each request "
              "alone %.2g\n",
              static_cast<std::ptrdiff_t>(reqs.size()), steps, rows_done, static_cast<double>(worst));
  return worst < 1e-4f ? 0 : 1;
}
