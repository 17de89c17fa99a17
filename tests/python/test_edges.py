"""Edge cases a caller reaches without a bug of their own: arrays with no rows (NumPy gives empty
arrays zero strides) and integers at and past the int64 limits. Needs only NumPy."""

import numpy as np
import pytest

import posenc

D = 8


def zero_strided(shape, dtype):
    """An array of `shape` (with a zero in it) whose strides are all zero."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def read_only(shape, dtype):
    a = np.zeros(shape, dtype)
    a.flags.writeable = False
    return a


# Ways to make an array with no rows: np.zeros (whatever strides NumPy gives it), explicit zero strides,
# an empty slice of rows of a larger array, a read-only one (nothing is written to it).
EMPTY = {
    "zeros": lambda shape, dtype: np.zeros(shape, dtype),
    "zero-strides": zero_strided,
    "row-slice": lambda shape, dtype: np.ones((3,) + shape[1:], dtype)[3:],
    "read-only": read_only,
}


@pytest.fixture(params=list(EMPTY), ids=list(EMPTY))
def empty(request):
    return EMPTY[request.param]


def encoders(heads):
    return {
        "none": None,
        "rope": posenc.Rope(head_dim=D),
        "alibi": posenc.Alibi(num_heads=heads),
        "t5": posenc.T5Bias(np.ones((32, heads))),
        "shaw": posenc.ShawRelative(np.ones((5, D)), np.ones((5, D))),
    }


@pytest.mark.parametrize("encoding", ["none", "rope", "alibi", "t5", "shaw"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_with_no_keys_gives_zeros_and_lse_minus_inf(rng, dtype, empty, encoding, causal):
    heads = 1 if encoding == "shaw" else 2
    q = rng.standard_normal((5, heads * D)).astype(dtype)
    k, v = empty((0, heads * D), dtype), empty((0, heads * D), dtype)
    out = np.full_like(q, np.nan)
    got, lse = posenc.attention(q, k, v, range(10, 15), None, encoders(heads)[encoding], heads=heads, causal=causal,
                                return_lse=True, out=out)
    assert got is out
    assert np.all(out == 0), "a query with no keys gives zeros"
    assert lse.shape == (5, heads) and lse.dtype == dtype and np.all(np.isneginf(lse))


def test_attention_with_no_keys_3d(rng, dtype, empty):
    q = rng.standard_normal((3, 4, D)).astype(dtype)
    k, v = empty((0, 2, D), dtype), empty((0, 2, D), dtype)
    out, lse = posenc.attention(q, k, v, [7, 8, 9], [], causal=True, return_lse=True)
    assert out.shape == q.shape and np.all(out == 0)
    assert lse.shape == (3, 4) and np.all(np.isneginf(lse))


@pytest.mark.parametrize("encoding", ["none", "rope", "alibi"])
def test_attention_with_no_queries_returns_empty(rng, dtype, empty, encoding):
    q = empty((0, 2 * D), dtype)
    k = rng.standard_normal((6, 2 * D)).astype(dtype)
    out, lse = posenc.attention(q, k, k, np.zeros(0, np.int64), None, encoders(2)[encoding], heads=2,
                                causal=True, return_lse=True)
    assert out.shape == (0, 2 * D) and out.dtype == dtype
    assert lse.shape == (0, 2) and lse.dtype == dtype
    both = empty((0, 2, D), dtype)
    out3 = posenc.attention(both, both, both)
    assert out3.shape == (0, 2, D)


@pytest.mark.parametrize("positions", [None, [], (), range(0), range(5, 5), np.zeros(0, np.int64),
                                       zero_strided((0,), np.int64)],
                         ids=["none", "list", "tuple", "range", "range-5", "array", "array-zero-strides"])
def test_rotate_and_add_to_with_no_rows_are_no_ops(dtype, empty, positions):
    r = posenc.Rope(head_dim=D)
    x = empty((0, 2 * D), dtype)
    assert r.rotate(x, positions) is None
    assert r.rotate(empty((0, 2, D), dtype), positions) is None
    assert posenc.Sinusoidal(dim=2 * D).add_to(x, positions) is None


def test_tables_with_no_positions_are_empty():
    c, s = posenc.Rope(head_dim=D).cos_sin([])
    assert c.shape == (0, D // 2) and s.shape == (0, D // 2)
    assert posenc.Sinusoidal(dim=D).table(range(0), dtype="float64").shape == (0, D)
    assert posenc.Alibi(num_heads=2).bias_tile(1, [], range(3)).shape == (0, 3)
    assert posenc.T5Bias(np.ones((32, 2))).bias_tile(0, range(4), zero_strided((0,), np.int64)).shape == (4, 0)
