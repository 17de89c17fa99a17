"""Length generalisation of positional encodings, trained with posenc.torch.attention.

A small decoder-only transformer (2 layers, d_model 64, 4 heads of 16, pre-LayerNorm, MLP 4x) is
trained at a short length L with each encoding in turn, its attention being posenc's blockwise kernel
and backward (posenc.torch.attention), then read at L, 2L, 4L, 8L and 16L:

- none (NoPE: the causal mask is the only source of order), sinusoidal (posenc.Sinusoidal's table
  added to the token embeddings), RoPE (posenc.Rope as encoding=, base 1e4), ALiBi (posenc.Alibi,
  the paper's fixed slopes) and a learned T5 bias (posenc.torch.T5Bias, 32 buckets, max_distance 128);
- recall: key-value retrieval. A haystack of random tokens holds P key-value pairs ("needles": a key
  token followed by a value drawn from the filler's symbols) at random depths; after a separator come P
  queries, keys drawn from the P with replacement, and the model must give each key's value. Only those
  P answers are scored. Finding the token that follows a key is an induction step that needs relative
  positions (a previous-token head), so the encodings differ;
- RoPE read at 4L by position interpolation (posenc.LinearScaling(factor=4)) and by YaRN
  (posenc.YarnScaling(factor=4, original_max_position=L)), without and with a short fine-tune at 4L;
  plain RoPE fine-tuned at 4L as a control;
- accuracy against the depth of the needle at 4L;
- lm: a character-level language model on the English license texts Debian ships
  (/usr/share/common-licenses; no download), Apache-2.0 and MPL-2.0 held out, with the perplexity of
  the held-out text in non-overlapping windows of L..16L characters.

Every configuration runs on the CPU with one thread by default (--threads).

    python3 study.py --quick                 # 1 seed, short training: about 2 minutes on 1 core
    python3 study.py --full                  # 3 seeds: about 40 minutes on an idle 2-core machine
    python3 study.py --full --parts recall   # one part (results/length_generalisation_recall.json)
    python3 study.py --full --plot-only      # redraw the plots of --full from its JSON results

--quick writes its JSON and plots into --out (default ./length_generalisation_quick); --full writes the
JSON into results/ beside this script and the plots into the repository's docs/images, each run saved as
it ends. Measured on a 2-core x86-64 machine shared with a compiler, under nice, one thread: --quick
137 s (its recall models only begin to learn: a check that everything runs); --full --parts lm 60 minutes, --parts recall
46 minutes for 2 of its 3 seeds, run side by side (docs/length_generalisation.md).
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

import posenc
import posenc.torch as pt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

ENCODINGS = ["none", "sinusoidal", "rope", "alibi", "t5"]
LABELS = {"none": "NoPE", "sinusoidal": "sinusoidal", "rope": "RoPE", "alibi": "ALiBi", "t5": "T5 bias",
          "rope_pi": "RoPE + PI (x4)", "rope_yarn": "RoPE + YaRN (x4)", "rope_ft": "RoPE, fine-tuned at 4L",
          "rope_pi_ft": "RoPE + PI (x4), fine-tuned at 4L", "rope_yarn_ft": "RoPE + YaRN (x4), fine-tuned at 4L"}

# The configurations. steps: training steps at L; ft_steps: fine-tune steps at 4L; eval: sequences per length.
CONFIGS = {
    "quick": {"seeds": 1, "recall": {"L": 32, "pairs": 4, "steps": 150, "batch": 32, "lr": 3e-3, "eval": 64,
                                     "ft_steps": 20, "ft_batch": 8, "factors": [1, 2, 4, 8, 16]},
              "lm": {"L": 32, "steps": 80, "batch": 16, "lr": 3e-3, "ft_steps": 10, "ft_batch": 4,
                     "factors": [1, 2, 4, 8, 16], "eval_chars": 8192}},
    "full": {"seeds": 3, "recall": {"L": 32, "pairs": 4, "steps": 800, "batch": 32, "lr": 3e-3, "eval": 128,
                                    "ft_steps": 100, "ft_batch": 8, "factors": [1, 2, 4, 8, 16]},
             "lm": {"L": 64, "steps": 1000, "batch": 16, "lr": 3e-3, "ft_steps": 100, "ft_batch": 4,
                    "factors": [1, 2, 4, 8, 16], "eval_chars": 16384}},
}


# --- The model ------------------------------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, d_model, heads, t5):
        super().__init__()
        self.h, self.d = heads, d_model // heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = torch.nn.Linear(d_model, d_model, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))
        self.norm1, self.norm2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)
        # A learned T5 bias per layer, decoder form (past keys only).
        self.t5 = pt.T5Bias(heads, 32, max_distance=128, bidirectional=False) if t5 else None

    def forward(self, x, encoding, threads):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.h, self.d).unbind(2)  # [b, t, h, d] views
        enc = self.t5 if self.t5 is not None else encoding
        a = pt.attention(q, k, v, encoding=enc, causal=True, threads=threads)
        x = x + self.o(a.flatten(2))
        return x + self.mlp(self.norm2(x))


class Model(torch.nn.Module):
    """Token embedding (+ sinusoidal table), blocks, final LayerNorm, output head. `self.encoding` is the
    posenc encoder every block passes to the attention (None, a posenc.Rope or posenc.Alibi); replacing
    it (a scaled Rope) changes how the trained weights read positions."""

    def __init__(self, kind, vocab, d_model=64, heads=4, layers=2, threads=1):
        super().__init__()
        self.kind, self.threads, self.d_model = kind, threads, d_model
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.blocks = torch.nn.ModuleList(Block(d_model, heads, kind == "t5") for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab)
        self.encoding = {"rope": posenc.Rope(head_dim=d_model // heads),
                         "alibi": posenc.Alibi(num_heads=heads)}.get(kind)
        self.sinusoidal = posenc.Sinusoidal(dim=d_model) if kind == "sinusoidal" else None
        self._tables = {}

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.sinusoidal is not None:
            t = tokens.shape[1]
            if t not in self._tables:
                self._tables[t] = torch.from_numpy(self.sinusoidal.table(range(t)))
            x = x + self._tables[t]
        for block in self.blocks:
            x = block(x, self.encoding, self.threads)
        return self.head(self.norm(x))


def clone(model):
    """A deep copy of the model (posenc's encoders are immutable: the copy shares them)."""
    return copy.deepcopy(model)


def rope_variant(model, variant, L):
    """The Rope read at 4L: plain, position interpolation or YaRN (factor 4 over the trained length L)."""
    head_dim = model.d_model // model.blocks[0].h
    if variant == "pi":
        return posenc.Rope(head_dim=head_dim, scaling=posenc.LinearScaling(factor=4.0))
    if variant == "yarn":
        return posenc.Rope(head_dim=head_dim, scaling=posenc.YarnScaling(factor=4.0, original_max_position=L))
    return posenc.Rope(head_dim=head_dim)


def train(model, batches, steps, lr, loss_fn, warmup=50):
    """Adam, linear warm-up then cosine decay to lr/10; returns the loss of every step and the steps skipped
    because a gradient was not finite."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = min(warmup, max(steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    model.train()
    losses, skipped = [], []
    for step in range(steps):
        loss = loss_fn(model, batches(step))
        opt.zero_grad()
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            # A guard, counted in the results: a non-finite gradient skips the step instead of spoiling
            # the weights (none in the committed runs; see docs/length_generalisation.md).
            skipped.append(step)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, skipped


# --- Recall: key-value retrieval at random depths -------------------------------------------------------

SYMBOLS, KEYS = 32, 16  # filler and value tokens share SYMBOLS symbols (0..31); keys are 32..47
SEP = SYMBOLS + KEYS
RECALL_VOCAB = SEP + 1


def recall_batch(rng, batch, n, pairs):
    """tokens [batch, n] int64, answer positions [pairs] (the same for every row: the query keys, whose
    next token is the value), answers [batch, pairs], depths [batch, pairs] (the queried needle's position /
    haystack length, in [0, 1)). Layout: haystack (n - 1 - 2 pairs tokens, `pairs` needles inside), SEP,
    `pairs` queries. Values are drawn from the filler's symbols, so that a value cannot be told from filler
    but by the key before it; the queries draw their keys with replacement, so that no answer follows from
    the others by elimination."""
    hay = n - 1 - 2 * pairs
    fill = hay - 2 * pairs
    tokens = np.empty((batch, n), dtype=np.int64)
    answers = np.empty((batch, pairs), dtype=np.int64)
    depths = np.empty((batch, pairs))
    for b in range(batch):
        keys = SYMBOLS + rng.choice(KEYS, pairs, replace=False)
        values = rng.integers(0, SYMBOLS, pairs)
        # The haystack as fill filler items and pairs needle items in a random order.
        slots = np.sort(rng.choice(fill + pairs, pairs, replace=False))
        row, at, where = [], 0, np.empty(pairs)
        filler = rng.integers(0, SYMBOLS, fill)
        for i in range(fill + pairs):
            if at < pairs and slots[at] == i:
                where[at] = len(row) / hay
                row += [keys[at], values[at]]
                at += 1
            else:
                row.append(filler[i - at])
        asked = rng.integers(0, pairs, pairs)
        row.append(SEP)
        for j in asked:
            row += [keys[j], values[j]]
        tokens[b] = row
        answers[b], depths[b] = values[asked], where[asked]
    ask = hay + 1 + 2 * np.arange(pairs)
    return torch.from_numpy(tokens), torch.from_numpy(ask), torch.from_numpy(answers), depths


def recall_loss(model, batch):
    tokens, ask, answers, _ = batch
    logits = model(tokens)[:, ask]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, RECALL_VOCAB), answers.reshape(-1))


@torch.no_grad()
def recall_eval(model, n, count, pairs, seed, chunk=32):
    """Accuracy at length n over `count` sequences (fixed by the seed), and (correct, depth) per answer."""
    model.eval()
    rng = np.random.default_rng(10_000 + seed * 100 + n)
    correct, depth = [], []
    for start in range(0, count, chunk):
        tokens, ask, answers, depths = recall_batch(rng, min(chunk, count - start), n, pairs)
        pred = model(tokens)[:, ask].argmax(-1)
        correct.append((pred == answers).numpy().ravel())
        depth.append(depths.ravel())
    correct, depth = np.concatenate(correct), np.concatenate(depth)
    return float(correct.mean()), correct, depth


def run_recall(cfg, seeds, threads, log, encodings=ENCODINGS, save=lambda res: None, first_seed=0):
    L, pairs, factors = cfg["L"], cfg["pairs"], cfg["factors"]
    lengths = [f * L for f in factors]
    out = {"config": cfg, "lengths": lengths, "runs": []}

    def add(run):  # each run is saved as it ends (save), so that a stopped study keeps what it measured
        out["runs"].append(run)
        save(out)
    bins = np.linspace(0, 1, 11)

    def depth_curve(correct, depth):
        idx = np.clip(np.digitize(depth, bins) - 1, 0, len(bins) - 2)
        return [float(correct[idx == i].mean()) if (idx == i).any() else None for i in range(len(bins) - 1)]

    def evaluate(model, seed):
        accs, curve = {}, None
        for n in lengths:
            acc, correct, depth = recall_eval(model, n, cfg["eval"], pairs, seed)
            accs[n] = acc
            if n == 4 * L:
                curve = depth_curve(correct, depth)
        return accs, curve

    for seed in range(first_seed, first_seed + seeds):
        for kind in encodings:
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            model = Model(kind, RECALL_VOCAB, threads=threads)
            t0 = time.time()
            losses, skipped = train(model, lambda s: recall_batch(rng, cfg["batch"], L, pairs), cfg["steps"], cfg["lr"],
                           recall_loss)
            train_s = time.time() - t0
            accs, curve = evaluate(model, seed)
            add({"encoding": kind, "seed": seed, "train_seconds": train_s, "losses": losses, "skipped_steps": skipped,
                 "accuracy": accs, "depth_accuracy_4L": curve})
            log(f"recall seed {seed} {kind:10s} loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f} "
                f"({train_s:.0f} s) acc " + " ".join(f"{n}:{a:.3f}" for n, a in accs.items()))
            if kind != "rope":
                continue
            # RoPE read at 4L: scaled without fine-tune, then each variant fine-tuned at 4L.
            trained = model
            for variant in ("pi", "yarn", "plain"):
                name = {"pi": "rope_pi", "yarn": "rope_yarn", "plain": "rope"}[variant]
                if variant != "plain":
                    model = clone(trained)
                    model.encoding = rope_variant(model, variant, L)
                    accs, curve = evaluate(model, seed)
                    add({"encoding": name, "seed": seed, "accuracy": accs, "depth_accuracy_4L": curve})
                    log(f"recall seed {seed} {name:10s} no fine-tune acc "
                        + " ".join(f"{n}:{a:.3f}" for n, a in accs.items()))
                model = clone(trained)
                model.encoding = rope_variant(model, variant, L)
                ft_rng = np.random.default_rng(1000 + seed)
                t0 = time.time()
                ft_losses, ft_skipped = train(model, lambda s: recall_batch(ft_rng, cfg["ft_batch"], 4 * L, pairs),
                                  cfg["ft_steps"], cfg["lr"] / 3, recall_loss)
                ft_s = time.time() - t0
                accs, curve = evaluate(model, seed)
                add({"encoding": name + "_ft", "seed": seed, "train_seconds": ft_s,
                     "losses": ft_losses, "skipped_steps": ft_skipped, "accuracy": accs,
                     "depth_accuracy_4L": curve})
                log(f"recall seed {seed} {name + '_ft':10s} ({ft_s:.0f} s) acc "
                    + " ".join(f"{n}:{a:.3f}" for n, a in accs.items()))
    return out


# --- A character-level language model on Debian's license texts -----------------------------------------

LICENSES = "/usr/share/common-licenses"
HELD_OUT = ("Apache-2.0", "MPL-2.0")


def license_texts():
    """(train, held-out) text: every distinct file of /usr/share/common-licenses (symlinks resolved once),
    Apache-2.0 and MPL-2.0 held out. Near-duplicates (GPL-2/GPL-3, LGPL versions) stay in training."""
    seen, train_text, test_text = set(), [], []
    for name in sorted(os.listdir(LICENSES)):
        path = os.path.realpath(os.path.join(LICENSES, name))
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            text = " ".join(f.read().split())  # whitespace runs (line breaks, indentation) as one space
        (test_text if os.path.basename(path) in HELD_OUT else train_text).append(text)
    return "\n".join(train_text), "\n".join(test_text)


def run_lm(cfg, seeds, threads, log, encodings=ENCODINGS, save=lambda res: None, first_seed=0):
    train_text, test_text = license_texts()
    chars = sorted(set(train_text) | set(test_text))
    index = {c: i for i, c in enumerate(chars)}
    train_ids = torch.tensor([index[c] for c in train_text])
    test_ids = torch.tensor([index[c] for c in test_text])[: cfg["eval_chars"]]
    L, vocab = cfg["L"], len(chars)
    lengths = [f * L for f in cfg["factors"]]
    out = {"config": cfg, "lengths": lengths, "train_chars": len(train_text), "test_chars": int(test_ids.numel()),
           "vocab": vocab, "runs": []}

    def add(run):
        out["runs"].append(run)
        save(out)

    def batches(rng, batch, n):
        def get(step):
            starts = rng.integers(0, train_ids.numel() - n - 1, batch)
            return torch.stack([train_ids[s:s + n + 1] for s in starts])
        return get

    def lm_loss(model, seqs):
        logits = model(seqs[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), seqs[:, 1:].reshape(-1))

    @torch.no_grad()
    def perplexity(model):
        """exp(mean loss) over the held-out text cut into non-overlapping windows of n characters."""
        model.eval()
        ppl = {}
        for n in lengths:
            windows = (test_ids.numel() - 1) // n
            seqs = torch.stack([test_ids[i * n:i * n + n + 1] for i in range(windows)])
            total = 0.0
            for s in range(0, windows, 8):
                chunk = seqs[s:s + 8]
                logits = model(chunk[:, :-1])
                total += torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), chunk[:, 1:].reshape(-1),
                                                           reduction="sum").item()
            ppl[n] = math.exp(total / (windows * n))
        return ppl

    for seed in range(first_seed, first_seed + seeds):
        for kind in encodings:
            torch.manual_seed(seed)
            model = Model(kind, vocab, threads=threads)
            t0 = time.time()
            losses, skipped = train(model, batches(np.random.default_rng(seed), cfg["batch"], L), cfg["steps"],
                                    cfg["lr"],
                           lm_loss)
            train_s = time.time() - t0
            ppl = perplexity(model)
            add({"encoding": kind, "seed": seed, "train_seconds": train_s, "losses": losses, "skipped_steps": skipped,
                 "perplexity": ppl})
            log(f"lm seed {seed} {kind:10s} loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f} "
                f"({train_s:.0f} s) ppl " + " ".join(f"{n}:{p:.2f}" for n, p in ppl.items()))
            if kind != "rope":
                continue
            trained = model
            model = clone(trained)
            model.encoding = rope_variant(model, "pi", L)
            ppl = perplexity(model)
            add({"encoding": "rope_pi", "seed": seed, "perplexity": ppl})
            log(f"lm seed {seed} rope_pi    no fine-tune ppl " + " ".join(f"{n}:{p:.2f}" for n, p in ppl.items()))
            model = clone(trained)
            model.encoding = rope_variant(model, "pi", L)
            t0 = time.time()
            ft_losses, ft_skipped = train(model, batches(np.random.default_rng(1000 + seed), cfg["ft_batch"], 4 * L),
                              cfg["ft_steps"], cfg["lr"] / 3, lm_loss)
            ft_s = time.time() - t0
            ppl = perplexity(model)
            add({"encoding": "rope_pi_ft", "seed": seed, "train_seconds": ft_s, "losses": ft_losses,
                 "skipped_steps": ft_skipped, "perplexity": ppl})
            log(f"lm seed {seed} rope_pi_ft ({ft_s:.0f} s) ppl " + " ".join(f"{n}:{p:.2f}" for n, p in ppl.items()))
    return out


# --- Plots ------------------------------------------------------------------------------------------------

def stats(runs, name, key, n):
    vals = [r[key][str(n)] if str(n) in r[key] else r[key][n] for r in runs if r["encoding"] == name]
    return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else None


def plot(images, recall=None, lm=None, prefix="length_generalisation"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def lines(ax, res, names, key, ylabel):
        L = res["config"]["L"]
        for name in names:
            pts = [(n, stats(res["runs"], name, key, n)) for n in res["lengths"]]
            pts = [(n, s) for n, s in pts if s is not None]
            if not pts:
                continue
            xs = [n / L for n, _ in pts]
            ax.errorbar(xs, [s[0] for _, s in pts], yerr=[s[1] for _, s in pts], marker="o", capsize=3,
                        label=LABELS[name])
        ax.set_xscale("log", base=2)
        ax.set_xticks([n / L for n in res["lengths"]])
        ax.set_xticklabels([f"{n // L}L\n({n})" for n in res["lengths"]])
        ax.set_xlabel(f"evaluation length (L = {L} tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    def seed_count(res):
        """'3 seeds', or '2-3 seeds' when a stopped study has fewer runs of some encodings."""
        counts = [sum(1 for r in res["runs"] if r["encoding"] == name) for name in {r["encoding"] for r in res["runs"]}]
        lo, hi = min(counts), max(counts)
        return f"{lo}-{hi} seeds" if lo != hi else f"{hi} seed{'s' if hi > 1 else ''}"

    if recall is not None:
        sub = f"{seed_count(recall)}, mean and standard deviation"
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines(ax, recall, ENCODINGS, "accuracy", "key-value recall accuracy")
        ax.axhline(1 / SYMBOLS, color="gray", ls=":", label="chance")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Trained at L, read at longer lengths ({sub})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(images, f"{prefix}_extrapolation.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines(ax, recall, ["rope", "rope_pi", "rope_yarn", "rope_ft", "rope_pi_ft", "rope_yarn_ft"], "accuracy",
              "key-value recall accuracy")
        ax.axvline(4, color="gray", ls="--", lw=0.8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"RoPE extended to 4L, with and without a fine-tune at 4L ({sub})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(images, f"{prefix}_rope_extension.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(9, 4.5))
        centres = np.arange(10) / 10 + 0.05
        for name in ENCODINGS + ["rope_pi_ft", "rope_yarn_ft"]:
            curves = [r["depth_accuracy_4L"] for r in recall["runs"]
                      if r["encoding"] == name and r["depth_accuracy_4L"]]
            if not curves:
                continue
            arr = np.array([[np.nan if v is None else v for v in c] for c in curves])
            ax.errorbar(centres, np.nanmean(arr, 0), yerr=np.nanstd(arr, 0), marker="o", capsize=3,
                        label=LABELS[name], ls="--" if name.endswith("_ft") else "-")
        ax.set_xlabel("depth of the needle in the haystack (0 = first token, 1 = just before the queries)")
        ax.set_ylabel(f"recall accuracy at 4L = {4 * recall['config']['L']} tokens")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"Accuracy against needle depth at 4L ({sub})", fontsize=10)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        written.append(os.path.join(images, f"{prefix}_depth.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if lm is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines(ax, lm, ["none", "sinusoidal", "rope", "rope_pi", "rope_pi_ft", "alibi", "t5"], "perplexity",
              "held-out perplexity (characters)")
        ax.set_yscale("log")
        ax.set_title(f"Character LM on Debian's license texts, trained at L ({seed_count(lm)})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(images, f"{prefix}_lm.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def tables(recall=None, lm=None):
    """Markdown tables of the results: mean +- standard deviation over seeds."""
    lines = []

    def table(res, names, key, fmt, title):
        L = res["config"]["L"]
        lines.append(f"{title}\n")
        lines.append("| encoding | seeds | " + " | ".join(f"{n // L}L = {n}" for n in res["lengths"]) + " |")
        lines.append("|---|---|" + "---|" * len(res["lengths"]))
        for name in names:
            cells = [stats(res["runs"], name, key, n) for n in res["lengths"]]
            if any(c is None for c in cells):
                continue
            lines.append(f"| {LABELS[name]} | {cells[0][2]} | " + " | ".join(fmt.format(m, s) for m, s, _ in cells)
                         + " |")
        lines.append("")

    if recall is not None:
        table(recall, ENCODINGS + ["rope_pi", "rope_yarn", "rope_ft", "rope_pi_ft", "rope_yarn_ft"], "accuracy",
              "{:.2f} ± {:.2f}", "Recall accuracy")
    if lm is not None:
        table(lm, ["none", "sinusoidal", "rope", "rope_pi", "rope_pi_ft", "alibi", "t5"], "perplexity",
              "{:.2f} ± {:.2f}", "Held-out perplexity")
    for res, part in ((recall, "recall"), (lm, "lm")):
        if res is None:
            continue
        train = [r["train_seconds"] for r in res["runs"] if "train_seconds" in r and not r["encoding"].endswith("_ft")]
        skipped = sum(len(r.get("skipped_steps", [])) for r in res["runs"])
        lines.append(f"{part}: {res['seconds']:.0f} s in all, {np.mean(train):.0f} s per training run at L, "
                     f"{skipped} steps skipped for non-finite gradients")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a small configuration, 1 seed (the default)")
    mode.add_argument("--full", action="store_true", help="the whole study, 3 seeds")
    p.add_argument("--parts", default="recall,lm", help="comma-separated: recall, lm")
    p.add_argument("--seeds", type=int, help="override the configuration's seed count")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (to run seeds in several processes)")
    p.add_argument("--steps", type=int, help="override the training steps of both parts")
    p.add_argument("--ft-steps", type=int, help="override the fine-tune steps of both parts")
    p.add_argument("--eval", type=int, help="override the recall evaluation sequences per length")
    p.add_argument("--encodings", default=",".join(ENCODINGS), help="comma-separated subset of " + ", ".join(ENCODINGS))
    p.add_argument("--threads", type=int, default=1, help="torch and posenc threads (default 1)")
    p.add_argument("--out", help="folder of the JSON results (and, with --quick, the plots)")
    p.add_argument("--images", help="folder of the plots")
    p.add_argument("--plot-only", action="store_true", help="redraw the plots from the JSON results in --out")
    p.add_argument("--table", action="store_true", help="also print the results as Markdown tables")
    args = p.parse_args(argv)

    name = "full" if args.full else "quick"
    cfg = copy.deepcopy(CONFIGS[name])
    out = args.out or (os.path.join(HERE, "results") if args.full else "length_generalisation_quick")
    images = args.images or (os.path.join(ROOT, "docs", "images") if args.full else out)
    os.makedirs(out, exist_ok=True)
    os.makedirs(images, exist_ok=True)
    parts = [s for s in args.parts.split(",") if s]
    for part in parts:
        if part not in ("recall", "lm"):
            p.error(f"--parts: unknown part {part!r} (recall, lm)")
        for key, value in (("steps", args.steps), ("ft_steps", args.ft_steps)):
            if value is not None:
                cfg[part][key] = value
    if args.eval is not None:
        cfg["recall"]["eval"] = args.eval
    seeds = args.seeds or cfg["seeds"]
    encodings = [e for e in args.encodings.split(",") if e]
    for e in encodings:
        if e not in ENCODINGS:
            p.error(f"--encodings: unknown encoding {e!r} ({', '.join(ENCODINGS)})")
    torch.set_num_threads(args.threads)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    paths = {part: os.path.join(out, f"length_generalisation_{part}.json") for part in ("recall", "lm")}
    if not args.plot_only:
        t0 = time.time()
        for part in parts:
            t1 = time.time()

            def save(res, complete=False):
                res.update({"mode": name, "seeds": seeds, "threads": args.threads, "seconds": time.time() - t1,
                            "complete": complete, "torch": torch.__version__, "posenc": posenc.__version__})
                with open(paths[part] + ".tmp", "w") as f:
                    json.dump(res, f, indent=1)
                os.replace(paths[part] + ".tmp", paths[part])

            res = (run_recall if part == "recall" else run_lm)(cfg[part], seeds, args.threads, log, encodings, save,
                                                               args.first_seed)
            save(res, complete=True)
            log(f"{part}: {res['seconds']:.0f} s, results in {paths[part]}")
        log(f"total {time.time() - t0:.0f} s")
    loaded = {}
    for part, path in paths.items():
        if os.path.exists(path):
            with open(path) as f:
                loaded[part] = json.load(f)
    for path in plot(images, loaded.get("recall"), loaded.get("lm")):
        log(f"plot {path}")
    if args.table:
        print(tables(loaded.get("recall"), loaded.get("lm")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
