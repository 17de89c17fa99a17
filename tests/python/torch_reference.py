"""PyTorch references for the Python tests, written from the formulas (the encoder pages in
docs/ and the papers), never by calling posenc. Everything is computed in float64 on the CPU."""

import math

import torch

f64 = torch.float64


# --- RoPE frequency tables -------------------------------------------------------------------------

def plain_inv_freq(r, base):
    """inv_freq[i] = base^(-2i/r), i < r/2 (Su et al. 2021)."""
    i = torch.arange(0, r // 2, dtype=f64)
    return torch.tensor(float(base), dtype=f64) ** (-2.0 * i / r)


def linear_inv_freq(r, base, factor):
    """Position interpolation (Chen et al. 2023): every frequency divided by the factor."""
    return plain_inv_freq(r, base) / factor


def ntk_inv_freq(r, base, alpha):
    """NTK-aware scaling: the base becomes base * alpha^(r / (r - 2))."""
    return plain_inv_freq(r, base * alpha ** (r / (r - 2)))


def dynamic_ntk_inv_freq(r, base, factor, original, length):
    """Dynamic NTK: past the trained length, base * (s L / L0 - (s - 1))^(r / (r - 2))."""
    if length <= original:
        return plain_inv_freq(r, base)
    return plain_inv_freq(r, base * (factor * length / original - (factor - 1)) ** (r / (r - 2)))


def yarn_inv_freq(r, base, factor, original, beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023): pair i turns original * inv_i / (2 pi) times over the trained
    length; pairs turning more than beta_fast times keep their frequency, pairs turning fewer than
    beta_slow times are interpolated, and a linear ramp over the pair index blends between."""
    def pair_of(turns):  # the (fractional) pair index that turns `turns` times over `original`
        return r * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_of(beta_fast)), 0)
    high = min(math.ceil(pair_of(beta_slow)), r - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(r // 2, dtype=f64) - low) / (high - low)).clamp(0, 1)
    inv = plain_inv_freq(r, base)
    return inv / factor * ramp + inv * (1 - ramp)


def yarn_magnitude(factor, mscale=1.0):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def llama3_inv_freq(r, base, factor, low_freq_factor, high_freq_factor, original):
    """Llama 3.1: wavelengths longer than original / low_freq_factor are interpolated, shorter than
    original / high_freq_factor kept, and those between blended by original / wavelength."""
    inv = plain_inv_freq(r, base)
    wavelength = 2 * math.pi / inv
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelength > original / low_freq_factor, inv / factor, blended)
    return torch.where(wavelength < original / high_freq_factor, inv, out)


def longrope_inv_freq(r, base, factors):
    """LongRoPE: inv_i = 1 / (f_i * base^(2i/r))."""
    return plain_inv_freq(r, base) / torch.tensor(factors, dtype=f64)


# --- RoPE rotation ---------------------------------------------------------------------------------

def rope_rotate(x, positions, head_dim, inv_freq, layout="half_split", magnitude=1.0):
    """Rotates every head of x [tokens, heads * head_dim]: pair (a, b) of pair index i at position p
    becomes (a cos - b sin, b cos + a sin) * magnitude with angle p * inv_freq[i]. Half-split pairs
    are (i, i + r/2) (GPT-NeoX, LLaMA), interleaved pairs (2i, 2i + 1) (GPT-J, RoFormer); dims past
    r = 2 len(inv_freq) pass through."""
    x = torch.as_tensor(x, dtype=f64)
    n = x.shape[0]
    h = x.reshape(n, x.shape[1] // head_dim, head_dim).clone()
    r = 2 * inv_freq.numel()
    pos = torch.as_tensor(positions, dtype=f64).reshape(n, 1, 1)
    angle = pos * inv_freq.reshape(1, 1, -1)
    c, s = torch.cos(angle) * magnitude, torch.sin(angle) * magnitude
    if layout == "half_split":
        a, b = h[..., : r // 2].clone(), h[..., r // 2: r].clone()
        h[..., : r // 2] = a * c - b * s
        h[..., r // 2: r] = b * c + a * s
    else:
        a, b = h[..., 0:r:2].clone(), h[..., 1:r:2].clone()
        h[..., 0:r:2] = a * c - b * s
        h[..., 1:r:2] = b * c + a * s
    return h.reshape(n, x.shape[1])


# --- Score biases ----------------------------------------------------------------------------------

def alibi_slopes(n):
    """Press et al. 2022: 2^(-8 (h+1) / n) for n a power of two; otherwise the slopes of the largest
    power of two c below n, then every other slope of 2c (odd multiples of 8 / 2c) until n."""
    c = 2 ** int(math.floor(math.log2(n)))
    slopes = [2.0 ** (-8.0 * (h + 1) / c) for h in range(c)]
    extra = [2.0 ** (-8.0 * (h + 1) / (2 * c)) for h in range(2 * c)][0::2]
    return torch.tensor(slopes + extra[: n - c], dtype=f64)


def alibi_bias(slopes, qpos, kpos, symmetric=False):
    """[heads, n_q, n_kv] bias -slope_h * (qpos - kpos), or * |qpos - kpos|."""
    d = torch.as_tensor(qpos, dtype=f64)[:, None] - torch.as_tensor(kpos, dtype=f64)[None, :]
    if symmetric:
        d = d.abs()
    return -slopes[:, None, None] * d[None]


def t5_bucket(relative, num_buckets=32, max_distance=128, bidirectional=True):
    """Raffel et al. 2020 (T5's _relative_position_bucket), relative = kpos - qpos."""
    relative = torch.as_tensor(relative, dtype=torch.int64)
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).to(torch.int64) * num_buckets
        d = relative.abs()
    else:
        d = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    far = max_exact + (torch.log(d.to(f64).clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).floor().to(torch.int64)
    far = far.clamp(max=num_buckets - 1)
    return bucket + torch.where(d < max_exact, d, far)


def t5_bias(table, qpos, kpos, num_buckets, max_distance, bidirectional):
    """[heads, n_q, n_kv] bias table[bucket(kpos - qpos), head]."""
    rel = torch.as_tensor(kpos)[None, :] - torch.as_tensor(qpos)[:, None]
    b = t5_bucket(rel, num_buckets, max_distance, bidirectional)
    return torch.as_tensor(table, dtype=f64)[b].permute(2, 0, 1)


# --- Softmax attention -----------------------------------------------------------------------------

def visible(qp, kp, causal=False, window=(-1, -1), chunk_size=None):
    """[n_q, n_kv] bool: key j visible to query i, from qp = qpos[:, None] and kp = kpos[None, :]
    (int64 tensors): causal kpos <= qpos, window kpos in [qpos - left, qpos + right] (-1 unbounded),
    chunks floor(kpos / c) == floor(qpos / c)."""
    vis = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool)
    if causal:
        vis &= kp <= qp
    if window[0] >= 0:
        vis &= kp >= qp - window[0]
    if window[1] >= 0:
        vis &= kp <= qp + window[1]
    if chunk_size is not None:
        vis &= torch.div(kp, chunk_size, rounding_mode="floor") == torch.div(qp, chunk_size, rounding_mode="floor")
    return vis


def attention(q, k, v, heads, kv_heads, qpos, kpos, bias=None, causal=False, window=(-1, -1), scale=None,
              softcap=0.0, sinks=None):
    """Naive softmax attention in float64. q [n_q, heads * d], k, v [n_kv, kv_heads * d]; query head
    h reads kv head h // (heads // kv_heads); bias [heads, n_q, n_kv] is added to the scaled logits;
    softcap > 0 then maps every logit s to softcap * tanh(s / softcap) (Gemma 2); key j is visible to
    query i when (not causal or kpos <= qpos) and within the window. sinks (one logit z_h per head,
    gpt-oss) join every row's softmax denominator without a value: out = sum_j e^s_j v_j / (e^z +
    sum_j e^s_j), lse = log(e^z + sum_j e^s_j). Returns out [n_q, heads * d] (zero for a row with no
    visible key) and lse [n_q, heads] (-inf there without sinks, z with them)."""
    q, k, v = (torch.as_tensor(a, dtype=f64) for a in (q, k, v))
    n_q, n_kv = q.shape[0], k.shape[0]
    d = q.shape[1] // heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = q.reshape(n_q, heads, d).transpose(0, 1)
    group = heads // kv_heads
    kh = k.reshape(n_kv, kv_heads, d).transpose(0, 1).repeat_interleave(group, dim=0)
    vh = v.reshape(n_kv, kv_heads, d).transpose(0, 1).repeat_interleave(group, dim=0)
    s = scale * qh @ kh.transpose(1, 2)
    if bias is not None:
        s = s + bias
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    qp = torch.as_tensor(qpos)[:, None]
    kp = torch.as_tensor(kpos)[None, :]
    s = s.masked_fill(~visible(qp, kp, causal, window)[None], -math.inf)
    if sinks is None:
        lse = torch.logsumexp(s, dim=-1)
    else:
        z = torch.as_tensor(sinks, dtype=f64).reshape(heads, 1, 1).expand(heads, n_q, 1)
        lse = torch.logsumexp(torch.cat([s, z], dim=-1), dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no visible key: -inf - -inf
    out = (p @ vh).transpose(0, 1).reshape(n_q, heads * d)
    return out, lse.transpose(0, 1)
