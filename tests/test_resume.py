"""Kill, resume, layout changes and damaged checkpoints, through `lpjax train` as a user runs it."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lpjax.training.checkpoint import Checkpointer
from lpjax.config.build import build_experiment
from lpjax.training.loop import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "mnist_mlp.py")
# digits and a small MLP: long enough (about 3 s of steps) to be killed in the middle
BASE = ["--config.dataset.name=digits", "--config.dataset.test_size=300", "--config.model.width=64",
        "--config.optimizer.decay=constant", "--config.num_steps=240", "--config.log_every=10",
        "--config.checkpoint.every_steps=20", "--config.eval_every=0"]
PIPELINED = ["--config.layout.executor=mpmd", "--config.schedule.name=streaming",
             "--config.schedule.microbatches=2", "--config.method.name=overlapping"]


def command(workdir, extra):
    return [sys.executable, "-m", "lpjax", "train", f"--config={RECIPE}", *BASE, *extra, f"--workdir={workdir}"]


def environment():
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")


def final_states(workdir):
    """The stage states of a run's newest checkpoint, read back onto one device."""
    config = json.loads((Path(workdir) / "config.json").read_text())
    config["layout"] = {"executor": "reference", "stages": None, "data": 1}
    trainer = build_experiment(config).trainer
    states, meta = Checkpointer(str(Path(workdir) / "checkpoints"), trainer.num_stages).restore_latest(
        trainer.stage_states)
    return jax.device_get([(s.params, s.rest, s.opt_state) for s in states]), meta["step"]


def assert_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def checkpoint_steps(workdir):
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


@pytest.mark.parametrize("extra", [[], PIPELINED], ids=["reference", "mpmd-streaming"])
def test_sigkill_at_a_random_point_then_resume_matches_an_uninterrupted_run(tmp_path, extra):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    whole = subprocess.run(command(tmp_path / "whole", extra), env=environment(), capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr

    killed = subprocess.Popen(command(tmp_path / "killed", extra), env=environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint_steps(tmp_path / "killed") and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    assert killed.poll() is None, f"the run finished before it could be killed (seed {seed})"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    at_kill = checkpoint_steps(tmp_path / "killed")
    assert at_kill and at_kill[-1] < 240, (seed, at_kill)

    resumed = subprocess.run(command(tmp_path / "killed", extra), env=environment(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint at step" in resumed.stdout, (seed, resumed.stdout)

    (states_whole, step_whole), (states_resumed, step_resumed) = (final_states(tmp_path / "whole"),
                                                                  final_states(tmp_path / "killed"))
    assert step_whole == step_resumed == 240
    assert_identical(states_whole, states_resumed)
    # the metrics of the killed stretch were replaced, not duplicated
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 240


def small_config(**changes):
    config = {
        "dataset": {"name": "digits", "test_size": 300}, "model": {"name": "mlp", "depth": 2, "width": 32},
        "stages": 2, "method": {"name": "chunked"}, "optimizer": {"name": "sgd", "learning_rate": 0.05},
        "batch_size": 32, "num_steps": 20, "log_every": 5, "checkpoint": {"every_steps": 10},
        "layout": {"executor": "mpmd", "stages": 2, "data": 1},
    }
    for key, value in changes.items():
        config[key] = value
    return config


def test_resume_onto_a_different_data_axis(tmp_path):
    """Steps 1-10 on 2x1 devices, 11-20 on 2x2. Not bit-exact against a 2x2 run from the start: on
    two data devices each step's gradient is a mean of two half-batch means, whose float rounding
    differs from the one-device mean; the difference stays at rounding level."""
    train_and_evaluate(small_config(num_steps=10), str(tmp_path / "moved"), progress=False, verbose=False)
    wider = {"executor": "mpmd", "stages": 2, "data": 2}
    results = train_and_evaluate(small_config(layout=wider), str(tmp_path / "moved"), progress=False, verbose=False)
    assert results["resumed_from_step"] == 10
    train_and_evaluate(small_config(layout=wider), str(tmp_path / "wide"), progress=False, verbose=False)
    moved, wide = final_states(tmp_path / "moved"), final_states(tmp_path / "wide")
    assert moved[1] == wide[1] == 20
    for x, y in zip(jax.tree.leaves(moved[0]), jax.tree.leaves(wide[0])):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=1e-5, rtol=0)


def damage(step_dir: Path):
    """Overwrite the middle of every array data file of a checkpoint with other bytes."""
    damaged = 0
    for path in step_dir.rglob("*"):
        if path.is_file() and "d" in path.parts[len(step_dir.parts):-1]:
            data = bytearray(path.read_bytes())
            for i in range(len(data) // 3, 2 * len(data) // 3):
                data[i] ^= 0x5A
            path.write_bytes(bytes(data))
            damaged += 1
    assert damaged, f"no array data files under {step_dir}"


@pytest.mark.parametrize("how", ["bytes flipped", "file missing"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd, how):
    train_and_evaluate(small_config(), str(tmp_path / "clean"), progress=False, verbose=False)
    train_and_evaluate(small_config(), str(tmp_path / "run"), progress=False, verbose=False)
    newest = tmp_path / "run" / "checkpoints" / "20"
    if how == "bytes flipped":
        damage(newest / "stage1")
    else:
        (newest / "stage0" / "manifest.ocdbt").unlink()
    capfd.readouterr()

    results = train_and_evaluate(small_config(), str(tmp_path / "run"), progress=False, verbose=False)
    warning = capfd.readouterr().err
    assert "lpjax: warning: checkpoint at step 20 is damaged" in warning, warning
    assert results["resumed_from_step"] == 10
    assert (tmp_path / "run" / "corrupt" / "20").is_dir()  # moved aside, not deleted
    assert_identical(final_states(tmp_path / "clean"), final_states(tmp_path / "run"))


def test_a_different_model_in_a_resumed_workdir_is_refused_and_nothing_changes(tmp_path):
    train_and_evaluate(small_config(num_steps=10), str(tmp_path / "run"), progress=False, verbose=False)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    changed = small_config(model={"name": "mlp", "depth": 2, "width": 48})
    with pytest.raises(Exception, match="different model"):
        train_and_evaluate(changed, str(tmp_path / "run"), progress=False, verbose=False)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after


def test_spmd_pipeline_resumes_exactly(tmp_path):
    """The one-program executor: 10 steps, stop, resume to 20 equals 20 straight (streaming, so the
    checkpoint at 10 flushed a pipeline with microbatches in flight in both runs)."""
    spmd = {"executor": "spmd", "stages": 2, "data": 1}
    options = dict(layout=spmd, method={"name": "overlapping", "window": 2},
                   schedule={"name": "streaming", "microbatches": 2})
    train_and_evaluate(small_config(num_steps=10, **options), str(tmp_path / "split"), progress=False, verbose=False)
    results = train_and_evaluate(small_config(**options), str(tmp_path / "split"), progress=False, verbose=False)
    assert results["resumed_from_step"] == 10
    train_and_evaluate(small_config(**options), str(tmp_path / "straight"), progress=False, verbose=False)
    assert_identical(final_states(tmp_path / "split"), final_states(tmp_path / "straight"))
