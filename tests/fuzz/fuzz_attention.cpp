// libFuzzer target: blockwise attention with arbitrary shapes, tile sizes, thread counts, masks,
// positions, chunk sizes and encoders (none, ALiBi, RoPE inside the kernel or already applied, T5, Shaw),
// against the naive reference evaluated in double on the same (float-representable) inputs.
//
// A finding: a crash or sanitizer report; an exception other than a documented one; an output or
// log-sum-exp that is not finite where the reference is; a difference beyond the error bound
// below; a fully masked row that is not exactly zero with lse = -inf; a write past a row.
//
// Error bound per (row, head): the float logits carry at most `E = eps (d + 16) m^2 scale |q_i|
// max_j |k_j| + 8 eps max|bias|` of error (`m` the rotation's magnitude), which moves a softmax
// average by at most `(e^(2E) - 1) max|v|`; accumulating `n_kv` probabilities and `d` products
// adds `(n_kv + d + 32) eps max|v|`.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <variant>
#include <vector>

#include "fuzz_common.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/executor.hpp"

namespace {

// Calls with two threads run on a pool of their own, started once.
posenc::thread_pool& fuzz_pool() {
  static posenc::thread_pool pool(2);
  return pool;
}

using posenc::index_t;
using posenc::position;
template <class S>
using mat = posenc::row_matrix<S>;


enum class enc_kind { none, alibi, rope, t5, shaw, count };

struct case_spec {
  bool use_double = false;
  index_t n_q = 0, n_kv = 0, kv_heads = 1, group = 1, d = 1;
  index_t pad_q = 0, pad_k = 0, pad_v = 0, pad_o = 0;
  posenc::attention_params p;
  enc_kind enc = enc_kind::none;
  bool want_lse = false;
  bool mismatched_encoder = false;  // encoder built for another head_dim / head count
  std::vector<position> qpos, kpos;
  bool q_range = true, k_range = true;
  double amp_q = 1, amp_k = 1, amp_v = 1;
  std::uint32_t seed = 0;
  // Encoder knobs.
  double base = 10000, max_bias = 8;
  posenc::rope_layout layout = posenc::rope_layout::half_split;
  index_t rotary_dim = 0, buckets = 32, max_rel = 4;
  position max_distance = 128;
  bool bidirectional = true, symmetric = false;
};

std::vector<position> make_positions(posenc_fuzz::reader& in, index_t n, bool& range, position limit) {
  range = in.flag();
  const position base = in.position_value(limit - 4096);
  std::vector<position> out(static_cast<std::size_t>(n));
  if (range) {
    for (index_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = base + i;
    return out;
  }
  const int style = in.byte() % 4;
  for (index_t i = 0; i < n; ++i) {
    position v = base + i;
    if (style == 1) v = base + in.in_range<position>(-40, 40);                       // shuffled, duplicates
    if (style == 2) v = base + static_cast<position>(n - 1 - i);                     // reversed
    if (style == 3) v = (i % 2 ? base : -base / 2) + in.in_range<position>(0, 8);    // two far clusters
    out[static_cast<std::size_t>(i)] = v;
  }
  return out;
}

case_spec read_case(posenc_fuzz::reader& in) {
  case_spec c;
  c.use_double = in.flag();
  c.enc = static_cast<enc_kind>(in.byte() % static_cast<int>(enc_kind::count));
  c.kv_heads = in.in_range<index_t>(1, 3);
  c.group = in.in_range<index_t>(1, 3);
  c.d = in.in_range<index_t>(1, 72);
  const bool decode = in.byte() % 16 == 15;
  c.n_q = decode ? in.in_range<index_t>(0, 3) : in.in_range<index_t>(0, 48);
  c.n_kv = decode ? in.in_range<index_t>(8192, 8500) : in.in_range<index_t>(0, 200);
  if (decode) c.d = std::min<index_t>(c.d, 24);
  c.pad_q = in.in_range<index_t>(0, 3), c.pad_k = in.in_range<index_t>(0, 3);
  c.pad_v = in.in_range<index_t>(0, 3), c.pad_o = in.in_range<index_t>(0, 3);
  c.p.heads = c.kv_heads * c.group;
  c.p.kv_heads = in.flag() ? c.kv_heads : (c.kv_heads == c.p.heads ? 0 : c.kv_heads);
  c.p.causal = in.flag();
  c.p.window_left = in.flag() ? -1 : in.in_range<position>(0, 80);
  c.p.window_right = in.flag() ? -1 : in.in_range<position>(0, 80);
  c.p.q_tile = in.in_range<index_t>(0, 70);
  c.p.k_tile = in.in_range<index_t>(0, 70);
  c.p.threads = in.in_range(1, 2);
  if (in.byte() % 8 == 0) c.p.scale = in.flag() ? 0.0 : in.uniform(-2, 2);
  c.want_lse = in.flag();
  c.mismatched_encoder = in.byte() % 32 == 0;
  c.amp_q = std::exp(in.uniform(std::log(1e-3), std::log(30.0)));
  c.amp_k = std::exp(in.uniform(std::log(1e-3), std::log(30.0)));
  c.amp_v = std::exp(in.uniform(std::log(1e-3), std::log(1e3)));
  c.seed = static_cast<std::uint32_t>(in.bits(4));
  c.base = in.flag() ? 10000.0 : std::exp(in.uniform(std::log(1.5), std::log(1e7)));
  c.layout = in.flag() ? posenc::rope_layout::half_split : posenc::rope_layout::interleaved;
  c.rotary_dim = 2 * in.in_range<index_t>(0, c.d / 2);
  c.max_bias = in.uniform(0.5, 16);
  c.symmetric = in.flag();
  c.bidirectional = in.flag();
  c.buckets = in.in_range<index_t>(c.bidirectional ? 4 : 2, 64);
  const index_t max_exact = (c.bidirectional ? c.buckets / 2 : c.buckets) / 2;
  c.max_distance = max_exact + in.in_range<position>(1, 300);
  c.max_rel = in.in_range<index_t>(0, 20);
  // Positions: ALiBi needs exact distances (< 2^53), T5 and Shaw differences that fit int64;
  // RoPE angles past 2^52 are plain double products, where the kernel's tile rotator and
  // rope::rotate legitimately differ (both keep norms; neither angle is accurate).
  position limit = c.enc == enc_kind::alibi || c.enc == enc_kind::rope ? position{1} << 51
                   : c.enc == enc_kind::t5 || c.enc == enc_kind::shaw   ? position{1} << 61
                                                                        : position{1} << 62;
  c.qpos = make_positions(in, c.n_q, c.q_range, limit);
  c.kpos = make_positions(in, c.n_kv, c.k_range, limit);
  if (in.flag() && c.n_q > 0 && c.n_kv > 0) {
    // Queries at the end of the key range (prefill after a cache, decode).
    const position shift = c.kpos.back() - c.qpos.back();
    for (auto& v : c.qpos) v += shift;
  }
  // Chunked attention, drawn last so that older corpus entries keep their meaning.
  if (in.flag()) c.p.chunk_size = in.flag() ? in.in_range<position>(1, 8) : in.in_range<position>(1, 200);
  return c;
}

template <class S>
mat<S> random_matrix(index_t rows, index_t cols, index_t pad, std::mt19937& rng, double amp) {
  std::normal_distribution<double> n(0, amp);
  mat<S> m(rows, cols + pad);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(n(rng));
  return m;
}

template <class M>
auto cols_view(M& m, index_t cols) {
  using S = std::remove_pointer_t<decltype(m.data())>;
  return posenc::strided_view<S>(m.data(), m.rows(), cols, m.cols());
}

double row_norm(const double* x, index_t n) {
  double s = 0;
  for (index_t i = 0; i < n; ++i) s += x[i] * x[i];
  return std::sqrt(s);
}

// The encoders a case uses, in float and double, with float-representable tables.
struct encoders {
  std::variant<std::monostate, posenc::alibi<float>, posenc::rope<float>, posenc::t5_relative_bias<float>,
               posenc::shaw_relative<float>>
      f;
  std::variant<std::monostate, posenc::alibi<double>, posenc::rope<double>, posenc::t5_relative_bias<double>,
               posenc::shaw_relative<double>>
      d;
  double magnitude = 1, max_bias = 0, max_ak = 0, max_av = 0;
};

encoders make_encoders(const case_spec& c, std::mt19937& rng) {
  encoders e;
  const index_t dd = c.mismatched_encoder ? c.d + 2 : c.d;
  const index_t heads = c.mismatched_encoder ? std::max<index_t>(1, c.p.heads - 1) : c.p.heads;
  switch (c.enc) {
    case enc_kind::alibi: {
      const posenc::alibi_params ap{.num_heads = heads,
                                    .form = c.symmetric ? posenc::alibi_form::symmetric : posenc::alibi_form::causal,
                                    .max_bias = c.max_bias};
      e.f.emplace<posenc::alibi<float>>(ap);
      e.d.emplace<posenc::alibi<double>>(ap);
      break;
    }
    case enc_kind::rope: {
      // Rotary dims are even and 0 means head_dim: a head of one dimension has no rotation.
      if (dd < 2) break;
      const index_t r = c.rotary_dim == 0 && dd % 2 ? dd - 1 : std::min(c.rotary_dim, dd / 2 * 2);
      const posenc::rope_params rp{.head_dim = dd, .rotary_dim = r, .layout = c.layout, .base = c.base};
      e.f.emplace<posenc::rope<float>>(rp);
      e.magnitude = e.d.emplace<posenc::rope<double>>(rp).magnitude();
      break;
    }
    case enc_kind::t5: {
      const posenc::t5_bias_params tp{.num_heads = heads,
                                      .num_buckets = c.buckets,
                                      .max_distance = c.max_distance,
                                      .bidirectional = c.bidirectional};
      mat<float> table = random_matrix<float>(c.buckets, heads, 0, rng, 3.0);
      e.max_bias = table.cwiseAbs().maxCoeff();
      e.f.emplace<posenc::t5_relative_bias<float>>(tp, table);
      e.d.emplace<posenc::t5_relative_bias<double>>(tp, mat<double>(table.cast<double>()));
      break;
    }
    case enc_kind::shaw: {
      const posenc::shaw_params sp{.head_dim = dd, .max_relative_position = c.max_rel};
      mat<float> ak = random_matrix<float>(2 * c.max_rel + 1, dd, 0, rng, c.amp_k);
      mat<float> av = random_matrix<float>(2 * c.max_rel + 1, dd, 0, rng, c.amp_v);
      for (index_t r = 0; r < ak.rows(); ++r) e.max_ak = std::max<double>(e.max_ak, ak.row(r).norm());
      e.max_av = av.cwiseAbs().maxCoeff();
      e.f.emplace<posenc::shaw_relative<float>>(sp, ak, av);
      e.d.emplace<posenc::shaw_relative<double>>(sp, mat<double>(ak.cast<double>()), mat<double>(av.cast<double>()));
      break;
    }
    default:
      break;
  }
  return e;
}

const case_spec* current = nullptr;

[[noreturn]] void fail_row(const char* what, index_t i, index_t h, index_t t, double got, double want, double tol) {
  const case_spec& c = *current;
  if (std::getenv("POSENC_FUZZ_VERBOSE")) {
    std::fprintf(stderr, "qpos[%td] = %lld; qpos:", i, (long long)c.qpos[static_cast<std::size_t>(i)]);
    for (position q : c.qpos) std::fprintf(stderr, " %lld", (long long)q);
    std::fprintf(stderr, "\nkpos:");
    for (position k : c.kpos) std::fprintf(stderr, " %lld", (long long)k);
    std::fprintf(stderr, "\n");
  }
  posenc_fuzz::fail(
      "%s at row %td head %td col %td: got %.9g, reference %.9g, tolerance %.3g\n"
      "  case: %s n_q=%td n_kv=%td heads=%td kv_heads=%td d=%td tiles=%td/%td threads=%d causal=%d window=(%lld,%lld) "
      "chunk=%lld encoder=%d q0=%lld k0=%lld ranges=%d/%d",
      what, i, h, t, got, want, tol, c.use_double ? "double" : "float", c.n_q, c.n_kv, c.p.heads, c.kv_heads, c.d,
      c.p.q_tile, c.p.k_tile, c.p.threads, int(c.p.causal), (long long)c.p.window_left, (long long)c.p.window_right,
      (long long)c.p.chunk_size.value_or(0), int(c.enc), c.n_q ? (long long)c.qpos[0] : 0LL,
      c.n_kv ? (long long)c.kpos[0] : 0LL, int(c.q_range), int(c.k_range));
}

template <class S>
void run_case(const case_spec& c) {
  current = &c;
  using C = posenc::compute_t<S>;
  std::mt19937 rng(c.seed);
  const index_t hq = c.p.heads * c.d, hk = c.kv_heads * c.d;
  mat<S> q = random_matrix<S>(c.n_q, hq, c.pad_q, rng, c.amp_q);
  mat<S> k = random_matrix<S>(c.n_kv, hk, c.pad_k, rng, c.amp_k);
  mat<S> v = random_matrix<S>(c.n_kv, hk, c.pad_v, rng, c.amp_v);
  constexpr S canary = S(-12345.5);
  mat<S> out = mat<S>::Constant(c.n_q, hq + c.pad_o, canary);
  mat<C> lse = mat<C>::Constant(c.n_q, c.p.heads, C(7));
  encoders e = make_encoders(c, rng);
  posenc::attention_params p = c.p;
  p.executor = &fuzz_pool();
  const posenc::positions qp = c.q_range && c.n_q > 0 ? posenc::arange(c.qpos[0], c.n_q) : posenc::positions(c.qpos);
  const posenc::positions kp = c.k_range && c.n_kv > 0 ? posenc::arange(c.kpos[0], c.n_kv) : posenc::positions(c.kpos);

  auto blockwise = [&](const auto& enc) {
    if (c.want_lse) {
      posenc::attention(cols_view(q, hq), cols_view(k, hk), cols_view(v, hk), cols_view(out, hq), qp, kp, enc, p,
                        lse);
    } else {
      posenc::attention(cols_view(q, hq), cols_view(k, hk), cols_view(v, hk), cols_view(out, hq), qp, kp, enc, p);
    }
  };
  auto run_blockwise = [&] {
    std::visit(
        [&](const auto& enc) {
          using E = std::remove_cvref_t<decltype(enc)>;
          if constexpr (std::same_as<E, std::monostate>) {
            blockwise(posenc::no_position<C>{});
          } else if constexpr (std::same_as<typename E::scalar_type, C>) {
            blockwise(enc);
          }
        },
        e.f);
    std::visit(
        [&](const auto& enc) {
          using E = std::remove_cvref_t<decltype(enc)>;
          if constexpr (!std::same_as<E, std::monostate> && std::same_as<C, double>) blockwise(enc);
        },
        e.d);
  };

  if (c.mismatched_encoder && c.enc != enc_kind::none) {
    // A caller bug: it must be reported (or, where the shapes happen to fit, run), never crash,
    // with any thread count (finding 3: it was reported from inside a parallel region).
    try {
      run_blockwise();
    } catch (const std::invalid_argument&) {
    } catch (const posenc::precondition_error&) {
    }
    return;
  }
  run_blockwise();

  // The reference in double on the same values.
  const mat<double> qd = q.template cast<double>(), kd = k.template cast<double>(), vd = v.template cast<double>();
  mat<double> ref(c.n_q, hq), ref_lse(c.n_q, c.p.heads);
  std::visit(
      [&](const auto& enc) {
        using E = std::remove_cvref_t<decltype(enc)>;
        if constexpr (std::same_as<E, std::monostate>) {
          posenc::attention_reference(cols_view(qd, hq), cols_view(kd, hk), cols_view(vd, hk), ref, qp, kp,
                                      posenc::no_position<double>{}, p, ref_lse);
        } else {
          posenc::attention_reference(cols_view(qd, hq), cols_view(kd, hk), cols_view(vd, hk), ref, qp, kp, enc, p,
                                      ref_lse);
        }
      },
      e.d);

  constexpr double eps = std::numeric_limits<C>::epsilon();
  const double scale = p.scale ? std::abs(*p.scale) : 1.0 / std::sqrt(static_cast<double>(c.d));
  const double m2 = e.magnitude * e.magnitude;
  for (index_t h = 0; h < c.p.heads; ++h) {
    const index_t g = h / c.group;
    double kmax = 0, vmax = 0;
    for (index_t j = 0; j < c.n_kv; ++j) {
      kmax = std::max(kmax, row_norm(kd.row(j).data() + g * c.d, c.d));
      for (index_t t = 0; t < c.d; ++t) vmax = std::max(vmax, std::abs(vd(j, g * c.d + t)));
    }
    kmax += e.max_ak;
    vmax += e.max_av;
    double bias_max = e.max_bias;
    if (const auto* al = std::get_if<posenc::alibi<double>>(&e.d)) {
      for (index_t i = 0; i < c.n_q; ++i)
        for (index_t j = 0; j < c.n_kv; ++j) bias_max = std::max(bias_max, std::abs(al->bias(h, qp[i], kp[j])));
    }
    for (index_t i = 0; i < c.n_q; ++i) {
      const double qn = row_norm(qd.row(i).data() + h * c.d, c.d);
      const double logit_err = eps * static_cast<double>(c.d + 16) * m2 * scale * qn * kmax + 8 * eps * bias_max;
      const double tol = std::expm1(2 * logit_err) * vmax + static_cast<double>(c.n_kv + c.d + 32) * eps * vmax;
      const double r_lse = ref_lse(i, h);
      const double b_lse = static_cast<double>(lse(i, h));
      for (index_t t = 0; t < c.d; ++t) {
        const double r = ref(i, h * c.d + t);
        const double b = static_cast<double>(out(i, h * c.d + t));
        if (r_lse == -std::numeric_limits<double>::infinity()) {
          if (b != 0) fail_row("fully masked row not zero", i, h, t, b, r, 0);
        } else if (std::isfinite(r) && !std::isfinite(b)) {
          fail_row("not finite where the reference is", i, h, t, b, r, tol);
        } else if (std::isfinite(r) && !(std::abs(b - r) <= tol)) {
          fail_row("output differs from the reference", i, h, t, b, r, tol);
        }
      }
      if (c.want_lse) {
        const double ltol = logit_err + static_cast<double>(c.n_kv + 32) * eps * std::max(1.0, std::abs(r_lse));
        if (r_lse == -std::numeric_limits<double>::infinity() ? b_lse != r_lse
                                                               : std::isfinite(r_lse) && !(std::abs(b_lse - r_lse) <= ltol))
          fail_row("lse differs from the reference", i, h, -1, b_lse, r_lse, ltol);
      }
      for (index_t t = hq; t < hq + c.pad_o; ++t)
        if (!(out(i, t) == canary)) fail_row("wrote past the end of an output row", i, h, t, double(out(i, t)), 0, 0);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  posenc_fuzz::reader in(data, size);
  const case_spec c = read_case(in);
  if (c.use_double) {
    run_case<double>(c);
  } else {
    run_case<float>(c);
  }
  return 0;
}
