"""Conformance matrix: every allowed schedule x executor x method x data x pause cell trains the
same parameters as the reference, and every refused cell raises ConfigError (issue 10).

The reference for a cell is the reference executor (one device, tasks in table order) on the
canonical schedule of the cell's family with no pause: ``Sequential`` for the flushed schedules
(GPipe and 1F1B must give exactly its parameters), ``Streaming`` without drains for streaming
(``docs/semantics.md``: pauses change nothing). So the reference executor's own cells are checked
too. One compile per cell; the references are computed once per test process.
"""

import functools
import itertools
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.core.schedules import GPipe, OneFOneB, Sequential, Streaming

from tiny import assert_trees_close, stage_params, tiny_batch, tiny_model

STAGES, MICRO, STEPS, BATCH = 3, 2, 3, 8
SCHEDULES = {"sequential": Sequential, "gpipe": GPipe, "1f1b": OneFOneB, "streaming": Streaming}
METHODS = {
    "backprop": lambda: lpjax.Backprop(),
    "greedy": lambda: lpjax.Greedy(),
    "chunked": lambda: lpjax.Chunked(),
    "overlapping2": lambda: lpjax.Overlapping(2),
    # window 3 reaches stage 0 from stage 2; stage 1's loss is switched off, so stage 0's only
    # later source is two hops away and stage 1 sends no gradient of its own
    "overlapping3-uneven": lambda: lpjax.Overlapping(3, loss_weights=(0.5, 0.0, 2.0)),
    # SOLO's shared read-only readout, refreshed every 2 steps (so once in the 3 steps, before step 2);
    # refused with streaming, which has no step boundary to refresh at
    "overlapping2-shared": lambda: lpjax.make_method("overlapping", shared_readout=True, readout_refresh_steps=2),
}
EXECUTORS = [("reference", 1), ("mpmd", 1), ("mpmd", 2), ("spmd", 1), ("spmd", 2)]
CELLS = [(s, e, d, m, pause) for s, (e, d), m, pause in
         itertools.product(SCHEDULES, EXECUTORS, METHODS, ("none", "drain"))]


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """Cells share most of their programs (a drain changes no program of a flushed schedule, the
    reference's per-task programs recur, ...), but each executor jits its own functions. A
    persistent compilation cache, shared by the xdist workers, compiles each program once: about
    10x less CPU for a repeated cell."""
    from jax.experimental.compilation_cache import compilation_cache

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    options = {"jax_compilation_cache_dir": str(root / "conformance-jax-cache"),
               "jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": 0}
    saved = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def refused(schedule, method):
    return method in ("backprop", "overlapping2-shared") and schedule == "streaming"


def train(schedule, method, layout, drain_each_step):
    x, y = tiny_batch(BATCH)
    trainer = lpjax.Trainer(tiny_model(STAGES), method=METHODS[method](), optimizer=optax.sgd(0.5),
                            schedule=SCHEDULES[schedule](MICRO), layout=layout)
    for i in range(STEPS):
        trainer.step(np.roll(x, i, axis=0), np.roll(y, i))
        if drain_each_step:
            trainer.drain()
    trainer.drain()
    return stage_params(trainer)


@functools.cache
def reference(family, method):
    return train("sequential" if family == "sync" else "streaming", method, None, False)


@pytest.mark.parametrize("schedule,executor,data,method,pause", CELLS,
                         ids=[f"{s}-{e}x{d}-{m}-{p}" for s, e, d, m, p in CELLS])
def test_cell(schedule, executor, data, method, pause):
    layout = None if executor == "reference" else lpjax.Layout(stages=STAGES, data=data, executor=executor)
    if refused(schedule, method):
        with pytest.raises(lpjax.ConfigError, match="flushing schedule"):
            train(schedule, method, layout, pause == "drain")
        return
    got = train(schedule, method, layout, pause == "drain")
    family = "streaming" if schedule == "streaming" else "sync"
    assert_trees_close(reference(family, method), got, atol=1e-6)


def test_matrix_size():
    """The closing note quotes these numbers: keep them true."""
    assert len(CELLS) == 240
    assert sum(refused(s, m) for s, _, _, m, _ in CELLS) == 20


# -- the reproductions ------------------------------------------------------------------

class Tanh(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x):
        return jax.nn.tanh(self.linear(x))


def digits_mlp():
    rngs = nnx.Rngs(0)
    layers = [Tanh(64 if i == 0 else 32, 32, rngs) for i in range(4)]
    return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(32, 10, rngs=r), num_stages=4, rngs=rngs)


@pytest.mark.parametrize("method", [lpjax.Backprop, lambda: lpjax.Overlapping(2)], ids=["backprop", "overlapping"])
def test_repro_sequential_on_spmd(method):
    """Repro 1: Sequential(2) on a 4-stage spmd layout differed by 0.03-0.04 (the backward run was
    GPipe-shaped, so the last stage updated twice a step and stage 0 never)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data[:64].astype(np.float32) / 16.0, digits.target[:64].astype(np.int32)
    runs = []
    for layout in (None, lpjax.Layout(stages=4, executor="spmd")):
        trainer = lpjax.Trainer(digits_mlp(), method=method(), optimizer=optax.sgd(0.1), schedule=Sequential(2),
                                layout=layout)
        for _ in range(3):
            trainer.step(x, y)
        trainer.drain()
        runs.append(stage_params(trainer))
    assert_trees_close(runs[0], runs[1], atol=1e-6)


def test_repro_streaming_drain_keeps_cotangents_on_spmd():
    """Repro 2: a drain between steps dropped the cotangents the spmd inbox held for one clock."""
    def model():
        rngs = nnx.Rngs(0)
        layers = [nnx.Linear(4, 4, rngs=rngs) for _ in range(2)]
        return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(4, 3, rngs=r), num_stages=2, rngs=rngs)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 4)).astype(np.float32), np.array([0, 1, 2, 0], np.int32)
    runs = []
    for layout in (None, lpjax.Layout(stages=2, executor="spmd")):
        trainer = lpjax.Trainer(model(), method=lpjax.Overlapping(2), optimizer=optax.sgd(0.5),
                                schedule=Streaming(2), layout=layout)
        trainer.step(x, y)
        trainer.drain()
        trainer.step(x, y)
        runs.append(stage_params(trainer))
    assert_trees_close(runs[0], runs[1], atol=1e-6)
