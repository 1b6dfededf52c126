"""Evaluation on the SPMD mesh (lpjax/executors/spmd/eval.py), the path multi-process runs take,
equals the per-stage evaluation one process uses, in one process on simulated devices: ragged
batches (padded with masked rows), a data axis, stages whose activations differ in shape, and
token-level labels. The multi-process runs are in tests/test_multihost.py."""

import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.errors import ConfigError
from lpjax.executors.spmd.eval import MeshEvaluator

from tiny import Dense, tiny_batch


def widening_model(classes=5):
    """Three stages whose activations have 8, 6 and 10 features (packed into one message size)."""
    rngs = nnx.Rngs(0)
    sizes = [12, 8, 6, 10]
    layers = [Dense(sizes[i], sizes[i + 1], rngs) for i in range(3)]
    return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(sizes[i + 1], classes, rngs=r), num_stages=3, rngs=rngs)


class PerToken(nnx.Module):
    """A layer applied at every position of integer tokens' embeddings (cheaper to compile than
    the Transformer): labels are per token, ``[rows, positions]``."""

    def __init__(self, din, dout, rngs, vocab=None):
        self.embed = nnx.Embed(vocab, din, rngs=rngs) if vocab else None
        self.linear = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x):
        return jax.nn.tanh(self.linear(self.embed(x) if self.embed else x))


def token_model(vocab=7, classes=5):
    rngs = nnx.Rngs(1)
    layers = [PerToken(4, 6, rngs, vocab=vocab), PerToken(6, 6, rngs)]
    return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(6, classes, rngs=r), num_stages=2, rngs=rngs)


def token_batch(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 7, (n, 3)).astype(np.int32), rng.integers(0, 5, (n, 3)).astype(np.int32)


def assert_same_figures(mine, theirs):
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["accuracy"] - b["accuracy"]) <= 1e-6, (a, b)


def test_mesh_evaluation_equals_the_per_stage_evaluation_and_moves_no_stage_state():
    trainer = lpjax.Trainer(widening_model(), method=lpjax.Greedy(), optimizer=optax.adam(1e-2),
                            layout=lpjax.Layout(stages=3, data=2, executor="spmd"))
    x, y = tiny_batch(8)
    trainer.step(x, y)  # what is evaluated just has to be trained weights
    test_x, test_y = tiny_batch(13, seed=3)
    expected = trainer.evaluate(test_x, test_y, batch_size=5)  # batches of 5, 5 and a ragged 3
    batches = [(test_x[s:s + 5], test_y[s:s + 5]) for s in range(0, len(test_x), 5)]
    evaluator = MeshEvaluator(trainer.executor, trainer.loss_fn)
    assert_same_figures(trainer._eval_figures(*evaluator.totals(batches)), expected)
    # an empty batch among them changes nothing (a process that has run out feeds masked rows only)
    assert_same_figures(trainer._eval_figures(*evaluator.totals(batches + [(test_x[:0], test_y[:0])])), expected)
    assert len(evaluator.programs()) == 1  # the ragged batch ran on the full batches' program, masked

    # health() reads the scalars where each stage lives; they equal the stage states' own
    norms, skipped, finite = trainer.executor.stage_scalars()
    assert [float(h["grad_norm"]) for h in trainer.health()] == list(norms)
    assert [float(s.grad_norm) for s in trainer.stage_states] == pytest.approx(list(norms), rel=1e-6)
    assert min(norms) > 0 and [int(s.skipped) for s in trainer.stage_states] == list(skipped)
    assert list(finite) == [True] * trainer.num_stages

    # what is compiled moves activations and a few sums, never a stage's state buffer: the largest
    # collective result is smaller than the smallest stage's packed state
    (program,) = evaluator.programs()
    placed = evaluator._placed(evaluator._padded(*batches[0]))
    text = program.lower(trainer.executor.state_buffers(), *placed).compile().as_text()
    collectives = re.findall(r"= \(?([^=]*?)\)? (all-gather|all-reduce|collective-permute|all-to-all)(?:-start)?\(",
                             text)
    assert {kind for _, kind in collectives} >= {"all-gather", "collective-permute"}, text[:2000]
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
             for shapes, _ in collectives for dims in re.findall(r"\[([\d,]*)\]", shapes)]
    state = min(sum(packer.sizes.values()) for packer in trainer.executor.format.packers)
    assert max(sizes) < state, (max(sizes), state, collectives)

    with pytest.raises(ConfigError, match="inputs and labels differ in number"):
        evaluator.totals([(x, y[:-1])])


def test_mesh_evaluation_of_per_token_labels_equals_the_per_stage_evaluation():
    """Integer inputs and labels of ``[rows, positions]``: loss and accuracy count positions."""
    trainer = lpjax.Trainer(token_model(), method=lpjax.Greedy(), optimizer=optax.sgd(0.1),
                            layout=lpjax.Layout(stages=2, data=2, executor="spmd"))
    test_x, test_y = token_batch(11, seed=2)
    expected = trainer.evaluate(test_x, test_y, batch_size=4)  # 4, 4 and a ragged 3
    batches = [(test_x[s:s + 4], test_y[s:s + 4]) for s in range(0, len(test_x), 4)]
    evaluator = MeshEvaluator(trainer.executor, trainer.loss_fn)
    assert_same_figures(trainer._eval_figures(*evaluator.totals(batches)), expected)
