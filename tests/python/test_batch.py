"""The engine step from Python: attention_varlen, paged_attention and paged_append against per-sequence
float64 PyTorch references written from the formulas (torch_reference.attention: masks by positions, GQA,
softcap, sinks; RoPE half-split; ALiBi); torch tensors and buffers used in place; float16 and bfloat16
storage; devices other than the CPU refused; bad index arrays named with their sizes."""

import array
import ctypes
import math

import numpy as np
import pytest

from conftest import assert_close, tolerance

torch = pytest.importorskip("torch", reason="python3-torch is not installed: the batch references need it")
import torch_reference as ref  # noqa: E402

import posenc  # noqa: E402

D = 16
HEADS, KV_HEADS = 4, 2
INV_FREQ = ref.plain_inv_freq(D, 10000.0)


def i32(values):
    return np.asarray(values, dtype=np.int32)


def cumulative(counts):
    return i32(np.concatenate([[0], np.cumsum(counts)]))


def reference(q, k, v, qpos, kpos, encoding, **knobs):
    """One sequence: rotate q and k with their positions (RoPE, half-split) or build the ALiBi bias, then
    softmax attention in float64."""
    bias = None
    if encoding == "rope":
        q = ref.rope_rotate(q, qpos, D, INV_FREQ)
        k = ref.rope_rotate(k, kpos, D, INV_FREQ)
    elif encoding == "alibi":
        bias = ref.alibi_bias(ref.alibi_slopes(HEADS), qpos, kpos)
    out, lse = ref.attention(q, k, v, HEADS, KV_HEADS, qpos, kpos, bias, **knobs)
    return out.numpy(), lse.numpy()


def posenc_encoding(name):
    return {"none": None, "rope": posenc.Rope(head_dim=D), "alibi": posenc.Alibi(num_heads=HEADS)}[name]


# (queries, keys) per sequence: a prefill, a decode step against a long history, a prefill chunk after
# earlier chunks, a sequence with no queries this step, and one with queries but no keys.
BATCH = [(6, 6), (1, 19), (3, 11), (0, 5), (2, 0)]
KNOBS = {
    "plain": {},
    "window": {"window": (4, -1)},
    "softcap-sinks": {"softcap": 2.5, "sinks": [0.5, -1.0, 2.0, -math.inf]},
}


@pytest.mark.parametrize("encoding", ["none", "rope", "alibi"])
@pytest.mark.parametrize("knobs", list(KNOBS), ids=list(KNOBS))
def test_varlen_matches_one_reference_per_sequence(rng, dtype, encoding, knobs):
    kw = KNOBS[knobs]
    n_q = [a for a, _ in BATCH]
    n_k = [b for _, b in BATCH]
    q = rng.standard_normal((sum(n_q), HEADS * D)).astype(dtype)
    k = rng.standard_normal((sum(n_k), KV_HEADS * D)).astype(dtype)
    v = rng.standard_normal((sum(n_k), KV_HEADS * D)).astype(dtype)
    # Keys at 100 b + j; queries bottom-right aligned (the last n_q positions of the sequence, or past it).
    kpos = np.concatenate([100 * b + np.arange(n, dtype=np.int64) for b, n in enumerate(n_k)])
    qpos = np.concatenate([100 * b + max(nk - nq, 0) + np.arange(nq, dtype=np.int64)
                           for b, (nq, nk) in enumerate(BATCH)])
    cu_q, cu_k = cumulative(n_q), cumulative(n_k)
    out, lse = posenc.attention_varlen(q, k, v, cu_q, cu_k, qpos, kpos, posenc_encoding(encoding), heads=HEADS,
                                       kv_heads=KV_HEADS, causal=True, return_lse=True, q_tile=4, k_tile=8, **kw)
    assert out.dtype == dtype and lse.dtype == dtype and lse.shape == (sum(n_q), HEADS)
    sinks = None if "sinks" not in kw else np.asarray(kw["sinks"], dtype=np.float32)
    for b in range(len(BATCH)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want, want_lse = reference(q[qs], k[ks], v[ks], qpos[qs], kpos[ks], encoding, causal=True,
                                   window=kw.get("window", (-1, -1)), softcap=kw.get("softcap", 0.0), sinks=sinks)
        assert_close(out[qs], want, dtype, f"sequence {b} out")
        assert_close(lse[qs], want_lse, dtype, f"sequence {b} lse")
    # The sequence without keys: zeros, and lse = the sink (-inf without sinks).
    assert np.all(out[cu_q[4]:] == 0)
    assert np.all(lse[cu_q[4]:] == (-math.inf if sinks is None else sinks))


def test_sinks_and_softcap_on_attention(rng, dtype):
    n = 23
    q = rng.standard_normal((n, HEADS * D)).astype(dtype) * 3  # large logits: the cap matters
    k = rng.standard_normal((n, KV_HEADS * D)).astype(dtype) * 3
    v = rng.standard_normal((n, KV_HEADS * D)).astype(dtype)
    sinks = np.asarray([1.5, -0.5, 0.0, 3.0], dtype=np.float32)
    pos = np.arange(n, dtype=np.int64)
    out, lse = posenc.attention(q, k, v, heads=HEADS, kv_heads=KV_HEADS, causal=True, softcap=1.5, sinks=sinks,
                                return_lse=True)
    want, want_lse = reference(q, k, v, pos, pos, "none", causal=True, softcap=1.5, sinks=sinks)
    assert_close(out, want, dtype, "out")
    assert_close(lse, want_lse, dtype, "lse")
    plain, _ = reference(q, k, v, pos, pos, "none", causal=True)
    assert np.abs(plain - want).max() > 1e-2  # the knobs change the result: this test can fail
    with pytest.raises(ValueError, match=r"attention_params\.sinks size = 3: must be heads = 4"):
        posenc.attention(q, k, v, heads=HEADS, kv_heads=KV_HEADS, sinks=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"attention_params\.softcap = -1: must be finite and >= 0"):
        posenc.attention(q, k, v, heads=HEADS, kv_heads=KV_HEADS, softcap=-1)


def test_varlen_default_positions_number_each_sequence_from_zero(rng):
    n_q, n_k = [4, 1, 3], [4, 6, 3]
    q = rng.standard_normal((sum(n_q), HEADS * D))
    k = rng.standard_normal((sum(n_k), KV_HEADS * D))
    v = rng.standard_normal((sum(n_k), KV_HEADS * D))
    cu_q, cu_k = cumulative(n_q), cumulative(n_k)
    out = posenc.attention_varlen(q, k, v, cu_q, cu_k, heads=HEADS, kv_heads=KV_HEADS, causal=True)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want, _ = reference(q[qs], k[ks], v[ks], np.arange(n_q[b]), np.arange(n_k[b]), "none", causal=True)
        assert_close(out[qs], want, np.float64, f"sequence {b}")


# --- Paged caches ----------------------------------------------------------------------------------

PAGE = 4
UNUSED_PAGE = 1_000_000  # block-table entries past a sequence's length: never read


class Paged:
    """Sequences' keys and values scattered over the pages of a cache in shuffled order; every row that
    holds no token (free pages, the tail of a sequence's last page) is NaN."""

    def __init__(self, rng, capacity, num_pages, dtype):
        self.num_pages = num_pages
        pages_per_seq = max(math.ceil(c / PAGE) for c in capacity)
        free = list(rng.permutation(num_pages))
        self.table = np.full((len(capacity), pages_per_seq), UNUSED_PAGE, dtype=np.int32)
        for b, c in enumerate(capacity):
            for blk in range(math.ceil(c / PAGE)):
                self.table[b, blk] = free.pop()
        self.k = np.full((num_pages * PAGE, KV_HEADS * D), np.nan, dtype=dtype)
        self.v = self.k.copy()

    def row(self, b, j):
        return self.table[b, j // PAGE] * PAGE + j % PAGE

    def write(self, b, keys, values):
        for j in range(len(keys)):
            self.k[self.row(b, j)] = keys[j]
            self.v[self.row(b, j)] = values[j]

    def shaped(self, a, layout):
        return {"4d": a.reshape(self.num_pages, PAGE, KV_HEADS, D), "3d": a.reshape(self.num_pages, PAGE, -1),
                "2d": a}[layout]


@pytest.mark.parametrize("layout", ["4d", "3d", "2d"])
@pytest.mark.parametrize("encoding", ["none", "rope-raw", "rope-rotated", "alibi", "rope-raw-positions"])
def test_paged_attention_matches_one_reference_per_sequence(rng, dtype, layout, encoding):
    lengths = i32([13, 1, 8, 0, 4])
    n_q = [3, 1, 2, 1, 4]
    cache = Paged(rng, lengths, num_pages=12, dtype=dtype)
    keys = [rng.standard_normal((n, KV_HEADS * D)) for n in lengths]
    values = [rng.standard_normal((n, KV_HEADS * D)) for n in lengths]
    # Key positions: the token's index in its sequence, or (positions=) a position stored per cache row.
    row_pos = np.full(cache.k.shape[0], -7, dtype=np.int64)
    kpos = []
    for b, n in enumerate(lengths):
        p = np.arange(n, dtype=np.int64) + (50 * b if encoding.endswith("positions") else 0)
        kpos.append(p)
        row_pos[[cache.row(b, j) for j in range(n)]] = p
    stored = [ref.rope_rotate(kb, kp, D, INV_FREQ).numpy() if encoding == "rope-rotated" else kb
              for kb, kp in zip(keys, kpos)]
    for b in range(len(lengths)):
        cache.write(b, stored[b], values[b])
    q = rng.standard_normal((sum(n_q), HEADS * D)).astype(dtype)
    qpos = np.concatenate([kp[-1] + 1 - n + np.arange(n) if len(kp) >= n else np.arange(n)
                           for kp, n in zip(kpos, n_q)]).astype(np.int64)
    cu_q = cumulative(n_q)
    enc = posenc_encoding(encoding.split("-")[0])
    extra = {"keys": encoding.split("-")[1]} if encoding.startswith("rope") else {}
    if encoding.endswith("positions"):
        extra["positions"] = row_pos
    if layout == "2d":
        extra["page_size"] = PAGE
    out, lse = posenc.paged_attention(q, cache.shaped(cache.k, layout), cache.shaped(cache.v, layout), cache.table,
                                      lengths, cu_q, qpos, enc, heads=HEADS, causal=True, return_lse=True, **extra)
    assert not np.any(np.isnan(out)) and not np.any(np.isnan(lse))
    for b in range(len(lengths)):
        qs = slice(cu_q[b], cu_q[b + 1])
        # The reference attends the keys as given (unrotated) and rotates both sides itself.
        k_b, v_b = keys[b].astype(dtype), values[b].astype(dtype)
        want, want_lse = reference(q[qs], k_b, v_b, qpos[qs], kpos[b], encoding.split("-")[0], causal=True)
        tol = 4 * tolerance(np.float64) if dtype == np.float64 else 0.0  # rotated keys rounded once to the cache
        assert_close(out[qs], want, dtype, f"sequence {b} out", atol=tol)
        assert_close(lse[qs], want_lse, dtype, f"sequence {b} lse", atol=tol)


@pytest.mark.parametrize("container", ["numpy", "torch"])
@pytest.mark.parametrize("keys", ["rotated", "raw"])
def test_paged_append_then_attention_equals_the_reference(rng, container, keys):
    """Two engine steps: a prefill appended, then a decode/chunk step appended and attended."""
    dtype = np.float32
    step1, step2 = [5, 1, 7], [1, 3, 1]
    lengths1, lengths2 = i32(step1), i32(np.add(step1, step2))
    cache = Paged(rng, lengths2, num_pages=10, dtype=dtype)
    new_k = [rng.standard_normal((a + b, KV_HEADS * D)).astype(dtype) for a, b in zip(step1, step2)]
    new_v = [rng.standard_normal((a + b, KV_HEADS * D)).astype(dtype) for a, b in zip(step1, step2)]
    conv = (lambda a: torch.from_numpy(a)) if container == "torch" else (lambda a: a)
    kc, vc = conv(cache.shaped(cache.k, "4d")), conv(cache.shaped(cache.v, "4d"))
    table = conv(cache.table)
    rope = posenc.Rope(head_dim=D)
    for lengths, rows in ((lengths1, [slice(0, a) for a in step1]),
                          (lengths2, [slice(a, a + b) for a, b in zip(step1, step2)])):
        k_new = np.concatenate([kb[r] for kb, r in zip(new_k, rows)])
        v_new = np.concatenate([vb[r] for vb, r in zip(new_v, rows)])
        cu_new = cumulative([r.stop - r.start for r in rows])
        assert posenc.paged_append(kc, vc, table, conv(lengths), conv(k_new), conv(v_new), conv(cu_new), rope,
                                   keys=keys) is None
    # The cache holds each token's key (rotated with its index when keys='rotated') and value in its row;
    # every other row is still NaN.
    used = np.zeros(cache.k.shape[0], dtype=bool)
    for b, n in enumerate(lengths2):
        rows = [cache.row(b, j) for j in range(n)]
        used[rows] = True
        want_k = ref.rope_rotate(new_k[b], np.arange(n), D, INV_FREQ).numpy() if keys == "rotated" else new_k[b]
        assert_close(cache.k[rows], want_k, dtype, f"cached keys of sequence {b}")
        np.testing.assert_array_equal(cache.v[rows], new_v[b])
    assert np.all(np.isnan(cache.k[~used])) and np.all(np.isnan(cache.v[~used]))

    q = rng.standard_normal((sum(step2), HEADS * D)).astype(dtype)
    qpos = np.concatenate([np.arange(a, a + b) for a, b in zip(step1, step2)]).astype(np.int64)
    cu_q = cumulative(step2)
    out = posenc.paged_attention(conv(q), kc, vc, table, conv(lengths2), conv(cu_q), conv(qpos), rope, keys=keys,
                                 heads=HEADS, causal=True)
    assert isinstance(out, torch.Tensor) == (container == "torch")
    out = np.asarray(out)
    for b, n in enumerate(lengths2):
        qs = slice(cu_q[b], cu_q[b + 1])
        want, _ = reference(q[qs], new_k[b], new_v[b], qpos[qs], np.arange(n), "rope", causal=True)
        assert_close(out[qs], want, dtype, f"sequence {b}")


# --- Arrays: torch tensors and buffers in place, dtypes ------------------------------------------------

def test_torch_tensors_in_and_out_without_a_copy():
    torch.manual_seed(3)
    n = 13
    fused = torch.randn(n, (HEADS + 2 * KV_HEADS) * D)  # one QKV projection: q, k, v are strided column slices
    q, k, v = fused[:, :HEADS * D], fused[:, HEADS * D:(HEADS + KV_HEADS) * D], fused[:, (HEADS + KV_HEADS) * D:]
    assert not q.is_contiguous()
    before = fused.clone()
    big = torch.zeros(n, 2 * HEADS * D)
    out = big[:, HEADS * D:]  # a slice of a larger tensor: the result must land in `big`
    ptr = out.data_ptr()
    pos = np.arange(n)
    got, lse = posenc.attention(q.unflatten(1, (HEADS, D)), k, v, heads=HEADS, kv_heads=KV_HEADS, causal=True,
                                out=out, return_lse=True)
    assert got is out and out.data_ptr() == ptr
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32 and lse.shape == (n, HEADS)
    want, want_lse = reference(q.numpy(), k.numpy(), v.numpy(), pos, pos, "none", causal=True)
    assert_close(big[:, HEADS * D:].numpy(), want, np.float32, "out written through the slice")
    assert torch.all(big[:, :HEADS * D] == 0)
    assert_close(lse.numpy(), want_lse, np.float32, "lse")
    assert torch.equal(fused, before)  # inputs untouched
    # A new result is a torch tensor when q is one.
    new = posenc.attention(q, k, v, heads=HEADS, kv_heads=KV_HEADS, causal=True)
    assert isinstance(new, torch.Tensor) and new.dtype == torch.float32 and torch.equal(new, out)
    # Varlen with torch index tensors.
    cu = torch.tensor([0, 5, n], dtype=torch.int32)
    got = posenc.attention_varlen(q, k, v, cu, cu, heads=HEADS, kv_heads=KV_HEADS, causal=True)
    want0, _ = reference(q[:5].numpy(), k[:5].numpy(), v[:5].numpy(), np.arange(5), np.arange(5), "none",
                         causal=True)
    assert_close(got[:5].numpy(), want0, np.float32, "varlen, torch")


def test_rotate_writes_into_torch_tensors_and_buffers(rng):
    rope = posenc.Rope(head_dim=D)
    pos = rng.integers(0, 5000, size=6)
    x = torch.randn(6, 3 * D, dtype=torch.float64)
    original = x.clone()
    rope.rotate(x[:, D:], torch.from_numpy(pos))  # a column slice: rows of contiguous elements
    assert_close(x[:, D:].numpy(), ref.rope_rotate(original[:, D:], pos, D, INV_FREQ).numpy(), np.float64, "torch")
    assert torch.equal(x[:, :D], original[:, :D])
    # The buffer protocol: an array.array seen as a 2-D float64 memoryview, rotated in place.
    values = rng.standard_normal(6 * D)
    buf = array.array("d", values)
    rope.rotate(memoryview(buf).cast("B").cast("d", (6, D)), pos)
    assert_close(np.asarray(buf).reshape(6, D), ref.rope_rotate(values.reshape(6, D), pos, D, INV_FREQ).numpy(),
                 np.float64, "buffer")
    with pytest.raises(ValueError, match=r"x is read-only"):
        rope.rotate(memoryview(bytes(8 * D)).cast("d", (1, D)))
    with pytest.raises(ValueError, match=r"is not laid out as rows of contiguous elements"):
        rope.rotate(torch.zeros(D, 4).t())


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_float16_storage_within_float16_tolerance(rng, lib):
    n_q, n_k = [3, 1], [5, 9]
    q = rng.standard_normal((4, HEADS * D)).astype(np.float16)
    k = rng.standard_normal((14, KV_HEADS * D)).astype(np.float16)
    v = rng.standard_normal((14, KV_HEADS * D)).astype(np.float16)
    conv = (lambda a: torch.from_numpy(a)) if lib == "torch" else (lambda a: a)
    cu_q, cu_k = cumulative(n_q), cumulative(n_k)
    qpos = np.array([2, 3, 4, 8], dtype=np.int64)
    kpos = np.concatenate([np.arange(5), np.arange(9)]).astype(np.int64)
    rope = posenc.Rope(head_dim=D)
    out, lse = posenc.attention_varlen(conv(q), conv(k), conv(v), cu_q, cu_k, qpos, kpos, rope, heads=HEADS,
                                       kv_heads=KV_HEADS, causal=True, return_lse=True)
    assert np.asarray(out).dtype == np.float16 and np.asarray(lse).dtype == np.float32
    for b in range(2):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want, want_lse = reference(q[qs], k[ks], v[ks], qpos[qs], kpos[ks], "rope", causal=True)
        assert_close(np.asarray(out)[qs], want, np.float16, f"float16 out, sequence {b}")
        assert_close(np.asarray(lse)[qs], want_lse, np.float32, f"float16 lse, sequence {b}")
    # Rope.rotate on float16: computed in float32, rounded once.
    x = conv(q.copy())
    rope.rotate(x, qpos)
    assert_close(np.asarray(x), ref.rope_rotate(q, qpos, D, INV_FREQ).numpy(), np.float16, "float16 rotate")
    # Paged: a float16 cache.
    cache = Paged(rng, i32([14]), num_pages=6, dtype=np.float16)
    cache.write(0, k, v)
    out = posenc.paged_attention(conv(q), conv(cache.shaped(cache.k, "4d")), conv(cache.shaped(cache.v, "4d")),
                                 cache.table, i32([14]), i32([0, 4]), np.arange(10, 14), heads=HEADS, causal=True)
    want, _ = reference(q, k, v, np.arange(10, 14), np.arange(14), "none", causal=True)
    assert_close(np.asarray(out), want, np.float16, "float16 paged")


def test_bfloat16_torch_tensors(rng):
    n = 9
    q, k, v = (torch.randn(n, h * D).bfloat16() for h in (HEADS, KV_HEADS, KV_HEADS))
    out = posenc.attention(q, k, v, heads=HEADS, kv_heads=KV_HEADS, causal=True)
    assert out.dtype == torch.bfloat16
    want, _ = reference(q.double().numpy(), k.double().numpy(), v.double().numpy(), np.arange(n), np.arange(n),
                        "none", causal=True)
    eps = 2.0 ** -7  # bfloat16 keeps 8 significant bits
    err = np.abs(out.double().numpy() - want) / np.maximum(np.abs(want), 1.0)
    assert err.max() <= 2 * eps, f"bfloat16 out: worst relative error {err.max():.3g}"


def test_mixed_dtypes_name_both(rng):
    q = rng.standard_normal((2, HEADS * D)).astype(np.float32)
    k = rng.standard_normal((2, KV_HEADS * D))
    cu = i32([0, 2])
    with pytest.raises(TypeError, match=r"^posenc\.attention_varlen: k has dtype float64 but q has dtype float32"):
        posenc.attention_varlen(q, k, k, cu, cu, heads=HEADS)
    with pytest.raises(TypeError, match=r"^posenc\.attention: k has dtype float16 but q has dtype float32"):
        posenc.attention(q, torch.from_numpy(k).half(), k, heads=HEADS)
    with pytest.raises(TypeError, match=r"^posenc\.paged_append: k_new has dtype float32 but k_cache has dtype "
                                        r"float64; they must match$"):
        posenc.paged_append(k, k, i32([[0]]), i32([2]), q[:, :KV_HEADS * D], k, cu, page_size=2)


# --- Devices -------------------------------------------------------------------------------------------

class DLManagedTensor(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [
    ("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
    ("ndim", ctypes.c_int32), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
    ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
    ("byte_offset", ctypes.c_uint64), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class FakeTensor:
    """A DLPack producer written from the DLPack spec (float64, 2-D, C-contiguous) that lends `backing`'s
    memory and claims to live on `device`; it counts the deleter's calls."""

    def __init__(self, backing, device, report_device=True):
        self.backing, self.device, self.deleted = backing, device, 0
        self.shape = (ctypes.c_int64 * 2)(*backing.shape)
        self.deleter = DELETER(self._delete)
        self.managed = DLManagedTensor(backing.ctypes.data, device[0], device[1], 2, 2, 64, 1, self.shape, None, 0,
                                       None, self.deleter)
        if report_device:
            self.__dlpack_device__ = lambda: device

    def _delete(self, _):
        self.deleted += 1

    def __dlpack__(self, stream=None):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self.managed), b"dltensor", None)


def test_a_dlpack_producer_on_the_cpu_is_written_in_place_and_released():
    x = np.random.default_rng(1).standard_normal((5, D))
    fake = FakeTensor(x, (1, 0), report_device=False)
    original = x.copy()
    posenc.Rope(head_dim=D).rotate(fake, range(5))
    assert_close(x, ref.rope_rotate(original, np.arange(5), D, INV_FREQ).numpy(), np.float64, "written through")
    assert fake.deleted == 1  # the consumed capsule's deleter ran once, when the call ended


@pytest.mark.parametrize("report_device", [True, False], ids=["__dlpack_device__", "capsule"])
def test_a_tensor_on_another_device_is_refused_naming_it(report_device):
    x = np.zeros((5, D))
    fake = FakeTensor(x, (2, 1), report_device)
    with pytest.raises(TypeError, match=r"^posenc\.Rope\.rotate: x is on cuda:1; posenc computes on the CPU: "
                                        r"pass a CPU tensor \(x\.cpu\(\)\)$"):
        posenc.Rope(head_dim=D).rotate(fake)
    # Refused before export when the producer says where it is; a consumed capsule is still released.
    assert fake.deleted == (0 if report_device else 1)
    with pytest.raises(TypeError, match=r"q is on rocm:0"):
        posenc.attention(FakeTensor(x, (10, 0)), x, x, heads=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the device check is faked above)")
def test_a_cuda_tensor_is_refused():
    with pytest.raises(TypeError, match=r"q is on cuda:0"):
        posenc.attention(torch.zeros(2, D, device="cuda"), torch.zeros(2, D), torch.zeros(2, D), heads=1)


def test_a_tensor_that_requires_grad_is_named():
    x = torch.zeros(2, D, requires_grad=True)
    with pytest.raises(TypeError, match=r"^posenc\.Rope\.rotate: x: Tensor\.__dlpack__\(\) failed: .*detach"):
        posenc.Rope(head_dim=D).rotate(x)


# --- Index arrays ----------------------------------------------------------------------------------------

@pytest.fixture
def paged_args(rng):
    cache = Paged(rng, i32([6, 3]), num_pages=5, dtype=np.float64)
    cache.k[:] = 0
    cache.v[:] = 0
    q = rng.standard_normal((3, HEADS * D))
    return dict(q=q, k_cache=cache.shaped(cache.k, "4d"), v_cache=cache.shaped(cache.v, "4d"),
                block_table=cache.table, lengths=i32([6, 3]), cu_q=i32([0, 2, 3]), qpos=np.array([4, 5, 2]),
                heads=HEADS)


def test_index_arrays_int32_int64_and_lists_agree(paged_args):
    base = posenc.paged_attention(**paged_args)
    for conv in (lambda a: a.astype(np.int64), lambda a: a.tolist(), torch.from_numpy):
        args = dict(paged_args, lengths=conv(paged_args["lengths"]), cu_q=conv(paged_args["cu_q"]))
        if conv is torch.from_numpy:
            args["block_table"] = torch.from_numpy(paged_args["block_table"])
        np.testing.assert_array_equal(np.asarray(posenc.paged_attention(**args)), base)
    with pytest.raises(TypeError, match=r"^posenc\.paged_attention: cu_q must have dtype int32 \(int64 is copied\), "
                                        r"got float64$"):
        posenc.paged_attention(**dict(paged_args, cu_q=np.array([0.0, 2, 3])))
    with pytest.raises(OverflowError, match=r"lengths\[1\] = 4294967296 does not fit in int32"):
        posenc.paged_attention(**dict(paged_args, lengths=np.array([6, 2**32])))


def test_bad_block_tables_lengths_and_cu_arrays_name_the_sizes(paged_args):
    table = paged_args["block_table"].copy()
    table[1, 0] = 9
    with pytest.raises(posenc.PreconditionError, match=r"block_table\[1\]\[0\] = 9 is not a page of the cache "
                                                       r"\(5 pages\)"):
        posenc.paged_attention(**dict(paged_args, block_table=table))
    with pytest.raises(posenc.PreconditionError, match=r"paged_kv\.lengths\[0\] = 9 is outside \[0, 8\]"):
        posenc.paged_attention(**dict(paged_args, lengths=i32([9, 3])))
    with pytest.raises(ValueError, match=r"^posenc\.paged_attention: lengths has 3 entries but cu_q has 3 "
                                         r"\(2 sequences\)$"):
        posenc.paged_attention(**dict(paged_args, lengths=i32([6, 3, 1])))
    with pytest.raises(ValueError, match=r"^posenc\.paged_attention: block_table has 1 rows but cu_q has 3 entries"):
        posenc.paged_attention(**dict(paged_args, block_table=paged_args["block_table"][:1]))
    with pytest.raises(ValueError, match=r"block_table must be 2-D, got shape \(4,\)"):
        posenc.paged_attention(**dict(paged_args, block_table=paged_args["block_table"].ravel()))
    with pytest.raises(posenc.PreconditionError, match=r"cu_q\[2\] = 4 but there are 3 rows"):
        posenc.paged_attention(**dict(paged_args, cu_q=i32([0, 2, 4])))
    with pytest.raises(posenc.PreconditionError, match=r"cu_q must not decrease, but cu_q\[2\] = 1 < cu_q\[1\] = 2"):
        posenc.paged_attention(**dict(paged_args, cu_q=i32([0, 2, 1]), lengths=i32([6, 3])))
    with pytest.raises(ValueError, match=r"cu_q is empty; a batch of B sequences has B \+ 1 entries"):
        posenc.paged_attention(**dict(paged_args, cu_q=i32([])))
    with pytest.raises(ValueError, match=r"page_size = 2 but k_cache has shape \(5, 4, 2, 16\): pages of 4 rows"):
        posenc.paged_attention(**paged_args, page_size=2)
    with pytest.raises(ValueError, match=r"k_cache is 2-D \[num_pages \* page_size, kv_heads \* head_dim\]: "
                                         r"pass page_size="):
        posenc.paged_attention(**dict(paged_args, k_cache=paged_args["k_cache"].reshape(20, -1),
                                      v_cache=paged_args["v_cache"].reshape(20, -1)))
    q, k = np.zeros((3, HEADS * D)), np.zeros((7, KV_HEADS * D))
    with pytest.raises(posenc.PreconditionError, match=r"cu_k\[2\] = 6 but there are 7 rows"):
        posenc.attention_varlen(q, k, k, i32([0, 1, 3]), i32([0, 2, 6]), heads=HEADS, kv_heads=KV_HEADS)
    with pytest.raises(ValueError, match=r"^posenc\.attention_varlen: cu_k has 2 entries but cu_q has 3"):
        posenc.attention_varlen(q, k, k, i32([0, 1, 3]), i32([0, 7]), heads=HEADS, kv_heads=KV_HEADS)
    with pytest.raises(posenc.PreconditionError,
                       match=r"paged_append: sequence 0 appends 3 tokens but its length is 2"):
        posenc.paged_append(paged_args["k_cache"], paged_args["v_cache"], paged_args["block_table"], i32([2, 3]),
                            k[:4], k[:4], i32([0, 3, 4]))


def test_keys_has_no_default_with_a_rope(paged_args):
    rope = posenc.Rope(head_dim=D)
    with pytest.raises(ValueError, match=r"^posenc\.paged_attention: encoding is a Rope: pass keys='rotated' .* or "
                                         r"keys='raw' .*; there is no default$"):
        posenc.paged_attention(**paged_args, encoding=rope)
    with pytest.raises(ValueError, match=r"keys = 'rope': must be one of 'rotated', 'raw'"):
        posenc.paged_attention(**paged_args, encoding=rope, keys="rope")
    k = np.zeros((3, KV_HEADS * D))
    with pytest.raises(ValueError, match=r"^posenc\.paged_append: encoding is a Rope: pass keys="):
        posenc.paged_append(paged_args["k_cache"], paged_args["v_cache"], paged_args["block_table"],
                            paged_args["lengths"], k, k, i32([0, 2, 3]), rope)
    # Without a rotation, keys= may be left out.
    posenc.paged_attention(**paged_args, encoding=posenc.Alibi(num_heads=HEADS))
