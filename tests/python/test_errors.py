"""Wrong dtypes, layouts, shapes and parameters raise TypeError / ValueError naming the argument, before
any work; correct arrays are used in place. Needs only NumPy."""

import numpy as np
import pytest

import posenc

D = 8


@pytest.fixture
def arrays(rng):
    q = rng.standard_normal((6, 2 * D))
    return q, q.copy(), q.copy()


def test_rotate_rejects_wrong_dtype(rng):
    r = posenc.Rope(head_dim=D)
    with pytest.raises(TypeError, match=r"Rope\.rotate: x must have dtype float16, bfloat16, float32 or float64, "
                                        r"got int32"):
        r.rotate(np.zeros((2, D), dtype=np.int32))
    with pytest.raises(TypeError, match=r"x must be an array \(numpy\.ndarray, torch\.Tensor, .*\), got list"):
        r.rotate([[0.0] * D])
    with pytest.raises(TypeError, match=r"^posenc\.Sinusoidal\.add_to: x must have dtype float32 or float64, "
                                        r"got float16$"):
        posenc.Sinusoidal(dim=D).add_to(np.zeros((2, D), dtype=np.float16))
    with pytest.raises(TypeError, match=r"positions must have dtype int64, got int32"):
        r.rotate(np.zeros((2, D)), np.arange(2, dtype=np.int32))
    with pytest.raises(TypeError, match=r"positions must be None, a range"):
        r.rotate(np.zeros((2, D)), 3.5)


def test_rotate_rejects_wrong_layout_and_shape():
    r = posenc.Rope(head_dim=D)
    x = np.zeros((4, 2 * D), dtype=np.float32)
    with pytest.raises(ValueError, match=r"x with shape \(4, 8\) and strides \(64, 8\) is not laid out"):
        r.rotate(x[:, ::2])
    with pytest.raises(ValueError, match=r"is not laid out as rows"):
        r.rotate(np.asfortranarray(x))
    with pytest.raises(ValueError, match=r"x must be 2-D .* got shape \(16,\)"):
        r.rotate(x[0])
    with pytest.raises(ValueError, match=r"x has 12 columns, not a multiple of head_dim 8"):
        r.rotate(np.zeros((2, 12)))
    with pytest.raises(ValueError, match=r"positions has 3 positions but 4 are needed"):
        r.rotate(x, range(3))
    with pytest.raises(ValueError, match=r"range with step 1"):
        r.rotate(x, range(0, 8, 2))
    x.flags.writeable = False
    with pytest.raises(ValueError, match=r"x is read-only"):
        r.rotate(x)


def test_rows_of_a_larger_array_are_accepted():
    """Rows may be further apart than their length (a slice of a wider buffer): no copy needed."""
    big = np.zeros((5, 3 * D))
    big[:, :D] = 1.0
    posenc.Rope(head_dim=D).rotate(big[:, :D], range(5))
    assert not np.all(big[:, :D] == 1.0)
    assert np.all(big[:, D:] == 0.0)
    posenc.Rope(head_dim=D).rotate(big[::2, :D], range(3))  # every other row: still rows of contiguous elements


def test_parameter_errors_name_the_field():
    with pytest.raises(ValueError, match=r"rope_params\.rotary_dim = 7: must be even"):
        posenc.Rope(head_dim=D, rotary_dim=7)
    with pytest.raises(ValueError, match=r"rope_scaling\.factor = -1"):
        posenc.Rope(head_dim=D, rope_scaling={"rope_type": "linear", "factor": -1})
    with pytest.raises(ValueError, match=r"rope_scaling"):
        posenc.Rope(head_dim=D, rope_scaling={"rope_type": "nonsense"})
    with pytest.raises(ValueError, match=r"not both"):
        posenc.Rope(head_dim=D, scaling=posenc.LinearScaling(factor=2),
                    rope_scaling={"rope_type": "linear", "factor": 2})
    with pytest.raises(ValueError, match=r"layout = 'diagonal'"):
        posenc.Rope(head_dim=D, layout="diagonal")
    with pytest.raises(TypeError, match=r"scaling must be None or one of"):
        posenc.Rope(head_dim=D, scaling={"factor": 2})
    with pytest.raises(ValueError, match=r"alibi_params\.num_heads = 0"):
        posenc.Alibi(num_heads=0)
    with pytest.raises(ValueError, match=r"t5_bias_params\.max_distance"):
        posenc.T5Bias(np.zeros((32, 2)), max_distance=4)
    with pytest.raises(ValueError, match=r"key_table has 4 rows"):
        posenc.ShawRelative(np.zeros((4, D)), np.zeros((4, D)))


def test_attention_argument_errors(arrays):
    q, k, v = arrays
    with pytest.raises(TypeError, match=r"v has dtype float32 but q has dtype float64"):
        posenc.attention(q, k, v.astype(np.float32), heads=2)
    with pytest.raises(TypeError, match=r"k has dtype float64 but q has dtype float16; they must match"):
        posenc.attention(q.astype(np.float16), k, v, heads=2)
    with pytest.raises(TypeError, match=r"q must have dtype float16, bfloat16, float32 or float64, got int64"):
        posenc.attention(q.astype(np.int64), k, v, heads=2)
    with pytest.raises(ValueError, match=r"k has 8 columns but kv_heads \* head_dim = 2 \* 8 = 16"):
        posenc.attention(q, k[:, :D], v, heads=2)
    with pytest.raises(ValueError, match=r"kv_heads = 3: must be positive and divide heads = 2"):
        posenc.attention(q, k, v, heads=2, kv_heads=3)
    with pytest.raises(ValueError, match=r"v has 5 rows but k has 6"):
        posenc.attention(q, k, v[:5], heads=2)
    with pytest.raises(ValueError, match=r"kpos has 2 positions but 6 are needed"):
        posenc.attention(q, k, v, None, [0, 1], heads=2)
    with pytest.raises(ValueError, match=r"out has shape \(6, 8\) but q has shape \(6, 16\)"):
        posenc.attention(q, k, v, heads=2, out=np.zeros((6, D)))
    with pytest.raises(TypeError, match=r"out has dtype float32 but q has dtype float64"):
        posenc.attention(q, k, v, heads=2, out=np.zeros_like(q, dtype=np.float32))
    with pytest.raises(ValueError, match=r"the Rope has head_dim 16 but q has head_dim 8"):
        posenc.attention(q, k, v, heads=2, encoding=posenc.Rope(head_dim=16))
    with pytest.raises(ValueError, match=r"the Alibi has slopes for 1 heads"):
        posenc.attention(q, k, v, heads=2, encoding=posenc.Alibi(num_heads=1))
    with pytest.raises(TypeError, match=r"Sinusoidal is an additive-input encoding"):
        posenc.attention(q, k, v, heads=2, encoding=posenc.Sinusoidal(dim=16))
    with pytest.raises(TypeError, match=r"encoding must be None, Rope, MRope, Alibi, T5Bias or ShawRelative, got str"):
        posenc.attention(q, k, v, heads=2, encoding="rope")
    with pytest.raises(ValueError, match=r"attention_params\.window_left = -2"):
        posenc.attention(q, k, v, heads=2, window=(-2, -1))


def test_attention_writes_out_in_place_and_float32_stays_float32(arrays):
    q, k, v = (a.astype(np.float32) for a in arrays)
    out = np.zeros_like(q)
    got = posenc.attention(q, k, v, heads=2, causal=True, out=out)
    assert got is out and got.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.any(out != 0)
    # The first query sees only the first key, so its output is that key's value row.
    np.testing.assert_array_equal(out[0], v[0])


def test_module_metadata():
    assert posenc.__version__.count(".") == 2
    assert posenc.Rope(head_dim=D, scaling=posenc.YarnScaling(factor=2, original_max_position=64)).name == "rope-yarn"
    assert issubclass(posenc.PreconditionError, ValueError)


def attention_error(message, *args, **kwargs):
    with pytest.raises(ValueError) as e:
        posenc.attention(*args, **kwargs)
    assert str(e.value) == "posenc.attention: " + message


def test_two_d_q_needs_heads(arrays):
    """A 2-D q has no head axis; taking it as one head would silently attend across many heads' columns."""
    q, k, v = arrays
    attention_error("q is 2-D [tokens, heads * head_dim]: pass heads= (and kv_heads= for GQA/MQA)", q, k, v)
    attention_error("q is 2-D [tokens, heads * head_dim]: pass heads= (and kv_heads= for GQA/MQA)", q, k, v,
                    causal=True, kv_heads=1)
    attention_error("k has 8 columns but kv_heads * head_dim = 2 * 8 = 16 are needed; pass kv_heads= for GQA/MQA",
                    q, k[:, :D], v[:, :D], heads=2)
    assert posenc.attention(q[:, :D], k[:, :D], v[:, :D], heads=1).shape == (6, D)


def test_heads_first_arrays_are_named_as_such():
    """[heads, tokens, head_dim] (PyTorch's per-head layout) given without layout='htd' is recognised and the
    fix named; other head-axis mismatches say which axis holds what, never a kv_heads the caller did not pass."""
    q = np.zeros((8, 128, 64), np.float32)
    k = np.zeros((2, 128, 64), np.float32)
    qt, kt = np.zeros((128, 8, 64), np.float32), np.zeros((128, 2, 64), np.float32)
    attention_error("q has shape (8, 128, 64): posenc takes [tokens, heads, head_dim] by default; this looks like "
                    "[heads, tokens, head_dim]: pass layout='htd'", q, k, k, heads=8)
    attention_error("k has shape (2, 128, 64): posenc takes [tokens, kv_heads, head_dim] by default; this looks "
                    "like [kv_heads, tokens, head_dim]: pass layout='htd'", qt, k, k, heads=8)
    attention_error("k has shape (2, 128, 64): posenc takes [tokens, kv_heads, head_dim] by default; this looks "
                    "like [kv_heads, tokens, head_dim]: pass layout='htd'", qt, k, k, kv_heads=2)
    attention_error("v has shape (2, 128, 64): posenc takes [tokens, kv_heads, head_dim] by default; this looks "
                    "like [kv_heads, tokens, head_dim]: pass layout='htd'", qt, kt, k)
    attention_error("k has shape (128, 3, 64): its axis 1 holds the kv heads, and 3 does not divide heads = 8",
                    qt, np.zeros((128, 3, 64), np.float32), kt)
    attention_error("k has shape (128, 3, 64): its axis 1 holds the kv heads but kv_heads = 2",
                    qt, np.zeros((128, 3, 64), np.float32), kt, kv_heads=2)
    attention_error("q has shape (4, 3, 8): its axis 1 holds the heads but heads = 5",
                    np.zeros((4, 3, 8)), np.zeros((4, 3, 8)), np.zeros((4, 3, 8)), heads=5)
    # With the layout named, the same arrays are taken as they are.
    assert posenc.attention(q, k, k, layout="htd").shape == (8, 128, 64)


def test_rotation_keyword_is_gone(arrays):
    """The encoding passed to attention is always applied; q and k rotated by the caller take encoding=None."""
    q, k, v = arrays
    for value in ("already_rotated", "in_kernel"):
        with pytest.raises(TypeError) as e:
            posenc.attention(q, k, v, heads=2, encoding=posenc.Rope(head_dim=D), rotation=value)
        assert str(e.value) == ("posenc.attention() got an unexpected keyword argument 'rotation' (removed: the "
                                "encoding is always applied in the kernel; for q and k already rotated with "
                                "Rope.rotate, pass encoding=None)")
        assert len(str(e.value)) < 200
