"""SIGTERM (a scheduler's preemption notice) stops `lpjax train` at a step boundary with a checkpoint
and exit 0; running the same command again ends bit-identical to a run that was never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tiny import digits_recipe

REPO = Path(__file__).resolve().parents[1]

# two 300-step training runs and a resume: run by .ci/run after make test
pytestmark = pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1",
                                reason="several training runs; LPJAX_SLOW_TESTS=1 runs it")

# chunked on a 2-stage MLP, sequential schedule: a checkpoint's flush changes nothing, so the
# stopped-and-resumed run must match the unbroken one bit for bit.
CONFIG = digits_recipe(num_steps=300, log_every=5, checkpoint__every_steps=1000)


def start(config, workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "lpjax", "train", "--config", str(config), "--workdir", str(workdir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final_params(workdir, step):
    return [jax.tree.leaves(ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / f"stage{k}")["params"])
            for k in range(2)]


def test_sigterm_saves_exits_0_and_the_rerun_is_bit_identical(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    stopped, unbroken = tmp_path / "stopped", tmp_path / "unbroken"
    reference = start(config, unbroken)
    proc = start(config, stopped)
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    line = next(line for line in out.splitlines() if line.startswith("preempted at step"))
    step = int(line.split()[3].rstrip(";"))
    assert line == f"preempted at step {step}; run the same command to resume"
    assert 10 <= step < 300 and (stopped / "checkpoints" / str(step)).is_dir()
    assert not (stopped / "results.json").exists()  # the run is not finished

    rerun = start(config, stopped)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert f"resumed from the checkpoint at step {step}" in out
    reference.communicate(timeout=300)
    assert reference.returncode == 0
    for mine, theirs in zip(final_params(stopped, 300), final_params(unbroken, 300), strict=True):
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    last = json.loads((stopped / "results.json").read_text())["final"]
    assert last == json.loads((unbroken / "results.json").read_text())["final"]


def test_ctrl_c_says_interrupted_exits_130_and_the_rerun_resumes(tmp_path):
    """SIGINT is a person's Ctrl-C, not a preemption: the same checkpoint and resume, its own words."""
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    workdir = tmp_path / "run"
    proc = start(config, workdir)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    line = next(line for line in out.splitlines() if line.startswith("interrupted at step"))
    step = int(line.split()[3].rstrip(";"))
    assert line == f"interrupted at step {step}; run the same command to resume"
    assert "preempted" not in out and (workdir / "checkpoints" / str(step)).is_dir()
    rerun = start(config, workdir)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert f"resumed from the checkpoint at step {step}" in out
