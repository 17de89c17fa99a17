"""Chunked attention, M-RoPE, axial 2-D RoPE, per-layer encodings from a model config and Llama 4's
query temperature, against NumPy float64 references written from the formulas."""

import math

import numpy as np
import pytest

from conftest import assert_close

import posenc

D = 16


def naive_attention(q, k, v, heads, qpos, kpos, causal=True, chunk=None, scale=None):
    """Softmax attention in float64; key j visible to query i when kpos <= qpos (causal) and
    kpos // chunk == qpos // chunk; zero rows where nothing is visible."""
    n_q, n_kv = q.shape[0], k.shape[0]
    d = q.shape[1] // heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((n_q, heads * d))
    for h in range(heads):
        qh, kh, vh = (a[:, h * d:(h + 1) * d].astype(np.float64) for a in (q, k, v))
        s = scale * qh @ kh.T
        vis = np.ones((n_q, n_kv), dtype=bool)
        if causal:
            vis &= kpos[None, :] <= qpos[:, None]
        if chunk is not None:
            vis &= (kpos[None, :] // chunk) == (qpos[:, None] // chunk)
        s = np.where(vis, s, -np.inf)
        m = s.max(axis=1, keepdims=True)
        p = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
        den = p.sum(axis=1, keepdims=True)
        out[:, h * d:(h + 1) * d] = np.divide(p @ vh, den, out=np.zeros((n_q, d)), where=den > 0)
    return out


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_chunked_attention_matches_numpy(rng, dtype, chunk):
    n = 90
    q, k, v = (rng.standard_normal((n, 2 * D)).astype(dtype) for _ in range(3))
    pos = np.arange(3, 3 + n, dtype=np.int64)
    out = posenc.attention(q, k, v, pos, pos, None, heads=2, causal=True, chunk_size=chunk, q_tile=16, k_tile=16)
    assert_close(out, naive_attention(q, k, v, 2, pos, pos, chunk=chunk), dtype, f"chunk {chunk}")


def test_chunk_size_zero_is_refused(rng):
    q = rng.standard_normal((4, D)).astype(np.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        posenc.attention(q, q, q, heads=1, causal=True, chunk_size=0)


def rotate_ref(x, angles, head_dim):
    """Half-split rotation of every head of x by angles [tokens, head_dim / 2], in float64."""
    x = x.astype(np.float64)
    out = x.copy()
    half = head_dim // 2
    for h in range(x.shape[1] // head_dim):
        a = x[:, h * head_dim:h * head_dim + half]
        b = x[:, h * head_dim + half:(h + 1) * head_dim]
        out[:, h * head_dim:h * head_dim + half] = a * np.cos(angles) - b * np.sin(angles)
        out[:, h * head_dim + half:(h + 1) * head_dim] = b * np.cos(angles) + a * np.sin(angles)
    return out


@pytest.mark.parametrize("interleaved", [False, True], ids=["qwen2-vl", "qwen3-vl"])
def test_mrope_rotates_each_pair_by_its_axis(rng, dtype, interleaved):
    sections = [24, 20, 20] if interleaved else [16, 24, 24]
    enc = posenc.MRope(head_dim=128, mrope_section=sections, base=1e6, interleaved=interleaved)
    axis = np.zeros(64, dtype=np.int64)
    if interleaved:
        for a in (1, 2):
            axis[a:3 * sections[a]:3] = a
    else:
        axis[16:40], axis[40:] = 1, 2
    assert [enc.axis_of_pair(k) for k in range(64)] == list(axis)
    n = 12
    pos = rng.integers(0, 5000, size=(n, 3)).astype(np.int64)
    x = rng.standard_normal((n, 2 * 128)).astype(dtype)
    got = x.copy()
    enc.rotate(got, pos)
    inv = 1e6 ** (-np.arange(64) * 2.0 / 128)
    angles = pos[:, axis] * inv[None, :]
    assert_close(got, rotate_ref(x, angles, 128), dtype, "mrope", atol=1e-9)
    # Text tokens: a 1-D position list is plain RoPE.
    text = x.copy()
    enc.rotate(text, np.arange(n, dtype=np.int64))
    plain = x.copy()
    posenc.Rope(head_dim=128, base=1e6).rotate(plain, np.arange(n, dtype=np.int64))
    np.testing.assert_array_equal(text, plain)
    with pytest.raises(ValueError, match="2"):
        enc.rotate(got, pos[:, :2].copy())


def test_axial_rope_on_a_grid(rng, dtype):
    enc = posenc.AxialRope(head_dim=80)
    grid = np.array([(r, c) for r in range(4) for c in range(5)], dtype=np.int64)
    x = rng.standard_normal((20, 3 * 80)).astype(dtype)
    got = x.copy()
    enc.rotate(got, grid)
    inv = 10000.0 ** (-4.0 * np.arange(20) / 80)
    angles = np.concatenate([grid[:, :1] * inv[None, :], grid[:, 1:] * inv[None, :]], axis=1)
    assert_close(got, rotate_ref(x, angles, 80), dtype, "axial")


def test_layer_encoding_reads_gemma3_and_llama4():
    gemma = {"model_type": "gemma3_text", "num_hidden_layers": 34, "head_dim": 256, "sliding_window": 1024,
             "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
             "query_pre_attn_scalar": 256, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
             "eos_token_id": [1, 106], "architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": None}
    local, glob = posenc.layer_encoding(gemma, 0), posenc.layer_encoding(gemma, 5)
    assert local["window"] == (1023, -1) and glob["window"] == (-1, -1)
    assert local["scale"] == 1 / 16 and glob["chunk_size"] is None
    np.testing.assert_allclose(local["encoding"].inv_freq, 1e4 ** (-np.arange(128) * 2.0 / 256), rtol=1e-15)
    np.testing.assert_allclose(glob["encoding"].inv_freq, 1e6 ** (-np.arange(128) * 2.0 / 256) / 8, rtol=1e-15)

    llama = {"model_type": "llama4_text", "num_hidden_layers": 48, "head_dim": 128, "rope_theta": 5e5,
             "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
             "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192}}
    rope_layer, nope_layer = posenc.layer_encoding(llama, 0), posenc.layer_encoding(llama, 3)
    assert rope_layer["chunk_size"] == 8192 and rope_layer["encoding"].layout == "interleaved"
    assert nope_layer["encoding"] is None and nope_layer["chunk_size"] is None
    assert nope_layer["temperature"] == {"floor_scale": 8192, "attn_scale": 0.1}
    with pytest.raises(ValueError, match="config.attention_chunk_size = 0"):
        posenc.layer_encoding(dict(llama, attention_chunk_size=0), 0)
    with pytest.raises(ValueError, match="layer = 48"):
        posenc.layer_encoding(llama, 48)


def test_query_temperature_values():
    pos = np.array([0, 8190, 8191, 10 ** 6, 2 ** 62], dtype=np.int64)
    want = [math.log((int(p) + 1) // 8192 + 1) * 0.1 + 1 for p in pos]
    np.testing.assert_allclose(posenc.query_temperature(pos), want, rtol=1e-15)
    with pytest.raises(ValueError):
        posenc.query_temperature(np.array([-1], dtype=np.int64))


def test_mrope_prompt_with_an_image_then_paged_decode(rng):
    """Qwen2-VL: [3 text tokens, a 2 x 3 image, 2 text tokens] prefilled with the tokens' three
    positions (MRope.rotate, then attention without an encoding, causal in token order), stored in a
    paged cache; two generated tokens appended and attended with the MRope in the call at their
    text position. Against a float64 reference in token order."""
    d, heads = 32, 2
    axes = [(i, i, i) for i in range(3)] + [(3, 3 + r, 3 + c) for r in range(2) for c in range(3)]
    axes += [(i, i, i) for i in range(6, 10)]
    axes = np.array(axes, dtype=np.int64)
    n, prefill, page = len(axes), 11, 4
    enc = posenc.MRope(head_dim=d, mrope_section=[4, 6, 6], base=1e6)
    q = rng.standard_normal((n, heads * d)).astype(np.float32)
    k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(2))
    axis = np.array([0] * 4 + [1] * 6 + [2] * 6)
    angles = axes[:, axis] * (1e6 ** (-np.arange(16) * 2.0 / d))[None, :]
    order = np.arange(n, dtype=np.int64)
    kd, vd = np.tile(rotate_ref(k, angles, d), (1, heads)), np.tile(v.astype(np.float64), (1, heads))  # MQA
    want = naive_attention(rotate_ref(q, angles, d), kd, vd, heads, order, order)

    qr, kr = q[:prefill].copy(), k[:prefill].copy()
    enc.rotate(qr, axes[:prefill])
    enc.rotate(kr, axes[:prefill])
    out = posenc.attention(qr, kr, v[:prefill], order[:prefill], order[:prefill], None, heads=heads, kv_heads=1,
                           causal=True)
    assert_close(out, want[:prefill], np.float32, "prefill", atol=2e-5)

    table = np.array([[2, 0, 3, 1]], dtype=np.int32)
    k_cache = np.full((4, page, d), np.nan, dtype=np.float32)
    v_cache = np.full((4, page, d), np.nan, dtype=np.float32)
    rows = np.array([table[0, j // page] * page + j % page for j in range(n)])
    row_pos = np.zeros(4 * page, dtype=np.int64)
    row_pos[rows] = axes.max(axis=1)  # a mask position no later than any later text token's
    lengths = np.array([prefill], dtype=np.int32)
    posenc.paged_append(k_cache, v_cache, table, lengths, kr, v[:prefill], [0, prefill], None, keys="rotated",
                        positions=row_pos)
    for i in range(prefill, n):
        lengths[0] = i + 1
        posenc.paged_append(k_cache, v_cache, table, lengths, k[i:i + 1], v[i:i + 1], [0, 1], enc, keys="rotated",
                            positions=row_pos)
        got = posenc.paged_attention(q[i:i + 1], k_cache, v_cache, table, lengths, [0, 1], axes[i:i + 1, 0], enc,
                                     keys="rotated", positions=row_pos, heads=heads, kv_heads=1, causal=True)
        assert_close(got, want[i:i + 1], np.float32, f"decoded token {i}", atol=2e-5)
    # An MRope in the call is the RoPE of its text tokens, bit for bit.
    rope = posenc.Rope(head_dim=d, base=1e6)
    same = posenc.paged_attention(q[-1:], k_cache, v_cache, table, lengths, [0, 1], axes[-1:, 0], rope,
                                  keys="rotated", positions=row_pos, heads=heads, kv_heads=1, causal=True)
    np.testing.assert_array_equal(same, got)
