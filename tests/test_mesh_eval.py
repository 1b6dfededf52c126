"""Evaluation on the SPMD mesh (lpjax/executors/mesh_eval.py), the path multi-process runs take,
equals the per-stage evaluation one process uses, in one process on simulated devices: ragged
batches (padded with masked rows), a data axis, stages whose activations differ in shape, and
token-level labels. The multi-process runs are in tests/test_multihost.py."""

import re

import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.executors.mesh_eval import MeshEvaluator
from lpjax.schedules import Streaming

from tiny import Dense, lm_batch, lm_model, tiny_batch


def widening_model(classes=5):
    """Three stages whose activations have 8, 6 and 10 features (packed into one message size)."""
    rngs = nnx.Rngs(0)
    sizes = [12, 8, 6, 10]
    layers = [Dense(sizes[i], sizes[i + 1], rngs) for i in range(3)]
    return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(sizes[i + 1], classes, rngs=r), num_stages=3, rngs=rngs)


def on_mesh(trainer, batches):
    return trainer._eval_figures(*MeshEvaluator(trainer.executor, trainer.loss_fn).totals(batches))


def assert_same_figures(mine, theirs):
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["accuracy"] - b["accuracy"]) <= 1e-6, (a, b)


@pytest.mark.parametrize("case", ["widening stages x data 2", "token labels"])
def test_mesh_evaluation_equals_the_per_stage_evaluation_on_ragged_batches(case):
    if case == "token labels":
        model, (x, y), stages = lm_model(2), lm_batch(16, seed=1), 2
        test_x, test_y = lm_batch(11, seed=2)
    else:
        model, (x, y), stages = widening_model(), tiny_batch(8), 3
        test_x, test_y = tiny_batch(13, seed=3)
    trainer = lpjax.Trainer(model, method=lpjax.Overlapping(2), optimizer=optax.adam(1e-2),
                            schedule=Streaming(2), layout=lpjax.Layout(stages=stages, data=2, executor="spmd"))
    for i in range(2):
        trainer.step(np.roll(x, i, axis=0), np.roll(y, i, axis=0))
    expected = trainer.evaluate(test_x, test_y, batch_size=5)  # batches of 5, 5 and a ragged 1 or 3
    batches = [(test_x[s:s + 5], test_y[s:s + 5]) for s in range(0, len(test_x), 5)]
    assert_same_figures(on_mesh(trainer, batches), expected)
    # an empty batch among them changes nothing; a process that has run out feeds masked rows only
    assert_same_figures(on_mesh(trainer, batches + [(test_x[:0], test_y[:0])]), expected)
    assert [h["grad_norm"] for h in trainer.health()] == pytest.approx(list(trainer.executor.stage_scalars()[0]))
    assert [int(h["skipped"]) for h in trainer.health()] == list(trainer.executor.stage_scalars()[1])


def test_no_collective_of_the_evaluation_program_moves_a_stage_state():
    """What is compiled moves activations and a few sums, never a stage's state buffer: the
    largest collective result is smaller than one stage's packed state."""
    trainer = lpjax.Trainer(widening_model(), method=lpjax.Greedy(), optimizer=optax.sgd(0.1),
                            layout=lpjax.Layout(stages=3, data=2, executor="spmd"))
    x, y = tiny_batch(12)
    trainer.step(x, y)
    evaluator = MeshEvaluator(trainer.executor, trainer.loss_fn)
    evaluator.totals([(x, y)])
    (program,) = evaluator._programs.values()
    placed = evaluator._placed(evaluator._padded(x, y))
    text = program.lower(trainer.executor.buffers["state"], *placed).compile().as_text()
    collectives = re.findall(r"= \(?([^=]*?)\)? (all-gather|all-reduce|collective-permute|all-to-all)(?:-start)?\(",
                             text)
    assert collectives, text[:2000]
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
             for shapes, _ in collectives for dims in re.findall(r"\[([\d,]*)\]", shapes)]
    state = min(sum(packer.sizes.values()) for packer in trainer.executor.state_packers)
    assert max(sizes) < state, (max(sizes), state, collectives)
