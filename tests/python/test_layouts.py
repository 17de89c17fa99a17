"""Layouts without copies: posenc.attention and Rope.rotate on [tokens, heads * d], [tokens, heads, d],
[heads, tokens, d] and the batched [batch, heads, tokens, d] / [batch, tokens, heads, d], contiguous, as
views of another arrangement (a transpose) and as slices of a fused QKV projection, against the naive
float64 reference of torch_reference.py applied to each sequence of the batch. Outputs keep the
input's layout and are written in place (checked through the caller's buffer and data pointers)."""

import numpy as np
import pytest

from conftest import assert_close

torch = pytest.importorskip("torch", reason="python3-torch is not installed: the layout tests use torch tensors")
import torch_reference as ref  # noqa: E402

import posenc  # noqa: E402

D, H, HK, B, N = 16, 4, 2, 3, 11

# The logical axes of each layout, as a permutation of (batch, heads, tokens, d); None: no batch axis.
AXES = {"flat": None, "thd": (2, 1, 3), "htd": (1, 2, 3), "bhtd": (0, 1, 2, 3), "bthd": (0, 2, 1, 3)}
LAYOUT_ARG = {"flat": None, "thd": None, "htd": "htd", "bhtd": None, "bthd": "bthd"}


def in_layout(x, layout, arrangement):
    """The logical tensor x [B, heads, N, D] (float64) as an array in `layout`, stored `arrangement`-wise:
    'contiguous' (C-contiguous in the layout), 'transposed' (a strided view of a tensor contiguous in the
    other token/head order, as q.view(b, t, h, d).transpose(1, 2) gives), or 'fused' (a strided view of the
    first heads*D columns of a wider [B, N, 3 heads * D] buffer, as a fused QKV projection gives).
    Returns (array, backing tensor)."""
    b, heads = x.shape[0], x.shape[1]
    if layout in ("flat", "thd", "htd"):
        assert b == 1
    if arrangement == "fused":
        backing = torch.full((b, N, 3 * heads * D), float("nan"), dtype=x.dtype)
        backing[..., :heads * D] = x.permute(0, 2, 1, 3).reshape(b, N, heads * D)
        bthd = backing[..., :heads * D].unflatten(2, (heads, D))  # [B, N, heads, D], rows 3 heads * D apart
    elif arrangement == "transposed":
        # Stored in the other order of tokens and heads than the layout names.
        head_major = layout in ("htd", "bhtd")
        backing = (x.permute(0, 2, 1, 3) if head_major else x).contiguous().clone()
        bthd = backing if head_major else backing.permute(0, 2, 1, 3)
    else:
        backing = None
        bthd = None
    if bthd is None:
        if layout == "flat":
            arr = x[0].permute(1, 0, 2).reshape(N, heads * D).contiguous()
        else:
            arr = x.permute(AXES[layout]).contiguous() if layout in ("bhtd", "bthd") else \
                x[0].permute(*[a - 1 for a in AXES[layout]]).contiguous()
        return arr, arr
    # bthd is a [B, N, heads, D] view; take the layout from it without copying.
    if layout == "flat":
        arr = bthd[0].flatten(1) if arrangement == "fused" else None
        if arr is None:
            pytest.skip("a transposed [tokens, heads * d] is not a 2-D view")
    elif layout == "thd":
        arr = bthd[0]
    elif layout == "htd":
        arr = bthd[0].transpose(0, 1)
    elif layout == "bthd":
        arr = bthd
    else:
        arr = bthd.transpose(1, 2)
    return arr, backing


def logical(arr, layout, heads):
    """The array in `layout` back as [B, heads, N, D] float64."""
    t = torch.as_tensor(np.asarray(arr.double() if torch.is_tensor(arr) else arr, dtype=np.float64))
    if layout == "flat":
        return t.reshape(N, heads, D).permute(1, 0, 2)[None]
    if layout == "thd":
        return t.permute(1, 0, 2)[None]
    if layout == "htd":
        return t[None]
    if layout == "bthd":
        return t.permute(0, 2, 1, 3)
    return t


def reference(q, k, v, qpos, kpos, bias=None, causal=True, sinks=None):
    """Every sequence of the batch alone, from [B, heads, N, D] float64 tensors: (out [B, H, N, D], lse [B, H, N])."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        flat = lambda t: t[b].permute(1, 0, 2).reshape(t.shape[2], -1)  # noqa: E731
        o, lse = ref.attention(flat(q), flat(k), flat(v), q.shape[1], k.shape[1], qpos, kpos, bias=bias,
                               causal=causal, sinks=sinks)
        outs.append(o.reshape(q.shape[2], q.shape[1], D).permute(1, 0, 2))
        lses.append(lse.transpose(0, 1))
    return torch.stack(outs), torch.stack(lses)


def random_qkv(batch, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(batch, HK, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(batch, HK, N, D, generator=g, dtype=torch.float64)
    # Rounded to the storage type first: the reference then sees the values posenc sees.
    return tuple(t.to(dtype).double() for t in (q, k, v))


def encoding_case(name, qpos, kpos):
    """(posenc encoding, reference bias [H, n_q, n_kv] or None, a function rotating a flat [n, h * D] array)."""
    if name == "none":
        return None, None
    if name == "alibi":  # heads 4..7 of 8: slopes by global head
        slopes = ref.alibi_slopes(8)[4:]
        return posenc.Alibi(num_heads=8, head_offset=4), ref.alibi_bias(slopes, qpos, kpos)
    if name == "t5":  # heads 2..5 of a 6-head table
        table = np.random.default_rng(3).standard_normal((32, 6))
        bias = ref.t5_bias(table[:, 2:], qpos, kpos, 32, 128, True)
        return posenc.T5Bias(table, head_offset=2), bias
    raise AssertionError(name)


CASES = [(layout, arrangement) for layout in AXES for arrangement in ("contiguous", "transposed", "fused")
         if not (layout == "flat" and arrangement == "transposed")]


@pytest.mark.parametrize("encoding", ["none", "alibi", "t5", "rope"])
@pytest.mark.parametrize("layout,arrangement", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_attention_in_every_layout_against_the_reference(layout, arrangement, encoding):
    batch = B if layout in ("bhtd", "bthd") else 1
    q, k, v = random_qkv(batch, seed=sum(map(ord, layout + arrangement + encoding)))
    qpos, kpos = np.arange(5, 5 + N), np.arange(5, 5 + N)
    qa, _ = in_layout(q.float(), layout, arrangement)
    ka, _ = in_layout(k.float(), layout, arrangement)
    va, _ = in_layout(v.float(), layout, arrangement)
    kwargs = dict(layout=LAYOUT_ARG[layout], causal=True, return_lse=True)
    if layout == "flat":
        kwargs.update(heads=H, kv_heads=HK)
    if encoding == "rope":
        rope = posenc.Rope(head_dim=D)
        inv = ref.plain_inv_freq(D, 10000.0)
        rot = lambda t: torch.stack([  # noqa: E731
            ref.rope_rotate(t[b].permute(1, 0, 2).reshape(N, -1), qpos, D, inv).reshape(N, -1, D).permute(1, 0, 2)
            for b in range(t.shape[0])])
        want, want_lse = reference(rot(q.float().double()), rot(k.float().double()), v.float().double(), qpos, kpos)
        out, lse = posenc.attention(qa, ka, va, qpos, kpos, rope, **kwargs)
    else:
        enc, bias = encoding_case(encoding, qpos, kpos)
        want, want_lse = reference(q.float().double(), k.float().double(), v.float().double(), qpos, kpos, bias)
        out, lse = posenc.attention(qa, ka, va, qpos, kpos, enc, **kwargs)
    assert torch.is_tensor(out) and out.shape == qa.shape and out.dtype == torch.float32
    assert_close(logical(out, layout, H).numpy(), want.numpy(), np.float32, f"{layout}/{arrangement} out")
    # lse: q's layout without head_dim.
    lse_shape = {"flat": (N, H), "thd": (N, H), "htd": (H, N), "bhtd": (batch, H, N), "bthd": (batch, N, H)}
    assert tuple(lse.shape) == lse_shape[layout]
    got_lse = {"flat": lambda t: t.T[None], "thd": lambda t: t.T[None], "htd": lambda t: t[None],
               "bhtd": lambda t: t, "bthd": lambda t: t.transpose(1, 2)}[layout](lse)
    assert_close(got_lse.numpy(), want_lse.numpy(), np.float32, f"{layout}/{arrangement} lse")


@pytest.mark.parametrize("layout", ["htd", "bhtd", "bthd", "thd"])
def test_out_is_written_in_place_through_a_strided_view(layout):
    """out= a non-contiguous view of a bigger buffer (the q slot of a fused buffer): the call returns that
    very object, writes exactly the view's elements (the rest of the buffer keeps its NaN) and keeps its
    data pointer."""
    batch = B if layout in ("bhtd", "bthd") else 1
    q, k, v = random_qkv(batch, seed=7)
    qa, ka, va = (in_layout(t.float(), layout, "transposed")[0] for t in (q, k, v))
    out, backing = in_layout(torch.full_like(q, float("nan")).float(), layout, "fused")
    pointer = out.data_ptr()
    got = posenc.attention(qa, ka, va, layout=LAYOUT_ARG[layout], causal=True, out=out)
    assert got is out and out.data_ptr() == pointer
    want, _ = reference(q.float().double(), k.float().double(), v.float().double(), np.arange(N), np.arange(N))
    assert_close(logical(out, layout, H).numpy(), want.numpy(), np.float32, f"{layout} out=")
    assert torch.isnan(backing[..., H * D:]).all(), "elements outside the view were written"
    assert not torch.isnan(backing[..., :H * D]).any()


def test_new_outputs_are_new_tensors_in_qs_layout():
    q, k, v = random_qkv(B, seed=8)
    qa, ka, va = (in_layout(t.float(), "bhtd", "transposed")[0] for t in (q, k, v))
    out = posenc.attention(qa, ka, va)
    assert out.shape == qa.shape and out.is_contiguous() and out.data_ptr() not in (qa.data_ptr(), ka.data_ptr())


@pytest.mark.parametrize("layout,arrangement", [("bhtd", "transposed"), ("bhtd", "fused"), ("htd", "fused"),
                                                ("bthd", "fused"), ("thd", "transposed"), ("flat", "fused")])
def test_rotate_in_place_in_every_layout(layout, arrangement):
    """Rope.rotate writes through the caller's view: the fused buffer changes in the view's elements only."""
    batch = B if layout in ("bhtd", "bthd") else 1
    q = random_qkv(batch, seed=9)[0]
    x, backing = in_layout(q, layout, arrangement)
    before = backing.clone()
    pointer = x.data_ptr()
    pos = np.arange(100, 100 + N)
    posenc.Rope(head_dim=D).rotate(x, pos, layout=LAYOUT_ARG[layout])
    assert x.data_ptr() == pointer
    inv = ref.plain_inv_freq(D, 10000.0)
    for b in range(batch):
        want = ref.rope_rotate(q[b].permute(1, 0, 2).reshape(N, -1), pos, D, inv).reshape(N, H, D).permute(1, 0, 2)
        assert_close(logical(x, layout, H)[b].numpy(), want.numpy(), np.float64, f"{layout} rotate, batch {b}")
    if arrangement == "fused":
        assert torch.equal(backing[..., H * D:].isnan(), before[..., H * D:].isnan())
        assert torch.isnan(backing[..., H * D:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["bhtd", "htd"])
def test_half_and_double_storage_in_head_major_layouts(dtype, layout):
    """float16 and bfloat16 are storage, computed in float32 and rounded once; float64 stays float64."""
    batch = B if layout == "bhtd" else 1
    q, k, v = random_qkv(batch, dtype, seed=10)
    qa, ka, va = (in_layout(t.to(dtype), layout, "transposed")[0] for t in (q, k, v))
    out, lse = posenc.attention(qa, ka, va, layout=LAYOUT_ARG[layout], causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want, want_lse = reference(q, k, v, np.arange(N), np.arange(N))
    got = logical(out, layout, H)
    if dtype == torch.bfloat16:
        err = (got - want).abs() / want.abs().clamp(min=1.0)
        assert err.max() <= 2 * 2.0 ** -7, f"bfloat16 out: worst relative error {err.max():.3g}"
    else:
        assert_close(got.numpy(), want.numpy(), np.float16 if dtype == torch.float16 else np.float64, "out")
    # NumPy float16 in the same layout takes the same path.
    if dtype == torch.float16:
        qn, kn, vn = (np.asarray(t.numpy()) for t in (qa, ka, va))
        outn = posenc.attention(qn, kn, vn, layout=LAYOUT_ARG[layout], causal=True)
        assert outn.dtype == np.float16
        np.testing.assert_array_equal(outn, out.numpy())


def test_numpy_views_in_head_major_layouts(rng):
    """NumPy arrays (and their transposes, views of other arrays) work the same as tensors."""
    q = rng.standard_normal((N, H, D)).astype(np.float32)
    k = rng.standard_normal((N, HK, D)).astype(np.float32)
    v = rng.standard_normal((N, HK, D)).astype(np.float32)
    out_htd = posenc.attention(q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2), layout="htd",
                               causal=True)
    assert out_htd.shape == (H, N, D)
    want, _ = ref.attention(q.reshape(N, -1), k.reshape(N, -1), v.reshape(N, -1), H, HK, np.arange(N),
                            np.arange(N), causal=True)
    assert_close(out_htd.transpose(1, 0, 2).reshape(N, -1), want.numpy(), np.float32, "numpy htd")


def test_expanded_kv_heads_are_read_in_place():
    """k and v broadcast over the query heads (torch's expand, stride 0) are read as they are."""
    q, k, v = random_qkv(B, seed=11)
    k1, v1 = k[:, :1], v[:, :1]  # one kv head (MQA), expanded to H
    out = posenc.attention(q, k1.expand(B, H, N, D), v1.expand(B, H, N, D), causal=True)
    want, _ = reference(q, k1, v1, np.arange(N), np.arange(N))
    assert_close(out.numpy(), want.numpy(), np.float64, "expanded k, v")


def test_sinks_and_window_per_head():
    q, k, v = random_qkv(2, seed=12)
    sinks = [0.5, -1.0, 2.0, 0.0]
    out = posenc.attention(q, k, v, sinks=sinks, window=(3, 0), causal=True)
    qp = np.arange(N)
    for b in range(2):
        flat = lambda t: t[b].permute(1, 0, 2).reshape(N, -1)  # noqa: E731
        want, _ = ref.attention(flat(q), flat(k), flat(v), H, HK, qp, qp, causal=True, window=(3, 0), sinks=sinks)
        assert_close(out[b].permute(1, 0, 2).reshape(N, -1).numpy(), want.numpy(), np.float64, f"sinks, batch {b}")


def error(exc, message, *args, **kwargs):
    with pytest.raises(exc) as e:
        posenc.attention(*args, **kwargs)
    assert str(e.value) == "posenc.attention: " + message, str(e.value)


def test_bad_layouts_are_named():
    q4 = torch.zeros(2, H, N, D)
    k4 = torch.zeros(2, HK, N, D)
    error(ValueError, "layout = 'bhtd' is [batch, heads, tokens, head_dim] (4-D) but q has shape (4, 11, 16)",
          q4[0], k4[0], k4[0], layout="bhtd")
    error(ValueError, "layout = 'hdt': must be one of 'thd', 'htd', 'bhtd', 'bthd'", q4, k4, k4, layout="hdt")
    error(ValueError, "k has shape (3, 2, 11, 16): batch 3 but q has batch 2", q4, torch.zeros(3, HK, N, D),
          torch.zeros(3, HK, N, D))
    error(ValueError, "k has head_dim 8 but q has head_dim 16", q4, torch.zeros(2, HK, N, 8), torch.zeros(2, HK, N, 8))
    error(ValueError, "k has shape (11, 32) but the call's layout is [batch, heads, tokens, head_dim] (4-D)",
          q4, torch.zeros(N, 2 * D), torch.zeros(N, 2 * D))
    error(ValueError, "q must be " + "2-D [tokens, heads * head_dim], 3-D with layout 'thd' [tokens, heads, head_dim] "
          "(default) or 'htd' [heads, tokens, head_dim], or 4-D with layout 'bhtd' [batch, heads, tokens, head_dim] "
          "(default) or 'bthd' [batch, tokens, heads, head_dim], got shape (11,)", torch.zeros(N), k4, k4)
    error(TypeError, "layout must be a str, got int", q4, k4, k4, layout=4)
    # head_dim not the unit-stride axis.
    bad = torch.zeros(2, H, D, N).transpose(2, 3)
    with pytest.raises(ValueError, match=r"^posenc\.attention: q with shape \(2, 4, 11, 16\) and strides "
                                         r"\(2816, 704, 4, 44\) is not laid out as rows of contiguous elements"):
        posenc.attention(bad, k4, k4)
    # An output whose elements share memory.
    with pytest.raises(ValueError, match=r"^posenc\.attention: out with shape \(2, 4, 11, 16\) and strides "
                                         r"\(0, 0, 64, 4\) has elements that share memory"):
        posenc.attention(q4, k4, k4, out=torch.zeros(N, D).expand(2, H, N, D))
    error(ValueError, "out has shape (2, 4, 11, 8) but q has shape (2, 4, 11, 16)", q4, k4, k4,
          out=torch.zeros(2, H, N, 8))
    # Rotation: the same names.
    with pytest.raises(ValueError, match=r"^posenc\.Rope\.rotate: layout = 'htd' is \[heads, tokens, head_dim\] "
                                         r"\(3-D\) but x has shape \(2, 4, 11, 16\)$"):
        posenc.Rope(head_dim=D).rotate(q4, layout="htd")
    with pytest.raises(ValueError, match=r"^posenc\.Rope\.rotate: x has head_dim 16 \(its last axis\) but the encoder "
                                         r"has head_dim 8$"):
        posenc.Rope(head_dim=8).rotate(q4)


def test_other_dtypes_and_devices_are_refused_in_new_layouts():
    q4 = torch.zeros(2, H, N, D)
    error(TypeError, "q must have dtype float16, bfloat16, float32 or float64, got int32",
          q4.int(), q4.int(), q4.int())
    error(TypeError, "q must have dtype float16, bfloat16, float32 or float64, got complex64",
          q4.to(torch.complex64), q4, q4)
    error(TypeError, "v has dtype bfloat16 but q has dtype float32; they must match", q4, q4, q4.bfloat16())
    from test_batch import FakeTensor  # a DLPack producer that claims another device
    fake = FakeTensor(np.zeros((N, D)), (2, 0))
    error(TypeError, "q is on cuda:0; posenc computes on the CPU: pass a CPU tensor (q.cpu())", fake, q4, q4,
          layout="bhtd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the device check is faked above)")
def test_a_cuda_tensor_in_a_batched_layout_is_refused():
    with pytest.raises(TypeError, match=r"q is on cuda:0"):
        posenc.attention(torch.zeros(2, H, N, D, device="cuda"), torch.zeros(2, H, N, D), torch.zeros(2, H, N, D))


@pytest.mark.parametrize("layout", ["bhtd", "htd"])
def test_threads_give_the_same_bits_head_by_head(layout):
    """Head-major arrays are attended one head per call, the calls spread over the pool: any `threads`
    gives the same bits."""
    batch = B if layout == "bhtd" else 1
    q, k, v = (t.float() if layout == "bhtd" else t.float()[0] for t in random_qkv(batch, seed=13))
    rope = posenc.Rope(head_dim=D)
    one = posenc.attention(q, k, v, encoding=rope, layout=LAYOUT_ARG[layout], causal=True, threads=1, q_tile=4)
    many = posenc.attention(q, k, v, encoding=rope, layout=LAYOUT_ARG[layout], causal=True, threads=0, q_tile=4)
    assert torch.equal(one, many)


def test_buffer_protocol_objects_in_batched_layouts(rng):
    """A memoryview (buffer protocol) of a 4-D array is taken in place like the array itself."""
    q = rng.standard_normal((2, H, N, D))
    k = rng.standard_normal((2, HK, N, D))
    out = np.full_like(q, np.nan)
    posenc.attention(memoryview(q), memoryview(k), memoryview(k), causal=True, out=memoryview(out))
    want, _ = reference(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(k), np.arange(N), np.arange(N))
    assert_close(out, want.numpy(), np.float64, "memoryview bhtd")


@pytest.mark.parametrize("q_shape,k_shape", [((2, H, 0, D), (2, HK, 5, D)), ((0, H, 3, D), (0, HK, 3, D)),
                                             ((2, H, 3, D), (2, HK, 0, D))], ids=["no-queries", "no-batch", "no-keys"])
def test_empty_batches_tokens_and_keys(q_shape, k_shape):
    """Nothing to attend gives empty results; queries with no key get zeros and lse -inf."""
    q, k = torch.randn(*q_shape), torch.randn(*k_shape)
    out, lse = posenc.attention(q, k, k, return_lse=True)
    assert out.shape == q.shape and lse.shape == q_shape[:3]
    assert torch.equal(out, torch.zeros(q_shape)) and bool((lse == float("-inf")).all())
