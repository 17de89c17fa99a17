"""Calls: a mistyped keyword, a missing argument or too many positionals raise a short TypeError that
names the argument and never prints the arrays; ints past int64 in scalar arguments raise OverflowError
naming the argument; help() and inspect.signature show the Python signatures. Needs only NumPy."""

import inspect

import numpy as np
import pytest

import posenc

D = 8
BIG = 2**64  # 18446744073709551616


@pytest.fixture
def x():
    # Large enough that its repr would be thousands of characters long.
    return np.zeros((64, 2 * D))


def short_type_error(call, message):
    """`call()` raises TypeError whose whole text is `message` (short, no array repr)."""
    with pytest.raises(TypeError) as e:
        call()
    text = str(e.value)
    assert text == message
    assert len(text) < 200 and "array(" not in text


def test_mistyped_keyword_suggests_the_parameter(x):
    r, s, a, t = posenc.Rope(head_dim=D), posenc.Sinusoidal(dim=2 * D), posenc.Alibi(num_heads=2), \
        posenc.T5Bias(np.ones((32, 2)))
    cases = [
        (lambda: posenc.attention(x, x, x, heads=2, is_causal=True), "attention", "is_causal", "causal"),
        (lambda: posenc.attention(x, x, x, head=2), "attention", "head", "heads"),
        (lambda: posenc.attention(x, x, x, heads=2, return_lses=True), "attention", "return_lses", "return_lse"),
        (lambda: r.rotate(x, positon=None), "Rope.rotate", "positon", "positions"),
        (lambda: r.cos_sin(position=[1]), "Rope.cos_sin", "position", "positions"),
        (lambda: s.add_to(x, positons=None), "Sinusoidal.add_to", "positons", "positions"),
        (lambda: s.table([1], dtpye="float64"), "Sinusoidal.table", "dtpye", "dtype"),
        (lambda: a.bias(0, 1, kpo=2), "Alibi.bias", "kpo", "kpos"),
        (lambda: t.bias_tile(0, [1], [2], dtyp="float64"), "T5Bias.bias_tile", "dtyp", "dtype"),
        (lambda: posenc.Rope(head_dim=64, bas=1e4), "Rope", "bas", "base"),
        (lambda: posenc.T5Bias(np.ones((32, 2)), max_dist=64), "T5Bias", "max_dist", "max_distance"),
        (lambda: posenc.YarnScaling(factr=2.0), "YarnScaling", "factr", "factor"),
    ]
    for call, where, wrong, right in cases:
        short_type_error(call, f"posenc.{where}() got an unexpected keyword argument '{wrong}' "
                               f"(did you mean '{right}'?)")


def test_unknown_keyword_without_a_close_match(x):
    short_type_error(lambda: posenc.attention(x, x, x, heads=2, banana=1),
                     "posenc.attention() got an unexpected keyword argument 'banana'")


def test_wrong_number_of_arguments(x):
    r = posenc.Rope(head_dim=D)
    short_type_error(lambda: posenc.attention(x, x, x, None, None, None, 2),
                     "posenc.attention() takes from 3 to 6 positional arguments but 7 were given")
    short_type_error(lambda: posenc.attention(x, x), "posenc.attention() missing required argument 'v'")
    short_type_error(lambda: posenc.attention(x, x, x, None, qpos=None, heads=2),
                     "posenc.attention() got multiple values for argument 'qpos'")
    short_type_error(lambda: r.rotate(x, None, None),
                     "posenc.Rope.rotate() takes from 1 to 2 positional arguments but 3 were given")
    short_type_error(lambda: r.rotate(), "posenc.Rope.rotate() missing required argument 'x'")
    short_type_error(lambda: r.cos_sin(), "posenc.Rope.cos_sin() missing required argument 'positions'")
    short_type_error(lambda: posenc.Alibi(num_heads=2).bias(0, 1),
                     "posenc.Alibi.bias() missing required argument 'kpos'")
    short_type_error(lambda: posenc.Rope(64), "posenc.Rope() takes no positional arguments but 1 was given")
    short_type_error(lambda: posenc.ShawRelative(np.ones((3, D))),
                     "posenc.ShawRelative() missing required argument 'value_table'")
    short_type_error(lambda: posenc.LongRopeScaling(short_factor=[1.0]),
                     "posenc.LongRopeScaling() missing required keyword argument 'long_factor'")


def test_wrong_scalar_types_name_the_argument(x):
    short_type_error(lambda: posenc.attention(x, x, x, heads=2.0), "posenc.attention: heads must be an int, got float")
    short_type_error(lambda: posenc.attention(x, x, x, heads=2, scale="1"),
                     "posenc.attention: scale must be a float, got str")
    short_type_error(lambda: posenc.attention(x, x, x, heads=2, causal="yes"),
                     "posenc.attention: causal must be a bool, got str")
    short_type_error(lambda: posenc.attention(x, x, x, heads=2, window=3),
                     "posenc.attention: window must be a pair (left, right) of ints, -1 for unbounded, got int")
    short_type_error(lambda: posenc.Rope(head_dim=D, layout=1), "posenc.Rope: layout must be a str, got int")
    short_type_error(lambda: posenc.Rope(head_dim=D, rope_scaling=[("rope_type", "linear")]),
                     "posenc.Rope: rope_scaling must be a dict, got list")


def test_numpy_scalars_are_accepted(x):
    out = posenc.attention(x, x, x, heads=np.int64(2), causal=np.bool_(True), scale=np.float32(0.5),
                           window=(np.int32(3), -1))
    want = posenc.attention(x, x, x, heads=2, causal=True, scale=0.5, window=(3, -1))
    np.testing.assert_array_equal(out, want)


def overflow(call, message):
    with pytest.raises(OverflowError) as e:
        call()
    assert str(e.value) == message


def test_scalar_ints_past_int64_raise_overflow_error_naming_the_argument(x):
    a, t = posenc.Alibi(num_heads=2), posenc.T5Bias(np.ones((32, 2)))
    for kw in ("heads", "kv_heads", "q_tile", "k_tile"):
        overflow(lambda: posenc.attention(x, x, x, **{"heads": 2, kw: BIG}),
                 f"posenc.attention: {kw} = {BIG} does not fit in int64")
    overflow(lambda: posenc.attention(x, x, x, heads=2, window=(-1, -BIG)),
             f"posenc.attention: window[1] = {-BIG} does not fit in int64")
    overflow(lambda: posenc.attention(x, x, x, heads=2, window=[BIG, -1]),
             f"posenc.attention: window[0] = {BIG} does not fit in int64")
    overflow(lambda: posenc.attention(x, x, x, heads=2, threads=2**40),
             "posenc.attention: threads = 1099511627776 does not fit in int")
    overflow(lambda: a.bias(0, BIG, 0), f"posenc.Alibi.bias: qpos = {BIG} does not fit in int64")
    overflow(lambda: a.bias(BIG, 0, 0), f"posenc.Alibi.bias: head = {BIG} does not fit in int64")
    overflow(lambda: t.bias(0, 0, -BIG), f"posenc.T5Bias.bias: kpos = {-BIG} does not fit in int64")
    overflow(lambda: t.bias_tile(BIG, [0], [0]), f"posenc.T5Bias.bias_tile: head = {BIG} does not fit in int64")
    overflow(lambda: t.bucket(2**63), "posenc.T5Bias.bucket: relative = 9223372036854775808 does not fit in int64")
    overflow(lambda: posenc.Rope(head_dim=BIG), f"posenc.Rope: head_dim = {BIG} does not fit in int64")
    overflow(lambda: posenc.Sinusoidal(position_offset=BIG),
             f"posenc.Sinusoidal: position_offset = {BIG} does not fit in int64")
    overflow(lambda: posenc.Alibi(num_heads=BIG), f"posenc.Alibi: num_heads = {BIG} does not fit in int64")
    overflow(lambda: posenc.T5Bias(np.ones((32, 2)), max_distance=BIG),
             f"posenc.T5Bias: max_distance = {BIG} does not fit in int64")
    overflow(lambda: posenc.YarnScaling(original_max_position=BIG),
             f"posenc.YarnScaling: original_max_position = {BIG} does not fit in int64")
    overflow(lambda: posenc.Rope(head_dim=D, rope_scaling={"rope_type": "linear", "factor": 2.0,
                                                            "original_max_position_embeddings": BIG}),
             f"posenc.Rope: rope_scaling['original_max_position_embeddings'] = {BIG} does not fit in int64")
    overflow(lambda: posenc.Rope(head_dim=D, base=10**400),
             "posenc.Rope: base = 10000000000000000000...0000000000 (401 digits) does not fit in float64")


def test_int64_extremes_that_fit_are_accepted():
    a = posenc.Alibi(num_heads=2, form="symmetric")
    assert a.bias(1, 2**63 - 1, 2**63 - 5) == -a.slopes[1] * 4
    assert posenc.T5Bias(np.ones((32, 1))).bucket(-2**63) == posenc.T5Bias(np.ones((32, 1))).bucket(-10**12)


def test_a_shape_bug_past_the_modules_checks_raises_precondition_error():
    """Alibi.bias does not check its head index itself: the library's check throws
    posenc::precondition_error, which arrives as posenc.PreconditionError, a ValueError."""
    with pytest.raises(posenc.PreconditionError) as e:
        posenc.Alibi(num_heads=8, head_offset=4).bias(4, 0, 1)
    assert isinstance(e.value, ValueError)
    assert str(e.value) == ("posenc: alibi: local head 4 is outside the encoder's heads (head_offset = 4, "
                            "num_heads = 8)")
    with pytest.raises(posenc.PreconditionError, match=r"^posenc: t5_relative_bias: local head -1 is outside"):
        posenc.T5Bias(np.ones((32, 2))).bias(-1, 0, 1)


def test_signatures_are_the_python_ones():
    assert str(inspect.signature(posenc.attention)) == (
        "(q, k, v, qpos=None, kpos=None, encoding=None, *, heads=None, kv_heads=None, layout=None, scale=None, "
        "softcap=0.0, sinks=None, causal=False, window=(-1, -1), chunk_size=None, return_lse=False, out=None, threads=0, "
        "q_tile=0, k_tile=0, bf16_qk=False)")
    assert str(inspect.signature(posenc.attention_varlen)) == (
        "(q, k, v, cu_q, cu_k, qpos=None, kpos=None, encoding=None, *, heads=None, kv_heads=None, scale=None, "
        "softcap=0.0, sinks=None, causal=False, window=(-1, -1), chunk_size=None, return_lse=False, out=None, "
        "threads=0, q_tile=0, k_tile=0, bf16_qk=False)")
    assert str(inspect.signature(posenc.paged_attention)).startswith(
        "(q, k_cache, v_cache, block_table, lengths, cu_q, qpos, encoding=None, *, page_size=None, keys=None, "
        "positions=None, heads=None,")
    assert str(inspect.signature(posenc.paged_append)) == (
        "(k_cache, v_cache, block_table, lengths, k_new, v_new, cu_new, encoding=None, *, page_size=None, "
        "keys=None, positions=None)")
    assert str(inspect.signature(posenc.Rope.rotate)) == "(self, x, positions=None, *, layout=None)"
    assert str(inspect.signature(posenc.Rope(head_dim=D).rotate)) == "(x, positions=None, *, layout=None)"
    assert str(inspect.signature(posenc.Sinusoidal.table)) == "(self, positions, dtype='float32')"
    assert str(inspect.signature(posenc.Alibi.bias_tile)) == "(self, head, qpos, kpos, dtype='float32')"
    assert str(inspect.signature(posenc.T5Bias)) == "(table, *, max_distance=128, bidirectional=True, head_offset=0)"
    assert str(inspect.signature(posenc.Rope)).startswith("(*, head_dim=128, rotary_dim=0, base=10000.0,")
    assert posenc.Rope.rotate.__doc__.startswith("Rotates every head of x")
    assert str(inspect.signature(posenc.MRope)).startswith("(*, head_dim=128, mrope_section, rotary_dim=0,")
    assert str(inspect.signature(posenc.layer_encoding)) == "(config, layer)"


def test_encoders_are_immutable_so_copies_are_the_objects_themselves():
    """copy.copy and copy.deepcopy (of a model holding an encoder: EMA copies, torch.nn.Module clones) work and
    return the encoder itself; attributes cannot be assigned."""
    import copy

    encoders = [posenc.Rope(head_dim=8), posenc.Alibi(num_heads=4), posenc.Sinusoidal(dim=8),
                posenc.T5Bias(np.zeros((8, 2)), max_distance=16),
                posenc.ShawRelative(np.zeros((5, 8)), np.zeros((5, 8))), posenc.YarnScaling(factor=4.0)]
    held = {"layers": [{"enc": e} for e in encoders]}
    cloned = copy.deepcopy(held)
    assert cloned is not held and cloned["layers"][0] is not held["layers"][0]
    for e, c in zip(encoders, cloned["layers"]):
        assert c["enc"] is e
        assert copy.copy(e) is e
    with pytest.raises(AttributeError):
        encoders[0].head_dim = 16
