"""posenc.Rope against the PyTorch references: half-split and interleaved rotations, partial rotary,
every frequency policy (built from parameters and from a Hugging Face rope_scaling dict)."""

import numpy as np
import pytest

from conftest import angle_error, assert_close

torch = pytest.importorskip("torch", reason="python3-torch is not installed: the RoPE references need it")
import torch_reference as ref  # noqa: E402

import posenc  # noqa: E402

HEAD_DIM = 64
HEADS = 3
TOKENS = 37
BASE = 10000.0


def random_positions(rng, n, high=100_000):
    return rng.integers(0, high, size=n, dtype=np.int64)


@pytest.mark.parametrize("layout", ["half_split", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, 24])
def test_rotation_matches_torch(rng, dtype, layout, rotary_dim):
    x = rng.standard_normal((TOKENS, HEADS * HEAD_DIM)).astype(dtype)
    pos = random_positions(rng, TOKENS)
    r = posenc.Rope(head_dim=HEAD_DIM, rotary_dim=rotary_dim, base=BASE, layout=layout)
    want = ref.rope_rotate(x, pos, HEAD_DIM, ref.plain_inv_freq(rotary_dim, BASE), layout)
    atol = angle_error(pos, 1.0, x)
    r.rotate(x, pos)
    assert_close(x, want.numpy(), dtype, f"rope {layout} r={rotary_dim}", atol)


def test_layouts_differ_by_a_permutation(rng):
    """Interleaved dim 2i is half-split dim i, 2i + 1 is i + r/2: the layouts are one rotation."""
    x = rng.standard_normal((TOKENS, HEAD_DIM))
    perm = np.concatenate([np.arange(0, HEAD_DIM, 2), np.arange(1, HEAD_DIM, 2)])  # interleaved -> half-split
    pos = random_positions(rng, TOKENS)
    a, b = x.copy(), np.ascontiguousarray(x[:, perm])
    posenc.Rope(head_dim=HEAD_DIM, layout="interleaved").rotate(a, pos)
    posenc.Rope(head_dim=HEAD_DIM, layout="half_split").rotate(b, pos)
    assert_close(a[:, perm], b, np.float64, "interleaved vs permuted half-split")
    assert not np.allclose(a, x), "the rotation changed nothing"


# Each policy: (posenc scaling object, Hugging Face rope_scaling dict, reference table, reference magnitude).
R = 128
POLICIES = {
    "linear": (posenc.LinearScaling(factor=4.0), {"rope_type": "linear", "factor": 4.0},
               lambda: ref.linear_inv_freq(R, BASE, 4.0), 1.0),
    "ntk": (posenc.NtkAwareScaling(alpha=8.0), {"rope_type": "ntk", "factor": 8.0},
            lambda: ref.ntk_inv_freq(R, BASE, 8.0), 1.0),
    "dynamic": (posenc.DynamicNtkScaling(factor=2.0, original_max_position=2048, sequence_length=6000),
                {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048,
                 "sequence_length": 6000},
                lambda: ref.dynamic_ntk_inv_freq(R, BASE, 2.0, 2048, 6000), 1.0),
    "dynamic-short": (posenc.DynamicNtkScaling(factor=2.0, original_max_position=2048, sequence_length=1000),
                      {"type": "dynamic", "factor": 2.0, "max_position_embeddings": 2048, "sequence_length": 1000},
                      lambda: ref.plain_inv_freq(R, BASE), 1.0),
    "yarn": (posenc.YarnScaling(factor=16.0, original_max_position=4096),
             {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096},
             lambda: ref.yarn_inv_freq(R, BASE, 16.0, 4096), ref.yarn_magnitude(16.0)),
    "yarn-deepseek": (posenc.YarnScaling(factor=40.0, original_max_position=4096, beta_fast=32, beta_slow=1,
                                         mscale=0.707, mscale_all_dim=0.707),
                      {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                       "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                      lambda: ref.yarn_inv_freq(R, BASE, 40.0, 4096), 1.0),
    "llama3": (posenc.Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position=8192),
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192},
               lambda: ref.llama3_inv_freq(R, BASE, 8.0, 1.0, 4.0, 8192), 1.0),
}
LONG = [1.0 + 0.05 * i for i in range(R // 2)]
SHORT = [1.0 + 0.01 * i for i in range(R // 2)]
POLICIES["longrope"] = (
    posenc.LongRopeScaling(short_factor=SHORT, long_factor=LONG, original_max_position=4096, max_position=131072,
                           sequence_length=8000),
    {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 4096,
     "max_position_embeddings": 131072, "sequence_length": 8000},
    lambda: ref.longrope_inv_freq(R, BASE, LONG), float(np.sqrt(1 + np.log(32.0) / np.log(4096.0))))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_table_and_rotation_match_torch(rng, dtype, policy):
    scaling, hf, table, magnitude = POLICIES[policy]
    want_inv = table()
    from_params = posenc.Rope(head_dim=R, base=BASE, scaling=scaling)
    from_hf = posenc.Rope(head_dim=R, base=BASE, rope_scaling=hf)
    assert_close(from_params.inv_freq, want_inv.numpy(), np.float64, f"{policy} inv_freq")
    assert np.array_equal(from_hf.inv_freq, from_params.inv_freq), f"{policy}: HF dict and parameters differ"
    assert from_hf.magnitude == from_params.magnitude
    assert from_params.magnitude == pytest.approx(magnitude, rel=1e-14)

    x = rng.standard_normal((TOKENS, 2 * R)).astype(dtype)
    pos = random_positions(rng, TOKENS, high=32768)
    want = ref.rope_rotate(x, pos, R, want_inv, "half_split", magnitude)
    atol = angle_error(pos, want_inv.numpy(), x) * magnitude
    from_hf.rotate(x, pos)
    assert_close(x, want.numpy(), dtype, f"{policy} rotation", atol)


def test_hf_dict_reads_rope_theta_and_attention_factor():
    r = posenc.Rope(head_dim=R, rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5,
                                              "attention_factor": 1.5})
    assert r.base == 5e5
    assert r.magnitude == 1.5
    assert_close(r.inv_freq, ref.linear_inv_freq(R, 5e5, 2.0).numpy(), np.float64, "rope_theta")


def test_relative_property(rng):
    """<R(m) q, R(n) k> depends only on m - n (RoFormer section 3.4.2)."""
    r = posenc.Rope(head_dim=HEAD_DIM, scaling=posenc.YarnScaling(factor=4.0, original_max_position=512))
    q0, k0 = rng.standard_normal((2, HEAD_DIM))
    dots = []
    for m in [5, 1005, 70_000]:
        q = np.tile(q0, (1, 1))
        k = np.tile(k0, (1, 1))
        r.rotate(q, [m])
        r.rotate(k, [m - 5])
        dots.append(float(q @ k.T))
    assert_close(dots, [dots[0]] * 3, np.float64, "dot product at offsets")


def test_positions_forms_agree(rng):
    x = rng.standard_normal((6, HEAD_DIM))
    r = posenc.Rope(head_dim=HEAD_DIM)
    outs = []
    for pos in [None, range(0, 6), list(range(6)), np.arange(6, dtype=np.int64)]:
        y = x.copy()
        r.rotate(y, pos)
        outs.append(y)
    for y in outs[1:]:
        assert np.array_equal(y, outs[0])
    shifted = x.copy()
    r.rotate(shifted, range(100, 106))
    assert not np.array_equal(shifted, outs[0])


def test_rotates_views_in_place(rng):
    """A column block of a wider buffer (a slice of a fused QKV matrix) is rotated in place: nothing
    outside it changes, and the result equals rotating a contiguous copy."""
    fused = rng.standard_normal((TOKENS, 3 * HEADS * HEAD_DIM)).astype(np.float32)
    before = fused.copy()
    k_block = fused[:, HEADS * HEAD_DIM: 2 * HEADS * HEAD_DIM]
    pos = random_positions(rng, TOKENS)
    r = posenc.Rope(head_dim=HEAD_DIM)
    copy = np.ascontiguousarray(k_block)
    r.rotate(copy, pos)
    r.rotate(k_block, pos)
    assert np.array_equal(fused[:, HEADS * HEAD_DIM: 2 * HEADS * HEAD_DIM], copy)
    assert np.array_equal(fused[:, : HEADS * HEAD_DIM], before[:, : HEADS * HEAD_DIM])
    assert np.array_equal(fused[:, 2 * HEADS * HEAD_DIM:], before[:, 2 * HEADS * HEAD_DIM:])
    three_d = before[:, HEADS * HEAD_DIM: 2 * HEADS * HEAD_DIM].copy().reshape(TOKENS, HEADS, HEAD_DIM)
    r.rotate(three_d, pos)
    assert np.array_equal(three_d.reshape(TOKENS, -1), copy)


def test_cos_sin_match_torch():
    r = posenc.Rope(head_dim=HEAD_DIM, scaling=posenc.LinearScaling(factor=2.0))
    pos = np.array([0, 1, 7, 2**31 - 1], dtype=np.int64)
    c, s = r.cos_sin(pos)
    angle = torch.tensor(pos, dtype=torch.float64)[:, None] * ref.linear_inv_freq(HEAD_DIM, BASE, 2.0)[None, :]
    # Up to 2^31 the float64 product itself is accurate to ~1e-7 rad; posenc's reduction is better.
    np.testing.assert_allclose(c, torch.cos(angle).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(s, torch.sin(angle).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(c[:3], torch.cos(angle[:3]).numpy(), atol=1e-15, rtol=0)
