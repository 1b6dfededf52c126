"""The reference executor runs a host call whose tasks are all different cells as ONE jitted program
(lpjax/executors/dataflow.py). It must train what the task-by-task interpreter trains, keep what
is in flight across host calls, and compile once for a steady pipeline."""

import numpy as np
import optax
import pytest

import lpjax
from lpjax.schedules import Sequential, Streaming

from tiny import assert_trees_close, stage_params, tiny_batch, tiny_model

CASES = {
    # one cell per stage and step: the greedy overhead benchmark's shape
    "greedy-sequential1": (lambda: lpjax.Greedy(), lambda: Sequential(1), lambda: optax.adam(1e-2)),
    # one optax tree, stepped inside the program with the global norm (first/update flags differ per m)
    "backprop-sequential2-clip-adamw": (lambda: lpjax.Backprop(), lambda: Sequential(2),
                                        lambda: optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(1e-2))),
    # cotangents and residuals in flight between calls, two hops, uneven weights, with drains
    "overlapping3-streaming1": (lambda: lpjax.Overlapping(3, loss_weights=(0.5, 0.0, 2.0)), lambda: Streaming(1),
                                lambda: optax.sgd(0.5)),
}


def train(case, fuse, steps=4, drain_after=(1,)):
    method, schedule, tx = (make() for make in CASES[case])
    x, y = tiny_batch(8)
    trainer = lpjax.Trainer(tiny_model(3), method=method, optimizer=tx, schedule=schedule)
    trainer.executor.fuse = fuse
    losses = []
    for i in range(steps):
        metrics = trainer.step(np.roll(x, i, axis=0), np.roll(y, i))
        losses.append([None if m is None else float(m["loss"]) for m in metrics])
        if i in drain_after:
            trainer.drain()
    trainer.drain()
    return trainer, losses


@pytest.mark.parametrize("case", list(CASES))
def test_fused_calls_train_what_task_by_task_trains(case):
    fused, fused_losses = train(case, fuse=True)
    plain, plain_losses = train(case, fuse=False)
    assert fused.executor._fused, "no host call ran as a fused program"
    assert not plain.executor._fused
    assert_trees_close(stage_params(plain), stage_params(fused), atol=1e-6, err_msg=case)
    np.testing.assert_allclose(np.array(fused_losses, dtype=float), np.array(plain_losses, dtype=float),
                               rtol=1e-6, atol=1e-6)


def test_repeated_cells_run_task_by_task():
    """Two forwards of the same cell in one call (M = 3: the middle microbatches) are not inlined."""
    trainer = lpjax.Trainer(tiny_model(2), method=lpjax.Greedy(), optimizer=optax.sgd(0.1), schedule=Sequential(3))
    trainer.step(*tiny_batch(6))
    assert not trainer.executor._fused


def test_steady_pipeline_compiles_one_program():
    """Microbatch numbers are relative to the call's first, so every steady step reuses one program."""
    x, y = tiny_batch(8)
    trainer = lpjax.Trainer(tiny_model(3), method=lpjax.Overlapping(2), optimizer=optax.sgd(0.1),
                            schedule=Streaming(1))
    for _ in range(6):  # fill: the first calls consume fewer cotangents
        trainer.step(x, y)
    programs = len(trainer.executor._fused)
    compiled = sum(program._cache_size() for program, _ in trainer.executor._fused.values())
    for _ in range(4):
        trainer.step(x, y)
    assert len(trainer.executor._fused) == programs
    assert sum(program._cache_size() for program, _ in trainer.executor._fused.values()) == compiled
