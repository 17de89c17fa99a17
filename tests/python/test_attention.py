"""posenc.attention against naive PyTorch softmax attention: no encoding, RoPE in the kernel, ALiBi,
T5 and Shaw biases; causal masks, windows, GQA, KV-cache positions, log-sum-exp."""

import math

import numpy as np
import pytest

from conftest import assert_close

torch = pytest.importorskip("torch", reason="python3-torch is not installed: the attention references need it")
import torch_reference as ref  # noqa: E402

import posenc  # noqa: E402

D = 16


def qkv(rng, dtype, n_q, n_kv, heads, kv_heads):
    return (rng.standard_normal((n_q, heads * D)).astype(dtype),
            rng.standard_normal((n_kv, kv_heads * D)).astype(dtype),
            rng.standard_normal((n_kv, kv_heads * D)).astype(dtype))


# (heads, kv_heads, n_q, n_kv, query position offset): self-attention, GQA, MQA, and a query block at
# the end of a longer KV cache (bottom-right aligned by positions).
SHAPES = [(2, 2, 40, 40, 0), (4, 2, 33, 33, 0), (3, 1, 21, 21, 0), (4, 2, 5, 70, 65)]


def encoding_and_bias(name, heads, qpos, kpos, rng):
    """The posenc encoder and the reference's [heads, n_q, n_kv] bias (None for none and RoPE)."""
    if name == "none":
        return None, None
    if name == "alibi":
        return posenc.Alibi(num_heads=heads), ref.alibi_bias(ref.alibi_slopes(heads), qpos, kpos)
    if name == "t5":
        table = rng.standard_normal((32, heads))
        enc = posenc.T5Bias(table, max_distance=128, bidirectional=False)
        return enc, ref.t5_bias(table, qpos, kpos, 32, 128, False)
    raise ValueError(name)


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa", "mqa", "kv-cache"])
@pytest.mark.parametrize("encoding", ["none", "alibi", "t5"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_biased_attention_matches_torch(rng, dtype, shape, encoding, causal):
    heads, kv_heads, n_q, n_kv, offset = shape
    q, k, v = qkv(rng, dtype, n_q, n_kv, heads, kv_heads)
    qpos = np.arange(offset, offset + n_q, dtype=np.int64)
    kpos = np.arange(n_kv, dtype=np.int64)
    enc, bias = encoding_and_bias(encoding, heads, qpos, kpos, rng)
    out, lse = posenc.attention(q, k, v, qpos, kpos, enc, heads=heads, kv_heads=kv_heads, causal=causal,
                                return_lse=True, q_tile=16, k_tile=16)
    want, want_lse = ref.attention(q, k, v, heads, kv_heads, qpos, kpos, bias, causal=causal)
    assert out.dtype == dtype and lse.dtype == dtype
    assert_close(out, want.numpy(), dtype, f"{encoding} out")
    assert_close(lse, want_lse.numpy(), dtype, f"{encoding} lse")


@pytest.mark.parametrize("layout", ["half_split", "interleaved"])
def test_rope_attention_matches_torch(rng, dtype, layout):
    heads, kv_heads, n = 4, 2, 45
    q, k, v = qkv(rng, dtype, n, n, heads, kv_heads)
    pos = np.sort(rng.choice(5000, size=n, replace=False)).astype(np.int64)
    r = posenc.Rope(head_dim=D, layout=layout, scaling=posenc.YarnScaling(factor=4.0, original_max_position=1024))
    inv = ref.yarn_inv_freq(D, 10000.0, 4.0, 1024)
    mag = ref.yarn_magnitude(4.0)
    qr = ref.rope_rotate(q, pos, D, inv, layout, mag)
    kr = ref.rope_rotate(k, pos, D, inv, layout, mag)
    want, want_lse = ref.attention(qr, kr, v, heads, kv_heads, pos, pos, causal=True)
    out, lse = posenc.attention(q, k, v, pos, pos, r, heads=heads, kv_heads=kv_heads, causal=True, return_lse=True)
    assert_close(out, want.numpy(), dtype, "rope in kernel")
    assert_close(lse, want_lse.numpy(), dtype, "rope lse")
    # q and k rotated by the caller (keys rotated once into a KV cache) are attended with encoding=None.
    q2, k2 = q.copy(), k.copy()
    r.rotate(q2, pos)
    r.rotate(k2, pos)
    out2 = posenc.attention(q2, k2, v, pos, pos, None, heads=heads, kv_heads=kv_heads, causal=True)
    assert_close(out2, want.numpy(), dtype, "rope rotated by the caller")


def test_shaw_attention_matches_torch(rng, dtype):
    n, K = 30, 4
    q, k, v = qkv(rng, dtype, n, n, 1, 1)
    ak, av = rng.standard_normal((2, 2 * K + 1, D))
    pos = np.arange(n, dtype=np.int64)
    idx = torch.clamp(torch.tensor(pos)[None, :] - torch.tensor(pos)[:, None], -K, K) + K  # [i, j]: clip(j - i)
    qt, kt, vt = (torch.tensor(a, dtype=torch.float64) for a in (q, k, v))
    akt, avt = torch.tensor(ak), torch.tensor(av)
    # Shaw et al. 2018: e_ij = q_i . (k_j + aK[clip(j - i)]) / sqrt(d); out_i = sum_j a_ij (v_j + aV[clip(j - i)]).
    e = (qt @ kt.T + torch.einsum("id,ijd->ij", qt, akt[idx])) / math.sqrt(D)
    e = e.masked_fill(torch.tensor(pos)[None, :] > torch.tensor(pos)[:, None], -math.inf)
    a = torch.softmax(e, dim=-1)
    want = a @ vt + torch.einsum("ij,ijd->id", a, avt[idx])
    out = posenc.attention(q, k, v, pos, pos, posenc.ShawRelative(ak, av), heads=1, causal=True)
    assert_close(out, want.numpy(), dtype, "shaw")


@pytest.mark.parametrize("window", [(8, -1), (3, 5), (0, 0)])
def test_window_matches_torch(rng, dtype, window):
    n = 37
    q, k, v = qkv(rng, dtype, n, n, 2, 2)
    pos = np.arange(n, dtype=np.int64)
    enc = posenc.Alibi(num_heads=2, form="symmetric")
    bias = ref.alibi_bias(ref.alibi_slopes(2), pos, pos, symmetric=True)
    out, lse = posenc.attention(q, k, v, pos, pos, enc, heads=2, window=window, return_lse=True, q_tile=8, k_tile=8)
    want, want_lse = ref.attention(q, k, v, 2, 2, pos, pos, bias, window=window)
    assert_close(out, want.numpy(), dtype, f"window {window}")
    assert_close(lse, want_lse.numpy(), dtype, f"window {window} lse")


def test_fully_masked_rows_are_zero_with_lse_minus_inf(rng, dtype):
    q, k, v = qkv(rng, dtype, 4, 6, 1, 1)
    qpos = np.array([0, 1, 10, 11], dtype=np.int64)
    kpos = np.arange(2, 8, dtype=np.int64)  # every key is after queries 0 and 1
    out, lse = posenc.attention(q, k, v, qpos, kpos, heads=1, causal=True, return_lse=True)
    want, want_lse = ref.attention(q, k, v, 1, 1, qpos, kpos, causal=True)
    assert np.all(out[:2] == 0) and np.all(np.isneginf(lse[:2]))
    assert_close(out, want.numpy(), dtype, "masked rows")
    assert_close(lse, want_lse.numpy(), dtype, "masked rows lse")


def test_three_d_arrays_and_out(rng, dtype):
    heads, kv_heads, n = 4, 2, 19
    q, k, v = qkv(rng, dtype, n, n, heads, kv_heads)
    q3, k3, v3 = q.reshape(n, heads, D), k.reshape(n, kv_heads, D), v.reshape(n, kv_heads, D)
    out = np.full_like(q3, np.nan)
    got = posenc.attention(q3, k3, v3, causal=True, out=out)  # heads and kv_heads from axis 1
    assert got is out
    want, _ = ref.attention(q, k, v, heads, kv_heads, np.arange(n), np.arange(n), causal=True)
    assert_close(out.reshape(n, -1), want.numpy(), dtype, "3-D")


def test_heads_first_arrays_need_their_layout_named(rng, dtype):
    """PyTorch's per-head layout [heads, tokens, d] without layout= is refused, naming the fix; with it, the
    arrays are attended in place (test_layouts.py covers every layout against the reference)."""
    heads, kv_heads, n = 4, 2, 23
    qh = rng.standard_normal((heads, n, D)).astype(dtype)
    kh, vh = (rng.standard_normal((kv_heads, n, D)).astype(dtype) for _ in range(2))
    with pytest.raises(ValueError, match=r"looks like \[heads, tokens, head_dim\]: pass layout='htd'"):
        posenc.attention(qh, kh, vh, heads=heads, kv_heads=kv_heads, causal=True)
    out = posenc.attention(qh, kh, vh, layout="htd", causal=True)
    pos = np.arange(n)
    flat = lambda a: np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(n, -1)  # noqa: E731
    want, _ = ref.attention(flat(qh), flat(kh), flat(vh), heads, kv_heads, pos, pos, causal=True)
    assert out.shape == qh.shape
    assert_close(flat(out), want.numpy(), dtype, "heads-first")


def test_explicit_scale(rng):
    q, k, v = qkv(rng, np.float64, 9, 9, 1, 1)
    out = posenc.attention(q, k, v, heads=1, scale=0.5)
    want, _ = ref.attention(q, k, v, 1, 1, np.arange(9), np.arange(9), scale=0.5)
    assert_close(out, want.numpy(), np.float64, "scale")


def test_threads_give_the_same_bits(rng):
    """The module's pool shares the work; threads=1 keeps it on the calling thread: same bits."""
    q = rng.standard_normal((300, 4 * 32)).astype(np.float32)
    k = rng.standard_normal((300, 2 * 32)).astype(np.float32)
    v = rng.standard_normal((300, 2 * 32)).astype(np.float32)
    r = posenc.Rope(head_dim=32)
    one = posenc.attention(q, k, v, encoding=r, heads=4, kv_heads=2, causal=True, threads=1, q_tile=32)
    many = posenc.attention(q, k, v, encoding=r, heads=4, kv_heads=2, causal=True, threads=0, q_tile=32)
    np.testing.assert_array_equal(one, many)
