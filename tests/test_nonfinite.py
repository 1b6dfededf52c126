"""Injected NaN and diverging learning rates: `skip` carries on past bad batches and counts them but
stops a stage that no longer trains, `halt` exits 1 with one line; no checkpoint ever holds a non-finite
value, read back raw with orbax."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lpjax

from lpjax import cli
from lpjax.training.checkpoint import Checkpointer, state_summary
from lpjax.config.build import build_experiment
from lpjax.data import load_dataset
from lpjax.data.registry import DATASETS
from lpjax.errors import ConfigError, NonFiniteError
from lpjax.training.nonfinite import STALLED_STEPS, NonfiniteGuard, halt_on_skipped, streaming_lags
from tiny import stage_params, tiny_batch, tiny_model

MNIST_MLP = Path(__file__).resolve().parents[1] / "recipes" / "mnist_mlp.py"

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
    stages = [{"skipped": 0}, {"skipped": 2}]
    with pytest.raises(NonFiniteError, match=r"stage 1 \(2 updates\); the checkpoint at step 30 holds finite"):
        halt_on_skipped(stages, 38, saved=30)
    with pytest.raises(NonFiniteError, match="no checkpoint was written yet"):
        halt_on_skipped(stages, 38, saved=None)
    NonfiniteGuard("skip", [0, 0], 37, [0, 0]).check(stages, 38, saved=None)  # skip carries on


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


def raw_leaves(workdir):
    """Every array of every checkpoint in ``workdir``, read back with orbax alone: ``(step, item, leaf)``."""
    found = []
    for step_dir in sorted((workdir / "checkpoints").iterdir()):
        for item in sorted(step_dir.iterdir()):
            if item.is_dir() and item.name != "meta":
                tree = ocp.StandardCheckpointer().restore(item.resolve())
                found += [(step_dir.name, item.name, np.asarray(leaf)) for leaf in jax.tree.leaves(tree)]
    return found


def assert_no_checkpoint_holds_a_non_finite_value(workdir):
    for step, item, leaf in raw_leaves(workdir):
        if np.issubdtype(leaf.dtype, np.inexact):
            assert np.isfinite(leaf).all(), f"checkpoint {step}, {item}: {leaf.ravel()[:4]}"


EXECUTOR_FLAGS = {
    "reference": [],
    # the issue's failing case: streaming overlapping on the per-stage executor
    "mpmd": ["--config.layout.executor=mpmd", "--config.method.name=overlapping", "--config.schedule.name=streaming",
             "--config.schedule.microbatches=2"],
    # backprop: one optimizer tree over both stages, which must skip together
    "spmd": ["--config.layout.executor=spmd", "--config.method.name=backprop", "--config.schedule.name=gpipe",
             "--config.schedule.microbatches=2"],
}


@pytest.mark.parametrize("executor", sorted(EXECUTOR_FLAGS))
@pytest.mark.parametrize("optimizer,rate", [("sgd", "1e30"), ("sgd", "1e38"), ("momentum", "3e38"), ("adam", "1e6")])
def test_a_diverging_learning_rate_never_exits_0_with_a_dead_model_or_saves_a_non_finite_value(
        optimizer, rate, executor, tmp_path, capsys):
    """The issue's runs under nonfinite=skip (each overflows the first updates), on every executor."""
    workdir = tmp_path / "run"
    code = cli.main(["lpjax", "train", f"--config={MNIST_MLP}", "--config.dataset.name=digits",
                     "--config.dataset.test_size=300", "--config.model.width=64", f"--config.optimizer.name={optimizer}",
                     f"--config.optimizer.learning_rate={rate}", "--config.optimizer.decay=constant",
                     "--config.num_steps=40", "--config.checkpoint.every_steps=10", "--config.nonfinite=skip",
                     *EXECUTOR_FLAGS[executor], f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert_no_checkpoint_holds_a_non_finite_value(workdir)
    train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    if code == 0:  # it recovered: every stage applied updates in the last record's window
        before = train[-2]["skipped"]
        assert all(now - then < 10 for now, then in zip(train[-1]["skipped"], before)), train[-2:]
        assert optimizer == "adam", "sgd and momentum at these rates never recover"
        return
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("lpjax: error:")]
    assert len(lines) == 1 and "skipped every update of steps" in lines[0], err
    assert "Lower the learning rate" in lines[0] and "Traceback" not in err
    assert not (workdir / "results.json").exists()


def test_the_issues_command_exits_1_naming_the_stage_and_the_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "W"
    code = cli.main(["lpjax", "train", f"--config={MNIST_MLP}", "--config.dataset.name=digits",
                     "--config.model.width=64", "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=1e30",
                     "--config.optimizer.decay=constant", "--config.num_steps=60", "--config.checkpoint.every_steps=10",
                     "--config.nonfinite=skip", f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert code == 1
    line = next(line for line in err.splitlines() if line.startswith("lpjax: error:"))
    # the first update is applied (finite, huge), and from step 2 on no loss is finite
    assert line.startswith(f"lpjax: error: stage 0 skipped every update of steps 11-{10 + STALLED_STEPS}:"), line
    assert "the newest checkpoint, at step 10, was written before these steps" in line
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["10"]
    assert_no_checkpoint_holds_a_non_finite_value(workdir)


def test_fit_stops_a_diverged_model_with_non_finite_error(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 12)).astype(np.float32), rng.integers(0, 5, 64).astype(np.int32)
    # tanh layers keep the loss finite whatever the weights; a rate past float32's range overflows every update
    trainer = lpjax.Trainer(tiny_model(num_stages=2), method=lpjax.methods.Greedy(), optimizer=optax.sgd(1e39),
                            nonfinite="skip")
    with pytest.raises(NonFiniteError, match="skipped every update of steps 1-10"):
        lpjax.fit(trainer, (x, y, x, y), workdir=str(tmp_path / "fit"), steps=40, batch_size=16, log_every=5,
                  checkpoint_every=5, nonfinite="skip", progress=False, verbose=False)
    assert_no_checkpoint_holds_a_non_finite_value(tmp_path / "fit")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(stage_params(trainer)))


LAYOUTS = {"reference": None, "mpmd": lpjax.Layout(stages=2, executor="mpmd"),
           "spmd": lpjax.Layout(stages=2, executor="spmd")}


@pytest.mark.parametrize("executor", sorted(LAYOUTS))
def test_a_backprop_step_that_would_overflow_one_stage_is_skipped_by_every_stage(executor):
    """Stage 1's head bias sits at float32's largest value, so the step overflows it; stage 0's own
    step stays finite, but backprop steps the whole model or none of it."""
    model = tiny_model(num_stages=2)
    bias = model[1].head.bias
    bias[...] = jnp.full(bias[...].shape, np.finfo(np.float32).max)
    trainer = lpjax.Trainer(model, method=lpjax.methods.Backprop(), optimizer=optax.sgd(1e33),
                            layout=LAYOUTS[executor], nonfinite="skip")
    before = stage_params(trainer)
    trainer.step(*tiny_batch())
    health = jax.device_get(trainer.health())
    assert [int(h["skipped"]) for h in health] == [1, 1]
    for old, new in zip(before, stage_params(trainer)):
        for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
            np.testing.assert_array_equal(a, b)
    # the skipped step (its gradient is still in the states) judged stage by stage: stage 0 alone would step
    states = jax.device_get(trainer.stage_states)
    assert [bool(rule.update_stays_finite(state)) for rule, state in zip(trainer.rules, states)] == [True, False]


@pytest.mark.parametrize("executor", sorted(LAYOUTS))
@pytest.mark.parametrize("optimizer", [optax.sgd(1e38), optax.sgd(3e38, momentum=0.9), optax.adam(1e6)],
                         ids=["sgd", "momentum", "adam"])
def test_trainer_steps_never_write_a_non_finite_value(optimizer, executor):
    trainer = lpjax.Trainer(tiny_model(num_stages=2), method=lpjax.methods.Greedy(), optimizer=optimizer,
                            layout=LAYOUTS[executor], nonfinite="skip")
    for seed in range(6):
        trainer.step(*tiny_batch(n=16, seed=seed))
    for state in jax.device_get(trainer.stage_states):
        for leaf in jax.tree.leaves((state.params, state.rest, state.opt_state, state.grad_norm)):
            if np.issubdtype(np.asarray(leaf).dtype, np.inexact):
                assert np.isfinite(leaf).all()


@pytest.mark.parametrize("executor", sorted(LAYOUTS))
def test_under_halt_an_overflowing_update_shows_in_health_and_export_refuses_it(executor):
    """halt leaves the written-state check out of the step: the overflow is written, and every way
    out of the trainer says so instead of handing the values on."""
    trainer = lpjax.Trainer(tiny_model(num_stages=2), method=lpjax.methods.Greedy(), optimizer=optax.sgd(1e39),
                            layout=LAYOUTS[executor])
    assert trainer.nonfinite == "halt"
    assert [bool(h["finite"]) for h in jax.device_get(trainer.health())] == [True, True]
    trainer.step(*tiny_batch(n=16))
    health = jax.device_get(trainer.health())
    assert [bool(h["finite"]) for h in health] == [False, False]
    assert [int(h["skipped"]) for h in health] == [0, 0]  # the gradient was finite: nothing was skipped
    with pytest.raises(NonFiniteError, match=r"^export\(\): stage 0's parameters or optimizer state are not finite"):
        trainer.export()


@pytest.mark.parametrize("executor", sorted(EXECUTOR_FLAGS))
@pytest.mark.parametrize("rate,first_line", [
    # past float32's range: the first update writes infinities, which the record at step 1 finds
    ("1e39", "lpjax: error: stage 0's parameters or optimizer state are not finite at step 1: an update overflowed"),
    # the first update is finite but huge; step 2's loss is NaN, and its update is skipped
    ("1e30", "lpjax: error: non-finite loss or gradient by step 2: skipped stage 0"),
], ids=["overflow", "nan-loss"])
def test_halt_stops_a_diverging_run_at_the_first_record_naming_the_stage(executor, rate, first_line, tmp_path, capsys):
    workdir = tmp_path / "W"
    code = cli.main(["lpjax", "train", f"--config={MNIST_MLP}", "--config.dataset.name=digits",
                     "--config.dataset.test_size=300", "--config.model.width=64", "--config.optimizer.name=sgd",
                     f"--config.optimizer.learning_rate={rate}", "--config.optimizer.decay=constant",
                     "--config.num_steps=40", "--config.log_every=1", "--config.checkpoint.every_steps=10",
                     *EXECUTOR_FLAGS[executor], f"--workdir={workdir}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lpjax: error:")]
    assert code == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(first_line), lines[0]
    assert "no checkpoint was written yet" in lines[0], lines[0]
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
    assert not (workdir / "results.json").exists()


def test_fit_refuses_skip_over_a_trainer_that_writes_updates_unchecked(tmp_path):
    trainer = lpjax.Trainer(tiny_model(num_stages=2), method=lpjax.methods.Greedy(), optimizer=optax.sgd(0.1))
    x, y = np.zeros((16, 12), np.float32), np.zeros(16, np.int32)
    with pytest.raises(ConfigError, match=r"nonfinite='skip'\)$"):
        lpjax.fit(trainer, (x, y, x, y), workdir=str(tmp_path / "fit"), steps=2, batch_size=16,
                  nonfinite="skip", progress=False, verbose=False)
    assert not (tmp_path / "fit").exists()


def test_the_guard_stops_a_non_finite_stage_under_either_policy():
    for policy in ("skip", "halt"):
        guard = NonfiniteGuard(policy, [0, 0], 0, [0, 0])
        with pytest.raises(NonFiniteError, match=r"^stage 1's parameters or optimizer state are not finite at step 5"):
            guard.check([{"skipped": 0, "finite": True}, {"skipped": 0, "finite": False}], 5, saved=None)


def test_a_save_of_a_non_finite_state_is_refused_naming_the_stage_and_the_fix(tmp_path):
    trainer = lpjax.Trainer(tiny_model(num_stages=2), method=lpjax.methods.Greedy(), optimizer=optax.sgd(0.1))
    states = jax.device_get(trainer.stage_states)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), 2, asynchronous=False)
    checkpointer.save(3, states, {})
    bad = dataclasses.replace(states[1], params=jax.tree.map(lambda a: np.full_like(a, np.inf), states[1].params))
    with pytest.raises(NonFiniteError) as refused:
        checkpointer.save(4, [states[0], bad], {})
    checkpointer.close()
    message = str(refused.value)
    assert message.startswith("stage 1 holds a non-finite") and "\n" not in message
    assert "lower the learning rate" in message and "the newest checkpoint, at step 3, holds finite" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]


def test_the_guard_stops_a_stage_that_skipped_every_update_of_the_last_steps():
    guard = NonfiniteGuard("skip", [0, 0], 0, [0, 0])
    guard.check([{"skipped": 1}, {"skipped": 5}], 5)  # stage 1 skipped all five
    with pytest.raises(NonFiniteError, match=r"^stage 1 skipped every update of steps 1-10: .*no checkpoint"):
        guard.check([{"skipped": 2}, {"skipped": 10}], 10)
    guard = NonfiniteGuard("skip", [0, 0], 0, [0, 0])
    for step in range(5, 60, 5):  # stage 1 applies one update in every window: it still trains
        guard.check([{"skipped": 0}, {"skipped": step - step // 5}], step, saved=5)


def test_the_guard_allows_for_the_updates_a_streaming_stage_still_owes():
    lags = streaming_lags(4, 1, synchronous=False)
    assert lags == [0, 1, 2, 3] and streaming_lags(4, 2, synchronous=False) == [0, 1, 1, 2]
    assert streaming_lags(4, 1, synchronous=True) == [0, 0, 0, 0]
    guard = NonfiniteGuard("skip", [0, 0, 0, 0], 0, lags)
    guard.check([{"skipped": 5}, {"skipped": 4}, {"skipped": 3}, {"skipped": 2}], 5)  # all it ran
    with pytest.raises(NonFiniteError, match="^stage 0 skipped every update of steps 1-10"):
        guard.check([{"skipped": 10}, {"skipped": 9}, {"skipped": 8}, {"skipped": 7}], 10)
