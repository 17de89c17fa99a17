"""posenc.Sinusoidal, posenc.Alibi and posenc.T5Bias against the formulas, written in PyTorch."""

import numpy as np
import pytest

from conftest import angle_error, assert_close

torch = pytest.importorskip("torch", reason="python3-torch is not installed: the encoder references need it")
import torch_reference as ref  # noqa: E402

import posenc  # noqa: E402


@pytest.mark.parametrize("layout", ["interleaved", "concatenated"])
@pytest.mark.parametrize("shifted", [False, True])
def test_sinusoidal_matches_torch(rng, dtype, layout, shifted):
    dim, offset = 48, 1
    pos = np.array([0, 1, 2, 99, 12345, 2**30], dtype=np.int64)
    s = posenc.Sinusoidal(dim=dim, layout=layout, shifted_denominator=shifted, position_offset=offset)
    # Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(...); the shifted form
    # divides the exponent by dim/2 - 1 instead of dim/2; concatenated puts all sines first.
    i = torch.arange(dim // 2, dtype=torch.float64)
    freq = 10000.0 ** (-i / (dim // 2 - (1 if shifted else 0)))
    angle = (torch.tensor(pos, dtype=torch.float64)[:, None] + offset) * freq[None, :]
    sin, cos = torch.sin(angle), torch.cos(angle)
    if layout == "interleaved":
        want = torch.stack([sin, cos], dim=-1).reshape(len(pos), dim)
    else:
        want = torch.cat([sin, cos], dim=1)
    got = s.table(pos, dtype=dtype)
    assert got.dtype == dtype
    atol = angle_error(pos[:-1] + offset, 1.0, 1.0)
    # At 2^30 the float64 product p * f is itself off by up to ~1e-7 rad; posenc's angle is exact.
    assert_close(got[:-1], want[:-1].numpy(), dtype, "sinusoidal table", atol)
    np.testing.assert_allclose(got[-1], want[-1].numpy(), atol=1e-6)
    x = np.ones((len(pos), dim), dtype=dtype)
    s.add_to(x, pos)
    assert_close(x[:-1], 1 + want[:-1].numpy(), dtype, "sinusoidal add_to", atol)


@pytest.mark.parametrize("heads", [8, 12, 5, 1])
def test_alibi_slopes_and_tiles_match_torch(dtype, heads):
    a = posenc.Alibi(num_heads=heads)
    want = ref.alibi_slopes(heads).numpy()
    assert np.array_equal(a.slopes, want) if heads in (8, 1) else np.allclose(a.slopes, want, rtol=1e-15, atol=0)
    qpos = np.array([3, 100, 7, 2**40], dtype=np.int64)
    kpos = np.arange(0, 50, 7, dtype=np.int64)
    bias = ref.alibi_bias(torch.tensor(want), qpos, kpos).numpy()
    for h in range(heads):
        assert_close(a.bias_tile(h, qpos, kpos, dtype=dtype), bias[h], dtype, f"alibi head {h}")
    sym = posenc.Alibi(num_heads=heads, form="symmetric")
    assert sym.bias(0, 3, 10) == pytest.approx(-want[0] * 7)


def test_alibi_head_offset_uses_global_slopes():
    """A shard of heads 4..7 of 8 keeps the global slopes, as a tensor-parallel shard must."""
    shard = posenc.Alibi(num_heads=8, head_offset=4)
    assert shard.bias(0, 10, 0) == -ref.alibi_slopes(8)[4].item() * 10


TIES = (16, 32, 64, 128)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_and_tiles_match_torch(rng, dtype, bidirectional):
    buckets, heads, max_distance = 32, 3, 128
    table = rng.standard_normal((buckets, heads)).astype(dtype)
    t = posenc.T5Bias(table, max_distance=max_distance, bidirectional=bidirectional)
    # Distances where the logarithm's argument is an exact power (ties of the floor) are left out:
    # a float64 log may round them either way; the C++ tests pin them down exactly.
    rel = np.array([r for r in range(-400, 401) if abs(r) not in TIES] + [-10**9, 10**9])
    want = ref.t5_bucket(torch.tensor(rel), buckets, max_distance, bidirectional).numpy()
    got = np.array([t.bucket(int(r)) for r in rel])
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"bucket of relative {rel[bad[0]]}: got {got[bad[0]]}, reference {want[bad[0]]}"
    qpos = np.array([0, 5, 300, 1000], dtype=np.int64)
    kpos = np.arange(0, 1200, 13, dtype=np.int64)
    untied = ~np.isin(np.abs(kpos[None, :] - qpos[:, None]), TIES)
    bias = ref.t5_bias(table, qpos, kpos, buckets, max_distance, bidirectional).numpy()
    for h in range(heads):
        got_h = t.bias_tile(h, qpos, kpos, dtype=dtype)
        assert_close(got_h[untied], bias[h][untied], dtype, f"t5 head {h}")
