#!/usr/bin/env python3
"""Draws the picture examples' CSV files as PNG (matplotlib, Agg backend, no display needed).

Usage: plot.py NAME FOLDER   reads FOLDER/NAME.csv (written by the example NAME), writes FOLDER/NAME.png
                             (encoders: one CSV and one PNG per encoder family; positions_2025: several
                             CSVs, PNGs mrope, chunked_attention and layer_config).
Exits non-zero when the CSV is missing or malformed, or the PNG could not be written."""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

DPI = 100
LABELS = {"rope": "RoPE (no scaling)", "linear": "position interpolation", "ntk": "NTK-aware",
          "yarn": "YaRN", "llama3": "Llama 3", "none": "no encoding", "t5": "T5 bias"}


def read(folder, name):
    data = np.genfromtxt(os.path.join(folder, name + ".csv"), delimiter=",", names=True)
    if data.size == 0:
        raise ValueError(f"{name}.csv has no rows")
    return data


def log_binned_mean(x, y, bins=80):
    """Mean of y over log-spaced bins of x >= 1 (each integer below 16 its own bin), to show the trend
    of a curve that oscillates faster than the figure can resolve."""
    edges = np.unique(np.concatenate([np.arange(1, 16), np.geomspace(16, x.max() + 1, bins)]).astype(int))
    idx = np.digitize(x, edges)
    keep = [i for i in range(1, len(edges)) if np.any(idx == i)]
    return np.array([x[idx == i].mean() for i in keep]), np.array([y[idx == i].mean() for i in keep])


def rope_decay(folder):
    d = read(folder, "rope_decay")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    near = d["distance"] <= 256
    a.plot(d["distance"][near], d["rope"][near], color="C0")
    a.set(title="RoPE long-term decay (d = 128, base 1e4)", xlabel="relative distance",
          ylabel="relative upper bound  (1/(d/2)) sum |S_j|")
    for i, col in enumerate(["rope", "linear", "ntk", "yarn", "llama3"]):
        b.plot(*log_binned_mean(d["distance"], d[col]), label=LABELS[col], color=f"C{i}", lw=1.2)
    b.axvline(2048, color="gray", ls=":", lw=1)
    b.text(2048, 31, "L0 = 2048 ", color="gray", va="top", ha="right")
    b.set(title="tables extended 4x from L0 = 2048 (mean over log bins)", xlabel="relative distance",
          xscale="log", ylabel="relative upper bound")
    b.set_xlim(1, 8192)
    b.legend(fontsize=8)
    return fig


def interpolation(folder):
    d = read(folder, "interpolation")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = d["distance"]
    a.fill_between(x, d["seen_min"], d["seen_max"], color="gray", alpha=0.25, label="range seen for r < L0")
    a.plot(x, d["extrapolated"], color="C3", label="extrapolated (plain table)")
    a.plot(x, d["interpolated"], color="C0", label="interpolated (table / 4)")
    a.axvline(2048, color="gray", ls=":", lw=1)
    a.set(title="slow pairs' part of one random pair's logit", xlabel="relative distance r",
          ylabel="logit part  q . R(r) k")
    a.legend(fontsize=8, loc="lower left")
    b.plot(x, d["slow_outside_extrapolated"], color="C3", label="slow pairs' part, extrapolated")
    b.plot(x, d["slow_outside_interpolated"], color="C0", label="slow pairs' part, interpolated")
    b.plot(x, d["outside_extrapolated"], color="C3", lw=0.5, alpha=0.7, label="whole logit, extrapolated")
    b.plot(x, d["outside_interpolated"], color="C0", lw=0.5, alpha=0.7, label="whole logit, interpolated")
    b.axvline(2048, color="gray", ls=":", lw=1)
    b.set(title="256 random unit pairs (d = 128, L0 = 2048)", xlabel="relative distance r",
          ylabel="fraction outside their range for r < L0")
    b.legend(fontsize=8, loc="upper left")
    return fig


def needle(folder):
    d = read(folder, "needle")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = d["position"]
    heads = [c for c in d.dtype.names if c.startswith("alibi_h")]
    for i, col in enumerate(heads):
        ax.plot(x, d[col], color=plt.cm.Greens(0.35 + 0.65 * i / max(len(heads) - 1, 1)), lw=0.9,
                label=f"ALiBi, head {col[7:]} (slope 2^-{int(col[7:]) + 1})" if i in (0, len(heads) - 1) else None)
    ax.plot(x, d["none"], color="k", label=LABELS["none"])
    ax.plot(x, d["rope"], color="C0", label="RoPE (base 1e4)")
    ax.plot(x, d["t5"], color="C1", label="T5 bias (illustrative table, -0.25 per bucket)")
    ax.set(yscale="log", xlabel="needle position p (query at the last position)",
           ylabel="attention weight on the needle", title="needle among random keys: recency of each encoding")
    ax.set_ylim(1e-6, 1.5)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def ring_memory(folder):
    d = read(folder, "ring_memory")
    m = read(folder, "ring_memory_measured")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, p in enumerate(d["processes"]):
        sel = m["processes"] == p
        a.plot(m["tokens_per_process"][sel], m["peak_bytes_per_process"][sel] / 2**20, "o", color=f"C{i}",
               ms=10 - 2 * i, label=f"P = {int(p)}, n = 256, 512, 1024")
    order = np.argsort(m["tokens_per_process"])
    a.plot(m["tokens_per_process"][order], m["fit_bytes"][order] / 2**20, "-", color="gray", lw=0.8,
           label="a + b n / P (fit, n / P >= 128)")
    a.set(title="measured peak heap per simulated process, one causal layer\n"
                "(32 q / 8 kv heads, d = 128, bf16, RoPE, zigzag)",
          xlabel="tokens per process (n / P)", ylabel="MiB", xscale="log", yscale="log")
    a.legend(fontsize=8)
    budgets = [c for c in d.dtype.names if c.startswith("max_tokens_")]
    for i, col in enumerate(budgets):
        budget = col[len("max_tokens_"):].replace("GiB", " GiB")
        b.plot(d["processes"], d[col], marker="o", color=f"C{i}", label=f"{budget} per process")
    b.set(xscale="log", yscale="log", xlabel="processes P", ylabel="longest context (tokens)",
          title="longest context within a per-process budget")
    b.set_xticks(d["processes"])
    b.set_xticklabels([str(int(p)) for p in d["processes"]])
    b.minorticks_off()
    b.legend(fontsize=8)
    return fig


def encoders(folder):
    """One figure per encoder family (docs/): returns {png name: figure}."""
    figs = {}
    s = read(folder, "sinusoidal")
    table = np.array([list(row)[1:] for row in s])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    im = ax.imshow(table.T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    ax.set(title="sinusoidal PE[pos, i], dim 64, concatenated: sines, then cosines", xlabel="position",
           ylabel="dimension i")
    fig.colorbar(im, ax=ax)
    figs["sinusoidal"] = fig

    a = read(folder, "alibi")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    heads = [c for c in a.dtype.names if c.startswith("h")]
    for i, col in enumerate(heads):
        ax.plot(a["distance"], a[col], color=plt.cm.viridis(i / (len(heads) - 1)), label=f"head {col[1:]}")
    ax.set(title="ALiBi bias, 8 heads: slopes 1/2, 1/4, ..., 1/256", xlabel="qpos - kpos", ylabel="bias")
    ax.legend(fontsize=7, ncol=2)
    figs["alibi"] = fig

    t = read(folder, "t5_bias")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.step(t["relative"], t["bidirectional"], where="mid", label="bidirectional (encoder)")
    ax.step(t["relative"], t["causal"], where="mid", label="causal (decoder)")
    for x in (-128, 128):
        ax.axvline(x, color="gray", ls=":", lw=1)
    ax.set(title="T5 buckets: 32 buckets, max distance 128", xlabel="kpos - qpos", ylabel="bucket")
    ax.legend(fontsize=8)
    figs["t5_bias"] = fig

    sh = read(folder, "shaw")
    index = np.array([list(row)[1:] for row in sh])
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(index, cmap="coolwarm", origin="upper")
    ax.set(title="Shaw: table row clip(j - i, -K, K) + K, K = 4", xlabel="key j", ylabel="query i")
    fig.colorbar(im, ax=ax)
    figs["shaw"] = fig
    return figs


def positions_2025(folder):
    """The position schemes of recent models (docs/mrope.md, chunked_attention.md, layer_config.md)."""
    figs = {}
    axes3 = ListedColormap(["#4c72b0", "#dd8452", "#55a868"])
    m = read(folder, "mrope_axes")
    fig, ax = plt.subplots(figsize=(8, 2.4))
    grid = np.vstack([m["sections"], m["interleaved"]])
    ax.imshow(grid, aspect="auto", cmap=axes3, vmin=-0.5, vmax=2.5, interpolation="nearest")
    ax.set_yticks([0, 1], ["Qwen2-VL sections\n[16, 24, 24]", "Qwen3-VL interleaved\n[24, 20, 20]"])
    ax.set(title="M-RoPE, head_dim 128: the axis whose position turns each rotary pair",
           xlabel="rotary pair k")
    for i, (name, color) in enumerate(zip(("temporal", "height", "width"), axes3.colors)):
        ax.plot([], [], "s", color=color, label=name)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, fontsize=8, frameon=False)
    figs["mrope"] = fig

    masks = ListedColormap(["#d9d9d9", "#9ecae1", "#08519c"])
    fig, axs = plt.subplots(1, 2, figsize=(8.5, 4.2))
    for ax, name, title in ((axs[0], "chunk_mask", "chunks of 8, causal (Llama 4)"),
                            (axs[1], "window_mask", "window of 8, causal (Gemma 3 local)")):
        t = read(folder, name)
        grid = np.array([list(row)[1:] for row in t])
        ax.imshow(grid, cmap=masks, vmin=-0.5, vmax=2.5, interpolation="nearest")
        for x in np.arange(-0.5, grid.shape[1], 4):
            ax.axvline(x, color="white", lw=0.8)
            ax.axhline(x, color="white", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="key position", ylabel="query position")
    for label, color in zip(("tile skipped", "hidden, tile computed", "visible"), masks.colors):
        axs[1].plot([], [], "s", color=color, label=label)
    axs[1].legend(loc="upper center", bbox_to_anchor=(-0.1, -0.13), ncol=3, fontsize=8, frameon=False)
    figs["chunked_attention"] = fig

    lay = read(folder, "layers")
    tmp = read(folder, "temperature")
    fig, axs = plt.subplots(2, 1, figsize=(8, 5.2), gridspec_kw={"height_ratios": [1.1, 1]})
    ax = axs[0]
    n = len(lay["layer"])
    for i in range(n):
        local = lay["gemma_window"][i] > 0
        ax.add_patch(plt.Rectangle((i - 0.45, 1.05), 0.9, 0.8, color="#9ecae1" if local else "#08519c"))
        rope = lay["llama_rope"][i] > 0
        ax.add_patch(plt.Rectangle((i - 0.45, 0.05), 0.9, 0.8, color="#fdae6b" if rope else "#a63603"))
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1.9)
    ax.set_yticks([0.45, 1.45], ["Llama 4 Scout", "Gemma 3 27B"])
    ax.set(xlabel="layer", title="Per-layer encodings from the published configs (first 24 layers)")
    for label, color in (("local: base 1e4, window 1024", "#9ecae1"), ("global: base 1e6, linear x8", "#08519c"),
                         ("RoPE, chunks of 8192", "#fdae6b"), ("NoPE + query temperature", "#a63603")):
        ax.plot([], [], "s", color=color, label=label)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8, frameon=False)
    ax = axs[1]
    ax.step(tmp["position"] / 1024, tmp["factor"], where="post")
    ax.set(xlabel="query position p (thousands of tokens)", ylabel="t(p)",
           title="Llama 4 NoPE layers: t(p) = 0.1 ln(floor((p + 1) / 8192) + 1) + 1")
    figs["layer_config"] = fig
    return figs


PICTURES = {"rope_decay": rope_decay, "interpolation": interpolation, "needle": needle, "ring_memory": ring_memory,
            "encoders": encoders, "positions_2025": positions_2025}


def main(argv):
    if len(argv) != 3 or argv[1] not in PICTURES:
        print(__doc__, file=sys.stderr)
        print("pictures: " + ", ".join(PICTURES), file=sys.stderr)
        return 2
    name, folder = argv[1], argv[2]
    figs = PICTURES[name](folder)
    if not isinstance(figs, dict):
        figs = {name: figs}
    for png, fig in figs.items():
        fig.tight_layout()
        path = os.path.join(folder, png + ".png")
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            print(f"plot.py: {path} was not written", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
