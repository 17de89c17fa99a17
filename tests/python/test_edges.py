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


INT64_MAX = 2**63 - 1
INT64_MIN = -2**63
BIG = 2**70  # 1180591620717411303424


def position_calls(x):
    """(name, call(positions)) for every function that takes per-row or free positions; x has 3 rows."""
    r = posenc.Rope(head_dim=D)
    alibi = posenc.Alibi(num_heads=2)
    kv = x.copy()
    return [
        ("attention: qpos", lambda p: posenc.attention(x, kv, kv, p, None, heads=2)),
        ("attention: kpos", lambda p: posenc.attention(x, kv, kv, None, p, heads=2)),
        ("Rope.rotate: positions", lambda p: r.rotate(x, p)),
        ("Rope.cos_sin: positions", lambda p: r.cos_sin(p)),
        ("Sinusoidal.add_to: positions", lambda p: posenc.Sinusoidal(dim=2 * D).add_to(x, p)),
        ("Sinusoidal.table: positions", lambda p: posenc.Sinusoidal(dim=2 * D).table(p)),
        ("Alibi.bias_tile: qpos", lambda p: alibi.bias_tile(0, p, [0])),
        ("Alibi.bias_tile: kpos", lambda p: alibi.bias_tile(0, [0], p)),
    ]


@pytest.mark.parametrize("positions, index, value", [
    ([0, 1, BIG], 2, BIG),
    ((0, INT64_MIN - 1, 2), 1, INT64_MIN - 1),
    (range(INT64_MAX - 1, INT64_MAX + 2), 2, INT64_MAX + 1),  # the last position is past the limit
    (range(INT64_MAX + 1, INT64_MAX + 4), 0, INT64_MAX + 1),
    (range(INT64_MIN - 1, INT64_MIN + 2), 0, INT64_MIN - 1),
], ids=["list", "tuple", "range-end", "range-start", "range-below"])
def test_positions_past_int64_raise_overflow_error_naming_the_index(positions, index, value):
    x = np.zeros((3, 2 * D))
    for name, call in position_calls(x):
        where, arg = name.split(": ")
        with pytest.raises(OverflowError) as e:
            call(positions)
        assert str(e.value) == f"posenc.{where}: {arg}[{index}] = {value} does not fit in int64"


def test_non_int_positions_name_the_index():
    with pytest.raises(TypeError, match=r"^posenc\.Rope\.rotate: positions\[1\] must be an int, got float$"):
        posenc.Rope(head_dim=D).rotate(np.zeros((2, D)), [0, 1.0])


def test_positions_at_the_int64_limits_are_exact():
    """Ranges ending at INT64_MAX and starting at INT64_MIN give the same tiles as the int64 arrays of the
    same positions (lists and ranges are read exactly, not through a float)."""
    a = posenc.Alibi(num_heads=2, form="symmetric")
    for first in (INT64_MAX - 4, INT64_MIN):
        r = range(first, first + 5)
        arr = np.arange(5, dtype=np.int64) + np.int64(first)
        want = a.bias_tile(1, arr, arr[::-1].copy(), dtype="float64")
        np.testing.assert_array_equal(a.bias_tile(1, r, list(reversed(r)), dtype="float64"), want)
        assert want[0, 0] == -a.slopes[1] * 4
