"""Injected NaN: `skip` carries on and counts, `halt` exits 1 with one line; no checkpoint is ever
non-finite."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from lpjax import cli
from lpjax.training.checkpoint import Checkpointer, state_summary
from lpjax.config.build import build_experiment
from lpjax.data import load_dataset
from lpjax.data.registry import DATASETS

NAN_ROWS = (5, 600, 1200)  # three poisoned training images: a few bad batches per epoch

RECIPE = """
from lpjax.config.build import base_config


def get_config():
    config = base_config()
    config.dataset.name = "digits_with_nan"
    config.model.name = "mlp"
    config.model.depth = 2
    config.model.width = 32
    config.stages = 2
    config.method.name = "chunked"
    config.optimizer.learning_rate = 0.01
    config.batch_size = 32
    config.num_steps = 60
    config.log_every = 5
    config.checkpoint.every_steps = 10
    return config
"""


def digits_with_nan(*, seed=0):
    data = load_dataset("digits", seed=seed)
    train_x = data.train_x.copy()
    train_x[list(NAN_ROWS)] = np.nan
    return dataclasses.replace(data, name="digits_with_nan", train_x=train_x)


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "digits_with_nan", digits_with_nan)
    path = tmp_path / "nan_recipe.py"
    path.write_text(RECIPE)
    return path


def checkpoints_are_finite(workdir):
    config = json.loads((workdir / "config.json").read_text())
    trainer = build_experiment(config).trainer
    checkpointer = Checkpointer(str(workdir / "checkpoints"), trainer.num_stages)
    steps = checkpointer.steps()
    for step in steps:
        states, _ = checkpointer._restore(step, trainer.stage_states)
        assert all(state_summary(s)[1] for s in states), f"checkpoint {step} holds non-finite values"
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get([s.params for s in states])))
    return steps


def test_skip_carries_on_and_counts_the_skipped_updates(recipe, tmp_path, capsys):
    workdir = tmp_path / "skip"
    code = cli.main(["lpjax", "train", f"--config={recipe}", "--config.nonfinite=skip", f"--workdir={workdir}"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    skipped = train[-1]["skipped"]
    assert skipped[0] > 0 and skipped[0] == skipped[1], skipped  # every bad batch, in both stages
    assert skipped[0] < 60 / 2  # most steps were fine and updated
    # records that averaged a bad batch's NaN loss are written as null; the others show it learning
    losses = [r["loss"][-1] for r in train if r["loss"][-1] is not None]
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0]
    results = json.loads((workdir / "results.json").read_text())
    assert results["final"]["test_accuracy"] > 0.3  # chance is 0.1
    assert checkpoints_are_finite(workdir)[-1] == 60


def test_halt_exits_1_with_one_line_and_leaves_only_finite_checkpoints(recipe, tmp_path, capsys):
    workdir = tmp_path / "halt"
    code = cli.main(["lpjax", "train", f"--config={recipe}", "--config.nonfinite=halt", f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if "lpjax:" in line]  # the rest is the progress bar
    assert len(lines) == 1 and lines[0].startswith("lpjax: error: non-finite loss or gradient"), err
    assert "--config.nonfinite=skip" in lines[0] and "Traceback" not in err
    assert not (workdir / "results.json").exists()
    assert all(step < 60 for step in checkpoints_are_finite(workdir))  # what was saved before the halt is finite


def test_halt_before_any_checkpoint_does_not_claim_one(recipe, tmp_path, capsys):
    """The first bad batch is at step 1 and the first checkpoint would be at step 10."""
    code = cli.main(["lpjax", "train", f"--config={recipe}", "--config.nonfinite=halt", "--config.log_every=1",
                     f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 1
    line = next(line for line in err.splitlines() if line.startswith("lpjax: error:"))
    assert "by step 1:" in line and "no checkpoint was written yet" in line, line
    assert "holds finite values" not in line
    assert not (tmp_path / "run" / "checkpoints").exists() or not checkpoints_are_finite(tmp_path / "run")


def test_the_halt_message_names_the_checkpoint_it_can_resume_from():
    from lpjax.errors import NonFiniteError
    from lpjax.training.loop import _apply_nonfinite_policy

    stages = [{"skipped": 0}, {"skipped": 2}]
    with pytest.raises(NonFiniteError, match=r"stage 1 \(2 updates\); the checkpoint at step 30 holds finite"):
        _apply_nonfinite_policy("halt", stages, 38, saved=30)
    with pytest.raises(NonFiniteError, match="no checkpoint was written yet"):
        _apply_nonfinite_policy("halt", stages, 38, saved=None)
    _apply_nonfinite_policy("skip", stages, 38, saved=None)  # skip carries on


def test_skip_checkpoints_at_a_skipped_step_and_resumes_from_it_exactly(recipe, tmp_path, capsys):
    """Steps 1 and 4 of this data order hold a NaN image (found with log_every=1). Before the fix the
    NaN gradient norm logged by the skipped update was saved with the state and refused by the
    checkpoint's finiteness guard, so a checkpoint at step 4 stopped the run with exit 1."""
    common = [f"--config={recipe}", "--config.nonfinite=skip", "--config.log_every=1",
              "--config.checkpoint.every_steps=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main(["lpjax", "train", *common, "--config.num_steps=8", f"--workdir={straight}"]) == 0
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    at_4 = next(r for r in records if r["split"] == "train" and r["step"] == 4)
    assert at_4["skipped"] == [2, 2] and at_4["grad_norm"] == [None, None], at_4  # step 4 was skipped
    assert cli.main(["lpjax", "train", *common, "--config.num_steps=4", f"--workdir={split}"]) == 0
    assert checkpoints_are_finite(split) == [4]
    assert cli.main(["lpjax", "train", *common, "--config.num_steps=8", f"--workdir={split}"]) == 0
    assert "resumed from the checkpoint at step 4" in capsys.readouterr().out
    assert checkpoints_are_finite(split) == [4, 8]

    def final(workdir):
        config = json.loads((workdir / "config.json").read_text())
        trainer = build_experiment(config).trainer
        states, meta = Checkpointer(str(workdir / "checkpoints"), trainer.num_stages).restore_latest(
            trainer.stage_states)
        return meta["step"], jax.device_get([(s.params, s.rest, s.opt_state, s.skipped) for s in states])

    (step_a, a), (step_b, b) = final(straight), final(split)
    assert step_a == step_b == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_huge_learning_rate_with_skip_finishes(tmp_path, capsys):
    """The issue's repro, shortened: every update of the last stage is skipped (its loss overflows),
    and the run still ends with exit 0 and finite checkpoints."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mnist_mlp.py"
    workdir = tmp_path / "run"
    code = cli.main(["lpjax", "train", f"--config={recipe}", "--config.dataset.name=digits",
                     "--config.dataset.test_size=300", "--config.model.width=32", "--config.optimizer.learning_rate=1e4",
                     "--config.nonfinite=skip", "--config.num_steps=10", "--config.log_every=5",
                     "--config.checkpoint.every_steps=5", f"--workdir={workdir}"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(sum(r["skipped"]) for r in records if r["split"] == "train") > 0  # it did skip
    assert checkpoints_are_finite(workdir) == [5, 10]
