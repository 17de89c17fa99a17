"""bench/training_step.py, the training-step benchmark against plain PyTorch attention, runs: a short length,
one timed step (it asserts itself that both models reach the same loss)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "training_step.py")


def test_training_step_benchmark_runs_and_both_models_agree():
    import posenc

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(posenc.__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, SCRIPT, "--lengths", "48,96", "--steps", "1"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 48 ") or line.startswith("| 96 ")]
    assert len(rows) == 2, r.stdout
