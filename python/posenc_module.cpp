// SPDX-License-Identifier: Apache-2.0
// The Python module `posenc`: posenc's encoders, blockwise attention and the engine step (varlen and
// paged attention) on NumPy arrays, torch tensors and other buffers.
//
// Arrays are used in place, never copied: a NumPy array, a CPU tensor through `__dlpack__` or any
// buffer, of float16, bfloat16, float32 or float64, whose last axis has unit stride (C-contiguous,
// or a slice of rows of one) becomes a posenc::strided_view. Anything else raises TypeError (wrong
// type, dtype or device) or ValueError (wrong ndim, shape, layout, read-only output) naming the
// function and the argument, before any work starts. Parameter errors from the library
// (std::invalid_argument, "posenc: rope_params.base = -1: ...") become ValueError too; shape bugs
// that slip past the checks here raise posenc.PreconditionError (a ValueError). An int that does
// not fit in int64 raises OverflowError naming the argument. A call with an unknown keyword, a
// missing argument or too many positionals raises a short TypeError (`call_args`).
// The GIL is released while rotating, encoding and attending.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include "posenc/posenc.hpp"

namespace py = pybind11;
using namespace pybind11::literals;
using posenc::index_t;
using posenc::position;

namespace {

// ---------------------------------------------------------------------------------------------
// Threads: the module's calls run on one pool of one worker per hardware thread, started by the
// first call that uses it (threads=1 keeps a call on the calling thread).

posenc::thread_pool& workers() {
  static posenc::thread_pool pool;
  return pool;
}

// ---------------------------------------------------------------------------------------------
// Docstrings: what help() shows. numpy style; every parameter under "Parameters" as `name : type`
// with its unit, shape, default and the model convention it follows (tests/python/test_package.py
// checks that each parameter of each signature is documented).

namespace docs {

constexpr const char* module = R"(posenc: positional encodings and blockwise attention, in place on NumPy arrays and CPU torch tensors.

Encoders: Sinusoidal (added to token embeddings), Rope with a frequency policy (LinearScaling,
NtkAwareScaling, DynamicNtkScaling, YarnScaling, Llama3Scaling, LongRopeScaling, or a Hugging Face
rope_scaling dict), and the score biases Alibi, T5Bias and ShawRelative. Attention: attention (one
sequence or a batch of equal-length sequences), attention_varlen (packed sequences), paged_attention
and paged_append (a paged KV cache).

Arrays: numpy.ndarray, torch.Tensor on the CPU (through __dlpack__), or any buffer; float16, bfloat16
(torch), float32 or float64; never copied. attention and Rope.rotate take [tokens, heads * head_dim],
[tokens, heads, head_dim], [heads, tokens, head_dim], [batch, heads, tokens, head_dim] and
[batch, tokens, heads, head_dim] through their strides (layout=). Positions are exact integers: None
(0..n-1), a range with step 1, an int64 array or a list of ints. Errors: TypeError (type, dtype,
device), ValueError (shape, layout, parameter), OverflowError (an int past int64),
posenc.PreconditionError (a ValueError: shape rules of the engine step).)";

constexpr const char* linear = R"(Position interpolation (Chen et al. 2023): every inverse frequency divided by factor,
the same as positions divided by factor. Hugging Face rope_type 'linear'.)";
constexpr const char* linear_init = R"(Parameters
----------
factor : float, default 1.0
    The scale s > 0: inv_freq[i] / s. A model trained on L tokens reads s * L.)";

constexpr const char* ntk = R"(NTK-aware scaling: the base becomes base * alpha^(r / (r - 2)), r = rotary_dim.
Hugging Face has no rope_type for it (Code Llama-style base changes).)";
constexpr const char* ntk_init = R"(Parameters
----------
alpha : float, default 1.0
    The NTK factor > 0 (1 = plain RoPE).)";

constexpr const char* dynamic = R"(Dynamic NTK (Hugging Face rope_type 'dynamic'): for a sequence of L > L0 tokens the base
becomes base * (s L / L0 - (s - 1))^(r / (r - 2)); at L <= L0 the plain table. The table is fixed
when the Rope is made: keys cached with one length go stale at another.)";
constexpr const char* dynamic_init = R"(Parameters
----------
factor : float, default 1.0
    s > 0.
original_max_position : int, default 2048
    L0, the trained context length in tokens.
sequence_length : int, default 0
    L, the length (tokens) the table is made for; 0 = L0 (the plain table).)";

constexpr const char* yarn = R"(YaRN (Peng et al. 2023, Hugging Face rope_type 'yarn'): pairs that turn more than beta_fast
times over the trained length keep their frequency, fewer than beta_slow times are divided by
factor, a linear ramp blends between; cos and sin are multiplied by 0.1 ln(factor) + 1.)";
constexpr const char* yarn_init = R"(Parameters
----------
factor : float, default 1.0
    s > 0: new context length / original_max_position.
original_max_position : int, default 4096
    L0, the trained context length in tokens.
beta_fast : float, default 32.0
    Rotations over L0 above which a pair keeps its frequency.
beta_slow : float, default 1.0
    Rotations over L0 below which a pair is interpolated; beta_slow < beta_fast.
mscale : float, default 0.0
    With mscale_all_dim (DeepSeek-V2): magnitude (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1);
    0 = the plain 0.1 ln s + 1.
mscale_all_dim : float, default 0.0
    See mscale.
truncate : bool, default True
    Round the ramp's ends to whole pairs (floor/ceil), as Hugging Face does; False keeps them fractional.)";

constexpr const char* llama3 = R"(Llama 3.1's frequency policy (Hugging Face rope_type 'llama3'): wavelengths 2 pi / inv_i
shorter than L0 / high_freq_factor are kept, longer than L0 / low_freq_factor divided by factor, and
those between blended with t = (L0 / wavelength - low) / (high - low).)";
constexpr const char* llama3_init = R"(Parameters
----------
factor : float, default 8.0
    s > 0, the divisor of low frequencies.
low_freq_factor : float, default 1.0
    Wavelengths above L0 / low_freq_factor are interpolated.
high_freq_factor : float, default 4.0
    Wavelengths below L0 / high_freq_factor are kept; > low_freq_factor.
original_max_position : int, default 8192
    L0, the trained context length in tokens.)";

constexpr const char* longrope = R"(LongRoPE (Phi-3, Hugging Face rope_type 'longrope'): inv_i = 1 / (f_i base^(2i / r)) with
per-pair factors f (short_factor for sequences up to original_max_position, long_factor past it);
cos and sin are multiplied by sqrt(1 + ln s / ln L0).)";
constexpr const char* longrope_init = R"(Parameters
----------
short_factor : list of float
    r / 2 factors used up to original_max_position tokens.
long_factor : list of float
    r / 2 factors used past it.
original_max_position : int, default 4096
    L0, the trained context length in tokens.
max_position : int, default 0
    The extended context length; s = max_position / L0 (0: use factor).
choice : {'per_length', 'fixed_long'}, default 'per_length'
    'per_length' picks the factors by sequence_length (keys cached with the short factors go stale when
    a sequence grows past L0); 'fixed_long' always uses long_factor.
sequence_length : int, default 0
    The length the short/long choice is made for ('per_length').
factor : float, default 0.0
    s when max_position is 0; 0 = none given.)";

constexpr const char* rope = R"(Rotary position embedding (Su et al. 2021), with an optional frequency policy.

Pair (a, b) of each head becomes (a cos - b sin, b cos + a sin) with angle position * inv_freq[i],
inv_freq[i] = base^(-2i / rotary_dim); dims past rotary_dim pass through. Angles are computed in
double: float accuracy at positions up to 2^31. Pair layouts: 'half_split' pairs (i, i + r/2)
(GPT-NeoX, LLaMA, Hugging Face), 'interleaved' pairs (2i, 2i + 1) (GPT-J, RoFormer, Meta's Llama).)";
constexpr const char* rope_init = R"(Parameters
----------
head_dim : int, default 128
    Elements per head (even, > 0).
rotary_dim : int, default 0
    Rotated elements at the front of each head (even, <= head_dim); 0 = head_dim (partial rotary,
    GPT-NeoX's rotary_pct * head_dim).
base : float, default 10000.0
    The frequency base theta > 0 (Hugging Face rope_theta; 500000 for Llama 3).
layout : {'half_split', 'interleaved'}, default 'half_split'
    Which elements form a pair (see the class).
scaling : LinearScaling, NtkAwareScaling, DynamicNtkScaling, YarnScaling, Llama3Scaling, LongRopeScaling or None
    The frequency policy; None = plain RoPE.
rope_scaling : dict or None
    Instead of scaling: a Hugging Face config's rope_scaling dict ('rope_type' or 'type', 'factor',
    'original_max_position_embeddings', ...); its 'rope_theta' overrides base.
attention_factor : float or None
    Overrides the policy's magnitude (multiplies cos and sin, so logits get its square).)";
constexpr const char* rotate = R"(Rotates every head of x in place, token i by positions[i].

Parameters
----------
x : array
    float16, bfloat16, float32 or float64 (half types computed in float32), written in place:
    [tokens, heads * head_dim], [tokens, heads, head_dim], or per layout=; head_dim (the last axis) must
    be this Rope's head_dim.
positions : None, range, int64 array or list of int
    One position per token (shared by every sequence of a batch); None = 0..tokens-1.
layout : {'thd', 'htd', 'bhtd', 'bthd'} or None
    Of a 3-D or 4-D x: 'thd' [tokens, heads, head_dim] (3-D default), 'htd' [heads, tokens, head_dim],
    'bhtd' [batch, heads, tokens, head_dim] (4-D default), 'bthd' [batch, tokens, heads, head_dim].
    Any strides with a unit-stride head_dim; no two elements may share memory.)";
constexpr const char* cos_sin = R"((cos, sin) of position * inv_freq, each a new float64 array [len(positions), rotary_dim / 2],
without the magnitude.

Parameters
----------
positions : range, int64 array or list of int
    The positions (exact integers).)";

constexpr const char* mrope = R"(Multi-axis RoPE (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each token carries one position per
axis (temporal, height, width) and each rotary pair turns by the position on its own axis.

Pair k turns by positions[i, axis_of_pair(k)] * inv_freq[k], inv_freq the plain RoPE frequencies of
rotary_dim. Sections (Qwen2-VL, mrope_section [16, 24, 24] for head_dim 128): pairs 0..15 take the
temporal axis, 16..39 the height, 40..63 the width. interleaved=True (Qwen3-VL, [24, 20, 20]): pairs
cycle t, h, w, t, h, w, ... while each axis has pairs left, the rest take the temporal axis. A text
token has the same position on every axis, and then M-RoPE is Rope exactly (the same bits).)";
constexpr const char* mrope_init = R"(Parameters
----------
head_dim : int, default 128
    Elements per head (even, > 0).
mrope_section : list of int
    Rotary pairs per axis (Hugging Face rope_scaling['mrope_section']); the entries sum to rotary_dim / 2.
rotary_dim : int, default 0
    Rotated elements at the front of each head (even, <= head_dim); 0 = head_dim.
base : float, default 10000.0
    The frequency base theta > 0 (rope_theta; 1000000 for Qwen2-VL).
layout : {'half_split', 'interleaved'}, default 'half_split'
    Which elements form a pair, as for Rope ('half_split' in every Qwen VL model).
interleaved : bool, default False
    Assign pairs to axes in turn (Qwen3-VL) instead of in contiguous sections (Qwen2-VL, Qwen2.5-VL).)";
constexpr const char* axes_rotate = R"(Rotates every head of x in place; pair k of row i by its axis' position of token i.

Parameters
----------
x : array
    float16, bfloat16, float32 or float64, [tokens, heads * head_dim] or [tokens, heads, head_dim],
    written in place.
positions : int64 array or list of int
    [tokens, axes] (one column per axis, any whole-element strides: a transposed [axes, tokens] array
    such as Hugging Face's position_ids[:, b, :] works as .T), or, for MRope, 1-D: one position per
    text token, the same on every axis.)";
constexpr const char* axis_of_pair = R"(The axis (0 = temporal, 1 = height, 2 = width) whose position turns rotary pair k.

Parameters
----------
k : int
    A rotary pair, 0 <= k < rotary_dim / 2.)";
constexpr const char* axial = R"(Axial 2-D RoPE for image patches (the vision encoders of the Qwen VL models): each patch carries
(row, column); pair k < rotary_dim / 4 turns by row * base^(-4k / rotary_dim), pair rotary_dim / 4 + j
by column * base^(-4j / rotary_dim). Rotate queries and keys with it, then attend with encoding=None.)";
constexpr const char* axial_init = R"(Parameters
----------
head_dim : int, default 64
    Elements per head (> 0).
rotary_dim : int, default 0
    Rotated elements at the front of each head (a multiple of 4, <= head_dim); 0 = head_dim.
base : float, default 10000.0
    The frequency base theta > 0.
layout : {'half_split', 'interleaved'}, default 'half_split'
    Which elements form a pair, as for Rope.)";
constexpr const char* layer_encoding = R"(The position encoding and mask of one layer of a model, read from its Hugging Face config.

Gemma 3 (local layers: rope_local_base_freq and sliding_window; global layers: rope_theta and
rope_scaling; query_pre_attn_scalar, attn_logit_softcapping), Llama 4 (RoPE layers with
attention_chunk_size, NoPE layers every no_rope_layer_interval with attn_temperature_tuning) and
Qwen2-VL / Qwen2.5-VL / Qwen3-VL (rope_scaling['mrope_section']). Fields a published config leaves
out take the Hugging Face config class defaults. Pass window, chunk_size, scale and softcap to
attention with causal=True; multiply a NoPE layer's queries by query_temperature(positions, **temperature).

Parameters
----------
config : dict
    The model's config.json as a dict, or its text_config.
layer : int
    The layer index, 0 <= layer < num_hidden_layers.

Returns
-------
dict with encoding (Rope, MRope, or None for no position encoding), window ((left, -1) or (-1, -1)),
chunk_size (int or None), scale (float or None: 1 / sqrt(head_dim)), softcap (0.0 = off) and
temperature (dict of floor_scale and attn_scale, or None). Raises ValueError naming the field for a
bad config.)";
constexpr const char* query_temperature = R"(Llama 4's query temperature (attn_temperature_tuning) per position, float64:
log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1. Multiply the queries of a NoPE layer by it
before attention.

Parameters
----------
positions : None, range, int64 array or list of int
    Token positions (>= 0).
floor_scale : int, default 8192
    Llama 4's floor_scale (> 0).
attn_scale : float, default 0.1
    Llama 4's attn_scale (>= 0).)";
constexpr const char* simd_level = R"(The kernel set posenc uses for calls that start now: 'portable', 'avx2', 'avx512' or 'neon'.

The best set the CPU has, lowered by the cap (set_simd_cap, or the environment variable
POSENC_SIMD_CAP read when the module is imported). Every set computes the same function (RoPE the
same bits, attention within float rounding); the cap lets one machine test and time each.

Parameters
----------
detected : bool, default False
    True: the best set this CPU and build support, ignoring the cap.)";
constexpr const char* set_simd_cap = R"(Caps the kernel set for the whole process and returns the set now in use.

A cap only lowers the set: 'avx2' on an AVX-512 machine runs the AVX2 kernels; on a CPU without
the named set the best it has runs. 'avx2' and 'neon' are the same tier (the first vector set of
x86 and of aarch64); 'portable' forces plain C++; 'avx512' caps nothing.

Parameters
----------
level : str
    'portable', 'avx2', 'avx512' or 'neon' (ValueError for anything else).)";
constexpr const char* cpu_has_avx512_bf16 = R"(Whether this CPU has AVX512_BF16.

Where it has and the kernel set in use is 'avx512', attention(..., bf16_qk=True) computes Q K^T
with its bf16 dot products (vdpbf16ps); elsewhere the float kernels multiply the rounded values.)";
constexpr const char* sinusoidal = R"(Sinusoidal absolute position encoding (Vaswani et al. 2017), added to token embeddings
before the Q/K/V projections: PE[pos, 2i] = sin(pos / base^(2i / dim)), PE[pos, 2i + 1] = cos(...).)";
constexpr const char* sinusoidal_init = R"(Parameters
----------
dim : int, default 512
    The embedding width (even, > 0).
base : float, default 10000.0
    The wavelength base > 0.
layout : {'interleaved', 'concatenated'}, default 'interleaved'
    'interleaved' [sin cos sin cos ...] (the paper, fairseq); 'concatenated' all sines then all cosines
    (tensor2tensor, Hugging Face's sinusoidal embeddings).
shifted_denominator : bool, default False
    Use half_dim - 1 as the exponent's denominator (tensor2tensor, fairseq).
position_offset : int, default 0
    Added to every position (fairseq starts at padding_idx + 1).)";
constexpr const char* add_to = R"(x[i] += PE[positions[i]], in place.

Parameters
----------
x : array
    [tokens, dim], float32 or float64, written in place.
positions : None, range, int64 array or list of int
    One per row; None = 0..tokens-1.)";
constexpr const char* table = R"(A new [len(positions), dim] array of PE[positions[i]].

Parameters
----------
positions : range, int64 array or list of int
    The positions.
dtype : 'float32' or 'float64', default 'float32'
    The new array's dtype.)";

constexpr const char* alibi = R"(ALiBi (Press et al. 2022): the bias -slope_h * (qpos - kpos) (causal) or -slope_h * |qpos - kpos|
(symmetric) on the logits. For n heads a power of two, slope_h = 2^(-max_bias (h + 1) / n); otherwise
the slopes of the largest power of two c < n, then every other slope of 2c (BLOOM, MPT).)";
constexpr const char* alibi_init = R"(Parameters
----------
num_heads : int, default 8
    The model's total (global) query head count the slopes are computed for.
head_offset : int, default 0
    The global index of local head 0, for a shard of the heads (tensor parallelism): slopes stay
    those of the global heads.
form : {'causal', 'symmetric'}, default 'causal'
    -slope * (qpos - kpos), or -slope * |qpos - kpos| (encoders).
max_bias : float, default 8.0
    The exponent scale of the slope rule (8 in the paper, BLOOM and MPT).
slopes : list of float, 1-D array or None
    The slopes of all num_heads global heads instead of the rule (learned slopes, a model's own; copied,
    each finite); None = the rule.)";
constexpr const char* alibi_slopes =
    "The slopes of all num_heads global heads (by the rule, or as given), a new float64 array [num_heads].";
constexpr const char* bias = R"(The bias (float64) of one head for a query at qpos and a key at kpos.

Parameters
----------
head : int
    The local head, in [0, num_heads - head_offset).
qpos : int
    The query's position.
kpos : int
    The key's position.)";
constexpr const char* bias_tile = R"(A new [len(qpos), len(kpos)] array of the biases of one head.

Parameters
----------
head : int
    The local head, in [0, num_heads - head_offset).
qpos : range, int64 array or list of int
    The queries' positions (rows).
kpos : range, int64 array or list of int
    The keys' positions (columns).
dtype : 'float32' or 'float64', default 'float32'
    The new array's dtype.)";

constexpr const char* t5 = R"(T5's bucketed relative position bias (Raffel et al. 2020): a learned table[bucket(kpos - qpos),
head] on the logits; exact buckets for small distances, logarithmic ones up to max_distance.)";
constexpr const char* t5_init = R"(Parameters
----------
table : array
    [num_buckets, num_heads], any float dtype and strides (copied): the model's
    relative_attention_bias.weight as it is ([num_buckets, num_heads] in Hugging Face's T5).
max_distance : int, default 128
    Distances (tokens) from which on the last bucket is used.
bidirectional : bool, default True
    True for an encoder (half the buckets per side), False for a decoder (past keys only).
head_offset : int, default 0
    The global index of local head 0 (a shard of the heads).)";
constexpr const char* bucket = R"(The bucket of a relative distance.

Parameters
----------
relative : int
    kpos - qpos, in tokens.)";

constexpr const char* shaw = R"(Shaw et al. 2018 relative keys and values: e_ij = q_i . (k_j + aK[clip(j - i)]) / sqrt(d),
out_i = sum_j a_ij (v_j + aV[clip(j - i)]), distances clipped to [-K, K]; one table for every head.)";
constexpr const char* shaw_init = R"(Parameters
----------
key_table : array
    aK, [2K + 1, head_dim], any float dtype (copied); row r is distance r - K.
value_table : array
    aV, [2K + 1, head_dim], the same shape (copied).)";

constexpr const char* attention = R"(Blockwise softmax attention: out_i = sum_j softmax_j(scale q_i . k_j + bias_ij) v_j, tile by tile
(memory linear in the sequence length).

Parameters
----------
q : array
    Queries, float16, bfloat16, float32 or float64, in a layout below; used in place.
k : array
    Keys, the dtype of q, the same layout with kv_heads heads (or 2-D [n_kv, kv_heads * head_dim] beside
    a 3-D q).
v : array
    Values, like k.
qpos : None, range, int64 array or list of int
    The position of each query token (shared by every sequence of a batch); None = 0..n_q-1. A query
    block at the end of a KV cache gives its cache positions.
kpos : None, range, int64 array or list of int
    The position of each key token; None = 0..n_kv-1.
encoding : Rope, MRope, Alibi, T5Bias, ShawRelative or None
    Always applied in the kernel (a Rope rotates copies of the q and k tiles; q and k stay untouched).
    For q and k rotated already (Rope.rotate, a cache of rotated keys) pass None: never both. An MRope
    here takes one position per token (text tokens, equal on every axis: the RoPE it equals); rotate
    image tokens with MRope.rotate and their [tokens, 3] positions first.
heads : int or None
    Query heads; default the head axis of q (required for a 2-D q).
kv_heads : int or None
    Key/value heads, dividing heads; query head h reads kv head h // (heads // kv_heads) (GQA, MQA);
    default the head axis of k, or heads.
layout : {'thd', 'htd', 'bhtd', 'bthd'} or None
    Of 3-D and 4-D arrays: 'thd' [tokens, heads, head_dim] (3-D default), 'htd' [heads, tokens,
    head_dim], 'bhtd' [batch, heads, tokens, head_dim] (4-D default, torch's
    scaled_dot_product_attention), 'bthd' [batch, tokens, heads, head_dim]. A 2-D array is [tokens,
    heads * head_dim]. Any strides with a unit-stride head_dim (transposes, slices of a fused QKV
    projection, k and v expanded over heads). A batch is independent sequences of equal length.
scale : float or None
    The logit scale; None = 1 / sqrt(head_dim).
softcap : float, default 0.0
    Gemma 2's logit soft-capping: every logit s (scaled, biases added) becomes softcap * tanh(s /
    softcap) before masking; 0 = off.
sinks : list of float, 1-D array or None
    gpt-oss attention sinks: one logit z_h per query head joining every row's softmax denominator
    without a value (copied).
causal : bool, default False
    Key j is visible to query i only when kpos[j] <= qpos[i] (positions, not indices: bottom-right
    aligned for a query block at the end of a cache).
window : (int, int), default (-1, -1)
    (left, right): keys within [qpos - left, qpos + right] (FlashAttention's window_size); -1 = unbounded.
chunk_size : int or None, default None
    Chunked attention (Llama 4's attention_chunk_size): key j is visible to query i only when
    kpos[j] // chunk_size == qpos[i] // chunk_size; None = off. Tiles outside every query's chunk are
    skipped unread.
return_lse : bool, default False
    Also return the log-sum-exp of each row's logits (natural log): q's layout without head_dim,
    float32 (float64 for float64 q), -inf for a row with no visible key.
out : array or None
    Written in place and returned: q's shape, dtype and layout (any strides, no shared elements).
    None = a new array (a torch tensor when q is one).
threads : int, default 0
    The most workers of the module's pool to use (0 = all, 1 = the calling thread); the result is the
    same bits for any value.
q_tile : int, default 0
    Query rows per tile; 0 = the kernel's choice.
k_tile : int, default 0
    Key rows per tile; 0 = the kernel's choice.
bf16_qk : bool, default False
    Q K^T as a bf16 model computes it: q and k, after the encoding's rotation, rounded to bf16,
    their exact products summed in float32 and then scaled. For bf16 q and k that need no rotation
    the result is as accurate as without it; CPUs with AVX512_BF16 compute these products with
    vdpbf16ps (faster prefill). Forward only: attention_backward computes float logits.

Returns
-------
out, or (out, lse) with return_lse. The GIL is released while it runs.

Examples
--------
Torch's layout, straight from a Llama-style projection, no copy:

>>> q = proj(x).view(b, t, h, d).transpose(1, 2)        # [b, h, t, d], a strided view
>>> out = posenc.attention(q, k, v, encoding=rope, causal=True))";

constexpr const char* varlen = R"(Attention of a batch of sequences packed one after another (FlashAttention's varlen layout):
sequence b attends its queries, rows cu_q[b]:cu_q[b+1] of q, to its keys, rows cu_k[b]:cu_k[b+1] of k
and v, and only to them; the same as one attention call per sequence.

Parameters
----------
q : array
    [total_q, heads * head_dim] or [total_q, heads, head_dim], float16, bfloat16, float32 or float64.
k : array
    [total_k, kv_heads * head_dim] or [total_k, kv_heads, head_dim], the dtype of q.
v : array
    Like k.
cu_q : int32 array or list of int
    B + 1 cumulative query counts from 0 (int64 or a list is copied into int32).
cu_k : int32 array or list of int
    B + 1 cumulative key counts from 0.
qpos : None, range, int64 array or list of int
    One position per query row; None = each sequence's rows numbered 0..n_b-1.
kpos : None, range, int64 array or list of int
    One position per key row; None = 0..n_b-1 per sequence.
encoding : Rope, MRope, Alibi, T5Bias, ShawRelative or None
    As for attention.
heads : int or None
    As for attention.
kv_heads : int or None
    As for attention.
scale : float or None
    As for attention.
softcap : float, default 0.0
    As for attention.
sinks : list of float, 1-D array or None
    As for attention.
causal : bool, default False
    As for attention (by positions, within each sequence).
window : (int, int), default (-1, -1)
    As for attention.
chunk_size : int or None, default None
    As for attention (by positions, within each sequence).
return_lse : bool, default False
    Also return lse [total_q, heads].
out : array or None
    As for attention, q's shape.
threads : int, default 0
    As for attention.
q_tile : int, default 0
    As for attention.
k_tile : int, default 0
    As for attention.
bf16_qk : bool, default False
    As for attention.)";

constexpr const char* paged = R"(Attention of a batch of sequences whose keys and values are in a paged cache (vLLM's layout):
sequence b attends its queries, rows cu_q[b]:cu_q[b+1] of q at positions qpos, to the lengths[b]
tokens of its cache; token j is row j % page_size of page block_table[b, j // page_size]. Pages past
a sequence's length are never read.

Parameters
----------
q : array
    [total_q, heads * head_dim] or [total_q, heads, head_dim], float16, bfloat16, float32 or float64.
k_cache : array
    [num_pages, page_size, kv_heads, head_dim], [num_pages, page_size, kv_heads * head_dim], or 2-D
    [num_pages * page_size, kv_heads * head_dim] with page_size=; the dtype of q.
v_cache : array
    The shape of k_cache.
block_table : int32 array
    [B, pages_per_sequence]: each sequence's pages, in order.
lengths : int32 array or list of int
    [B]: tokens per sequence, this step's included.
cu_q : int32 array or list of int
    B + 1 cumulative query counts from 0.
qpos : range, int64 array or list of int
    Each query's position (required).
encoding : Rope, MRope, Alibi, T5Bias, ShawRelative or None
    As for attention; with a Rope, keys= says what the cache holds.
page_size : int or None
    Rows per page; required for a 2-D cache, else read from its shape.
keys : {'rotated', 'raw'} or None
    With a Rope (required then): 'rotated' (the cache holds keys rotated by paged_append, what engines
    keep; only queries are rotated) or 'raw' (keys rotated by every call).
positions : None, int64 array or list of int
    The position of every cache row (rolling caches); None = a token's index in its sequence.
heads : int or None
    As for attention.
kv_heads : int or None
    Default: the cache's head axis, or its columns / head_dim.
scale : float or None
    As for attention.
softcap : float, default 0.0
    As for attention.
sinks : list of float, 1-D array or None
    As for attention.
causal : bool, default False
    As for attention.
window : (int, int), default (-1, -1)
    As for attention.
chunk_size : int or None, default None
    As for attention (by positions, within each sequence).
return_lse : bool, default False
    Also return lse [total_q, heads].
out : array or None
    As for attention, q's shape.
threads : int, default 0
    As for attention.
q_tile : int, default 0
    As for attention.
k_tile : int, default 0
    As for attention.
bf16_qk : bool, default False
    As for attention.)";

constexpr const char* append = R"(Writes a step's new keys and values into a paged cache, in place: row i of sequence b's new rows
(cu_new[b]:cu_new[b+1] of k_new and v_new) becomes its token lengths[b] - n_b + i.

Parameters
----------
k_cache : array
    As for paged_attention; written in place.
v_cache : array
    The shape of k_cache; written in place.
block_table : int32 array
    [B, pages_per_sequence].
lengths : int32 array or list of int
    [B]: tokens per sequence, this step's included.
k_new : array
    [total_new, kv_heads * head_dim] or [total_new, kv_heads, head_dim], the cache's dtype.
v_new : array
    Like k_new.
cu_new : int32 array or list of int
    B + 1 cumulative counts of new rows from 0.
encoding : Rope, MRope, Alibi, T5Bias, ShawRelative or None
    With a Rope and keys='rotated' each key is rotated with its token's position; otherwise keys are
    stored as given (score biases act in paged_attention).
page_size : int or None
    Rows per page; required for a 2-D cache.
keys : {'rotated', 'raw'} or None
    With a Rope (required then): what the cache holds.
positions : None, int64 array or list of int
    The position of every cache row; None = a token's index in its sequence.)";

constexpr const char* backward = R"(Gradients of attention (the backward of attention, FlashAttention-2's algorithm): given dout =
dL/dout, returns dL/dq, dL/dk, dL/dv and the gradients of the encoder's learned parameters and of the
sinks. Logits are recomputed tile by tile from q, k and the forward's lse, so memory stays linear in
the sequence length; the result is the same bits for any threads.

Pass the forward's inputs and knobs unchanged (q and k as given to attention: with a Rope, not
rotated; the backward rotates copies as the forward did and returns the gradients of the unrotated
q and k), its output out and its log-sum-exp (attention(..., return_lse=True)).

Parameters
----------
q : array
    Queries, float32 or float64, in any layout of attention (2-D [tokens, heads * head_dim], 'thd', 'htd',
    'bhtd', 'bthd'; any strides with a unit-stride head_dim), read in place; a batch is sequences of equal
    length in one call.
k : array
    Keys, the dtype of q, in q's layout with kv_heads heads.
v : array
    Values, like k.
out : array
    The forward's output, q's shape and dtype.
lse : array
    The forward's log-sum-exp in q's layout without head_dim (as attention(..., return_lse=True) returns
    it: [tokens, heads], [heads, tokens], [batch, heads, tokens] or [batch, tokens, heads]), float32 or
    float64 (-inf: the row saw no key).
dout : array
    dL/dout, q's shape and dtype.
qpos : None, range, int64 array or list of int
    As for attention.
kpos : None, range, int64 array or list of int
    As for attention.
encoding : Rope, MRope, Alibi, T5Bias, ShawRelative or None
    As for attention (the same encoder as the forward).
heads : int or None
    As for attention.
kv_heads : int or None
    As for attention; dk and dv sum the query heads of each kv head's group.
layout : str or None
    As for attention.
scale : float or None
    As for attention.
softcap : float, default 0.0
    As for attention.
sinks : list of float, 1-D array or None
    As for attention.
causal : bool, default False
    As for attention.
window : (int, int), default (-1, -1)
    As for attention.
chunk_size : int or None, default None
    As for attention.
param_grads : bool, default True
    Also compute the gradients of the learned parameters: 'sinks' (with sinks), 'slopes' (Alibi: [num_heads]
    global heads, float64), 'table' (T5Bias: [num_buckets, num_heads]), 'key_table' and 'value_table'
    (ShawRelative: [2K + 1, head_dim]); in q's dtype unless said. False: the dict is empty.
dq : array or None
    Written in place and returned: q's shape, layout and dtype (any strides); None = a new array.
dk : array or None
    Like dq, k's shape.
dv : array or None
    Like dq, v's shape.
threads : int, default 0
    As for attention.
q_tile : int, default 0
    As for attention.
k_tile : int, default 0
    As for attention.

Returns
-------
(dq, dk, dv, grads): dq, dk and dv overwritten (new arrays are torch tensors when q is one), grads a dict
of new arrays (see param_grads). dq, dk and dv must not overlap the inputs. The GIL is released while it
runs.)";

}  // namespace docs

// ---------------------------------------------------------------------------------------------
// Arguments

std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")); }

[[noreturn]] void type_error(const std::string& where, const std::string& what) {
  throw py::type_error("posenc." + where + ": " + what);
}
[[noreturn]] void value_error(const std::string& where, const std::string& what) {
  throw py::value_error("posenc." + where + ": " + what);
}

[[noreturn]] void overflow_error(const std::string& where, const std::string& what) {
  PyErr_SetString(PyExc_OverflowError, ("posenc." + where + ": " + what).c_str());
  throw py::error_already_set();
}

/// `str(i)` of a Python int, its middle elided past 40 digits (an int of 10**400 stays one line).
std::string int_text(py::handle i) {
  std::string s = py::str(i);
  if (s.size() > 40)
    s = s.substr(0, 20) + "..." + s.substr(s.size() - 10) + " (" + std::to_string(s.size()) + " digits)";
  return s;
}

// ---------------------------------------------------------------------------------------------
// Scalar arguments. Python ints are unbounded and posenc's are int64: a value that does not fit
// raises OverflowError naming the argument and the value, never a generic cast failure.

/// An int (or anything with `__index__`, such as numpy.int64) as int64.
std::int64_t int64_of(py::handle obj, const std::string& where, const std::string& arg) {
  if (!PyIndex_Check(obj.ptr())) type_error(where, arg + " must be an int, got " + type_name(obj));
  auto i = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!i) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (overflow != 0) overflow_error(where, arg + " = " + int_text(i) + " does not fit in int64");
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

/// A float, an int or a NumPy number as double.
double float_of(py::handle obj, const std::string& where, const std::string& arg) {
  const auto* num = Py_TYPE(obj.ptr())->tp_as_number;
  if (!PyFloat_Check(obj.ptr()) && !PyIndex_Check(obj.ptr()) && (num == nullptr || num->nb_float == nullptr))
    type_error(where, arg + " must be a float, got " + type_name(obj));
  const double v = PyFloat_AsDouble(obj.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
    PyErr_Clear();
    overflow_error(where, arg + " = " + int_text(obj) + " does not fit in float64");
  }
  return v;
}

/// True/False (also numpy.bool_ and ints, by their truth value).
bool bool_of(py::handle obj, const std::string& where, const std::string& arg) {
  const std::string_view type = Py_TYPE(obj.ptr())->tp_name;
  const bool numpy_bool = type == "numpy.bool_" || type == "numpy.bool";  // NumPy 1, NumPy 2
  if (!PyBool_Check(obj.ptr()) && !numpy_bool && !PyIndex_Check(obj.ptr()))
    type_error(where, arg + " must be a bool, got " + type_name(obj));
  const int v = PyObject_IsTrue(obj.ptr());
  if (v < 0) throw py::error_already_set();
  return v != 0;
}

std::string str_of(py::handle obj, const std::string& where, const std::string& arg) {
  if (!py::isinstance<py::str>(obj)) type_error(where, arg + " must be a str, got " + type_name(obj));
  return obj.cast<std::string>();
}

/// A list, tuple or 1-D array of numbers, as doubles.
std::vector<double> floats_of(py::handle obj, const std::string& where, const std::string& arg) {
  const bool array = py::isinstance<py::array>(obj) && py::reinterpret_borrow<py::array>(obj).ndim() == 1;
  if (!array && !py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    type_error(where, arg + " must be a list of numbers, got " + type_name(obj));
  std::vector<double> out;
  for (auto item : obj) out.push_back(float_of(item, where, arg + "[" + std::to_string(out.size()) + "]"));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Calls. Every function, method and constructor takes (*args, **kwargs) and binds them itself, as
// Python binds a def's parameters, so that a wrong call raises a short TypeError naming the
// argument ("did you mean" for a mistyped keyword) where pybind11's would print every argument,
// arrays included. Each docstring starts with the Python signature for help() and inspect.

/// A parameter: positional-or-keyword unless `keyword_only`; a `required` one has no default.
struct param {
  std::string name;
  bool keyword_only = false;
  bool required = false;
};

/// What a function is called in messages ("attention", "Rope.rotate", "Rope" for a constructor),
/// its parameters in order, and keywords it no longer takes with what to do instead.
struct signature {
  std::string name;
  std::vector<param> params;
  std::vector<std::pair<std::string, std::string>> removed = {};
};

/// The signature of `name` from its Python parameter list, e.g. "x, positions=None" or
/// "q, k, v, qpos=None, *, heads=None": a parameter without a default is required, those after
/// "*" are keyword-only. The same text heads the docstring (see `doc_of`), so the two cannot differ.
signature sig_of(std::string name, std::string_view params,
                 std::vector<std::pair<std::string, std::string>> removed = {}) {
  signature s{std::move(name), {}, std::move(removed)};
  bool keyword_only = false;
  int depth = 0;
  std::size_t begin = 0;
  for (std::size_t i = 0; i <= params.size(); ++i) {
    const char c = i < params.size() ? params[i] : ',';
    if (c == '(' || c == '[') ++depth;
    if (c == ')' || c == ']') --depth;
    if (c != ',' || depth != 0) continue;
    std::string_view item = params.substr(begin, i - begin);
    begin = i + 1;
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    if (item == "*") {
      keyword_only = true;
    } else if (!item.empty()) {
      const auto eq = item.find('=');
      s.params.push_back(param{std::string(item.substr(0, eq)), keyword_only, eq == std::string_view::npos});
    }
  }
  return s;
}

/// A docstring whose first line CPython reads as the signature (`__text_signature__`, shown by
/// help() and inspect.signature): "name(self, params)\n--\n\n" then `doc`. A method names `self`
/// plainly: CPython's "$self" marks an argument that is already bound, and pybind11's function
/// objects count as bound to the module.
std::string doc_of(std::string_view name, bool method, std::string_view params, std::string_view doc) {
  std::string s(name);
  s += method ? "(self, " : "(";
  return s.append(params).append(")\n--\n\n").append(doc);
}

[[noreturn]] void call_error(const signature& sig, const std::string& what) {
  throw py::type_error("posenc." + sig.name + "() " + what);
}

/// The parameter name closest to a mistyped keyword (Python's difflib), or "".
std::string close_match(const signature& sig, const std::string& word) {
  py::list names;
  for (const auto& p : sig.params) names.append(p.name);
  py::list best = py::module_::import("difflib").attr("get_close_matches")(word, names, 1);
  return best.empty() ? std::string() : best[0].cast<std::string>();
}

std::string plural(std::size_t n, const char* word) { return std::to_string(n) + " " + word + (n == 1 ? "" : "s"); }

/// The arguments of one call bound to the parameters of `sig`; an argument left to its default is
/// a null handle. The handles borrow from the call's args and kwargs, which outlive this.
class call_args {
 public:
  call_args(const signature& sig, const py::args& args, const py::kwargs& kwargs)
      : sig_(sig), values_(sig.params.size()) {
    std::size_t max_positional = 0, min_positional = 0;
    for (const auto& p : sig.params) {
      if (p.keyword_only) break;
      ++max_positional;
      if (p.required) min_positional = max_positional;
    }
    if (args.size() > max_positional) {
      const std::string given = std::to_string(args.size()) + (args.size() == 1 ? " was" : " were");
      if (max_positional == 0) call_error(sig, "takes no positional arguments but " + given + " given");
      if (min_positional == max_positional)
        call_error(sig, "takes " + plural(max_positional, "positional argument") + " but " + given + " given");
      call_error(sig, "takes from " + std::to_string(min_positional) + " to " + std::to_string(max_positional) +
                          " positional arguments but " + given + " given");
    }
    for (std::size_t i = 0; i < args.size(); ++i) values_[i] = args[i];
    for (auto [key, value] : kwargs) {
      const auto name = key.cast<std::string>();
      const auto i = index_of(name);
      if (i == sig.params.size()) {
        for (const auto& [old, instead] : sig.removed)
          if (name == old) call_error(sig, "got an unexpected keyword argument '" + name + "' (" + instead + ")");
        const auto near = close_match(sig, name);
        call_error(sig, "got an unexpected keyword argument '" + name + "'" +
                            (near.empty() ? "" : " (did you mean '" + near + "'?)"));
      }
      if (values_[i]) call_error(sig, "got multiple values for argument '" + name + "'");
      values_[i] = value;
    }
    for (std::size_t i = 0; i < sig.params.size(); ++i)
      if (sig.params[i].required && !values_[i])
        call_error(sig, std::string("missing required ") + (sig.params[i].keyword_only ? "keyword " : "") +
                            "argument '" + sig.params[i].name + "'");
  }

  /// The argument, or None when it was left to its default.
  py::handle operator[](std::string_view name) const {
    const py::handle h = values_[checked_index(name)];
    return h ? h : py::handle(Py_None);
  }
  /// Given and not None.
  bool has(std::string_view name) const { return !(*this)[name].is_none(); }

  std::int64_t int64(std::string_view name, std::int64_t def) const {
    return has(name) ? int64_of((*this)[name], sig_.name, std::string(name)) : def;
  }
  std::optional<std::int64_t> optional_int64(std::string_view name) const {
    if (!has(name)) return std::nullopt;
    return int64_of((*this)[name], sig_.name, std::string(name));
  }
  double float64(std::string_view name, double def) const {
    return has(name) ? float_of((*this)[name], sig_.name, std::string(name)) : def;
  }
  std::optional<double> optional_float64(std::string_view name) const {
    if (!has(name)) return std::nullopt;
    return float_of((*this)[name], sig_.name, std::string(name));
  }
  bool flag(std::string_view name, bool def) const {
    return has(name) ? bool_of((*this)[name], sig_.name, std::string(name)) : def;
  }
  std::string str(std::string_view name, const char* def) const {
    return has(name) ? str_of((*this)[name], sig_.name, std::string(name)) : std::string(def);
  }

 private:
  std::size_t index_of(std::string_view name) const {
    std::size_t i = 0;
    while (i < sig_.params.size() && name != sig_.params[i].name) ++i;
    return i;
  }
  std::size_t checked_index(std::string_view name) const {
    const auto i = index_of(name);
    if (i == sig_.params.size()) throw std::logic_error("posenc module: no parameter " + std::string(name));
    return i;
  }

  const signature& sig_;
  std::vector<py::handle> values_;
};

// ---------------------------------------------------------------------------------------------
// Arrays. An array argument is used in place, never copied, whatever it comes as:
// - a numpy.ndarray;
// - an object with `__dlpack__` (a torch.Tensor, ...) whose memory is on the CPU: its DLPack
//   capsule is consumed (renamed "used_dltensor") and released by its deleter when the call ends,
//   so the tensor stays alive while the call runs;
// - any other object with the buffer protocol (memoryview, array.array, ...), wrapped by
//   numpy.asarray, which copies nothing.

/// The DLPack ABI (dlpack.h v0.5-0.8, the one torch 1.10+ and NumPy 1.22+ export): the structs a
/// capsule named "dltensor" points to. Spelled out here rather than included: the layout is the ABI.
namespace dlpack {
struct device {
  std::int32_t type;  // DLDeviceType: 1 = CPU
  std::int32_t id;
};
struct data_type {
  std::uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct tensor {
  void* data;
  device dev;
  std::int32_t ndim;
  data_type dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null: C-contiguous
  std::uint64_t byte_offset;
};
struct managed_tensor {
  tensor dl;
  void* manager_ctx;
  void (*deleter)(managed_tensor*);
};
static_assert(sizeof(void*) != 8 || (offsetof(tensor, ndim) == 16 && offsetof(tensor, byte_offset) == 40 &&
                                     offsetof(managed_tensor, deleter) == 56),
              "DLPack layout");
constexpr std::int32_t cpu = 1;

/// "cuda:0", "rocm:1", ...: the DLDeviceType's name and the device id.
std::string device_text(std::int64_t type, std::int64_t id) {
  static constexpr const char* names[] = {"",     "cpu",       "cuda",    "cuda_host",    "opencl",
                                          "",     "",          "vulkan",  "metal",        "vpi",
                                          "rocm", "rocm_host", "ext_dev", "cuda_managed", "oneapi"};
  const bool named = type > 0 && type < std::ssize(names) && *names[type] != '\0';
  return (named ? std::string(names[type]) : "DLPack device type " + std::to_string(type)) + ":" + std::to_string(id);
}
}  // namespace dlpack

enum class elem { f16, bf16, f32, f64, i32, i64, other };

const char* dtype_text(elem d) {
  static constexpr const char* names[] = {"float16", "bfloat16", "float32", "float64", "int32", "int64", "other"};
  return names[static_cast<int>(d)];
}

/// An array argument: where its elements are, their type, shape and strides (in bytes), and what
/// keeps them alive until the call returns.
struct array_arg {
  py::object source;                                // the caller's object
  py::object keep;                                  // the ndarray viewed (numpy and buffer objects)
  std::shared_ptr<dlpack::managed_tensor> capsule;  // a consumed DLPack tensor, released by its deleter
  char* data = nullptr;
  elem type = elem::other;
  std::string type_name;  // for messages ("float16", "uint8", "complex64")
  std::vector<py::ssize_t> shape, strides;
  bool writeable = true;

  py::ssize_t ndim() const { return static_cast<py::ssize_t>(shape.size()); }
  py::ssize_t size() const {
    py::ssize_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

std::string shape_text(const array_arg& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape[i]);
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string strides_text(const array_arg& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.strides[i]);
  return s + ")";
}

constexpr const char* array_kinds =
    "an array (numpy.ndarray, torch.Tensor, or any object with __dlpack__ or the buffer protocol)";

array_arg array_of_ndarray(py::handle source, const py::array& a) {
  array_arg t;
  t.source = py::reinterpret_borrow<py::object>(source);
  t.keep = a;
  t.data = static_cast<char*>(const_cast<void*>(a.data()));
  t.shape.assign(a.shape(), a.shape() + a.ndim());
  t.strides.assign(a.strides(), a.strides() + a.ndim());
  t.writeable = a.writeable();
  const py::dtype d = a.dtype();
  t.type_name = py::str(py::handle(d));
  if (d.attr("isnative").cast<bool>()) {
    const char kind = d.kind();
    const auto size = d.itemsize();
    if (kind == 'f' && size == 2) t.type = elem::f16;
    if (kind == 'f' && size == 4) t.type = elem::f32;
    if (kind == 'f' && size == 8) t.type = elem::f64;
    if (kind == 'i' && size == 4) t.type = elem::i32;
    if (kind == 'i' && size == 8) t.type = elem::i64;
  }
  return t;
}

std::string dlpack_type_name(dlpack::data_type d) {
  static constexpr const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  std::string s = d.code < 7 ? codes[d.code] : "DLPack type code " + std::to_string(d.code) + " ";
  if (d.code != 6) s += std::to_string(d.bits);
  if (d.lanes != 1) s += "x" + std::to_string(d.lanes);
  return s;
}

array_arg array_of_dlpack(py::handle obj, const std::string& where, const std::string& arg) {
  const auto refuse_device = [&](std::int64_t type, std::int64_t id) {
    type_error(where, arg + " is on " + dlpack::device_text(type, id) +
                          "; posenc computes on the CPU: pass a CPU tensor (" + arg + ".cpu())");
  };
  // Asked first, so that a GPU tensor is refused before it is exported (and synchronised).
  if (py::hasattr(obj, "__dlpack_device__")) {
    const py::tuple dev = obj.attr("__dlpack_device__")();
    const auto type = int64_of(dev[0], where, arg + ".__dlpack_device__()[0]");
    if (type != dlpack::cpu) refuse_device(type, int64_of(dev[1], where, arg + ".__dlpack_device__()[1]"));
  }
  py::object cap;
  try {
    cap = obj.attr("__dlpack__")();
  } catch (py::error_already_set& e) {
    // torch: "Can't export tensors that require gradient, use tensor.detach()".
    type_error(where, arg + ": " + type_name(obj) + ".__dlpack__() failed: " + std::string(py::str(e.value())));
  }
  if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
    type_error(where, arg + ": " + type_name(obj) +
                          ".__dlpack__() did not return an unused DLPack capsule (named 'dltensor')");
  auto* m = static_cast<dlpack::managed_tensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  // Consumed: the capsule no longer frees the tensor; its deleter runs when `capsule` goes.
  if (PyCapsule_SetName(cap.ptr(), "used_dltensor") != 0) throw py::error_already_set();
  array_arg t;
  t.capsule.reset(m, [](dlpack::managed_tensor* p) {
    if (p->deleter != nullptr) p->deleter(p);
  });
  t.source = py::reinterpret_borrow<py::object>(obj);
  const dlpack::tensor& dl = m->dl;
  if (dl.dev.type != dlpack::cpu) refuse_device(dl.dev.type, dl.dev.id);
  const dlpack::data_type d = dl.dtype;
  t.type_name = dlpack_type_name(d);
  if (d.lanes == 1) {
    if (d.code == 2 && d.bits == 16) t.type = elem::f16;
    if (d.code == 4 && d.bits == 16) t.type = elem::bf16;
    if (d.code == 2 && d.bits == 32) t.type = elem::f32;
    if (d.code == 2 && d.bits == 64) t.type = elem::f64;
    if (d.code == 0 && d.bits == 32) t.type = elem::i32;
    if (d.code == 0 && d.bits == 64) t.type = elem::i64;
  }
  const auto item = static_cast<py::ssize_t>((d.bits * d.lanes + 7) / 8);
  t.data = static_cast<char*>(dl.data) + dl.byte_offset;
  t.shape.assign(dl.shape, dl.shape + dl.ndim);
  t.strides.resize(t.shape.size());
  py::ssize_t dense = item;
  for (auto i = dl.ndim - 1; i >= 0; --i) {
    t.strides[i] = dl.strides != nullptr ? static_cast<py::ssize_t>(dl.strides[i]) * item : dense;
    dense *= t.shape[i];
  }
  return t;  // DLPack 0.x has no read-only flag: the producer lends its memory writable
}

/// An array argument in place (see above), or TypeError naming it.
array_arg array_of(py::handle obj, const std::string& where, const std::string& arg) {
  if (py::isinstance<py::array>(obj)) return array_of_ndarray(obj, py::reinterpret_borrow<py::array>(obj));
  if (py::hasattr(obj, "__dlpack__")) return array_of_dlpack(obj, where, arg);
  if (PyObject_CheckBuffer(obj.ptr()) != 0) {
    const py::array a = py::module_::import("numpy").attr("asarray")(obj);
    return array_of_ndarray(obj, a);
  }
  type_error(where, arg + " must be " + array_kinds + ", got " + type_name(obj));
}

bool is_float(elem e) { return e == elem::f16 || e == elem::bf16 || e == elem::f32 || e == elem::f64; }

/// The element of a float array at `p`, as double.
double element_at(const array_arg& a, const char* p) {
  switch (a.type) {
    case elem::f16: {
      Eigen::half h;
      std::memcpy(&h, p, sizeof h);
      return static_cast<float>(h);
    }
    case elem::bf16: {
      Eigen::bfloat16 h;
      std::memcpy(&h, p, sizeof h);
      return static_cast<float>(h);
    }
    case elem::f32: {
      float f;
      std::memcpy(&f, p, sizeof f);
      return f;
    }
    default: {
      double d;
      std::memcpy(&d, p, sizeof d);
      return d;
    }
  }
}

/// An array of floating-point storage: float16, bfloat16, float32, float64, or only float32 and
/// float64 when `wide_only` (TypeError otherwise).
array_arg float_array(py::handle obj, const std::string& where, const std::string& arg, bool wide_only = false) {
  array_arg t = array_of(obj, where, arg);
  if (!is_float(t.type) || (wide_only && (t.type == elem::f16 || t.type == elem::bf16)))
    type_error(where, arg + " must have dtype " +
                          (wide_only ? "float32 or float64" : "float16, bfloat16, float32 or float64") + ", got " +
                          t.type_name);
  return t;
}

void require_dtype(const array_arg& got, const array_arg& want, const std::string& where, const std::string& arg,
                   const std::string& of) {
  if (got.type != want.type)
    type_error(where, arg + " has dtype " + got.type_name + " but " + of + " has dtype " + want.type_name +
                          "; they must match");
}

/// Calls `f(T{})` with the storage type of `e` (a float type).
template <class F>
decltype(auto) with_storage(elem e, F&& f) {
  switch (e) {
    case elem::f16:
      return f(Eigen::half{});
    case elem::bf16:
      return f(Eigen::bfloat16{});
    case elem::f32:
      return f(float{});
    default:
      return f(double{});
  }
}

/// A matrix argument as posenc sees it: `[rows, cols]` with a row stride, plus the head count
/// and head_dim when it came as a 3-D `[tokens, heads, head_dim]` array (`ndim` 3).
template <class S>
struct matrix_arg {
  posenc::strided_view<S> view;
  int ndim = 2;
  index_t heads3 = 0;
  index_t head_dim3 = 0;
};

/// Views a 2-D `[rows, cols]` (or, when `allow_3d`, 3-D `[rows, heads, head_dim]`) array in
/// place. The last axis must have unit stride; for 3-D the middle one must be dense too; rows may
/// be any non-negative multiple of the element size apart, at least a row long. An array with no
/// elements addresses no memory, so its strides (NumPy gives such arrays zero strides) do not
/// matter and nothing is written to it, read-only or not.
template <class S>
matrix_arg<S> matrix_of(const array_arg& a, const std::string& where, const std::string& arg, bool allow_3d) {
  using T = std::remove_const_t<S>;
  constexpr auto item = static_cast<py::ssize_t>(sizeof(T));
  const py::ssize_t nd = a.ndim();
  if (nd != 2 && !(allow_3d && nd == 3))
    value_error(where, arg + " must be " +
                           (allow_3d ? "2-D [tokens, heads * head_dim] or 3-D [tokens, heads, head_dim]" : "2-D") +
                           ", got shape " + shape_text(a));
  const py::ssize_t rows = a.shape[0];
  const py::ssize_t inner = a.shape[nd - 1];
  const py::ssize_t cols = nd == 3 ? a.shape[1] * inner : inner;
  const bool empty = a.size() == 0;
  bool ok = inner <= 1 || a.strides[nd - 1] == item;
  if (nd == 3) ok = ok && (a.shape[1] <= 1 || a.strides[1] == inner * item);
  const py::ssize_t rs = a.strides[0];
  ok = ok && (rows <= 1 || (rs >= 0 && rs % item == 0 && rs / item >= cols));
  if (!ok && !empty)
    value_error(where, arg + " with shape " + shape_text(a) + " and strides " + strides_text(a) +
                           " is not laid out as rows of contiguous elements; pass a C-contiguous array "
                           "(numpy.ascontiguousarray, Tensor.contiguous()) or a slice of rows of one");
  if constexpr (!std::is_const_v<S>)
    if (!a.writeable && !empty) value_error(where, arg + " is read-only; it is written in place");
  const index_t stride = rows <= 1 || empty ? cols : rs / item;
  matrix_arg<S> m{posenc::strided_view<S>(reinterpret_cast<S*>(a.data), rows, cols, stride)};
  if (nd == 3) {
    m.ndim = 3;
    m.heads3 = a.shape[1];
    m.head_dim3 = inner;
  }
  return m;
}

/// Positions: None (0, 1, ..., n-1), a `range` with step 1, an int64 array (borrowed in place),
/// or a list/tuple of ints (copied). `n` is the number needed (one per row), or -1 for any number
/// (then None is not accepted). A position past int64 raises OverflowError naming its index.
class position_arg {
 public:
  position_arg(py::handle obj, index_t n, const std::string& where, const std::string& arg) {
    if (obj.is_none() && n >= 0) {
      start_ = 0;
      count_ = n;
      range_ = true;
    } else if (PyRange_Check(obj.ptr())) {
      // The bounds are Python ints, unbounded: compare and subtract them as such.
      const py::object step = obj.attr("step"), first = obj.attr("start"), stop = obj.attr("stop");
      if (!step.equal(py::int_(1)))
        value_error(where, arg + " must be a range with step 1, got step " + int_text(step));
      py::object length = stop - first;
      if (length < py::int_(0)) length = py::int_(0);
      if (n >= 0 && !length.equal(py::int_(n)))
        value_error(where, arg + " has " + int_text(length) + " positions but " + std::to_string(n) +
                               " are needed (one per row)");
      range_ = true;
      if (length > py::int_(0)) {
        start_ = int64_of(first, where, arg + "[0]");
        int64_of(stop - py::int_(1), where, arg + "[" + int_text(length - py::int_(1)) + "]");
        count_ = int64_of(length, where, "len(" + arg + ")");
      }
    } else if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
      const auto size = static_cast<index_t>(py::len(obj));
      if (n >= 0 && size != n)
        value_error(where, arg + " has " + std::to_string(size) + " positions but " + std::to_string(n) +
                               " are needed (one per row)");
      owned_.reserve(static_cast<std::size_t>(size));
      for (auto item : obj) owned_.push_back(int64_of(item, where, arg + "[" + std::to_string(owned_.size()) + "]"));
      count_ = size;
    } else if (py::isinstance<py::array>(obj) || py::hasattr(obj, "__dlpack__") || PyObject_CheckBuffer(obj.ptr())) {
      array_ = array_of(obj, where, arg);
      if (array_.type != elem::i64)
        type_error(where, arg + " must have dtype int64, got " + array_.type_name +
                              " (positions are 64-bit integers; convert with .astype(numpy.int64))");
      if (array_.ndim() != 1) value_error(where, arg + " must be 1-D, got shape " + shape_text(array_));
      if (array_.shape[0] > 1 && array_.strides[0] != static_cast<py::ssize_t>(sizeof(std::int64_t)))
        value_error(where, arg + " must be contiguous, got strides " + strides_text(array_));
      list_ = reinterpret_cast<const position*>(array_.data);
      count_ = array_.shape[0];
      check_count(n, where, arg);
    } else {
      type_error(where, arg + " must be " + (n >= 0 ? "None, " : "") +
                            "a range, an int64 array or a list of ints, got " + type_name(obj));
    }
  }
  /// Given already as int64 values (copied).
  explicit position_arg(std::vector<position> values)
      : owned_(std::move(values)), count_(static_cast<index_t>(owned_.size())) {}

  posenc::positions get() const {
    if (range_) return posenc::arange(start_, count_);
    return posenc::positions(span());
  }
  /// The positions as a span (a range is written out first).
  std::span<const position> span() const {
    if (range_ && owned_.empty())
      for (index_t i = 0; i < count_; ++i) owned_.push_back(start_ + i);
    return {list_ && !range_ ? list_ : owned_.data(), static_cast<std::size_t>(count_)};
  }
  index_t size() const { return count_; }

 private:
  void check_count(index_t n, const std::string& where, const std::string& arg) const {
    if (n >= 0 && count_ != n)
      value_error(where, arg + " has " + std::to_string(count_) + " positions but " + std::to_string(n) +
                             " are needed (one per row)");
  }

  array_arg array_;
  const position* list_ = nullptr;
  mutable std::vector<position> owned_;
  bool range_ = false;
  position start_ = 0;
  index_t count_ = 0;
};

/// Positions whose count is not tied to a matrix (bias tiles, cos/sin tables).
position_arg free_positions(py::handle obj, const std::string& where, const char* arg) {
  return position_arg(obj, -1, where, arg);
}

/// An int32 index array (cu_seqlens, a block table, lengths), as FlashAttention and vLLM keep
/// them: a C-contiguous int32 array is used in place; an int64 array (any strides), an int32 array
/// with other strides and a list of ints are copied into int32 (index arrays are small), a value
/// outside int32 raising OverflowError naming its index. `ndim` is 1 or 2.
class index_arg {
 public:
  index_arg(py::handle obj, int ndim, const std::string& where, const std::string& arg) {
    if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
      if (ndim != 1) type_error(where, arg + " must be a 2-D int32 array, got " + type_name(obj));
      for (auto item : obj) push(int64_of(item, where, arg + "[" + std::to_string(owned_.size()) + "]"), where, arg);
      shape_ = {static_cast<index_t>(owned_.size()), 1};
      return;
    }
    if (!(py::isinstance<py::array>(obj) || py::hasattr(obj, "__dlpack__") || PyObject_CheckBuffer(obj.ptr())))
      type_error(where,
                 arg + " must be an int32 array" + (ndim == 1 ? " or a list of ints" : "") + ", got " + type_name(obj));
    array_ = array_of(obj, where, arg);
    if (array_.type != elem::i32 && array_.type != elem::i64)
      type_error(where, arg + " must have dtype int32 (int64 is copied), got " + array_.type_name);
    if (array_.ndim() != ndim)
      value_error(where, arg + " must be " + std::to_string(ndim) + "-D, got shape " + shape_text(array_));
    shape_ = {array_.shape[0], ndim == 2 ? array_.shape[1] : 1};
    const py::ssize_t item = array_.type == elem::i32 ? 4 : 8;
    const py::ssize_t s0 = array_.strides[0], s1 = ndim == 2 ? array_.strides[1] : item;
    const bool dense = (shape_[1] <= 1 || s1 == item) && (shape_[0] <= 1 || s0 == shape_[1] * item);
    if (array_.type == elem::i32 && dense) {
      data_ = reinterpret_cast<const std::int32_t*>(array_.data);
      return;
    }
    for (index_t i = 0; i < shape_[0]; ++i)
      for (index_t j = 0; j < shape_[1]; ++j) {
        const char* p = array_.data + i * s0 + j * s1;
        std::int64_t v;
        if (array_.type == elem::i32) {
          std::int32_t w;
          std::memcpy(&w, p, 4);
          v = w;
        } else {
          std::memcpy(&v, p, 8);
        }
        push(v, where, arg + "[" + std::to_string(i) + (ndim == 2 ? "][" + std::to_string(j) : "") + "]");
      }
  }

  std::span<const std::int32_t> span() const {
    return {data_ ? data_ : owned_.data(), static_cast<std::size_t>(shape_[0] * shape_[1])};
  }
  index_t rows() const { return shape_[0]; }
  index_t cols() const { return shape_[1]; }

 private:
  void push(std::int64_t v, const std::string& where, const std::string& what) {
    if (v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max())
      overflow_error(where, what + " = " + std::to_string(v) + " does not fit in int32");
    owned_.push_back(static_cast<std::int32_t>(v));
  }

  array_arg array_;
  const std::int32_t* data_ = nullptr;
  std::vector<std::int32_t> owned_;
  std::array<index_t, 2> shape_{0, 1};
};

/// The `dtype` argument of `table` and `bias_tile`; left out (None), their default float32 (NumPy
/// would read None as float64).
elem parse_dtype(py::handle obj, const std::string& where) {
  if (obj.is_none()) return elem::f32;
  const auto d = py::dtype::from_args(py::reinterpret_borrow<py::object>(obj));
  if (d.is(py::dtype::of<float>())) return elem::f32;
  if (d.is(py::dtype::of<double>())) return elem::f64;
  type_error(where, "dtype must be float32 or float64, got " + std::string(py::str(py::handle(d))));
}

template <class T>
py::array_t<T> new_array(std::vector<py::ssize_t> shape) {
  return py::array_t<T>(std::move(shape));
}

// ---------------------------------------------------------------------------------------------
// Encoders: each Python object holds the float and the double encoder, and picks the one that
// matches the array it is given.

template <template <class> class E>
struct both {
  E<float> f;
  E<double> d;
  template <class T>
  const E<T>& get() const {
    if constexpr (std::same_as<T, float>) {
      return f;
    } else {
      return d;
    }
  }
};

using py_rope = both<posenc::rope>;
using py_sinusoidal = both<posenc::sinusoidal>;
using py_alibi = both<posenc::alibi>;
using py_t5 = both<posenc::t5_relative_bias>;
using py_shaw = both<posenc::shaw_relative>;

/// A Hugging Face `rope_scaling` dict as a posenc::config_map.
posenc::config_map config_of(const py::dict& d) {
  posenc::config_map m;
  for (auto [key, value] : d) {
    if (!py::isinstance<py::str>(key)) type_error("Rope", "rope_scaling keys must be strings, got " + type_name(key));
    const auto k = key.cast<std::string>();
    if (py::isinstance<py::bool_>(value)) {
      m[k] = value.cast<bool>();
    } else if (py::isinstance<py::int_>(value)) {
      m[k] = int64_of(value, "Rope", "rope_scaling['" + k + "']");
    } else if (py::isinstance<py::float_>(value)) {
      m[k] = value.cast<double>();
    } else if (py::isinstance<py::str>(value)) {
      m[k] = value.cast<std::string>();
    } else if (value.is_none()) {
      continue;  // JSON null: as if absent, as HF reads it
    } else if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value) ||
               py::isinstance<py::array>(value)) {
      m[k] = floats_of(value, "Rope", "rope_scaling['" + k + "']");
    } else {
      type_error("Rope", "rope_scaling['" + k + "'] has unsupported type " + type_name(value));
    }
  }
  return m;
}

posenc::rope_scaling scaling_of(py::handle obj) {
  if (obj.is_none()) return posenc::no_scaling{};
  if (py::isinstance<posenc::linear_scaling>(obj)) return obj.cast<posenc::linear_scaling>();
  if (py::isinstance<posenc::ntk_aware_scaling>(obj)) return obj.cast<posenc::ntk_aware_scaling>();
  if (py::isinstance<posenc::dynamic_ntk_scaling>(obj)) return obj.cast<posenc::dynamic_ntk_scaling>();
  if (py::isinstance<posenc::yarn_scaling>(obj)) return obj.cast<posenc::yarn_scaling>();
  if (py::isinstance<posenc::llama3_scaling>(obj)) return obj.cast<posenc::llama3_scaling>();
  if (py::isinstance<posenc::longrope_scaling>(obj)) return obj.cast<posenc::longrope_scaling>();
  type_error("Rope",
             "scaling must be None or one of LinearScaling, NtkAwareScaling, DynamicNtkScaling, "
             "YarnScaling, Llama3Scaling, LongRopeScaling, got " +
                 type_name(obj));
}

template <class E>
E enum_of(const std::string& s, std::initializer_list<std::pair<const char*, E>> names, const std::string& where,
          const char* arg) {
  std::string all;
  for (const auto& [n, e] : names) {
    if (s == n) return e;
    all += (all.empty() ? "'" : ", '") + std::string(n) + "'";
  }
  value_error(where, std::string(arg) + " = '" + s + "': must be one of " + all);
}

py_rope make_rope(const call_args& a) {
  posenc::rope_params p{.head_dim = a.int64("head_dim", 128),
                        .rotary_dim = a.int64("rotary_dim", 0),
                        .layout = enum_of<posenc::rope_layout>(a.str("layout", "half_split"),
                                                               {{"half_split", posenc::rope_layout::half_split},
                                                                {"interleaved", posenc::rope_layout::interleaved}},
                                                               "Rope", "layout"),
                        .base = a.float64("base", 10000.0),
                        .scaling = scaling_of(a["scaling"]),
                        .attention_factor = a.optional_float64("attention_factor")};
  if (a.has("rope_scaling")) {
    if (!py::isinstance<py::dict>(a["rope_scaling"]))
      type_error("Rope", "rope_scaling must be a dict, got " + type_name(a["rope_scaling"]));
    if (a.has("scaling")) value_error("Rope", "give scaling or rope_scaling, not both");
    const auto cfg = config_of(py::reinterpret_borrow<py::dict>(a["rope_scaling"]));
    p = posenc::rope_params_from_config(p, cfg);
  }
  return py_rope{posenc::rope<float>(p), posenc::rope<double>(p)};
}

using py_mrope = both<posenc::mrope>;
using py_axial = both<posenc::axial_rope>;

/// `[n, axes]` int64 positions (any strides that are whole elements), viewed in place; `array`
/// keeps the caller's object alive.
posenc::axis_positions axis_positions_of(const array_arg& array, index_t rows, index_t axes, const std::string& where) {
  if (array.type != elem::i64)
    type_error(where, "positions must have dtype int64, got " + array.type_name +
                          " (positions are 64-bit integers; convert with .astype(numpy.int64))");
  if (array.ndim() != 2 || array.shape[1] != axes)
    value_error(where, "positions must be [tokens, " + std::to_string(axes) + "] (one column per axis), got shape " +
                           shape_text(array));
  if (array.shape[0] != rows)
    value_error(where, "positions has " + std::to_string(array.shape[0]) + " rows but x has " + std::to_string(rows));
  constexpr auto e = static_cast<py::ssize_t>(sizeof(position));
  if (array.strides[0] % e != 0 || array.strides[1] % e != 0)
    value_error(where, "positions must have strides that are whole int64 elements, got " + strides_text(array));
  return posenc::axis_positions(reinterpret_cast<const position*>(array.data), rows, axes, array.strides[0] / e,
                                array.strides[1] / e);
}

/// `rotate(x, positions)` of MRope and AxialRope: positions `[tokens, axes]`, or (MRope, `text`)
/// one position per token for every axis.
template <class W>
void rotate_by_axes(const W& r, const call_args& a, const std::string& where, index_t axes, bool text) {
  const auto x = float_array(a["x"], where, "x");
  with_storage(x.type, [&](auto t) {
    using T = decltype(t);
    auto mx = matrix_of<T>(x, where, "x", true);
    const auto& enc = r.template get<posenc::compute_t<T>>();
    const py::handle ph = a["positions"];
    const bool two_d = !text || ((py::isinstance<py::array>(ph) || py::hasattr(ph, "__dlpack__")) &&
                                 array_of(ph, where, "positions").ndim() == 2);
    if (two_d) {
      const auto pa = array_of(ph, where, "positions");
      const auto ap = axis_positions_of(pa, mx.view.rows, axes, where);
      py::gil_scoped_release unlocked;
      enc.rotate(mx.view, ap, &workers());
    } else if constexpr (requires { enc.rotate(mx.view, posenc::positions(), &workers()); }) {
      position_arg p(ph, mx.view.rows, where, "positions");
      py::gil_scoped_release unlocked;
      enc.rotate(mx.view, p.get(), &workers());
    }
  });
}

py_mrope make_mrope(const call_args& a) {
  posenc::mrope_params mp;
  mp.rope.head_dim = a.int64("head_dim", 128);
  mp.rope.rotary_dim = a.int64("rotary_dim", 0);
  mp.rope.layout = enum_of<posenc::rope_layout>(
      a.str("layout", "half_split"),
      {{"half_split", posenc::rope_layout::half_split}, {"interleaved", posenc::rope_layout::interleaved}}, "MRope",
      "layout");
  mp.rope.base = a.float64("base", 10000.0);
  for (const double s : floats_of(a["mrope_section"], "MRope", "mrope_section")) {
    if (!(s >= 0 && s < 1e9) || s != static_cast<double>(static_cast<index_t>(s)))
      value_error("MRope", "mrope_section entries must be whole numbers, got " + posenc::detail::to_text(s));
    mp.sections.push_back(static_cast<index_t>(s));
  }
  mp.interleaved = a.flag("interleaved", false);
  return py_mrope{posenc::mrope<float>(mp), posenc::mrope<double>(mp)};
}

/// A model config dict as a config_map: the fields posenc reads are numbers, strings, booleans and
/// lists of numbers; others (null, nested dicts, lists of strings) are left out here.
posenc::config_map model_config_of(const py::dict& d) {
  py::dict kept;
  for (auto [key, value] : d) {
    if (!py::isinstance<py::str>(key))
      type_error("layer_encoding", "config keys must be strings, got " + type_name(key));
    if (value.is_none() || py::isinstance<py::dict>(value)) continue;
    if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value)) {
      bool numbers = true;
      for (auto item : value) numbers = numbers && (py::isinstance<py::int_>(item) || py::isinstance<py::float_>(item));
      if (!numbers) continue;
    }
    kept[key] = value;
  }
  return config_of(kept);
}

/// The `[rows, cols]` table of a float array argument (any strides), copied into double (encoder
/// tables are copied by the encoders anyway).
posenc::row_matrix<double> table_of(py::handle obj, const std::string& where, const char* arg) {
  const auto a = float_array(obj, where, arg);
  if (a.ndim() != 2) value_error(where, std::string(arg) + " must be 2-D, got shape " + shape_text(a));
  posenc::row_matrix<double> m(a.shape[0], a.shape[1]);
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j) m(i, j) = element_at(a, a.data + i * a.strides[0] + j * a.strides[1]);
  return m;
}

// ---------------------------------------------------------------------------------------------
// Layouts of attention and rotation arguments. A 2-D array is [tokens, heads * head_dim]; a 3-D or
// 4-D one is laid out as `layout=` says: 'thd' [tokens, heads, head_dim] (3-D default), 'htd'
// [heads, tokens, head_dim], 'bhtd' [batch, heads, tokens, head_dim] (4-D default, torch's
// scaled_dot_product_attention) or 'bthd' [batch, tokens, heads, head_dim]. Any strides (in whole
// elements, non-negative) with a unit stride along head_dim, so transposes and slices of a fused QKV
// projection are used in place. A batch is independent sequences of equal length and positions.
//
// The C++ views are [tokens, heads * head_dim] with one row stride. Where each token's heads lie
// head_dim apart (2-D, 'thd' and 'bthd' from a contiguous or row-sliced tensor) a batch item is one
// such view and one call; otherwise every (batch item, head) is a [tokens, head_dim] view of its
// own, attended by its own call with the head's global index (ALiBi, T5) and its kv head (GQA).

enum class layout_kind { flat, thd, htd, bthd, bhtd };

const char* layout_text(layout_kind k) {
  switch (k) {
    case layout_kind::flat:
      return "[tokens, heads * head_dim]";
    case layout_kind::thd:
      return "[tokens, heads, head_dim]";
    case layout_kind::htd:
      return "[heads, tokens, head_dim]";
    case layout_kind::bthd:
      return "[batch, tokens, heads, head_dim]";
    default:
      return "[batch, heads, tokens, head_dim]";
  }
}

/// The axis of the heads in a layout (for messages).
int head_axis(layout_kind k) {
  return k == layout_kind::htd ? 0 : k == layout_kind::bthd ? 2 : 1;
}

constexpr const char* layout_choices =
    "2-D [tokens, heads * head_dim], 3-D with layout 'thd' [tokens, heads, head_dim] (default) or 'htd' "
    "[heads, tokens, head_dim], or 4-D with layout 'bhtd' [batch, heads, tokens, head_dim] (default) or 'bthd' "
    "[batch, tokens, heads, head_dim]";

/// The layout of the call, from `layout=` (None: by the dimensions of `main`, the first array).
layout_kind layout_of(py::handle obj, const array_arg& main, const std::string& w, const char* arg) {
  const auto nd = main.ndim();
  if (obj.is_none()) {
    if (nd == 2) return layout_kind::flat;
    if (nd == 3) return layout_kind::thd;
    if (nd == 4) return layout_kind::bhtd;
    value_error(w, std::string(arg) + " must be " + layout_choices + ", got shape " + shape_text(main));
  }
  const std::string name = str_of(obj, w, "layout");
  const auto k = enum_of<layout_kind>(name,
                                      {{"thd", layout_kind::thd},
                                       {"htd", layout_kind::htd},
                                       {"bhtd", layout_kind::bhtd},
                                       {"bthd", layout_kind::bthd}},
                                      w, "layout");
  const py::ssize_t want = k == layout_kind::thd || k == layout_kind::htd ? 3 : 4;
  if (nd != want)
    value_error(w, "layout = '" + name + "' is " + layout_text(k) + " (" + std::to_string(want) + "-D) but " + arg +
                       " has shape " + shape_text(main));
  return k;
}

/// An attention or rotation argument as (batch, heads, tokens, head_dim) with element strides; the
/// head_dim axis is dense. A 2-D array knows its heads only once `split` is called.
template <class S>
struct heads_arg {
  S* data = nullptr;
  layout_kind kind = layout_kind::flat;
  index_t batch = 1, heads = 0, tokens = 0, d = 0;
  index_t cols = 0;                // heads * head_dim
  index_t sb = 0, sh = 0, st = 0;  // strides of batch, head and token, in elements

  bool flat() const { return kind == layout_kind::flat; }
  /// A 2-D array split into `h` heads (h divides cols).
  void split(index_t h) {
    heads = h;
    d = cols / h;
    sh = d;
  }
  /// Every batch item and head, through the strides.
  posenc::heads_view<S> view() const { return {data, batch, tokens, heads, d, sb, st, sh}; }
};

/// True when no two elements of the array (extents `e`, element strides `s`) share memory: sorted
/// by stride, each stride is at least the span of the axes before it.
bool no_overlap(std::vector<std::pair<index_t, index_t>> axes) {
  std::erase_if(axes, [](const auto& a) { return a.second <= 1; });
  std::sort(axes.begin(), axes.end());
  index_t span = 1;
  for (const auto& [stride, extent] : axes) {
    if (stride < span) return false;
    span += stride * (extent - 1);
  }
  return true;
}

/// Views `a` in place in layout `k` (`flat` for a 2-D array in a 3-D layout's call). Writable
/// (`S` not const): the array must be writeable and no two of its elements may share memory.
template <class S>
heads_arg<S> heads_of(const array_arg& a, layout_kind k, const std::string& w, const std::string& arg) {
  using T = std::remove_const_t<S>;
  constexpr auto item = static_cast<py::ssize_t>(sizeof(T));
  const py::ssize_t nd = a.ndim();
  const py::ssize_t want = k == layout_kind::flat ? 2 : k == layout_kind::thd || k == layout_kind::htd ? 3 : 4;
  if (nd != want)
    value_error(w, arg + " has shape " + shape_text(a) + " but the call's layout is " + layout_text(k) + " (" +
                       std::to_string(want) + "-D)");
  // Axes of batch, heads, tokens, head_dim (-1: none).
  int ab = -1, ah = -1, at = 0, ad = static_cast<int>(nd) - 1;
  switch (k) {
    case layout_kind::flat:
      break;
    case layout_kind::thd:
      ah = 1;
      break;
    case layout_kind::htd:
      ah = 0, at = 1;
      break;
    case layout_kind::bthd:
      ab = 0, at = 1, ah = 2;
      break;
    case layout_kind::bhtd:
      ab = 0, ah = 1, at = 2;
      break;
  }
  heads_arg<S> h;
  h.kind = k;
  h.data = reinterpret_cast<S*>(a.data);
  h.batch = ab >= 0 ? a.shape[ab] : 1;
  h.tokens = a.shape[at];
  if (k == layout_kind::flat) {
    h.cols = a.shape[ad];
  } else {
    h.heads = a.shape[ah];
    h.d = a.shape[ad];
    h.cols = h.heads * h.d;
  }
  const auto not_rows = [&] {
    value_error(w, arg + " with shape " + shape_text(a) + " and strides " + strides_text(a) +
                       " is not laid out as rows of contiguous elements; head_dim must be the last axis with unit "
                       "stride and strides whole non-negative elements (numpy.ascontiguousarray, "
                       "Tensor.contiguous())");
  };
  if (a.size() == 0) {  // addresses no memory: strides do not matter, nothing is written
    h.st = h.cols;
    h.sh = h.d;
    h.sb = h.tokens * h.cols;
    return h;
  }
  for (py::ssize_t i = 0; i < nd; ++i)
    if (a.shape[i] > 1 && (a.strides[i] < 0 || a.strides[i] % item != 0)) not_rows();
  if (a.shape[ad] > 1 && a.strides[ad] != item) not_rows();
  const auto stride = [&](int axis) { return axis >= 0 && a.shape[axis] > 1 ? a.strides[axis] / item : 0; };
  h.sb = stride(ab);
  h.sh = stride(ah);
  h.st = stride(at);
  // A head's rows must not overlap (the C++ views' rule); a 2-D array's rows hold all its columns.
  if (h.tokens > 1 && h.st < (k == layout_kind::flat ? h.cols : h.d)) not_rows();
  if constexpr (!std::is_const_v<S>) {
    if (!a.writeable) value_error(w, arg + " is read-only; it is written in place");
    std::vector<std::pair<index_t, index_t>> axes;
    for (py::ssize_t i = 0; i < nd; ++i) axes.emplace_back(a.strides[i] / item, a.shape[i]);
    if (!no_overlap(axes))
      value_error(w, arg + " with shape " + shape_text(a) + " and strides " + strides_text(a) +
                         " has elements that share memory (a broadcast or expanded view); it is written in place");
  }
  return h;
}

/// The message for a `name` whose head axis does not hold `want` heads (kv heads when `kv`). In
/// the 'thd' layout, an axis 0 of `want` most likely means [heads, tokens, head_dim].
std::string head_axis_error(const array_arg& a, layout_kind k, const char* name, bool kv, index_t want) {
  const std::string heads = kv ? "kv_heads" : "heads";
  const std::string head = std::string(name) + " has shape " + shape_text(a) + ": ";
  if (k == layout_kind::thd && a.shape[0] == want && a.shape[1] != want)
    return head + "posenc takes [tokens, " + heads + ", head_dim] by default; this looks like [" + heads +
           ", tokens, head_dim]: pass layout='htd'";
  return head + "its axis " + std::to_string(head_axis(k)) + " holds the " + (kv ? "kv heads" : "heads") + " but " +
         heads + " = " + std::to_string(want);
}

/// Splits 2-D arrays into heads and checks that q, k, v fit together; returns (heads, kv_heads).
template <class T>
std::pair<index_t, index_t> fit_heads(const std::string& w, layout_kind L, const array_arg& qa, heads_arg<const T>& q,
                                      const array_arg& ka, heads_arg<const T>& k, const array_arg& va,
                                      heads_arg<const T>& v, std::optional<index_t> heads,
                                      std::optional<index_t> kv_heads) {
  if (!heads && q.flat()) value_error(w, "q is 2-D [tokens, heads * head_dim]: pass heads= (and kv_heads= for GQA/MQA)");
  const index_t h = heads ? *heads : q.heads;
  if (h <= 0) value_error(w, "heads = " + std::to_string(h) + ": must be positive");
  if (q.flat()) {
    if (q.cols % h != 0)
      value_error(w, "q has " + std::to_string(q.cols) + " columns, not a multiple of heads = " + std::to_string(h));
    q.split(h);
  } else if (q.heads != h) {
    value_error(w, head_axis_error(qa, L, "q", false, h));
  }
  if (q.d == 0) value_error(w, "q has head_dim 0");
  const index_t d = q.d;
  // kv_heads: given, else k's head axis, else heads.
  const index_t hk = kv_heads ? *kv_heads : (!k.flat() ? k.heads : h);
  if (!kv_heads && !k.flat() && (hk <= 0 || h % hk != 0)) {
    if (L == layout_kind::thd && ka.shape[0] > 0 && h % ka.shape[0] == 0)
      value_error(w, head_axis_error(ka, L, "k", true, ka.shape[0]));
    value_error(w, "k has shape " + shape_text(ka) + ": its axis " + std::to_string(head_axis(L)) +
                       " holds the kv heads, and " + std::to_string(hk) + " does not divide heads = " +
                       std::to_string(h));
  }
  for (auto [m, arr, name] : {std::tuple{&k, &ka, "k"}, std::tuple{&v, &va, "v"}})
    if (!m->flat() && m->heads != hk) value_error(w, head_axis_error(*arr, L, name, true, hk));
  if (hk <= 0 || h % hk != 0)
    value_error(w, "kv_heads = " + std::to_string(hk) + ": must be positive and divide heads = " + std::to_string(h));
  for (auto [m, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    if (m->flat()) {
      if (m->cols != hk * d)
        value_error(w, std::string(name) + " has " + std::to_string(m->cols) +
                           " columns but kv_heads * head_dim = " + std::to_string(hk) + " * " + std::to_string(d) +
                           " = " + std::to_string(hk * d) + " are needed" +
                           (!kv_heads ? "; pass kv_heads= for GQA/MQA" : ""));
      m->split(hk);
    } else if (m->d != d) {
      value_error(w, std::string(name) + " has head_dim " + std::to_string(m->d) + " but q has head_dim " +
                         std::to_string(d));
    }
    if (m->batch != q.batch)
      value_error(w, std::string(name) + " has shape " + shape_text(*(m == &k ? &ka : &va)) + ": batch " +
                         std::to_string(m->batch) + " but q has batch " + std::to_string(q.batch));
  }
  if (v.tokens != k.tokens)
    value_error(w, "v has " + std::to_string(v.tokens) + " rows but k has " + std::to_string(k.tokens));
  return {h, hk};
}

// ---------------------------------------------------------------------------------------------
// Encoder methods, per element type.

template <class T>
void rope_rotate(const py_rope& r, const array_arg& a, py::handle pos, py::handle layout) {
  const std::string w = "Rope.rotate";
  const index_t hd = r.f.head_dim();
  const layout_kind L = layout_of(layout, a, w, "x");
  auto x = heads_of<T>(a, L, w, "x");
  if (!x.flat() && x.d != hd)
    value_error(w, "x has head_dim " + std::to_string(x.d) + " (its last axis) but the encoder has head_dim " +
                       std::to_string(hd));
  if (x.flat()) {
    if (x.cols % hd != 0)
      value_error(w, "x has " + std::to_string(x.cols) + " columns, not a multiple of head_dim " + std::to_string(hd));
    x.split(x.cols / hd);
  }
  position_arg p(pos, x.tokens, w, "positions");
  const auto& rope = r.get<posenc::compute_t<T>>();
  py::gil_scoped_release unlocked;
  rope.rotate(x.view(), p.get(), &workers());
}

template <class T>
void sinusoidal_add(const py_sinusoidal& s, const array_arg& a, py::handle pos) {
  auto m = matrix_of<T>(a, "Sinusoidal.add_to", "x", false);
  if (m.view.cols != s.f.dim())
    value_error("Sinusoidal.add_to",
                "x has " + std::to_string(m.view.cols) + " columns but dim is " + std::to_string(s.f.dim()));
  position_arg p(pos, m.view.rows, "Sinusoidal.add_to", "positions");
  py::gil_scoped_release unlocked;
  s.get<T>().add_to(m.view, p.get());
}

template <class T>
py::array sinusoidal_table(const py_sinusoidal& s, const position_arg& p) {
  auto out = new_array<T>({p.size(), s.f.dim()});
  posenc::strided_view<T> v(out.mutable_data(), p.size(), s.f.dim());
  py::gil_scoped_release unlocked;
  s.get<T>().write_table(v, p.get());
  return out;
}

/// `[len(qpos), len(kpos)]` tile of zeros plus the encoder's bias for `head`.
template <class T, class Enc>
py::array bias_tile(const Enc& e, index_t head, py::handle qpos, py::handle kpos, index_t num_heads,
                    index_t head_offset, const std::string& where) {
  if (head < 0 || head + head_offset >= num_heads)
    value_error(where,
                "head = " + std::to_string(head) + ": must be in [0, " + std::to_string(num_heads - head_offset) + ")");
  auto qp = free_positions(qpos, where, "qpos");
  auto kp = free_positions(kpos, where, "kpos");
  auto out = new_array<T>({qp.size(), kp.size()});
  posenc::strided_view<T> v(out.mutable_data(), qp.size(), kp.size());
  std::fill_n(v.data, qp.size() * kp.size(), T(0));
  e.template get<T>().add_bias_tile(v, head, qp.get(), kp.get());
  return out;
}

/// Adds `bias(head, qpos, kpos)` and `bias_tile(head, qpos, kpos, dtype)` to the class of a
/// position-bias encoder (ALiBi, T5).
template <class W>
void def_bias_methods(py::class_<W>& c, const std::string& name) {
  constexpr const char* bias_params = "head, qpos, kpos";
  constexpr const char* tile_params = "head, qpos, kpos, dtype='float32'";
  c.def(
       "bias",
       [sig = sig_of(name + ".bias", bias_params)](const W& w, py::args args, py::kwargs kwargs) {
         const call_args a(sig, args, kwargs);
         return w.d.bias(a.int64("head", 0), a.int64("qpos", 0), a.int64("kpos", 0));
       },
       doc_of("bias", true, bias_params, docs::bias)
           .c_str())
      .def(
          "bias_tile",
          [sig = sig_of(name + ".bias_tile", tile_params)](const W& w, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            const auto& p = w.d.params();
            const index_t head = a.int64("head", 0);
            return parse_dtype(a["dtype"], sig.name) == elem::f32
                       ? bias_tile<float>(w, head, a["qpos"], a["kpos"], p.num_heads, p.head_offset, sig.name)
                       : bias_tile<double>(w, head, a["qpos"], a["kpos"], p.num_heads, p.head_offset, sig.name);
          },
          doc_of("bias_tile", true, tile_params, docs::bias_tile)
              .c_str());
}

// ---------------------------------------------------------------------------------------------
// Attention: attention, attention_varlen, paged_attention, paged_append.

/// The knobs of one call. Not copyable: `p.sinks` points into `sinks`.
struct attention_knobs {
  posenc::attention_params p;
  std::vector<float> sinks;
  bool want_lse = false;

  attention_knobs() = default;
  attention_knobs(const attention_knobs&) = delete;
  attention_knobs& operator=(const attention_knobs&) = delete;
};

/// `window`: None, or a pair (left, right) of ints.
std::pair<position, position> window_of(py::handle obj, const std::string& w) {
  if (obj.is_none()) return {-1, -1};
  if (!(py::isinstance<py::tuple>(obj) || py::isinstance<py::list>(obj)) || py::len(obj) != 2)
    type_error(w, "window must be a pair (left, right) of ints, -1 for unbounded, got " + type_name(obj));
  auto s = py::reinterpret_borrow<py::sequence>(obj);
  return {int64_of(s[0], w, "window[0]"), int64_of(s[1], w, "window[1]")};
}

/// `sinks`: one float per head, a list or a 1-D array of any float dtype (copied into float32).
std::vector<float> sinks_of(py::handle obj, const std::string& w) {
  std::vector<float> out;
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    for (auto item : obj)
      out.push_back(static_cast<float>(float_of(item, w, "sinks[" + std::to_string(out.size()) + "]")));
    return out;
  }
  if (!(py::isinstance<py::array>(obj) || py::hasattr(obj, "__dlpack__") || PyObject_CheckBuffer(obj.ptr())))
    type_error(w, "sinks must be a list of floats or a 1-D float array (one per head), got " + type_name(obj));
  const auto a = float_array(obj, w, "sinks");
  if (a.ndim() != 1) value_error(w, "sinks must be 1-D (one per head), got shape " + shape_text(a));
  for (py::ssize_t i = 0; i < a.shape[0]; ++i)
    out.push_back(static_cast<float>(element_at(a, a.data + i * a.strides[0])));
  return out;
}

/// A list of numbers or a 1-D float array of any dtype (a torch tensor through __dlpack__), as doubles.
std::vector<double> doubles_of(py::handle obj, const std::string& w, const char* arg) {
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) return floats_of(obj, w, arg);
  if (!(py::isinstance<py::array>(obj) || py::hasattr(obj, "__dlpack__") || PyObject_CheckBuffer(obj.ptr())))
    type_error(w, std::string(arg) + " must be a list of floats or a 1-D float array, got " + type_name(obj));
  const auto a = float_array(obj, w, arg);
  if (a.ndim() != 1) value_error(w, std::string(arg) + " must be 1-D, got shape " + shape_text(a));
  std::vector<double> out;
  for (py::ssize_t i = 0; i < a.shape[0]; ++i) out.push_back(element_at(a, a.data + i * a.strides[0]));
  return out;
}

/// The knobs shared by the attention calls; `lse`: the call has return_lse= (the backward has not).
void read_knobs(attention_knobs& kn, const call_args& a, const std::string& w, bool lse = true) {
  kn.p.scale = a.optional_float64("scale");
  kn.p.softcap = a.float64("softcap", 0.0);
  if (a.has("sinks")) {
    kn.sinks = sinks_of(a["sinks"], w);
    kn.p.sinks = kn.sinks;
  }
  kn.p.causal = a.flag("causal", false);
  std::tie(kn.p.window_left, kn.p.window_right) = window_of(a["window"], w);
  kn.p.chunk_size = a.optional_int64("chunk_size");
  const std::int64_t threads = a.int64("threads", 0);
  if (threads < std::numeric_limits<int>::min() || threads > std::numeric_limits<int>::max())
    overflow_error(w, "threads = " + std::to_string(threads) + " does not fit in int");
  kn.p.threads = static_cast<int>(threads);
  kn.p.executor = &workers();
  kn.p.q_tile = a.int64("q_tile", 0);
  kn.p.k_tile = a.int64("k_tile", 0);
  kn.want_lse = lse && a.flag("return_lse", false);
  if (lse) kn.p.bf16_qk = a.flag("bf16_qk", false);
}

/// The encoder's head_dim must be the one of q.
void check_head_dim(index_t enc, index_t d, const char* encoder, const std::string& w) {
  if (enc != d)
    value_error(w, std::string("the ") + encoder + " has head_dim " + std::to_string(enc) + " but q has head_dim " +
                       std::to_string(d));
}

/// A score-bias encoder must cover `heads` global heads from its head_offset.
template <class P>
void check_heads(const P& p, index_t heads, const char* what, const std::string& w) {
  if (p.head_offset + heads > p.num_heads)
    value_error(w, std::string("the ") + what + " for " + std::to_string(p.num_heads - p.head_offset) +
                       " heads (num_heads - head_offset) but heads = " + std::to_string(heads));
}

/// The RoPE of a Rope, or of an MRope (one position per token: text tokens, the same on every axis,
/// where M-RoPE is this RoPE exactly), and the class name; {nullptr, ""} for anything else.
template <class C>
std::pair<const posenc::rope<C>*, const char*> rope_of(py::handle e) {
  if (py::isinstance<py_rope>(e)) return {&e.cast<const py_rope&>().get<C>(), "Rope"};
  if (py::isinstance<py_mrope>(e)) return {&e.cast<const py_mrope&>().get<C>().text_rope(), "MRope"};
  return {nullptr, ""};
}

/// Calls `f(encoder)` with the C++ encoder (compute type C) of the `encoding` argument, after
/// checking that it fits `heads` heads of dimension `d`.
template <class C, class F>
void with_encoding(py::handle e, const std::string& w, index_t heads, index_t d, F&& f) {
  if (e.is_none()) {
    f(posenc::no_position<C>{});
  } else if (const auto rope = rope_of<C>(e); rope.first) {
    check_head_dim(rope.first->head_dim(), d, rope.second, w);
    f(*rope.first);
  } else if (py::isinstance<py_alibi>(e)) {
    const auto& a = e.cast<const py_alibi&>().get<C>();
    check_heads(a.params(), heads, "Alibi has slopes", w);
    f(a);
  } else if (py::isinstance<py_t5>(e)) {
    const auto& t = e.cast<const py_t5&>().get<C>();
    check_heads(t.params(), heads, "T5Bias has a table", w);
    f(t);
  } else if (py::isinstance<py_shaw>(e)) {
    const auto& s = e.cast<const py_shaw&>().get<C>();
    check_head_dim(s.head_dim(), d, "ShawRelative", w);
    f(s);
  } else if (py::isinstance<py_sinusoidal>(e)) {
    type_error(w,
               "Sinusoidal is an additive-input encoding: add it to the token embeddings before the Q/K/V "
               "projections (Sinusoidal.add_to) and pass encoding=None here");
  } else {
    type_error(w, "encoding must be None, Rope, MRope, Alibi, T5Bias or ShawRelative, got " + type_name(e));
  }
}

/// The message for a 3-D `name` whose axis 1 is not `want` heads (kv heads when `kv`).
/// `transposed`: its axis 0 is, so it is most likely `[heads, tokens, head_dim]`, the per-head
/// layout of many PyTorch models.
std::string axis1_error(const array_arg& a, const char* name, bool kv, index_t want, bool transposed) {
  const std::string heads = kv ? "kv_heads" : "heads";
  const std::string head = std::string(name) + " has shape " + shape_text(a) + ": ";
  if (transposed)
    return head + "posenc takes [tokens, " + heads + ", head_dim]; this looks like [" + heads +
           ", tokens, head_dim]; pass " + name + ".transpose(1, 0, 2) made contiguous";
  return head + "its axis 1 holds the " + (kv ? "kv heads" : "heads") + " but " + heads + " = " + std::to_string(want);
}

/// Query heads: given, else a 3-D q's axis 1. A 2-D q has no head axis, and taking it as one
/// head would attend across the columns of what may be many heads: heads= is required.
template <class T>
index_t query_heads(const std::string& w, const array_arg& qa, const matrix_arg<const T>& q,
                    std::optional<index_t> heads) {
  if (!heads && q.ndim == 2)
    value_error(w, "q is 2-D [tokens, heads * head_dim]: pass heads= (and kv_heads= for GQA/MQA)");
  const index_t h = heads ? *heads : q.heads3;
  if (h <= 0) value_error(w, "heads = " + std::to_string(h) + ": must be positive");
  if (q.ndim == 3 && q.heads3 != h) value_error(w, axis1_error(qa, "q", false, h, qa.shape[0] == h));
  if (q.view.cols % h != 0)
    value_error(w, "q has " + std::to_string(q.view.cols) + " columns, not a multiple of heads = " + std::to_string(h));
  if (q.view.cols / h == 0) value_error(w, "q has head_dim 0");
  return h;
}

/// (heads, kv_heads) of a call with packed keys and values (attention, attention_varlen).
template <class T>
std::pair<index_t, index_t> resolve_heads(const std::string& w, const array_arg& qa, const matrix_arg<const T>& q,
                                          const array_arg& ka, const matrix_arg<const T>& k, const array_arg& va,
                                          const matrix_arg<const T>& v, std::optional<index_t> heads,
                                          std::optional<index_t> kv_heads) {
  const index_t h = query_heads(w, qa, q, heads);
  // kv_heads: given, else a 3-D k's axis 1, else heads.
  const index_t hk = kv_heads ? *kv_heads : (k.ndim == 3 ? k.heads3 : h);
  if (!kv_heads && k.ndim == 3 && (hk <= 0 || h % hk != 0)) {
    const index_t k0 = ka.shape[0];
    if (k0 > 0 && h % k0 == 0) value_error(w, axis1_error(ka, "k", true, k0, true));
    value_error(w, "k has shape " + shape_text(ka) + ": its axis 1 holds the kv heads, and " + std::to_string(hk) +
                       " does not divide heads = " + std::to_string(h));
  }
  for (auto [m, a, name] : {std::tuple{&k, &ka, "k"}, std::tuple{&v, &va, "v"}})
    if (m->ndim == 3 && m->heads3 != hk) value_error(w, axis1_error(*a, name, true, hk, a->shape[0] == hk));
  if (hk <= 0 || h % hk != 0)
    value_error(w, "kv_heads = " + std::to_string(hk) + ": must be positive and divide heads = " + std::to_string(h));
  const index_t d = q.view.cols / h;
  for (auto [m, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    if (m->view.cols != hk * d)
      value_error(w, std::string(name) + " has " + std::to_string(m->view.cols) +
                         " columns but kv_heads * head_dim = " + std::to_string(hk) + " * " + std::to_string(d) +
                         " = " + std::to_string(hk * d) + " are needed" +
                         (!kv_heads && m->ndim == 2 ? "; pass kv_heads= for GQA/MQA" : ""));
  }
  if (v.view.rows != k.view.rows)
    value_error(w, "v has " + std::to_string(v.view.rows) + " rows but k has " + std::to_string(k.view.rows));
  return {h, hk};
}

/// True when `obj` is a torch.Tensor (only asked when torch is imported already).
bool is_torch_tensor(py::handle obj) {
  const py::dict modules = py::module_::import("sys").attr("modules");
  return modules.contains("torch") && py::isinstance(obj, modules["torch"].attr("Tensor"));
}

/// A new result array (out, lse): a torch.Tensor when `like` is one, a numpy.ndarray otherwise.
py::object new_result(py::handle like, const std::vector<py::ssize_t>& shape, elem e, const std::string& w) {
  if (is_torch_tensor(like)) {
    const py::object torch = py::module_::import("sys").attr("modules")["torch"];
    py::tuple size(shape.size());
    for (std::size_t i = 0; i < shape.size(); ++i) size[i] = py::int_(shape[i]);
    return torch.attr("empty")(size, "dtype"_a = torch.attr(dtype_text(e)));
  }
  if (e == elem::bf16) type_error(w, "q is bfloat16 but not a torch.Tensor and NumPy has no bfloat16: pass out=");
  return py::array(py::dtype(dtype_text(e)), shape);
}

/// `out` (given or new, the shape and dtype of q) and the `[n_q, heads]` log-sum-exp (a new array
/// when return_lse, else scratch memory: the kernel writes it either way).
template <class T>
struct outputs {
  using C = posenc::compute_t<T>;
  py::object out_obj, lse_obj;
  array_arg out_arr, lse_arr;
  posenc::strided_view<T> out;
  posenc::strided_view<C> lse;
  std::vector<C> scratch;

  outputs(const call_args& a, const std::string& w, const array_arg& qa, const matrix_arg<const T>& q, index_t heads,
          bool want_lse) {
    out_obj = a.has("out") ? py::reinterpret_borrow<py::object>(a["out"]) : new_result(qa.source, qa.shape, qa.type, w);
    out_arr = float_array(out_obj, w, "out");
    require_dtype(out_arr, qa, w, "out", "q");
    out = matrix_of<T>(out_arr, w, "out", true).view;
    if (out.rows != q.view.rows || out.cols != q.view.cols)
      value_error(w, "out has shape " + shape_text(out_arr) + " but q has shape " + shape_text(qa));
    const index_t rows = q.view.rows;
    if (want_lse) {
      lse_obj = new_result(qa.source, {rows, heads}, std::same_as<C, float> ? elem::f32 : elem::f64, w);
      lse_arr = array_of(lse_obj, w, "lse");
      lse = posenc::strided_view<C>(reinterpret_cast<C*>(lse_arr.data), rows, heads);
    } else {
      scratch.resize(static_cast<std::size_t>(rows * heads));
      lse = posenc::strided_view<C>(scratch.data(), rows, heads);
    }
  }
  py::object result(bool want_lse) const { return want_lse ? py::object(py::make_tuple(out_obj, lse_obj)) : out_obj; }
};

/// The log-sum-exp of a call in layout `L`: q's layout without head_dim, so [tokens, heads] for 2-D
/// and 'thd', [heads, tokens] for 'htd', [batch, heads, tokens] for 'bhtd', [batch, tokens, heads]
/// for 'bthd'. A new array when asked for, else scratch memory [batch, tokens, heads].
std::vector<py::ssize_t> lse_shape(layout_kind L, index_t b, index_t h, index_t n) {
  switch (L) {
    case layout_kind::htd:
      return {h, n};
    case layout_kind::bhtd:
      return {b, h, n};
    case layout_kind::bthd:
      return {b, n, h};
    default:
      return {n, h};
  }
}

/// The batch, head and token element strides of a log-sum-exp array `a` of elements of `bytes`
/// bytes in layout `L` (q's layout without head_dim; see `lse_shape`).
struct lse_strides {
  index_t sb = 0, sh = 0, st = 0;
};
lse_strides lse_strides_of(layout_kind L, const array_arg& a, std::size_t bytes) {
  const auto es = [&](int axis) {
    return static_cast<index_t>(a.strides[static_cast<std::size_t>(axis)] / static_cast<py::ssize_t>(bytes));
  };
  switch (L) {
    case layout_kind::htd:
      return {0, es(0), es(1)};
    case layout_kind::bhtd:
      return {es(0), es(1), es(2)};
    case layout_kind::bthd:
      return {es(0), es(2), es(1)};
    default:
      return {0, es(1), es(0)};
  }
}

/// The layout of k, v or out beside a q in layout `L`: a 2-D array beside a 3-D q is
/// [tokens, kv_heads * head_dim] (a slice of a fused projection).
layout_kind layout_beside(layout_kind L, const array_arg& x) {
  return x.ndim() == 2 && (L == layout_kind::thd || L == layout_kind::htd) ? layout_kind::flat : L;
}

template <class T>
py::object attention_typed(const call_args& a, attention_knobs& kn, const array_arg& qa, const array_arg& ka,
                           const array_arg& va) {
  using C = posenc::compute_t<T>;
  const std::string w = "attention";
  const layout_kind L = layout_of(a["layout"], qa, w, "q");
  const auto kind = [&](const array_arg& x) { return layout_beside(L, x); };
  auto q = heads_of<const T>(qa, L, w, "q");
  auto k = heads_of<const T>(ka, kind(ka), w, "k");
  auto v = heads_of<const T>(va, kind(va), w, "v");
  const auto [h, hk] = fit_heads(w, L, qa, q, ka, k, va, v, a.optional_int64("heads"), a.optional_int64("kv_heads"));
  const index_t n = q.tokens, batch = q.batch, d = q.d;
  position_arg qp(a["qpos"], n, w, "qpos");
  position_arg kp(a["kpos"], k.tokens, w, "kpos");

  const py::object out_obj =
      a.has("out") ? py::reinterpret_borrow<py::object>(a["out"]) : new_result(qa.source, qa.shape, qa.type, w);
  const array_arg out_arr = float_array(out_obj, w, "out");
  require_dtype(out_arr, qa, w, "out", "q");
  auto out = heads_of<T>(out_arr, kind(out_arr), w, "out");
  if (out.flat() && out.cols % h == 0) out.split(h);
  if (out.batch != batch || out.tokens != n || out.heads != h || out.d != d)
    value_error(w, "out has shape " + shape_text(out_arr) + " but q has shape " + shape_text(qa));

  py::object lse_obj;
  array_arg lse_arr;
  heads_arg<C> lse;
  if (kn.want_lse) {
    lse_obj = new_result(qa.source, lse_shape(L, batch, h, n), std::same_as<C, float> ? elem::f32 : elem::f64, w);
    lse_arr = array_of(lse_obj, w, "lse");
    lse.data = reinterpret_cast<C*>(lse_arr.data);
    const lse_strides ls = lse_strides_of(L, lse_arr, sizeof(C));
    lse.sb = ls.sb, lse.sh = ls.sh, lse.st = ls.st;
  }

  kn.p.heads = h;
  kn.p.kv_heads = hk;
  // One call over every batch item and head, in place through the arrays' strides.
  with_encoding<C>(a["encoding"], w, h, d, [&](const auto& enc) {
    py::gil_scoped_release unlocked;
    if (kn.want_lse) {
      posenc::attention(q.view(), k.view(), v.view(), out.view(), qp.get(), kp.get(), enc, kn.p,
                        posenc::heads_view<C>(lse.data, batch, n, h, 1, lse.sb, lse.st, lse.sh));
    } else {
      posenc::attention(q.view(), k.view(), v.view(), out.view(), qp.get(), kp.get(), enc, kn.p);
    }
  });
  return kn.want_lse ? py::object(py::make_tuple(out_obj, lse_obj)) : out_obj;
}

/// Reads q, k, v (or q alone) as float arrays of one dtype.
std::vector<array_arg> same_dtype_arrays(const call_args& a, const std::string& w,
                                         std::initializer_list<const char*> names) {
  std::vector<array_arg> out;
  for (const char* n : names) {
    out.push_back(float_array(a[n], w, n));
    if (out.size() > 1) require_dtype(out.back(), out.front(), w, n, *names.begin());
  }
  return out;
}

constexpr const char* attention_params_text =
    "q, k, v, qpos=None, kpos=None, encoding=None, *, heads=None, kv_heads=None, layout=None, scale=None, "
    "softcap=0.0, sinks=None, causal=False, window=(-1, -1), chunk_size=None, return_lse=False, out=None, threads=0, "
    "q_tile=0, k_tile=0, bf16_qk=False";

py::object attention(const call_args& a) {
  const std::string w = "attention";
  const auto arrays = same_dtype_arrays(a, w, {"q", "k", "v"});
  attention_knobs kn;
  read_knobs(kn, a, w);
  return with_storage(arrays[0].type,
                      [&](auto t) { return attention_typed<decltype(t)>(a, kn, arrays[0], arrays[1], arrays[2]); });
}

/// `cu`: `sequences + 1` cumulative row counts from 0 (checked by the library's rule).
index_t sequences_of(const index_arg& cu, const std::string& w, const char* name) {
  if (cu.rows() == 0) value_error(w, std::string(name) + " is empty; a batch of B sequences has B + 1 entries");
  return cu.rows() - 1;
}

/// Each sequence's rows numbered 0, 1, ..., n_b - 1 (cu checked).
position_arg per_sequence_positions(const index_arg& cu) {
  const auto c = cu.span();
  std::vector<position> p(static_cast<std::size_t>(c.back()));
  for (std::size_t b = 0; b + 1 < c.size(); ++b)
    for (std::int32_t i = c[b]; i < c[b + 1]; ++i) p[static_cast<std::size_t>(i)] = i - c[b];
  return position_arg(std::move(p));
}

constexpr const char* varlen_params_text =
    "q, k, v, cu_q, cu_k, qpos=None, kpos=None, encoding=None, *, heads=None, kv_heads=None, scale=None, "
    "softcap=0.0, sinks=None, causal=False, window=(-1, -1), chunk_size=None, return_lse=False, out=None, threads=0, "
    "q_tile=0, k_tile=0, bf16_qk=False";

template <class T>
py::object varlen_typed(const call_args& a, attention_knobs& kn, const array_arg& qa, const array_arg& ka,
                        const array_arg& va) {
  using C = posenc::compute_t<T>;
  const std::string w = "attention_varlen";
  const auto q = matrix_of<const T>(qa, w, "q", true);
  const auto k = matrix_of<const T>(ka, w, "k", true);
  const auto v = matrix_of<const T>(va, w, "v", true);
  std::tie(kn.p.heads, kn.p.kv_heads) =
      resolve_heads(w, qa, q, ka, k, va, v, a.optional_int64("heads"), a.optional_int64("kv_heads"));
  const index_arg cu_q(a["cu_q"], 1, w, "cu_q"), cu_k(a["cu_k"], 1, w, "cu_k");
  const index_t seqs = sequences_of(cu_q, w, "cu_q");
  if (cu_k.rows() != cu_q.rows())
    value_error(w, "cu_k has " + std::to_string(cu_k.rows()) + " entries but cu_q has " + std::to_string(cu_q.rows()) +
                       " (one more than the sequences)");
  // The library checks these too; here first, because the default positions are read from them.
  posenc::detail::check_cumulative(cu_q.span(), seqs, q.view.rows, "attention_varlen", "cu_q");
  posenc::detail::check_cumulative(cu_k.span(), seqs, k.view.rows, "attention_varlen", "cu_k");
  const position_arg qp =
      a.has("qpos") ? position_arg(a["qpos"], q.view.rows, w, "qpos") : per_sequence_positions(cu_q);
  const position_arg kp =
      a.has("kpos") ? position_arg(a["kpos"], k.view.rows, w, "kpos") : per_sequence_positions(cu_k);
  outputs<T> o(a, w, qa, q, kn.p.heads, kn.want_lse);
  with_encoding<C>(a["encoding"], w, kn.p.heads, q.view.cols / kn.p.heads, [&](const auto& enc) {
    py::gil_scoped_release unlocked;
    posenc::attention_varlen(q.view, k.view, v.view, o.out, cu_q.span(), cu_k.span(), qp.get(), kp.get(), enc, kn.p,
                             o.lse);
  });
  return o.result(kn.want_lse);
}

py::object attention_varlen(const call_args& a) {
  const std::string w = "attention_varlen";
  const auto arrays = same_dtype_arrays(a, w, {"q", "k", "v"});
  attention_knobs kn;
  read_knobs(kn, a, w);
  return with_storage(arrays[0].type,
                      [&](auto t) { return varlen_typed<decltype(t)>(a, kn, arrays[0], arrays[1], arrays[2]); });
}

/// A paged cache argument: 2-D `[num_pages * page_size, kv_heads * head_dim]` (page_size= given),
/// 3-D `[num_pages, page_size, kv_heads * head_dim]` or 4-D `[num_pages, page_size, kv_heads,
/// head_dim]`, viewed in place as rows: the last axis dense (and the heads axis of a 4-D cache),
/// pages evenly spaced rows apart.
template <class S>
struct cache_arg {
  posenc::strided_view<S> view;
  index_t page_size = 0;
  index_t kv_heads4 = 0, head_dim4 = 0;  // a 4-D cache's axes 2 and 3
};

template <class S>
cache_arg<S> cache_of(const array_arg& a, const std::string& w, const char* arg, std::optional<index_t> page_size) {
  using T = std::remove_const_t<S>;
  constexpr auto item = static_cast<py::ssize_t>(sizeof(T));
  const py::ssize_t nd = a.ndim();
  cache_arg<S> c;
  if (nd == 2) {
    if (!page_size)
      value_error(w, std::string(arg) + " is 2-D [num_pages * page_size, kv_heads * head_dim]: pass page_size=");
    c.view = matrix_of<S>(a, w, arg, false).view;
    c.page_size = *page_size;
    return c;
  }
  if (nd != 3 && nd != 4)
    value_error(w, std::string(arg) +
                       " must be 2-D [num_pages * page_size, kv_heads * head_dim], 3-D [num_pages, page_size, "
                       "kv_heads * head_dim] or 4-D [num_pages, page_size, kv_heads, head_dim], got shape " +
                       shape_text(a));
  const py::ssize_t pages = a.shape[0], ps = a.shape[1], inner = a.shape[nd - 1];
  const py::ssize_t cols = nd == 4 ? a.shape[2] * inner : inner;
  if (page_size && *page_size != ps)
    value_error(w, "page_size = " + std::to_string(*page_size) + " but " + arg + " has shape " + shape_text(a) +
                       ": pages of " + std::to_string(ps) + " rows");
  bool ok = inner <= 1 || a.strides[nd - 1] == item;
  if (nd == 4) ok = ok && (a.shape[2] <= 1 || a.strides[2] == inner * item);
  // One row stride for the rows of all pages: pages must lie page_size rows apart.
  py::ssize_t rs = cols * item;
  if (ps > 1)
    rs = a.strides[1];
  else if (pages > 1)
    rs = a.strides[0];
  if (ps > 1 && pages > 1) ok = ok && a.strides[0] == ps * rs;
  ok = ok && rs >= 0 && rs % item == 0 && rs / item >= cols;
  if (!ok && a.size() != 0)
    value_error(w, std::string(arg) + " with shape " + shape_text(a) + " and strides " + strides_text(a) +
                       " is not laid out as pages of rows of contiguous elements; pass a C-contiguous array");
  if constexpr (!std::is_const_v<S>)
    if (!a.writeable && a.size() != 0) value_error(w, std::string(arg) + " is read-only; it is written in place");
  c.view = posenc::strided_view<S>(reinterpret_cast<S*>(a.data), pages * ps, cols, a.size() == 0 ? cols : rs / item);
  c.page_size = ps;
  if (nd == 4) {
    c.kv_heads4 = a.shape[2];
    c.head_dim4 = inner;
  }
  return c;
}

/// k_cache and v_cache, of one shape.
template <class S>
std::pair<cache_arg<S>, cache_arg<S>> caches_of(const call_args& a, const std::string& w, const array_arg& ka,
                                                const array_arg& va) {
  const auto page_size = a.optional_int64("page_size");
  if (va.shape != ka.shape)
    value_error(w, "v_cache has shape " + shape_text(va) + " but k_cache has shape " + shape_text(ka));
  return {cache_of<S>(ka, w, "k_cache", page_size), cache_of<S>(va, w, "v_cache", page_size)};
}

/// The block table `[sequences, pages_per_sequence]` and the lengths `[sequences]` of `seqs` sequences.
std::pair<index_arg, index_arg> tables_of(const call_args& a, const std::string& w, index_t seqs, const char* cu) {
  index_arg table(a["block_table"], 2, w, "block_table"), lengths(a["lengths"], 1, w, "lengths");
  if (table.rows() != seqs)
    value_error(w, "block_table has " + std::to_string(table.rows()) + " rows but " + cu + " has " +
                       std::to_string(seqs + 1) + " entries (" + std::to_string(seqs) + " sequences)");
  if (lengths.rows() != seqs)
    value_error(w, "lengths has " + std::to_string(lengths.rows()) + " entries but " + cu + " has " +
                       std::to_string(seqs + 1) + " (" + std::to_string(seqs) + " sequences)");
  return {std::move(table), std::move(lengths)};
}

/// `keys=`: None, 'rotated' or 'raw'; required with a Rope.
posenc::cached_keys keys_of(const call_args& a, const std::string& w) {
  const bool rope = rope_of<double>(a["encoding"]).first != nullptr;
  if (!a.has("keys")) {
    if (rope)
      value_error(w,
                  "encoding is a Rope: pass keys='rotated' (the cache holds keys rotated when appended) or "
                  "keys='raw' (rotated by each attention call); there is no default");
    return posenc::cached_keys::unspecified;
  }
  return enum_of<posenc::cached_keys>(
      a.str("keys", ""), {{"rotated", posenc::cached_keys::rotated}, {"raw", posenc::cached_keys::raw}}, w, "keys");
}

constexpr const char* paged_params_text =
    "q, k_cache, v_cache, block_table, lengths, cu_q, qpos, encoding=None, *, page_size=None, keys=None, "
    "positions=None, heads=None, kv_heads=None, scale=None, softcap=0.0, sinks=None, causal=False, "
    "window=(-1, -1), chunk_size=None, return_lse=False, out=None, threads=0, q_tile=0, k_tile=0, bf16_qk=False";

template <class T>
py::object paged_typed(const call_args& a, attention_knobs& kn, const array_arg& qa, const array_arg& ka,
                       const array_arg& va) {
  using C = posenc::compute_t<T>;
  const std::string w = "paged_attention";
  const auto q = matrix_of<const T>(qa, w, "q", true);
  const auto [kc, vc] = caches_of<const T>(a, w, ka, va);
  const index_t h = query_heads(w, qa, q, a.optional_int64("heads"));
  const index_t d = q.view.cols / h;
  // kv_heads: given, else a 4-D cache's axis 2, else the cache's columns / head_dim.
  const auto given = a.optional_int64("kv_heads");
  const index_t hk = given ? *given : kc.kv_heads4 > 0 ? kc.kv_heads4 : kc.view.cols / d;
  if (kc.head_dim4 > 0 && kc.head_dim4 != d)
    value_error(w, "k_cache has shape " + shape_text(ka) + ": head_dim " + std::to_string(kc.head_dim4) +
                       " but q has head_dim " + std::to_string(d));
  if (kc.kv_heads4 > 0 && kc.kv_heads4 != hk)
    value_error(w, "k_cache has shape " + shape_text(ka) +
                       ": its axis 2 holds the kv heads but kv_heads = " + std::to_string(hk));
  if (hk <= 0 || h % hk != 0)
    value_error(w, "kv_heads = " + std::to_string(hk) + ": must be positive and divide heads = " + std::to_string(h));
  if (kc.view.cols != hk * d)
    value_error(w, "k_cache has " + std::to_string(kc.view.cols) + " columns per row but kv_heads * head_dim = " +
                       std::to_string(hk) + " * " + std::to_string(d) + " = " + std::to_string(hk * d) + " are needed");
  kn.p.heads = h;
  kn.p.kv_heads = hk;
  const index_arg cu_q(a["cu_q"], 1, w, "cu_q");
  const index_t seqs = sequences_of(cu_q, w, "cu_q");
  const auto [table, lengths] = tables_of(a, w, seqs, "cu_q");
  if (a["qpos"].is_none())
    value_error(w, "qpos is required: the position of each query (a step's new tokens: their index in their sequence)");
  const position_arg qp(a["qpos"], q.view.rows, w, "qpos");
  std::optional<position_arg> rows_pos;
  if (a.has("positions")) rows_pos.emplace(a["positions"], kc.view.rows, w, "positions");
  const posenc::paged_kv<const T> cache{.k = kc.view,
                                        .v = vc.view,
                                        .page_size = kc.page_size,
                                        .block_table = table.span(),
                                        .pages_per_sequence = table.cols(),
                                        .lengths = lengths.span(),
                                        .positions = rows_pos ? rows_pos->span() : std::span<const position>{},
                                        .keys = keys_of(a, w)};
  outputs<T> o(a, w, qa, q, h, kn.want_lse);
  with_encoding<C>(a["encoding"], w, h, d, [&](const auto& enc) {
    py::gil_scoped_release unlocked;
    posenc::paged_attention(q.view, cache, o.out, cu_q.span(), qp.get(), enc, kn.p, o.lse);
  });
  return o.result(kn.want_lse);
}

py::object paged_attention(const call_args& a) {
  const std::string w = "paged_attention";
  const auto arrays = same_dtype_arrays(a, w, {"q", "k_cache", "v_cache"});
  attention_knobs kn;
  read_knobs(kn, a, w);
  return with_storage(arrays[0].type,
                      [&](auto t) { return paged_typed<decltype(t)>(a, kn, arrays[0], arrays[1], arrays[2]); });
}

constexpr const char* append_params_text =
    "k_cache, v_cache, block_table, lengths, k_new, v_new, cu_new, encoding=None, *, page_size=None, keys=None, "
    "positions=None";

template <class T>
void append_typed(const call_args& a, const array_arg& ka, const array_arg& va, const array_arg& kna,
                  const array_arg& vna) {
  using C = posenc::compute_t<T>;
  const std::string w = "paged_append";
  const auto [kc, vc] = caches_of<T>(a, w, ka, va);
  const auto kn = matrix_of<const T>(kna, w, "k_new", true);
  const auto vn = matrix_of<const T>(vna, w, "v_new", true);
  for (auto [m, arr, name] : {std::tuple{&kn, &kna, "k_new"}, std::tuple{&vn, &vna, "v_new"}})
    if (m->view.cols != kc.view.cols)
      value_error(w, std::string(name) + " has shape " + shape_text(*arr) + " (" + std::to_string(m->view.cols) +
                         " columns per row) but the cache rows have " + std::to_string(kc.view.cols));
  if (vn.view.rows != kn.view.rows)
    value_error(w, "v_new has " + std::to_string(vn.view.rows) + " rows but k_new has " + std::to_string(kn.view.rows));
  const index_arg cu_new(a["cu_new"], 1, w, "cu_new");
  const index_t seqs = sequences_of(cu_new, w, "cu_new");
  const auto [table, lengths] = tables_of(a, w, seqs, "cu_new");
  std::optional<position_arg> rows_pos;
  if (a.has("positions")) rows_pos.emplace(a["positions"], kc.view.rows, w, "positions");
  const posenc::paged_kv<T> cache{.k = kc.view,
                                  .v = vc.view,
                                  .page_size = kc.page_size,
                                  .block_table = table.span(),
                                  .pages_per_sequence = table.cols(),
                                  .lengths = lengths.span(),
                                  .positions = rows_pos ? rows_pos->span() : std::span<const position>{},
                                  .keys = keys_of(a, w)};
  const py::handle e = a["encoding"];
  if (const auto rope = rope_of<C>(e); rope.first) {
    if (kc.head_dim4 > 0) check_head_dim(rope.first->head_dim(), kc.head_dim4, rope.second, w);
    py::gil_scoped_release unlocked;
    posenc::paged_append(cache, kn.view, vn.view, cu_new.span(), *rope.first);
  } else if (e.is_none() || py::isinstance<py_alibi>(e) || py::isinstance<py_t5>(e) || py::isinstance<py_shaw>(e)) {
    py::gil_scoped_release unlocked;  // a score bias acts in attention: the keys are stored as given
    posenc::paged_append(cache, kn.view, vn.view, cu_new.span(), posenc::no_position<C>{});
  } else {
    with_encoding<C>(e, w, 1, 0, [](const auto&) {});  // raises the TypeError for anything else
  }
}

void paged_append(const call_args& a) {
  const std::string w = "paged_append";
  const auto arrays = same_dtype_arrays(a, w, {"k_cache", "v_cache", "k_new", "v_new"});
  with_storage(arrays[0].type,
               [&](auto t) { append_typed<decltype(t)>(a, arrays[0], arrays[1], arrays[2], arrays[3]); });
}

// ---------------------------------------------------------------------------------------------
// The backward of attention, for the layouts of attention_varlen: [tokens, heads * head_dim] and
// [tokens, heads, head_dim], float32 and float64 (the C++ backward's storage types).

constexpr const char* backward_params_text =
    "q, k, v, out, lse, dout, qpos=None, kpos=None, encoding=None, *, heads=None, kv_heads=None, layout=None, scale=None, "
    "softcap=0.0, sinks=None, causal=False, window=(-1, -1), chunk_size=None, param_grads=True, dq=None, dk=None, "
    "dv=None, threads=0, q_tile=0, k_tile=0";

/// An array of `like`'s shape and dtype: `name` (checked, written in place) when given, else new.
struct like_arg {
  py::object obj;
  array_arg arr;
};
like_arg shaped_like(const call_args& a, const std::string& w, const char* name, const array_arg& like, const char* of,
                     bool output) {
  like_arg r;
  r.obj = output && !a.has(name) ? new_result(like.source, like.shape, like.type, w)
                                 : py::reinterpret_borrow<py::object>(a[name]);
  r.arr = float_array(r.obj, w, name, true);
  require_dtype(r.arr, like, w, name, of);
  if (r.arr.shape != like.shape)
    value_error(
        w, std::string(name) + " has shape " + shape_text(r.arr) + " but " + of + " has shape " + shape_text(like));
  return r;
}

/// A new array (a torch tensor when `like` is one) of `shape` holding `values`, in dtype `e`.
template <class X>
py::object result_of(py::handle like, const std::vector<py::ssize_t>& shape, elem e, const std::vector<X>& values,
                     const std::string& w) {
  py::object obj = new_result(like, shape, e, w);
  const array_arg arr = array_of(obj, w, "result");
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (e == elem::f32) {
      const auto f = static_cast<float>(values[i]);
      std::memcpy(arr.data + i * sizeof f, &f, sizeof f);
    } else {
      const auto d = static_cast<double>(values[i]);
      std::memcpy(arr.data + i * sizeof d, &d, sizeof d);
    }
  }
  return obj;
}

template <class T>
py::object backward_typed(const call_args& a, attention_knobs& kn, const array_arg& qa, const array_arg& ka,
                          const array_arg& va) {
  const std::string w = "attention_backward";
  // Every layout of attention, through the strides: one C++ call over the whole batch.
  const layout_kind L = layout_of(a["layout"], qa, w, "q");
  const auto kind = [&](const array_arg& x) { return layout_beside(L, x); };
  auto q = heads_of<const T>(qa, L, w, "q");
  auto k = heads_of<const T>(ka, kind(ka), w, "k");
  auto v = heads_of<const T>(va, kind(va), w, "v");
  const auto [h, hk] = fit_heads(w, L, qa, q, ka, k, va, v, a.optional_int64("heads"), a.optional_int64("kv_heads"));
  kn.p.heads = h;
  kn.p.kv_heads = hk;
  const index_t n = q.tokens, batch = q.batch, d = q.d;
  const position_arg qp(a["qpos"], n, w, "qpos");
  const position_arg kp(a["kpos"], k.tokens, w, "kpos");
  // out, dout (read) and dq, dk, dv (written; new when not given): the shape of q or k, in place.
  const auto like = [&]<class X>(const like_arg& x, const char* name, const heads_arg<const T>& of, index_t heads,
                                 const char* of_name, X*) {
    auto r = heads_of<X>(x.arr, kind(x.arr), w, name);
    if (r.flat() && r.cols % heads == 0) r.split(heads);
    if (r.batch != of.batch || r.tokens != of.tokens || r.heads != of.heads || r.d != of.d)
      value_error(w, std::string(name) + " has shape " + shape_text(x.arr) + " but must be shaped like " + of_name);
    return r;
  };
  const like_arg out = shaped_like(a, w, "out", qa, "q", false);
  const like_arg dout = shaped_like(a, w, "dout", qa, "q", false);
  const like_arg dq = shaped_like(a, w, "dq", qa, "q", true);
  const like_arg dk = shaped_like(a, w, "dk", ka, "k", true);
  const like_arg dv = shaped_like(a, w, "dv", va, "v", true);
  constexpr const T* read = nullptr;
  constexpr T* written = nullptr;
  const auto out_h = like(out, "out", q, h, "q", read), dout_h = like(dout, "dout", q, h, "q", read);
  const auto dq_h = like(dq, "dq", q, h, "q", written), dk_h = like(dk, "dk", k, hk, "k", written),
             dv_h = like(dv, "dv", k, hk, "k", written);
  // lse: q's layout without head_dim, as attention(..., return_lse=True) returns it.
  const array_arg la = float_array(a["lse"], w, "lse", true);
  const std::vector<py::ssize_t> lse_want = lse_shape(L, batch, h, n);
  if (la.shape != lse_want) {
    std::string want;
    for (const auto x : lse_want) want += (want.empty() ? "[" : ", ") + std::to_string(x);
    value_error(w, "lse has shape " + shape_text(la) + " but must be " + want +
                       "] (q's layout without head_dim, as attention(..., return_lse=True) returns it)");
  }
  const auto lse_view = [&](auto tag) {
    using LS = decltype(tag);
    const lse_strides ls = lse_strides_of(L, la, sizeof(LS));
    return posenc::heads_view<const LS>(reinterpret_cast<const LS*>(la.data), batch, n, h, 1, ls.sb, ls.st, ls.sh);
  };
  const bool want = a.flag("param_grads", true);

  py::dict grads;
  with_encoding<T>(a["encoding"], w, h, d, [&](const auto& enc) {
    using E = std::remove_cvref_t<decltype(enc)>;
    posenc::parameter_gradients<E> g;
    std::vector<float> dsinks;
    if (want && !kn.sinks.empty()) {
      dsinks.assign(kn.sinks.size(), 0.0f);
      g.sinks = dsinks;
    }
    // Parameter gradients are added to zeros here, then copied into new arrays.
    std::vector<double> dslopes;
    std::vector<T> dtable, dkey, dvalue;
    index_t rows = 0, cols = 0;
    if constexpr (posenc::detail::is_alibi<E>::value) {
      if (want) {
        dslopes.assign(static_cast<std::size_t>(enc.params().num_heads), 0.0);
        g.slopes = dslopes;
      }
    } else if constexpr (posenc::detail::is_t5<E>::value) {
      rows = enc.params().num_buckets, cols = enc.params().num_heads;
      if (want) {
        dtable.assign(static_cast<std::size_t>(rows * cols), T(0));
        g.table = posenc::strided_view<T>(dtable.data(), rows, cols);
      }
    } else if constexpr (posenc::relative_key_value<E>) {
      rows = enc.num_relative(), cols = enc.head_dim();
      if (want) {
        dkey.assign(static_cast<std::size_t>(rows * cols), T(0));
        dvalue.assign(static_cast<std::size_t>(rows * cols), T(0));
        g.key_table = posenc::strided_view<T>(dkey.data(), rows, cols);
        g.value_table = posenc::strided_view<T>(dvalue.data(), rows, cols);
      }
    }
    const auto run = [&](auto lse) {
      py::gil_scoped_release unlocked;
      posenc::attention_backward(q.view(), k.view(), v.view(), out_h.view(), lse, dout_h.view(), dq_h.view(),
                                 dk_h.view(), dv_h.view(),
                                 qp.get(), kp.get(), enc, kn.p, g);
    };
    if (la.type == elem::f32) {
      run(lse_view(float{}));
    } else {
      run(lse_view(double{}));
    }
    if (!dsinks.empty()) grads["sinks"] = result_of(qa.source, {h}, qa.type, dsinks, w);
    if (!dslopes.empty())
      grads["slopes"] = result_of(qa.source, {static_cast<py::ssize_t>(dslopes.size())}, elem::f64, dslopes, w);
    if (!dtable.empty()) grads["table"] = result_of(qa.source, {rows, cols}, qa.type, dtable, w);
    if (!dkey.empty()) {
      grads["key_table"] = result_of(qa.source, {rows, cols}, qa.type, dkey, w);
      grads["value_table"] = result_of(qa.source, {rows, cols}, qa.type, dvalue, w);
    }
  });
  return py::make_tuple(dq.obj, dk.obj, dv.obj, grads);
}

py::object attention_backward(const call_args& a) {
  const std::string w = "attention_backward";
  const auto arrays = same_dtype_arrays(a, w, {"q", "k", "v"});
  if (arrays[0].type != elem::f32 && arrays[0].type != elem::f64)
    type_error(w, "q has dtype " + arrays[0].type_name +
                      "; the backward computes in float32 or float64 (convert q, k, v, out and dout)");
  attention_knobs kn;
  read_knobs(kn, a, w, false);
  if (arrays[0].type == elem::f32) return backward_typed<float>(a, kn, arrays[0], arrays[1], arrays[2]);
  return backward_typed<double>(a, kn, arrays[0], arrays[1], arrays[2]);
}

template <class R>
py::array_t<double> to_numpy(const R& values) {
  py::array_t<double> a(static_cast<py::ssize_t>(std::size(values)));
  std::copy(std::begin(values), std::end(values), a.mutable_data());
  return a;
}

/// A constructor of `cls` taking (*args, **kwargs), bound by `params` and built by
/// `make(call_args)`; its docstring comes from `doc_of("__init__", true, params, ...)`.
template <class F>
auto init_of(std::string cls, const char* params, F make) {
  return py::init([sig = sig_of(std::move(cls), params), make](py::args args, py::kwargs kwargs) {
    return make(call_args(sig, args, kwargs));
  });
}

}  // namespace

PYBIND11_MODULE(_posenc, m) {
  // Every function below writes its Python signature as the first line of its docstring.
  py::options options;
  options.disable_function_signatures();

  m.doc() = docs::module;
  m.attr("__version__") = std::to_string(POSENC_VERSION_MAJOR) + "." + std::to_string(POSENC_VERSION_MINOR) + "." +
                          std::to_string(POSENC_VERSION_PATCH);
  py::register_exception<posenc::precondition_error>(m, "PreconditionError", PyExc_ValueError);
  // POSENC_SIMD_CAP caps the kernels from the start, as in posenc's C++ tests and benchmarks; an
  // unknown name fails the import with the library's message.
  try {
    posenc::apply_simd_cap_from_environment();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }

  // Frequency policies (docs/rope_scaling.md), keyword arguments with the C++ aggregates' names and defaults.
  constexpr const char* linear_params = "*, factor=1.0";
  py::class_<posenc::linear_scaling>(m, "LinearScaling", docs::linear)
      .def(init_of("LinearScaling", linear_params,
                   [](const call_args& a) { return posenc::linear_scaling{a.float64("factor", 1.0)}; }),
           doc_of("__init__", true, linear_params, docs::linear_init).c_str())
      .def_readonly("factor", &posenc::linear_scaling::factor, "The scale s.");
  constexpr const char* ntk_params = "*, alpha=1.0";
  py::class_<posenc::ntk_aware_scaling>(m, "NtkAwareScaling", docs::ntk)
      .def(init_of("NtkAwareScaling", ntk_params,
                   [](const call_args& a) { return posenc::ntk_aware_scaling{a.float64("alpha", 1.0)}; }),
           doc_of("__init__", true, ntk_params, docs::ntk_init).c_str())
      .def_readonly("alpha", &posenc::ntk_aware_scaling::alpha, "The NTK factor.");
  constexpr const char* dynamic_params = "*, factor=1.0, original_max_position=2048, sequence_length=0";
  py::class_<posenc::dynamic_ntk_scaling>(
      m, "DynamicNtkScaling", docs::dynamic)
      .def(init_of("DynamicNtkScaling", dynamic_params,
                   [](const call_args& a) {
                     return posenc::dynamic_ntk_scaling{a.float64("factor", 1.0),
                                                        a.int64("original_max_position", 2048),
                                                        a.int64("sequence_length", 0)};
                   }),
           doc_of("__init__", true, dynamic_params, docs::dynamic_init).c_str())
      .def_readonly("factor", &posenc::dynamic_ntk_scaling::factor, "The scale s.")
      .def_readonly("original_max_position", &posenc::dynamic_ntk_scaling::original_max_position,
                    "L0, the trained context length (tokens).")
      .def_readonly("sequence_length", &posenc::dynamic_ntk_scaling::sequence_length,
                    "L, the length the table is made for (tokens).");
  constexpr const char* yarn_params =
      "*, factor=1.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.0, mscale_all_dim=0.0, "
      "truncate=True";
  py::class_<posenc::yarn_scaling>(
      m, "YarnScaling", docs::yarn)
      .def(init_of("YarnScaling", yarn_params,
                   [](const call_args& a) {
                     return posenc::yarn_scaling{a.float64("factor", 1.0),     a.int64("original_max_position", 4096),
                                                 a.float64("beta_fast", 32.0), a.float64("beta_slow", 1.0),
                                                 a.float64("mscale", 0.0),     a.float64("mscale_all_dim", 0.0),
                                                 a.flag("truncate", true)};
                   }),
           doc_of("__init__", true, yarn_params, docs::yarn_init).c_str())
      .def_readonly("factor", &posenc::yarn_scaling::factor, "The scale s.")
      .def_readonly("original_max_position", &posenc::yarn_scaling::original_max_position,
                    "L0, the trained context length (tokens).");
  constexpr const char* llama3_params =
      "*, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192";
  py::class_<posenc::llama3_scaling>(m, "Llama3Scaling", docs::llama3)
      .def(init_of("Llama3Scaling", llama3_params,
                   [](const call_args& a) {
                     return posenc::llama3_scaling{a.float64("factor", 8.0), a.float64("low_freq_factor", 1.0),
                                                   a.float64("high_freq_factor", 4.0),
                                                   a.int64("original_max_position", 8192)};
                   }),
           doc_of("__init__", true, llama3_params, docs::llama3_init).c_str())
      .def_readonly("factor", &posenc::llama3_scaling::factor, "s, the divisor of low frequencies.")
      .def_readonly("original_max_position", &posenc::llama3_scaling::original_max_position,
                    "L0, the trained context length (tokens).");
  constexpr const char* longrope_params =
      "*, short_factor, long_factor, original_max_position=4096, max_position=0, choice='per_length', "
      "sequence_length=0, factor=0.0";
  py::class_<posenc::longrope_scaling>(m, "LongRopeScaling", docs::longrope)
      .def(init_of("LongRopeScaling", longrope_params,
                   [](const call_args& a) {
                     return posenc::longrope_scaling{
                         floats_of(a["short_factor"], "LongRopeScaling", "short_factor"),
                         floats_of(a["long_factor"], "LongRopeScaling", "long_factor"),
                         a.int64("original_max_position", 4096),
                         a.int64("max_position", 0),
                         enum_of<posenc::longrope_choice>(a.str("choice", "per_length"),
                                                          {{"per_length", posenc::longrope_choice::per_length},
                                                           {"fixed_long", posenc::longrope_choice::fixed_long}},
                                                          "LongRopeScaling", "choice"),
                         a.int64("sequence_length", 0),
                         a.float64("factor", 0.0)};
                   }),
           doc_of("__init__", true, longrope_params, docs::longrope_init).c_str());

  constexpr const char* rope_params =
      "*, head_dim=128, rotary_dim=0, base=10000.0, layout='half_split', scaling=None, rope_scaling=None, "
      "attention_factor=None";
  constexpr const char* rotate_params = "x, positions=None, *, layout=None";
  constexpr const char* cos_sin_params = "positions";
  py::class_<py_rope>(m, "Rope", docs::rope)
      .def(init_of("Rope", rope_params, make_rope), doc_of("__init__", true, rope_params, docs::rope_init).c_str())
      .def(
          "rotate",
          [sig = sig_of("Rope.rotate", rotate_params)](const py_rope& r, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            const auto x = float_array(a["x"], sig.name, "x");
            with_storage(x.type, [&](auto t) { rope_rotate<decltype(t)>(r, x, a["positions"], a["layout"]); });
          },
          doc_of("rotate", true, rotate_params, docs::rotate)
              .c_str())
      .def(
          "cos_sin",
          [sig = sig_of("Rope.cos_sin", cos_sin_params)](const py_rope& r, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            auto p = free_positions(a["positions"], sig.name, "positions");
            const index_t half = r.f.rotary_dim() / 2;
            auto c = new_array<double>({p.size(), half});
            auto s = new_array<double>({p.size(), half});
            const auto pp = p.get();
            for (index_t i = 0; i < p.size(); ++i) r.d.unit_cos_sin(pp[i], c.mutable_data(i, 0), s.mutable_data(i, 0));
            return py::make_tuple(c, s);
          },
          doc_of("cos_sin", true, cos_sin_params, docs::cos_sin)
              .c_str())
      .def_property_readonly(
          "head_dim", [](const py_rope& r) { return r.f.head_dim(); }, "Elements per head.")
      .def_property_readonly(
          "rotary_dim", [](const py_rope& r) { return r.f.rotary_dim(); },
          "Rotated elements at the front of each head (head_dim unless partial).")
      .def_property_readonly(
          "base", [](const py_rope& r) { return r.f.base(); }, "The frequency base theta (after rope_theta).")
      .def_property_readonly("layout",
                             [](const py_rope& r) {
                               return r.f.layout() == posenc::rope_layout::half_split ? "half_split" : "interleaved";
                             },
                             "'half_split' (pairs (i, i + r/2)) or 'interleaved' (pairs (2i, 2i + 1)).")
      .def_property_readonly(
          "inv_freq", [](const py_rope& r) { return to_numpy(r.d.inv_freq()); },
          "The rotary_dim / 2 inverse frequencies after the scaling policy (float64 copy).")
      .def_property_readonly(
          "magnitude", [](const py_rope& r) { return r.f.magnitude(); },
          "The factor multiplying cos and sin (YaRN's 0.1 ln s + 1, ...).")
      .def_property_readonly(
          "name", [](const py_rope& r) { return std::string(r.f.name()); },
          "The encoder's name in reports ('rope', 'rope-yarn', ...).");

  constexpr const char* mrope_params_text =
      "*, head_dim=128, mrope_section, rotary_dim=0, base=10000.0, layout='half_split', interleaved=False";
  constexpr const char* axes_rotate_params = "x, positions";
  py::class_<py_mrope>(m, "MRope", docs::mrope)
      .def(init_of("MRope", mrope_params_text, make_mrope),
           doc_of("__init__", true, mrope_params_text, docs::mrope_init).c_str())
      .def(
          "rotate",
          [sig = sig_of("MRope.rotate", axes_rotate_params)](const py_mrope& r, py::args args, py::kwargs kwargs) {
            rotate_by_axes(r, call_args(sig, args, kwargs), sig.name, r.f.axes(), true);
          },
          doc_of("rotate", true, axes_rotate_params, docs::axes_rotate).c_str())
      .def(
          "axis_of_pair",
          [sig = sig_of("MRope.axis_of_pair", "k")](const py_mrope& r, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            return r.d.axis_of_pair(a.int64("k", 0));
          },
          doc_of("axis_of_pair", true, "k", docs::axis_of_pair).c_str())
      .def_property_readonly(
          "head_dim", [](const py_mrope& r) { return r.f.head_dim(); }, "Elements per head.")
      .def_property_readonly(
          "axes", [](const py_mrope& r) { return r.f.axes(); }, "Position axes per token (3).")
      .def_property_readonly(
          "name", [](const py_mrope& r) { return std::string(r.f.name()); },
          "The encoder's name in reports ('mrope' or 'mrope-interleaved').");

  constexpr const char* axial_params_text = "*, head_dim=64, rotary_dim=0, base=10000.0, layout='half_split'";
  py::class_<py_axial>(m, "AxialRope", docs::axial)
      .def(init_of("AxialRope", axial_params_text,
                   [](const call_args& a) {
                     posenc::axial_rope_params p;
                     p.head_dim = a.int64("head_dim", 64);
                     p.rotary_dim = a.int64("rotary_dim", 0);
                     p.base = a.float64("base", 10000.0);
                     p.layout = enum_of<posenc::rope_layout>(a.str("layout", "half_split"),
                                                             {{"half_split", posenc::rope_layout::half_split},
                                                              {"interleaved", posenc::rope_layout::interleaved}},
                                                             "AxialRope", "layout");
                     return py_axial{posenc::axial_rope<float>(p), posenc::axial_rope<double>(p)};
                   }),
           doc_of("__init__", true, axial_params_text, docs::axial_init).c_str())
      .def(
          "rotate",
          [sig = sig_of("AxialRope.rotate", axes_rotate_params)](const py_axial& r, py::args args, py::kwargs kwargs) {
            rotate_by_axes(r, call_args(sig, args, kwargs), sig.name, 2, false);
          },
          doc_of("rotate", true, axes_rotate_params, docs::axes_rotate).c_str())
      .def_property_readonly(
          "head_dim", [](const py_axial& r) { return r.f.head_dim(); }, "Elements per head.");

  constexpr const char* layer_params_text = "config, layer";
  m.def(
      "layer_encoding",
      [sig = sig_of("layer_encoding", layer_params_text)](py::args args, py::kwargs kwargs) {
        const call_args a(sig, args, kwargs);
        if (!py::isinstance<py::dict>(a["config"]))
          type_error(sig.name, "config must be a dict (a model's config.json, or its text_config), got " +
                                   type_name(a["config"]));
        const auto cfg = py::reinterpret_borrow<py::dict>(a["config"]);
        posenc::config_map scaling;
        if (cfg.contains("rope_scaling") && !cfg["rope_scaling"].is_none()) {
          if (!py::isinstance<py::dict>(cfg["rope_scaling"]))
            type_error(sig.name, "config['rope_scaling'] must be a dict or None");
          scaling = config_of(py::reinterpret_borrow<py::dict>(cfg["rope_scaling"]));
        }
        std::vector<std::string> types;
        if (cfg.contains("layer_types") && !cfg["layer_types"].is_none()) {
          for (auto t : cfg["layer_types"]) {
            if (!py::isinstance<py::str>(t)) type_error(sig.name, "config['layer_types'] must be a list of strings");
            types.push_back(t.cast<std::string>());
          }
        }
        const auto le = posenc::layer_encoding_from_config(model_config_of(cfg), scaling, a.int64("layer", 0), types);
        py::dict out;
        if (le.rope && le.mrope_section.empty()) {
          out["encoding"] = py::cast(py_rope{posenc::rope<float>(*le.rope), posenc::rope<double>(*le.rope)});
        } else if (le.rope) {
          const auto mp = le.mrope();
          out["encoding"] = py::cast(py_mrope{posenc::mrope<float>(mp), posenc::mrope<double>(mp)});
        } else {
          out["encoding"] = py::none();
        }
        out["window"] = py::make_tuple(le.window_left, -1);
        out["chunk_size"] = le.chunk_size ? py::cast(*le.chunk_size) : py::none();
        out["scale"] = le.scale ? py::cast(*le.scale) : py::none();
        out["softcap"] = le.softcap;
        if (le.temperature) {
          py::dict t;
          t["floor_scale"] = le.temperature->floor_scale;
          t["attn_scale"] = le.temperature->attn_scale;
          out["temperature"] = t;
        } else {
          out["temperature"] = py::none();
        }
        return out;
      },
      doc_of("layer_encoding", false, layer_params_text, docs::layer_encoding).c_str());

  constexpr const char* temperature_params_text = "positions, *, floor_scale=8192, attn_scale=0.1";
  m.def(
      "query_temperature",
      [sig = sig_of("query_temperature", temperature_params_text)](py::args args, py::kwargs kwargs) {
        const call_args a(sig, args, kwargs);
        const posenc::query_temperature t(
            {.floor_scale = a.int64("floor_scale", 8192), .attn_scale = a.float64("attn_scale", 0.1)});
        auto p = free_positions(a["positions"], sig.name, "positions");
        auto out = new_array<double>({p.size()});
        const auto pp = p.get();
        for (index_t i = 0; i < p.size(); ++i) out.mutable_data()[i] = t.factor(pp[i]);
        return out;
      },
      doc_of("query_temperature", false, temperature_params_text, docs::query_temperature).c_str());

  m.def(
      "simd_level",
      [sig = sig_of("simd_level", "*, detected=False")](py::args args, py::kwargs kwargs) {
        const call_args a(sig, args, kwargs);
        const bool detected = a.has("detected") && py::cast<bool>(a["detected"]);
        return std::string(posenc::simd_level_name(detected ? posenc::detected_simd_level() : posenc::simd_level_in_use()));
      },
      doc_of("simd_level", false, "*, detected=False", docs::simd_level).c_str());
  m.def(
      "set_simd_cap",
      [sig = sig_of("set_simd_cap", "level")](py::args args, py::kwargs kwargs) {
        const call_args a(sig, args, kwargs);
        if (!py::isinstance<py::str>(a["level"]))
          type_error("set_simd_cap", "level must be a str ('portable', 'avx2', 'avx512' or 'neon'), got " +
                                         type_name(a["level"]));
        try {
          posenc::set_simd_cap(posenc::parse_simd_level(py::cast<std::string>(a["level"]), "level"));
        } catch (const std::invalid_argument& e) {
          value_error("set_simd_cap", std::string(e.what()).substr(8));  // without "posenc: "
        }
        return std::string(posenc::simd_level_name(posenc::simd_level_in_use()));
      },
      doc_of("set_simd_cap", false, "level", docs::set_simd_cap).c_str());
  m.def(
      "cpu_has_avx512_bf16",
      [sig = sig_of("cpu_has_avx512_bf16", "")](py::args args, py::kwargs kwargs) {
        const call_args a(sig, args, kwargs);
        return posenc::cpu_has_avx512_bf16();
      },
      doc_of("cpu_has_avx512_bf16", false, "", docs::cpu_has_avx512_bf16).c_str());

  constexpr const char* sinusoidal_params =
      "*, dim=512, base=10000.0, layout='interleaved', shifted_denominator=False, position_offset=0";
  constexpr const char* add_to_params = "x, positions=None";
  constexpr const char* table_params = "positions, dtype='float32'";
  py::class_<py_sinusoidal>(m, "Sinusoidal", docs::sinusoidal)
      .def(init_of("Sinusoidal", sinusoidal_params,
                   [](const call_args& a) {
                     const posenc::sinusoidal_params p{.dim = a.int64("dim", 512),
                                                       .base = a.float64("base", 10000.0),
                                                       .layout = enum_of<posenc::sinusoidal_layout>(
                                                           a.str("layout", "interleaved"),
                                                           {{"interleaved", posenc::sinusoidal_layout::interleaved},
                                                            {"concatenated", posenc::sinusoidal_layout::concatenated}},
                                                           "Sinusoidal", "layout"),
                                                       .shifted_denominator = a.flag("shifted_denominator", false),
                                                       .position_offset = a.int64("position_offset", 0)};
                     return py_sinusoidal{posenc::sinusoidal<float>(p), posenc::sinusoidal<double>(p)};
                   }),
           doc_of("__init__", true, sinusoidal_params, docs::sinusoidal_init).c_str())
      .def(
          "add_to",
          [sig = sig_of("Sinusoidal.add_to", add_to_params)](const py_sinusoidal& s, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            const auto x = float_array(a["x"], sig.name, "x", true);
            if (x.type == elem::f32) {
              sinusoidal_add<float>(s, x, a["positions"]);
            } else {
              sinusoidal_add<double>(s, x, a["positions"]);
            }
          },
          doc_of("add_to", true, add_to_params, docs::add_to).c_str())
      .def(
          "table",
          [sig = sig_of("Sinusoidal.table", table_params)](const py_sinusoidal& s, py::args args, py::kwargs kwargs) {
            const call_args a(sig, args, kwargs);
            auto p = free_positions(a["positions"], sig.name, "positions");
            return parse_dtype(a["dtype"], sig.name) == elem::f32 ? sinusoidal_table<float>(s, p)
                                                                  : sinusoidal_table<double>(s, p);
          },
          doc_of("table", true, table_params, docs::table).c_str())
      .def_property_readonly(
          "dim", [](const py_sinusoidal& s) { return s.f.dim(); }, "The embedding width.")
      .def_property_readonly(
          "frequencies", [](const py_sinusoidal& s) { return to_numpy(s.d.frequencies()); },
          "The dim / 2 angular frequencies 1 / base^(2i / dim) (float64 copy).");

  constexpr const char* alibi_params = "*, num_heads=8, head_offset=0, form='causal', max_bias=8.0, slopes=None";
  py::class_<py_alibi> alibi_class(m, "Alibi", docs::alibi);
  alibi_class
      .def(init_of("Alibi", alibi_params,
                   [](const call_args& a) {
                     const posenc::alibi_params p{
                         .num_heads = a.int64("num_heads", 8),
                         .head_offset = a.int64("head_offset", 0),
                         .form = enum_of<posenc::alibi_form>(
                             a.str("form", "causal"),
                             {{"causal", posenc::alibi_form::causal}, {"symmetric", posenc::alibi_form::symmetric}},
                             "Alibi", "form"),
                         .max_bias = a.float64("max_bias", 8.0)};
                     if (a.has("slopes")) {
                       const auto given = doubles_of(a["slopes"], "Alibi", "slopes");
                       return py_alibi{posenc::alibi<float>(p, given), posenc::alibi<double>(p, given)};
                     }
                     return py_alibi{posenc::alibi<float>(p), posenc::alibi<double>(p)};
                   }),
           doc_of("__init__", true, alibi_params, docs::alibi_init).c_str())
      .def_property_readonly(
          "slopes", [](const py_alibi& a) { return to_numpy(a.d.global_slopes()); }, docs::alibi_slopes);
  def_bias_methods(alibi_class, "Alibi");

  constexpr const char* t5_params = "table, *, max_distance=128, bidirectional=True, head_offset=0";
  constexpr const char* bucket_params = "relative";
  py::class_<py_t5> t5_class(m, "T5Bias", docs::t5);
  t5_class
      .def(init_of("T5Bias", t5_params,
                   [](const call_args& a) {
                     const auto t = table_of(a["table"], "T5Bias", "table");
                     const posenc::t5_bias_params p{.num_heads = t.cols(),
                                                    .num_buckets = t.rows(),
                                                    .max_distance = a.int64("max_distance", 128),
                                                    .bidirectional = a.flag("bidirectional", true),
                                                    .head_offset = a.int64("head_offset", 0)};
                     const posenc::row_matrix<float> tf = t.cast<float>();
                     return py_t5{posenc::t5_relative_bias<float>(p, tf), posenc::t5_relative_bias<double>(p, t)};
                   }),
           doc_of("__init__", true, t5_params, docs::t5_init).c_str())
      .def(
          "bucket",
          [sig = sig_of("T5Bias.bucket", bucket_params)](const py_t5& t, py::args args, py::kwargs kwargs) {
            return t.d.bucket(call_args(sig, args, kwargs).int64("relative", 0));
          },
          doc_of("bucket", true, bucket_params, docs::bucket).c_str());
  def_bias_methods(t5_class, "T5Bias");

  constexpr const char* shaw_params = "key_table, value_table";
  py::class_<py_shaw>(m, "ShawRelative", docs::shaw)
      .def(init_of(
               "ShawRelative", shaw_params,
               [](const call_args& a) {
                 const auto ak = table_of(a["key_table"], "ShawRelative", "key_table");
                 const auto av = table_of(a["value_table"], "ShawRelative", "value_table");
                 if (ak.rows() % 2 != 1)
                   value_error("ShawRelative", "key_table has " + std::to_string(ak.rows()) + " rows; it needs 2K + 1");
                 const posenc::shaw_params p{.head_dim = ak.cols(), .max_relative_position = (ak.rows() - 1) / 2};
                 const posenc::row_matrix<float> akf = ak.cast<float>(), avf = av.cast<float>();
                 return py_shaw{posenc::shaw_relative<float>(p, akf, avf), posenc::shaw_relative<double>(p, ak, av)};
               }),
           doc_of("__init__", true, shaw_params, docs::shaw_init).c_str())
      .def_property_readonly(
          "head_dim", [](const py_shaw& s) { return s.d.head_dim(); }, "Elements per head (the tables' width).")
      .def_property_readonly(
          "max_relative_position", [](const py_shaw& s) { return s.d.max_relative_position(); },
          "K: distances are clipped to [-K, K].");

  m.def(
      "attention",
      [sig = sig_of("attention", attention_params_text,
                    {{"rotation",
                      "removed: the encoding is always applied in the kernel; for q and k already rotated "
                      "with Rope.rotate, pass encoding=None"}})](py::args args, py::kwargs kwargs) {
        return attention(call_args(sig, args, kwargs));
      },
      doc_of("attention", false, attention_params_text, docs::attention)
          .c_str());

  m.def(
      "attention_varlen",
      [sig = sig_of("attention_varlen", varlen_params_text)](py::args args, py::kwargs kwargs) {
        return attention_varlen(call_args(sig, args, kwargs));
      },
      doc_of("attention_varlen", false, varlen_params_text, docs::varlen)
          .c_str());

  m.def(
      "paged_attention",
      [sig = sig_of("paged_attention", paged_params_text)](py::args args, py::kwargs kwargs) {
        return paged_attention(call_args(sig, args, kwargs));
      },
      doc_of("paged_attention", false, paged_params_text, docs::paged)
          .c_str());

  m.def(
      "attention_backward",
      [sig = sig_of("attention_backward", backward_params_text)](py::args args, py::kwargs kwargs) {
        return attention_backward(call_args(sig, args, kwargs));
      },
      doc_of("attention_backward", false, backward_params_text, docs::backward).c_str());

  // Encoders and frequency policies are immutable (every attribute read-only, tables copied at
  // construction): a copy is the object itself, so copy.deepcopy of a model holding one works.
  for (const char* name : {"Rope", "MRope", "AxialRope", "Sinusoidal", "Alibi", "T5Bias", "ShawRelative",
                           "LinearScaling", "NtkAwareScaling", "DynamicNtkScaling", "YarnScaling", "Llama3Scaling",
                           "LongRopeScaling"}) {
    const py::object cls = m.attr(name);
    cls.attr("__copy__") = py::cpp_function([](py::object self) { return self; }, py::is_method(cls),
                                            py::name("__copy__"), "The object itself: it is immutable.");
    cls.attr("__deepcopy__") =
        py::cpp_function([](py::object self, py::object) { return self; }, py::is_method(cls), py::name("__deepcopy__"),
                         py::arg("memo"), "The object itself: it is immutable.");
  }

  m.def(
      "paged_append",
      [sig = sig_of("paged_append", append_params_text)](py::args args, py::kwargs kwargs) {
        paged_append(call_args(sig, args, kwargs));
      },
      doc_of("paged_append", false, append_params_text, docs::append)
          .c_str());
}
