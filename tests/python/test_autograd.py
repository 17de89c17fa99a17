"""Training with posenc: posenc.attention_backward and posenc.torch.attention (a torch.autograd.Function
over the C++ forward and backward). torch.autograd.gradcheck in float64 for every encoder, mask, GQA shape
and arbitrary positions; float32 gradients against autograd through a plain PyTorch attention written here
from the formulas (float64); learned T5 and Shaw tables, sinks and ALiBi slopes; bad inputs."""

import inspect
import math
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import posenc  # noqa: E402
import posenc.torch as pt  # noqa: E402
from torch_reference import alibi_slopes, plain_inv_freq, t5_bucket, visible  # noqa: E402

f64 = torch.float64

# Arbitrary positions: gaps, a query block that does not start at 0, keys unsorted with a repeat.
QPOS = [3, 4, 7, 8, 12, 15]
KPOS = [0, 2, 3, 9, 5, 7, 8, 12, 13, 15, 3]
CHUNK = 4


# --- Reference: softmax attention in PyTorch, from the formulas, differentiable in every input -------------

def rotate_half_split(x, pos, base):
    """RoPE, half-split pairs (i, i + d/2) of x [n, heads, d]: (a cos - b sin, b cos + a sin), angle pos * inv_freq."""
    d = x.shape[-1]
    angle = torch.as_tensor(pos, dtype=f64)[:, None, None] * plain_inv_freq(d, base)[None, None, :]
    c, s = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def reference(q, k, v, qpos, kpos, enc=None, *, scale=None, softcap=0.0, sinks=None, causal=False,
              window=(-1, -1), chunk_size=None):
    """out [n_q, heads, d] of q [n_q, heads, d], k, v [n_kv, kv_heads, d]; query head h reads kv head
    h // (heads // kv_heads). enc: None, ("rope", base), ("alibi", slopes), ("t5", table, max_distance,
    bidirectional) or ("shaw", aK, aV). A row that sees no key (and has no sink) gives zeros."""
    n, heads, d = q.shape
    group = heads // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qp, kp = torch.tensor(qpos)[:, None], torch.tensor(kpos)[None, :]
    if enc is not None and enc[0] == "rope":
        q, k = rotate_half_split(q, qpos, enc[1]), rotate_half_split(k, kpos, enc[1])
    kh = k.transpose(0, 1).repeat_interleave(group, 0)  # [heads, n_kv, d]
    vh = v.transpose(0, 1).repeat_interleave(group, 0)
    qh = q.transpose(0, 1)
    s = qh @ kh.transpose(1, 2)
    rel = kp - qp  # kpos[j] - qpos[i]
    if enc is not None and enc[0] == "shaw":
        kk = (enc[1].shape[0] - 1) // 2
        r = rel.clamp(-kk, kk) + kk
        s = s + torch.einsum("hid,ijd->hij", qh, enc[1][r])
    s = s * scale
    if enc is not None and enc[0] == "alibi":
        s = s - enc[1][:, None, None] * (qp - kp).to(q.dtype)[None]
    if enc is not None and enc[0] == "t5":
        b = t5_bucket(rel, enc[1].shape[0], enc[2], enc[3])
        s = s + enc[1][b].permute(2, 0, 1)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible(qp, kp, causal, window, chunk_size)[None], -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[:, None, None].expand(heads, n, 1)], -1)
    dead = torch.isinf(s).all(-1, keepdim=True)  # no visible key and no sink: zeros, not NaN
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if sinks is not None:
        p = p[..., :-1]
    out = p @ vh
    if enc is not None and enc[0] == "shaw":
        kk = (enc[2].shape[0] - 1) // 2
        out = out + torch.einsum("hij,ijd->hid", p, enc[2][rel.clamp(-kk, kk) + kk])
    return out.transpose(0, 1)


def inputs(heads, kv_heads, d, dtype, seed=0, n=len(QPOS), n_kv=len(KPOS)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, h, d, generator=g, dtype=dtype).requires_grad_() for m, h in
            ((n, heads), (n_kv, kv_heads), (n_kv, kv_heads))]


def t5_module(heads, dtype, seed=1):
    m = pt.T5Bias(heads, 16, max_distance=12, bidirectional=True, dtype=dtype)
    with torch.no_grad():
        m.table.copy_(torch.randn(16, heads, generator=torch.Generator().manual_seed(seed), dtype=dtype))
    return m


def shaw_module(d, dtype, seed=2):
    m = pt.ShawRelative(d, 3, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.key_table.copy_(0.5 * torch.randn(7, d, generator=g, dtype=dtype))
        m.value_table.copy_(torch.randn(7, d, generator=g, dtype=dtype))
    return m


ENCODERS = ["none", "rope", "alibi", "alibi_learned", "t5", "shaw"]
MASKS = {"full": {}, "causal": {"causal": True}, "window": {"window": (3, 2)}, "chunk": {"chunk_size": CHUNK},
         "causal_window_softcap": {"causal": True, "window": (6, -1), "softcap": 2.5}}


def encoders(name, heads, d, dtype):
    """(the encoding for posenc.torch.attention, its learned tables)."""
    if name == "none":
        return None, []
    if name == "rope":
        return posenc.Rope(head_dim=d, base=100.0), []
    if name == "alibi":
        return posenc.Alibi(num_heads=heads), []
    if name == "alibi_learned":
        m = pt.Alibi(heads, dtype=dtype)
        with torch.no_grad():
            m.slopes.mul_(torch.linspace(0.5, 2.0, heads, dtype=dtype))  # away from the rule, as training moves them
        return m, [m.slopes]
    if name == "t5":
        m = t5_module(heads, dtype)
        return m, [m.table]
    m = shaw_module(d, dtype)
    return m, [m.key_table, m.value_table]


def spec(name, heads, tables):
    """The reference's encoder with these tables (float64 leaves of their own)."""
    return {"none": None, "rope": ("rope", 100.0), "alibi": ("alibi", alibi_slopes(heads)),
            "alibi_learned": ("alibi", *tables),
            "t5": ("t5", *tables, 12, True), "shaw": ("shaw", *tables)}[name]


# --- gradcheck: the backward against finite differences of the forward, float64 --------------------------

@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name", ENCODERS)
def test_gradcheck_every_encoder_and_mask(name, mask):
    heads, kv_heads, d = 4, 2, 4
    q, k, v = inputs(heads, kv_heads, d, f64)
    enc, tables = encoders(name, heads, d, f64)

    def f(q, k, v, *tabs):
        return pt.attention(q, k, v, QPOS, KPOS, enc, **MASKS[mask])

    assert torch.autograd.gradcheck(f, (q, k, v, *tables), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (3, 3), (4, 1), (6, 2)], ids=["MHA1", "MHA3", "MQA", "GQA3"])
def test_gradcheck_gqa_shapes_and_2d_layout(heads, kv_heads):
    d = 4
    q, k, v = inputs(heads, kv_heads, d, f64, seed=heads)
    flat = [t.detach().reshape(t.shape[0], -1).requires_grad_() for t in (q, k, v)]
    rope = posenc.Rope(head_dim=d, base=50.0)

    def f(q, k, v):
        return pt.attention(q, k, v, QPOS, KPOS, rope, heads=heads, kv_heads=kv_heads, causal=True)

    assert torch.autograd.gradcheck(f, tuple(flat), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_batch_of_sequences():
    """4-D [batch, tokens, heads, head_dim]: one forward call, a backward per sequence; the learned table's
    gradient sums the batch."""
    b, heads, kv_heads, d = 3, 2, 1, 4
    g = torch.Generator().manual_seed(9)
    q = torch.randn(b, len(QPOS), heads, d, generator=g, dtype=f64, requires_grad=True)
    k, v = (torch.randn(b, len(KPOS), kv_heads, d, generator=g, dtype=f64, requires_grad=True) for _ in range(2))
    t5 = t5_module(heads, f64)
    f = lambda q, k, v, table: pt.attention(q, k, v, QPOS, KPOS, t5, causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, t5.table), eps=1e-6, atol=1e-7, rtol=1e-6)
    # The same as one call per sequence.
    out = f(q, k, v, t5.table)
    w = torch.randn(out.shape, generator=g, dtype=f64)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, t5.table))
    parts = [torch.autograd.grad((f(q[i], k[i], v[i], t5.table) * w[i]).sum(), (q, k, v, t5.table)) for i in range(b)]
    for i, name in enumerate("q k v table".split()):
        assert torch.allclose(got[i], sum(p[i] for p in parts), rtol=1e-12, atol=1e-14), name


def test_gradcheck_mrope_text_positions():
    """An MRope with one position per token is its text RoPE: the same output and gradients as the Rope."""
    q, k, v = inputs(2, 1, 8, f64, seed=11)
    mrope, rope = posenc.MRope(head_dim=8, mrope_section=[2, 1, 1], base=100.0), posenc.Rope(head_dim=8, base=100.0)
    f = lambda q, k, v: pt.attention(q, k, v, QPOS, KPOS, mrope, causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-6)
    w = torch.randn(q.shape, dtype=f64)
    got = torch.autograd.grad((f(q, k, v) * w).sum(), (q, k, v))
    want = torch.autograd.grad((pt.attention(q, k, v, QPOS, KPOS, rope, causal=True) * w).sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_gradcheck_rope_defaults_and_self_attention_positions():
    """qpos and kpos left out (0..n-1), causal, RoPE with partial rotary dims."""
    q, k, v = inputs(2, 2, 8, f64, n=7, n_kv=7)
    rope = posenc.Rope(head_dim=8, rotary_dim=4)
    assert torch.autograd.gradcheck(lambda q, k, v: pt.attention(q, k, v, encoding=rope, causal=True), (q, k, v),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


# --- float32 gradients against autograd through the reference ------------------------------------------

def grads_of(out, inputs_, seed=5):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=f64)
    return torch.autograd.grad((out.double() * w).sum(), inputs_)


def assert_grads_close(got, want, what, rel=2e-5):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, what
        err = (a.double() - b).abs().max().item()
        bound = rel * max(b.abs().max().item(), 1.0)
        assert err <= bound, f"{what}: gradient {i}: max |diff| {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name", ENCODERS)
def test_float32_gradients_match_the_reference(name, mask):
    heads, kv_heads, d = 4, 2, 8
    q, k, v = inputs(heads, kv_heads, d, torch.float32, seed=3)
    enc, tables = encoders(name, heads, d, torch.float32)
    out = pt.attention(q, k, v, QPOS, KPOS, enc, **MASKS[mask])
    assert out.dtype == torch.float32 and out.shape == q.shape
    got = grads_of(out, [q, k, v, *tables])

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    tables64 = [t.detach().double().requires_grad_() for t in tables]
    ref = reference(q64, k64, v64, QPOS, KPOS, spec(name, heads, tables64), **MASKS[mask])
    assert (out.double() - ref).abs().max() < 1e-5
    want = grads_of(ref, [q64, k64, v64, *tables64])
    assert_grads_close(got, want, f"{name}/{mask}")


def test_learned_sinks_get_their_gradient():
    heads, kv_heads, d = 4, 2, 8
    q, k, v = inputs(heads, kv_heads, d, torch.float32, seed=4)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    out = pt.attention(q, k, v, QPOS, KPOS, causal=True, window=(4, -1), sinks=sinks)
    got = grads_of(out, [q, k, v, sinks])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s64 = sinks.detach().double().requires_grad_()
    ref = reference(q64, k64, v64, QPOS, KPOS, causal=True, window=(4, -1), sinks=s64)
    want = grads_of(ref, [q64, k64, v64, s64])
    assert_grads_close(got, want, "sinks")
    # Fixed sinks (a list) get none, and q, k, v the same gradients.
    out2 = pt.attention(q, k, v, QPOS, KPOS, causal=True, window=(4, -1), sinks=[0.5, -1.0, 2.0, 0.0])
    assert torch.equal(out, out2)
    assert_grads_close(grads_of(out2, [q, k, v]), want[:3], "fixed sinks")


def test_loss_backward_accumulates_into_parameters():
    """loss.backward() fills .grad of q's leaf, the T5 table and the sinks, and adds on a second call."""
    heads, d = 2, 4
    q, k, v = inputs(heads, heads, d, f64, seed=6)
    t5 = t5_module(heads, f64)
    sinks = torch.zeros(heads, dtype=f64, requires_grad=True)
    loss = pt.attention(q, k, v, QPOS, KPOS, t5, causal=True, sinks=sinks).square().sum()
    loss.backward()
    first = [t.grad.clone() for t in (q, k, v, t5.table, sinks)]
    assert all(g.abs().sum() > 0 for g in first)
    pt.attention(q, k, v, QPOS, KPOS, t5, causal=True, sinks=sinks).square().sum().backward()
    for t, g in zip((q, k, v, t5.table, sinks), first):
        assert torch.allclose(t.grad, 2 * g, rtol=1e-12, atol=0)


def test_strided_inputs_and_expanded_gradients():
    """Row slices of a fused projection are used in place; expanded k, v and a dout of stride 0 work."""
    heads, d, n = 2, 4, 6
    fused = torch.randn(n, 3 * heads * d, dtype=f64, requires_grad=True)
    q, k, v = fused[:, :heads * d], fused[:, heads * d:2 * heads * d], fused[:, 2 * heads * d:]
    out = pt.attention(q, k, v, heads=heads, causal=True)
    saved = out.grad_fn.saved_tensors  # q, k, v as the C++ code read them: the caller's memory, not copies
    assert [t.data_ptr() for t in saved[:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    out.sum().backward()  # dout: ones expanded, stride 0
    ref_in = fused.detach().clone().requires_grad_()
    qr, kr, vr = (ref_in[:, i * heads * d:(i + 1) * heads * d].reshape(n, heads, d) for i in range(3))
    reference(qr, kr, vr, list(range(n)), list(range(n)), causal=True).sum().backward()
    assert torch.allclose(fused.grad, ref_in.grad, rtol=1e-10, atol=1e-12)

    kv = torch.randn(n, 1, d, dtype=f64, requires_grad=True)
    q3 = torch.randn(n, heads, d, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q3, kv: pt.attention(q3, kv.expand(n, heads, d), kv.expand(n, heads, d)),
                                    (q3, kv), eps=1e-6, atol=1e-7, rtol=1e-6)
    transposed = torch.randn(heads, n, d, dtype=f64).transpose(0, 1)  # [n, heads, d], heads n * d apart: in place
    out = pt.attention(transposed, q3, q3)
    assert out.grad_fn.saved_tensors[0].data_ptr() == transposed.data_ptr()
    assert torch.allclose(out, pt.attention(transposed.contiguous(), q3, q3), rtol=0, atol=0)
    last_axis = torch.randn(n, d, heads, dtype=f64).transpose(1, 2)  # head_dim not contiguous: copied
    out = pt.attention(last_axis, q3, q3)
    assert out.grad_fn.saved_tensors[0].data_ptr() != last_axis.data_ptr()
    assert torch.allclose(out, pt.attention(last_axis.contiguous(), q3, q3), rtol=0, atol=0)


def test_attention_backward_writes_into_views():
    """dq=, dk=, dv= may be row slices of one tensor (a fused QKV gradient): written in place, the rest untouched."""
    heads, d, n = 2, 4, 6
    q, k, v = (t.detach().flatten(1) for t in inputs(heads, heads, d, f64, seed=10, n=n, n_kv=n))
    out, lse = posenc.attention(q, k, v, heads=heads, causal=True, return_lse=True)
    dout = torch.randn(out.shape, dtype=f64)
    fused = torch.full((n, 3 * heads * d + 1), 7.0, dtype=f64)
    views = [fused[:, i * heads * d:(i + 1) * heads * d] for i in range(3)]
    got = posenc.attention_backward(q, k, v, out, lse, dout, heads=heads, causal=True, dq=views[0], dk=views[1],
                                    dv=views[2])
    want = posenc.attention_backward(q, k, v, out, lse, dout, heads=heads, causal=True)
    for g, view, w in zip(got[:3], views, want[:3]):
        assert g is view and torch.equal(view, w)
    assert torch.equal(fused[:, -1], torch.full((n,), 7.0, dtype=f64))


def test_tiny_model_learns():
    """A few steps of Adam through posenc's attention with a learned T5 bias reduce the loss."""
    torch.manual_seed(0)
    n, heads, d = 16, 2, 8
    x = torch.randn(n, heads * d)
    target = torch.roll(x, 1, 0)  # each token's answer is its predecessor: the bias must learn "distance 1"
    proj = torch.nn.Linear(heads * d, 3 * heads * d)
    t5 = pt.T5Bias(heads, 16, max_distance=16, bidirectional=False)
    opt = torch.optim.Adam(list(proj.parameters()) + list(t5.parameters()), lr=0.05)
    losses = []
    for _ in range(40):
        q, k, v = proj(x).split(heads * d, 1)
        loss = (pt.attention(q, k, v, encoding=t5, heads=heads, causal=True) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- posenc.attention_backward on NumPy arrays ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_attention_backward_numpy_with_alibi_slopes(dtype):
    """The binding itself: NumPy in and out, 2-D layout, GQA, ALiBi with the gradient of its slopes."""
    heads, kv_heads, d = 4, 2, 8
    rng = np.random.default_rng(7)
    q = rng.standard_normal((len(QPOS), heads * d)).astype(dtype)
    k = rng.standard_normal((len(KPOS), kv_heads * d)).astype(dtype)
    v = rng.standard_normal((len(KPOS), kv_heads * d)).astype(dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    alibi = posenc.Alibi(num_heads=heads)
    out, lse = posenc.attention(q, k, v, QPOS, KPOS, alibi, heads=heads, kv_heads=kv_heads, causal=True,
                                return_lse=True)
    dq = np.full_like(q, np.nan)
    res = posenc.attention_backward(q, k, v, out, lse, dout, QPOS, KPOS, alibi, heads=heads, kv_heads=kv_heads,
                                    causal=True, dq=dq)
    assert len(res) == 4 and res[0] is dq and isinstance(res[1], np.ndarray) and res[1].dtype == dtype
    assert sorted(res[3]) == ["slopes"] and res[3]["slopes"].dtype == np.float64

    t = [torch.from_numpy(a.astype(np.float64)).reshape(a.shape[0], -1, d).requires_grad_() for a in (q, k, v)]
    slopes = alibi_slopes(heads).requires_grad_()
    ref = reference(*t, QPOS, KPOS, ("alibi", slopes), causal=True).reshape(len(QPOS), heads * d)
    want = torch.autograd.grad((ref * torch.from_numpy(dout.astype(np.float64))).sum(), t + [slopes])
    rel = 2e-5 if dtype == np.float32 else 1e-11
    assert_grads_close([torch.from_numpy(np.asarray(a)).reshape(w.shape) for a, w in zip(res[:3], want)], want[:3],
                       "numpy", rel)
    assert_grads_close([torch.from_numpy(res[3]["slopes"])], want[3:], "slopes", rel)
    assert posenc.attention_backward(q, k, v, out, lse, dout, QPOS, KPOS, alibi, heads=heads, kv_heads=kv_heads,
                                     causal=True, param_grads=False)[3] == {}


def test_attention_backward_same_bits_for_any_threads():
    q, k, v = (t.detach() for t in inputs(4, 2, 8, torch.float32, seed=8, n=40, n_kv=40))
    out, lse = posenc.attention(q, k, v, encoding=posenc.Rope(head_dim=8), causal=True, return_lse=True)
    dout = torch.randn(out.shape)
    one = posenc.attention_backward(q, k, v, out, lse, dout, encoding=posenc.Rope(head_dim=8), causal=True, threads=1)
    many = posenc.attention_backward(q, k, v, out, lse, dout, encoding=posenc.Rope(head_dim=8), causal=True)
    for a, b in zip(one[:3], many[:3]):
        assert isinstance(a, torch.Tensor) and torch.equal(a, b)


def test_alibi_with_given_slopes():
    """posenc.Alibi(slopes=...): the bias is -slopes[global head] * (qpos - kpos), whatever the slopes."""
    given = [0.75, -0.5, 2.0, 1e-3]
    a = posenc.Alibi(num_heads=4, head_offset=1, slopes=torch.tensor(given, dtype=f64))
    assert a.slopes.tolist() == given
    assert a.bias(2, 9, 2) == -1e-3 * 7 and a.bias(0, 2, 9) == -3.5  # global heads 3 and 1
    assert np.array_equal(posenc.Alibi(num_heads=4, form="symmetric", slopes=np.array(given)).bias_tile(
        1, [2, 9], [9, 2], dtype="float64"), [[3.5, 0.0], [0.0, 3.5]])
    assert posenc.Alibi(num_heads=12).slopes.tolist() == alibi_slopes(12).tolist()
    assert message(lambda: posenc.Alibi(num_heads=2, slopes=[1.0]), ValueError) == \
        "posenc: alibi slopes.size() = 1: must equal num_heads (2)"
    assert message(lambda: posenc.Alibi(num_heads=2, slopes=[1.0, math.inf]), ValueError) == \
        "posenc: alibi slopes[1] = inf: must be finite"
    assert message(lambda: posenc.Alibi(num_heads=2, slopes="12"), TypeError) == \
        "posenc.Alibi: slopes must be a list of floats or a 1-D float array, got str"


# --- Errors ------------------------------------------------------------------------------------------

def message(call, kind):
    with pytest.raises(kind) as e:
        call()
    return str(e.value)


def test_bad_inputs_of_attention_backward():
    q = np.zeros((5, 2, 4))
    out, lse = posenc.attention(q, q, q, return_lse=True)
    bw = posenc.attention_backward
    assert message(lambda: bw(q, q, q, out, lse, q.astype(np.float32)), TypeError) == \
        "posenc.attention_backward: dout has dtype float32 but q has dtype float64; they must match"
    h = q.astype(np.float16)
    assert "the backward computes in float32 or float64" in message(lambda: bw(h, h, h, h, lse, h), TypeError)
    q4 = q[None]
    assert message(lambda: bw(q4, q4, q4, q4, lse, q4), ValueError) == (
        "posenc.attention_backward: lse has shape (5, 2) but must be [1, 5, 2] (q's layout without head_dim, as "
        "attention(..., return_lse=True) returns it)")
    assert message(lambda: bw(q, q, q, out, lse[:4], q), ValueError) == (
        "posenc.attention_backward: lse has shape (4, 2) but must be [5, 2] (q's layout without head_dim, as "
        "attention(..., return_lse=True) returns it)")
    assert message(lambda: bw(q, q, q, out, lse, q[:4]), ValueError) == \
        "posenc.attention_backward: dout has shape (4, 2, 4) but q has shape (5, 2, 4)"
    assert message(lambda: bw(q, q, q, out, lse, q, dk=np.zeros((5, 2, 3))), ValueError) == \
        "posenc.attention_backward: dk has shape (5, 2, 3) but k has shape (5, 2, 4)"
    assert message(lambda: bw(q, q, q, out, lse, q, causl=True), TypeError) == \
        "posenc.attention_backward() got an unexpected keyword argument 'causl' (did you mean 'causal'?)"
    assert message(lambda: bw(q, q, q, out, lse), TypeError) == \
        "posenc.attention_backward() missing required argument 'dout'"
    assert "the Rope has head_dim 8 but q has head_dim 4" in \
        message(lambda: bw(q, q, q, out, lse, q, encoding=posenc.Rope(head_dim=8)), ValueError)


def test_bad_inputs_of_the_autograd_function():
    q = torch.zeros(5, 2, 4, requires_grad=True)
    assert message(lambda: pt.attention(q.detach().numpy(), q, q), TypeError) == \
        "posenc.torch.attention: q must be a torch.Tensor, got ndarray"
    assert message(lambda: pt.attention(q.half(), q.half(), q.half()), TypeError) == (
        "posenc.torch.attention: q has dtype float16; the backward computes in float32 or float64 "
        "(convert with q.float())")
    assert message(lambda: pt.attention(q, q.double(), q), TypeError) == \
        "posenc.torch.attention: k has dtype float64 but q has dtype float32; they must match"
    assert message(lambda: pt.attention(q, q[None], q), ValueError) == (
        "posenc.torch.attention: k has shape (1, 5, 2, 4) and q has shape (5, 2, 4): posenc.torch.attention takes "
        "2-D [tokens, heads * head_dim], 3-D [tokens, heads, head_dim] or 4-D [batch, tokens, heads, head_dim], q, "
        "k and v alike (layout='bhtd' or 'htd' for head-major tensors)")
    q5 = q[None, None]
    assert "q has shape (1, 1, 5, 2, 4): posenc.torch.attention takes" in \
        message(lambda: pt.attention(q5, q5, q5), ValueError)
    assert "Sinusoidal is an additive-input encoding" in \
        message(lambda: pt.attention(q, q, q, encoding=posenc.Sinusoidal(dim=8)), TypeError)
    assert message(lambda: pt.attention(q, q, q, encoding="rope"), TypeError).endswith(", got str")
    assert message(lambda: pt.attention(q, q, q, sinks=torch.zeros(2, 1)), ValueError) == \
        "posenc.torch.attention: sinks must be 1-D (one per head), got shape (2, 1)"
    assert message(lambda: pt.attention(q.flatten(1), q.flatten(1), q.flatten(1)), ValueError) == \
        "posenc.torch.attention: q is 2-D [tokens, heads * head_dim]: pass heads= (and kv_heads= for GQA/MQA)"
    with pytest.raises(ValueError):
        pt.T5Bias(2, 16, max_distance=4)  # max_distance <= max_exact


# --- The package ---------------------------------------------------------------------------------------

def test_posenc_imports_without_torch_and_loads_posenc_torch_on_use():
    code = ("import sys, posenc; assert 'torch' not in sys.modules; posenc.torch.attention; "
            "assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_posenc_torch_is_documented():
    def documented(doc):
        section = doc.split("Parameters\n", 1)[1] if "Parameters\n" in doc else ""
        return set(re.findall(r"^ *([A-Za-z_][A-Za-z_0-9]*) : ", section, flags=re.M))

    for obj in (pt.attention, pt.Alibi, pt.T5Bias, pt.ShawRelative):
        f = obj.__init__ if isinstance(obj, type) else obj
        want = {p for p in inspect.signature(f).parameters if p != "self"}
        assert documented(obj.__doc__) == want, obj.__name__
    assert sorted(pt.__all__) == ["Alibi", "ShawRelative", "T5Bias", "attention"]


@pytest.mark.parametrize("layout", ["bhtd", "bthd", "htd"])
def test_backward_takes_every_layout_in_place_like_one_call_per_sequence(layout):
    """The backward reads and writes [batch, heads, tokens, d] (and the other layouts) through their strides:
    the same gradients as 2-D calls per sequence, written into the given dq, dk, dv views."""
    rng = np.random.default_rng(5)
    b, h, hk, n, d = 2, 4, 2, 11, 8
    rope = posenc.Rope(head_dim=d)
    dense = {name: rng.standard_normal((b, n, heads, d)) for name, heads in
             (("q", h), ("k", hk), ("v", hk), ("dout", h))}   # [b, t, heads, d]

    def as_layout(x):   # a view in `layout` of the [b, t, heads, d] array (no copy)
        if layout == "bhtd":
            return x.transpose(0, 2, 1, 3)
        if layout == "htd":
            return x[0].transpose(1, 0, 2)
        return x
    nb = 1 if layout == "htd" else b
    q, k, v, dout = (as_layout(dense[x]) for x in ("q", "k", "v", "dout"))
    out, lse = posenc.attention(q, k, v, encoding=rope, causal=True, layout=layout, return_lse=True)
    dq, dk, dv = (np.full_like(x, 7.0) for x in (q, k, v))
    got = posenc.attention_backward(q, k, v, out, lse, dout, encoding=rope, causal=True, layout=layout,
                                    dq=dq, dk=dk, dv=dv)
    assert got[0] is dq and got[1] is dk and got[2] is dv
    to_rows = {"bhtd": lambda x, i: x[i].transpose(1, 0, 2).reshape(n, -1),
               "bthd": lambda x, i: x[i].reshape(n, -1),
               "htd": lambda x, i: x.transpose(1, 0, 2).reshape(n, -1)}[layout]
    for i in range(nb):
        rows = [np.ascontiguousarray(to_rows(x, i)) for x in (q, k, v, dout)]
        o1, l1 = posenc.attention(rows[0], rows[1], rows[2], encoding=rope, heads=h, kv_heads=hk, causal=True,
                                  return_lse=True)
        ref = posenc.attention_backward(rows[0], rows[1], rows[2], o1, l1, rows[3], encoding=rope, heads=h,
                                        kv_heads=hk, causal=True)
        for g, r in zip((dq, dk, dv), ref[:3]):
            np.testing.assert_array_equal(to_rows(g, i), r)


def test_torch_attention_on_head_major_tensors_needs_no_copy_and_matches_bthd():
    """posenc.torch.attention with layout='bhtd' on torch's [batch, heads, tokens, d] (a transposed projection):
    the same output and gradients as the same numbers in [batch, tokens, heads, d]."""
    torch.manual_seed(3)
    b, h, hk, n, d = 2, 4, 2, 9, 8
    base = {name: torch.randn(b, n, heads, d, dtype=torch.float64) for name, heads in (("q", h), ("k", hk), ("v", hk))}
    rope = posenc.Rope(head_dim=d)
    grads = {}
    for layout in ("bthd", "bhtd"):
        leaves = {x: t.clone().requires_grad_(True) for x, t in base.items()}
        view = {x: t.transpose(1, 2) if layout == "bhtd" else t for x, t in leaves.items()}  # no copy
        out = pt.attention(view["q"], view["k"], view["v"], encoding=rope, causal=True, layout=layout)
        (out if layout == "bthd" else out.transpose(1, 2)).pow(2).sum().backward()
        grads[layout] = (out if layout == "bthd" else out.transpose(1, 2)).detach(), \
            [leaves[x].grad for x in ("q", "k", "v")]
    torch.testing.assert_close(grads["bhtd"][0], grads["bthd"][0], rtol=0, atol=1e-12)
    for g1, g2 in zip(grads["bhtd"][1], grads["bthd"][1]):
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
