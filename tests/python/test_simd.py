"""The kernel-set cap from Python: posenc.simd_level, posenc.set_simd_cap and POSENC_SIMD_CAP at import."""
import os
import subprocess
import sys

import numpy as np
import pytest

import posenc

LEVELS = ("portable", "avx2", "avx512", "neon")


@pytest.fixture
def restore_cap():
    yield
    posenc.set_simd_cap("avx512")  # no cap, as at import without POSENC_SIMD_CAP


def test_each_cap_runs_a_set_no_higher_and_attention_agrees(restore_cap):
    detected = posenc.simd_level(detected=True)
    assert detected in LEVELS
    rng = np.random.default_rng(3)
    q = rng.standard_normal((40, 4 * 32)).astype(np.float32)
    k = rng.standard_normal((40, 2 * 32)).astype(np.float32)
    v = rng.standard_normal((40, 2 * 32)).astype(np.float32)
    rope = posenc.Rope(head_dim=32)
    results = {}
    for cap in ("portable", "avx2", "avx512"):
        in_use = posenc.set_simd_cap(cap)
        assert in_use == posenc.simd_level()
        rank = {"portable": 0, "avx2": 1, "neon": 1, "avx512": 2}
        assert rank[in_use] <= rank[cap]
        if cap == "portable":
            assert in_use == "portable"
        results[in_use] = posenc.attention(q, k, v, encoding=rope, heads=4, kv_heads=2, causal=True)
    assert posenc.simd_level(detected=True) == detected  # the cap does not change what the CPU has
    base = results["portable"]
    for out in results.values():
        np.testing.assert_allclose(out, base, atol=2e-5, rtol=0)


def test_bad_levels_are_refused(restore_cap):
    with pytest.raises(ValueError, match="level = 'sse4' is not a kernel set"):
        posenc.set_simd_cap("sse4")
    with pytest.raises(TypeError, match="level must be a str"):
        posenc.set_simd_cap(2)


def run_with_cap(value):
    env = dict(os.environ, POSENC_SIMD_CAP=value,
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(posenc.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", "import posenc; print(posenc.simd_level())"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_environment_variable_caps_from_the_import():
    r = run_with_cap("portable")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "portable"
    r = run_with_cap("avx3")
    assert r.returncode != 0
    assert "POSENC_SIMD_CAP = 'avx3' is not a kernel set" in r.stderr


def bf16_round(x):
    """float32 values rounded to the nearest bfloat16 (ties to even), from the bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def softmax_attention(q, k, v, heads, kv_heads, causal):
    """float64 attention of [tokens, heads * d] rows, positions 0..n-1 (query rows at the end)."""
    n_q, d = q.shape[0], q.shape[1] // heads
    n_kv = k.shape[0]
    out = np.zeros((n_q, heads * d))
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = q[:, h * d:(h + 1) * d].astype(np.float64) @ k[:, g * d:(g + 1) * d].astype(np.float64).T / np.sqrt(d)
        if causal:
            s[np.arange(n_kv)[None, :] > (n_kv - n_q + np.arange(n_q))[:, None]] = -np.inf
        w = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h * d:(h + 1) * d] = (w / w.sum(axis=1, keepdims=True)) @ v[:, g * d:(g + 1) * d]
    return out


@pytest.mark.parametrize("n_q", [1, 70])
def test_bf16_qk_rounds_q_and_k_on_every_set(restore_cap, n_q):
    assert isinstance(posenc.cpu_has_avx512_bf16(), bool)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((n_q, 4 * 48)).astype(np.float32)
    k = rng.standard_normal((90, 2 * 48)).astype(np.float32)
    v = rng.standard_normal((90, 2 * 48)).astype(np.float32)
    ref = softmax_attention(bf16_round(q), bf16_round(k), v, 4, 2, True)
    qpos = np.arange(90 - n_q, 90)
    for cap in ("portable", "avx2", "avx512"):
        posenc.set_simd_cap(cap)
        out = posenc.attention(q, k, v, qpos, heads=4, kv_heads=2, causal=True, bf16_qk=True)
        np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)
        # The rounded inputs are the same operands: the same bits.
        same = posenc.attention(bf16_round(q), bf16_round(k), v, qpos, heads=4, kv_heads=2, causal=True,
                                bf16_qk=True)
        np.testing.assert_array_equal(out, same)
    # Forward only: the backward refuses the knob by name.
    with pytest.raises(TypeError, match="bf16_qk"):
        posenc.attention_backward(q, k, v, out, np.zeros((n_q, 4), np.float32), out, heads=4, kv_heads=2,
                                  bf16_qk=True)
