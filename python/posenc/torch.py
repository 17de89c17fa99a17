"""posenc.torch: training with posenc's attention in PyTorch.

``attention`` is posenc's blockwise attention as a ``torch.autograd.Function``: the forward is
``posenc.attention`` (which keeps the per-row log-sum-exp), the backward ``posenc.attention_backward``
(FlashAttention-2's algorithm, memory linear in the sequence length), both in C++ on the caller's CPU
tensors without copies. ``loss.backward()`` then gives the gradients of q, k and v, of learned sinks,
and of the parameters of the modules ``Alibi`` (slopes), ``T5Bias`` (table) and ``ShawRelative``
(tables) below, which hold them as ``torch.nn.Parameter``. Fixed encoders (``posenc.Rope``,
``posenc.Alibi``, ``posenc.T5Bias``, ``posenc.ShawRelative``) are passed as they are and get no gradient.

This module imports torch; ``import posenc`` does not (``posenc.torch`` is loaded on first use).
"""

import torch
from torch.autograd.function import once_differentiable

from . import _posenc

__all__ = ["attention", "Alibi", "T5Bias", "ShawRelative"]

_WHERE = "posenc.torch.attention"


class Alibi(torch.nn.Module):
    """ALiBi (Press et al. 2022) with learned slopes: the bias -slopes[h] * (qpos - kpos) (causal) or
    -slopes[h] * |qpos - kpos| (symmetric) on the logits, ``slopes`` a ``torch.nn.Parameter`` [num_heads]
    (global heads) that ``posenc.torch.attention`` gives a gradient. It starts at the paper's slopes.

    Parameters
    ----------
    num_heads : int
        The model's total (global) query head count: the slopes' length.
    head_offset : int, default 0
        The global index of local head 0 (a shard of the heads).
    form : {'causal', 'symmetric'}, default 'causal'
        -slope * (qpos - kpos), or -slope * |qpos - kpos| (encoders).
    max_bias : float, default 8.0
        The exponent scale of the rule the slopes start from.
    dtype : torch.dtype or None
        The slopes' dtype; None = torch's default dtype.
    """

    def __init__(self, num_heads, *, head_offset=0, form="causal", max_bias=8.0, dtype=None):
        super().__init__()
        self.head_offset, self.form = head_offset, form
        rule = _posenc.Alibi(num_heads=num_heads, head_offset=head_offset, form=form, max_bias=max_bias)
        self.slopes = torch.nn.Parameter(torch.tensor(rule.slopes, dtype=dtype))

    def encoding(self):
        """A ``posenc.Alibi`` holding a copy of the slopes as they are now."""
        return _posenc.Alibi(num_heads=self.slopes.shape[0], head_offset=self.head_offset, form=self.form,
                             slopes=self.slopes.detach())

    def _learned(self):
        return (self.slopes,)

    @staticmethod
    def _grads(g):
        return (g.get("slopes"),)


class T5Bias(torch.nn.Module):
    """T5's bucketed relative position bias (Raffel et al. 2020) with a learned table: the bias
    table[bucket(kpos - qpos), head] on the logits, ``table`` a ``torch.nn.Parameter``
    [num_buckets, num_heads] that ``posenc.torch.attention`` gives a gradient.

    Parameters
    ----------
    num_heads : int
        Query heads (global: the table's columns).
    num_buckets : int, default 32
        Rows of the table.
    max_distance : int, default 128
        Distances (tokens) from which on the last bucket is used.
    bidirectional : bool, default True
        True for an encoder (half the buckets per side), False for a decoder (past keys only).
    head_offset : int, default 0
        The global index of local head 0 (a shard of the heads).
    dtype : torch.dtype or None
        The table's dtype; None = torch's default dtype. The table starts at zeros (no bias).
    """

    def __init__(self, num_heads, num_buckets=32, *, max_distance=128, bidirectional=True, head_offset=0,
                 dtype=None):
        super().__init__()
        self.max_distance, self.bidirectional, self.head_offset = max_distance, bidirectional, head_offset
        self.table = torch.nn.Parameter(torch.zeros(num_buckets, num_heads, dtype=dtype))
        self.encoding()  # invalid parameters raise here, not at the first call

    def encoding(self):
        """A ``posenc.T5Bias`` holding a copy of the table as it is now."""
        return _posenc.T5Bias(self.table.detach(), max_distance=self.max_distance, bidirectional=self.bidirectional,
                              head_offset=self.head_offset)

    def _learned(self):
        return (self.table,)

    @staticmethod
    def _grads(g):
        return (g.get("table"),)


class ShawRelative(torch.nn.Module):
    """Shaw et al. 2018 relative keys and values with learned tables: e_ij = q_i . (k_j + aK[clip(j - i)]) * scale,
    out_i = sum_j a_ij (v_j + aV[clip(j - i)]), distances clipped to [-K, K], one table pair for every head;
    ``key_table`` (aK) and ``value_table`` (aV) are ``torch.nn.Parameter`` [2K + 1, head_dim] that
    ``posenc.torch.attention`` gives a gradient.

    Parameters
    ----------
    head_dim : int
        Elements per head (the tables' width).
    max_relative_position : int
        K, the largest distance told apart (> 0).
    dtype : torch.dtype or None
        The tables' dtype; None = torch's default dtype. The tables start at zeros.
    """

    def __init__(self, head_dim, max_relative_position, *, dtype=None):
        super().__init__()
        if max_relative_position < 0:
            raise ValueError(f"posenc.torch.ShawRelative: max_relative_position = {max_relative_position}: "
                             "must be >= 0")
        rows = 2 * max_relative_position + 1
        self.key_table = torch.nn.Parameter(torch.zeros(rows, head_dim, dtype=dtype))
        self.value_table = torch.nn.Parameter(torch.zeros(rows, head_dim, dtype=dtype))
        self.encoding()

    def encoding(self):
        """A ``posenc.ShawRelative`` holding copies of the tables as they are now."""
        return _posenc.ShawRelative(self.key_table.detach(), self.value_table.detach())

    def _learned(self):
        return (self.key_table, self.value_table)

    @staticmethod
    def _grads(g):
        return (g.get("key_table"), g.get("value_table"))


_FIXED = (_posenc.Rope, _posenc.MRope, _posenc.Alibi, _posenc.T5Bias, _posenc.ShawRelative)
_LEARNED = (Alibi, T5Bias, ShawRelative)


def _rows(t):
    """`t` itself when the C++ code reads it in place (head_dim, the last axis, with unit stride: any other strides,
    transposes and expanded axes included), else a contiguous copy (a tensor transposed in its last axis)."""
    if t.numel() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _layout_of(q, layout):
    """The posenc layout of a q of this many dimensions: `layout` when given, else 2-D [tokens, heads * head_dim],
    3-D [tokens, heads, head_dim] ('thd'), 4-D [batch, tokens, heads, head_dim] ('bthd')."""
    if layout is not None:
        if layout not in ("thd", "htd", "bthd", "bhtd"):
            raise ValueError(f"{_WHERE}: layout must be None, 'thd', 'htd', 'bthd' or 'bhtd', got {layout!r}")
        want = 3 if layout in ("thd", "htd") else 4
        if q.dim() != want:
            raise ValueError(f"{_WHERE}: layout {layout!r} is {want}-D but q has shape {tuple(q.shape)}")
        return layout
    return {2: None, 3: "thd", 4: "bthd"}[q.dim()]


class _Attention(torch.autograd.Function):
    """Inputs: the call (positions, encoder, knobs), q, k, v, the learned sinks (or None), the learned tables."""

    @staticmethod
    def forward(ctx, call, q, k, v, sinks, *tables):
        enc = call["encoder"]
        if isinstance(enc, _LEARNED):
            enc = enc.encoding()
        knobs = dict(call["knobs"])
        if sinks is not None:
            knobs["sinks"] = sinks.detach()
        out, lse = _posenc.attention(q.detach(), k.detach(), v.detach(), call["qpos"], call["kpos"], enc,
                                     layout=call["layout"], return_lse=True, **knobs)
        ctx.call, ctx.enc, ctx.knobs = call, enc, knobs
        ctx.sinks_dtype = None if sinks is None else sinks.dtype
        ctx.table_dtypes = [t.dtype for t in tables]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        want = any(ctx.needs_input_grad[4:])
        # One call over the whole batch, every tensor through its strides (dout too: the gradient of a
        # sum is expanded, stride 0).
        dq, dk, dv, g = _posenc.attention_backward(q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                                   _rows(dout.to(q.dtype)), call["qpos"], call["kpos"], ctx.enc,
                                                   layout=call["layout"], param_grads=want, **ctx.knobs)
        dsinks = g["sinks"].to(ctx.sinks_dtype) if want and ctx.sinks_dtype is not None else None
        dtables = ()
        if ctx.table_dtypes:
            dtables = tuple(None if t is None else t.to(dt)
                            for t, dt in zip(call["encoder"]._grads(g), ctx.table_dtypes))
        need = ctx.needs_input_grad
        return (None, dq if need[1] else None, dk if need[2] else None, dv if need[3] else None,
                dsinks if need[4] else None, *(t if n else None for t, n in zip(dtables, need[5:])))


def attention(q, k, v, qpos=None, kpos=None, encoding=None, *, heads=None, kv_heads=None, layout=None, scale=None,
              softcap=0.0, sinks=None, causal=False, window=(-1, -1), chunk_size=None, threads=0):
    """Softmax attention with autograd: out_i = sum_j softmax_j(scale q_i . k_j + bias_ij) v_j by posenc's
    blockwise kernel, whose backward (posenc.attention_backward) gives the gradients of q, k, v, of sinks
    that require grad and of the parameters of a posenc.torch.Alibi, T5Bias or ShawRelative.

    q, k and v are used in place through their strides, in every layout (a copy only of a tensor whose last
    axis, head_dim, is not contiguous); the forward keeps out and the log-sum-exp for the backward, which runs
    once for the whole batch.

    Parameters
    ----------
    q : torch.Tensor
        Queries on the CPU, float32 or float64, 2-D [tokens, heads * head_dim] (pass heads=), 3-D
        [tokens, heads, head_dim], or 4-D [batch, tokens, heads, head_dim] (sequences of equal length and
        positions; a projection's output viewed, FlashAttention's layout); other layouts with layout=.
    k : torch.Tensor
        Keys, the dtype of q, with kv_heads heads in q's layout ([n_kv, kv_heads * head_dim] beside a 2-D q).
    v : torch.Tensor
        Values, like k.
    qpos : None, range, int64 tensor or list of int
        The position of each query; None = 0..tokens-1.
    kpos : None, range, int64 tensor or list of int
        The position of each key; None = 0..n_kv-1.
    encoding : posenc encoder, posenc.torch module or None
        posenc.Rope, posenc.MRope, posenc.Alibi, posenc.T5Bias or posenc.ShawRelative (fixed), or a module of
        posenc.torch whose learned parameters get their gradients: Alibi, T5Bias, ShawRelative. Applied in the
        kernel, as by posenc.attention (a Rope rotates copies of q and k, an MRope by its text RoPE; the
        gradients are those of the unrotated q and k).
    heads : int or None
        Query heads; default the head axis of a 3-D q (required for a 2-D q).
    layout : str or None
        None: as above by q's dimensions; 'bhtd': [batch, heads, tokens, head_dim] (torch's
        scaled_dot_product_attention), 'htd': [heads, tokens, head_dim], 'thd', 'bthd'. Used in place.
    kv_heads : int or None
        Key/value heads dividing heads (GQA, MQA); default the head axis of k, or heads.
    scale : float or None
        The logit scale; None = 1 / sqrt(head_dim).
    softcap : float, default 0.0
        Gemma 2's logit soft-capping softcap * tanh(s / softcap); 0 = off.
    sinks : list of float, 1-D tensor or None
        One sink logit per query head in every row's softmax denominator (gpt-oss); a tensor that requires
        grad gets its gradient. The kernel keeps sinks in float32.
    causal : bool, default False
        Key j is visible to query i only when kpos[j] <= qpos[i].
    window : (int, int), default (-1, -1)
        (left, right): keys within [qpos - left, qpos + right]; -1 = unbounded.
    chunk_size : int or None, default None
        Keys visible only in the query's chunk (kpos // chunk_size == qpos // chunk_size); None = off.
    threads : int, default 0
        The most workers of posenc's pool to use (0 = all, 1 = the calling thread); the same bits for any value.

    Returns
    -------
    torch.Tensor
        out, q's shape and dtype; differentiable.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_WHERE}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise TypeError(f"{_WHERE}: {name} is on {t.device}; posenc computes on the CPU: pass a CPU tensor "
                            f"({name}.cpu())")
        if t.dim() not in (2, 3, 4) or t.dim() != q.dim():
            raise ValueError(f"{_WHERE}: {name} has shape {tuple(t.shape)}"
                             f"{'' if name == 'q' else ' and q has shape ' + str(tuple(q.shape))}: "
                             "posenc.torch.attention takes 2-D [tokens, heads * head_dim], 3-D [tokens, heads, "
                             "head_dim] or 4-D [batch, tokens, heads, head_dim], q, k and v alike (layout='bhtd' or "
                             "'htd' for head-major tensors)")
    if q.dim() == 2 and heads is None:
        raise ValueError(f"{_WHERE}: q is 2-D [tokens, heads * head_dim]: pass heads= (and kv_heads= for GQA/MQA)")
    if q.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_WHERE}: q has dtype {str(q.dtype)[6:]}; the backward computes in float32 or float64 "
                        "(convert with q.float())")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_WHERE}: {name} has dtype {str(t.dtype)[6:]} but q has dtype {str(q.dtype)[6:]}; "
                            "they must match")
    if encoding is not None and not isinstance(encoding, _FIXED + _LEARNED):
        if isinstance(encoding, _posenc.Sinusoidal):
            raise TypeError(f"{_WHERE}: Sinusoidal is an additive-input encoding: add it to the token embeddings "
                            "before the Q/K/V projections and pass encoding=None here")
        raise TypeError(f"{_WHERE}: encoding must be None, posenc.Rope, posenc.MRope, posenc.Alibi, "
                        "posenc.T5Bias, posenc.ShawRelative, posenc.torch.Alibi, posenc.torch.T5Bias or "
                        f"posenc.torch.ShawRelative, got {type(encoding).__name__}")
    knobs = {"heads": heads, "kv_heads": kv_heads, "scale": scale, "softcap": softcap, "causal": causal,
             "window": window, "chunk_size": chunk_size, "threads": threads}
    learned_sinks = None
    if isinstance(sinks, torch.Tensor):
        if sinks.dim() != 1:
            raise ValueError(f"{_WHERE}: sinks must be 1-D (one per head), got shape {tuple(sinks.shape)}")
        learned_sinks = sinks
    elif sinks is not None:
        knobs["sinks"] = sinks
    tables = encoding._learned() if isinstance(encoding, _LEARNED) else ()
    call = {"encoder": encoding, "qpos": qpos, "kpos": kpos, "knobs": knobs, "layout": _layout_of(q, layout)}
    return _Attention.apply(call, _rows(q), _rows(k), _rows(v), learned_sinks, *tables)
