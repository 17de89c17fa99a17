"""examples/length_generalisation/study.py: its task generator, and a reduced --quick run (two encodings, a few
dozen steps, under a minute on one core) that must train (the loss falls), finish, and write its JSON
results and plots."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

STUDY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "length_generalisation",
                     "study.py")


def load_study():
    spec = importlib.util.spec_from_file_location("length_generalisation_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recall_batches_hold_each_queried_value_after_its_key_in_the_haystack():
    study = load_study()
    rng = np.random.default_rng(3)
    for n, pairs in ((32, 2), (128, 2), (32, 4), (64, 4)):
        tokens, ask, answers, depths = study.recall_batch(rng, 16, n, pairs)
        assert tokens.shape == (16, n) and answers.shape == (16, pairs) and depths.shape == (16, pairs)
        hay = n - 1 - 2 * pairs
        assert (tokens[:, hay] == study.SEP).all() and int((tokens == study.SEP).sum()) == 16
        is_key = (tokens >= study.SYMBOLS) & (tokens < study.SYMBOLS + study.KEYS)
        assert (is_key[:, :hay].sum(1) == pairs).all()  # keys appear in the haystack only as needles
        assert (answers < study.SYMBOLS).all()  # values are drawn from the filler's symbols
        for b in range(16):
            row = tokens[b].tolist()
            for j, at in enumerate(ask.tolist()):
                key = row[at]
                assert is_key[b, at] and row[at + 1] == answers[b, j]  # a query, then its answer
                first = row.index(key)  # the needle: the key's only occurrence in the haystack
                assert first < hay - 1 and row[first + 1] == answers[b, j]
                assert row[:hay].count(key) == 1
                assert depths[b, j] == pytest.approx(first / hay)


def test_a_reduced_quick_run_trains_and_writes_results_and_plots(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, STUDY, "--quick", "--steps", "40", "--ft-steps", "3", "--eval", "8",
           "--encodings", "none,rope", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    for part, key in (("recall", "accuracy"), ("lm", "perplexity")):
        with open(out / f"length_generalisation_{part}.json") as f:
            res = json.load(f)
        L = res["config"]["L"]
        assert res["lengths"] == [L, 2 * L, 4 * L, 8 * L, 16 * L]
        names = {run["encoding"] for run in res["runs"]}
        assert {"none", "rope", "rope_pi", "rope_pi_ft"} <= names, names
        for run in res["runs"]:
            assert sorted(int(n) for n in run[key]) == res["lengths"]
            values = list(run[key].values())
            if key == "accuracy":
                assert all(0.0 <= a <= 1.0 for a in values), run
            else:
                assert all(math.isfinite(p) and p > 1.0 for p in values), run
            if "losses" in run and run["encoding"] in ("none", "rope"):
                losses = run["losses"]
                assert len(losses) == 40
                first, last = np.mean(losses[:5]), np.mean(losses[-5:])
                assert last < first - 0.3, (part, run["encoding"], first, last)
    for name in ("extrapolation", "rope_extension", "depth", "lm"):
        with open(out / f"length_generalisation_{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
