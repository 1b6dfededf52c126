"""The SPMD step program all-reduces over ``data`` once per update, of the gradient sum, and on no
other clock (issue 26): the compiled program's data-axis all-reduce bytes per step, read from its HLO
(lpjax/distributed/hlo_collectives.py), against gradient bytes x updates per step.

Per device, a clock's data-axis all-reduces may only sit in a stage's update branch (a 0-or-1-trip
loop that runs on the clocks where the control's ``update`` flag is set): one branch per stage, each
all-reducing that device's gradient-sum buffer. Outside the scan over clocks only the per-call
metrics (a few scalars) are averaged. Any per-clock all-reduce of the gradient (at the clock's top
level, or in a forward/backward branch) fails the byte budget or the branch count below.
"""

import jax
import numpy as np
import optax
import pytest

import lpjax
from lpjax.core.schedules import OneFOneB, Streaming
from lpjax.distributed import hlo_collectives as H

from tiny import tiny_model

K, DATA, M, BATCH, WIDTH = 2, 2, 4, 16, 32


def _float_bytes(tree):
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)
               if np.issubdtype(leaf.dtype, np.floating))


def _step_programs(trainer, monkeypatch):
    """Each step program the run compiles, by clock count, and every host call's update flags."""
    updates = []  # per host call, per clock and stage: whether the stage updates
    advance = trainer.executor._advance

    def spy(clocks):
        flags = np.zeros((len(clocks), K), np.int32)
        for t, clock in enumerate(clocks):
            for task in clock:
                if task is not None:
                    flags[t, task.stage] = task.update
        updates.append(flags)
        return advance(clocks)

    monkeypatch.setattr(trainer.executor, "_advance", spy)
    x = jax.ShapeDtypeStruct((BATCH // M, WIDTH), np.float32)
    y = jax.ShapeDtypeStruct((BATCH // M,), np.int32)
    programs = {}
    for name, lowered, _ in trainer.executor.lowered_programs(x, y):
        if name.startswith("step"):
            colls = H.collectives(lowered.compile().as_text(), trainer.executor.mesh)
            programs[updates[-1].shape[0]] = (name, colls)  # by clocks: a call with as many clocks runs it
    return programs, updates


@pytest.mark.parametrize("method,schedule,per_step,update_branches", [
    # flushing, one optimizer over the whole model: every stage updates once per step, after the scan
    (lpjax.Backprop(), OneFOneB(M), 1, 0),
    # streaming: each stage updates after its last microbatch of a step, at its own clock, in its
    # update branch (a different clock for each stage: the branch runs on 1 of the call's M clocks)
    (lpjax.Chunked(), Streaming(M), 1, K),
], ids=["backprop-1f1b", "chunked-streaming"])
def test_data_axis_all_reduce_bytes_per_step_are_gradient_bytes_per_update(method, schedule, per_step, update_branches,
                                                                          monkeypatch):
    model = tiny_model(num_stages=K, width=WIDTH, din=WIDTH, classes=8, layers_per_stage=2)
    trainer = lpjax.Trainer(model, method=method, optimizer=optax.sgd(0.1), schedule=schedule,
                            layout=lpjax.Layout(stages=K, data=DATA, executor="spmd"))
    grads = [_float_bytes(state.params) for state in trainer.stage_states]
    # a device all-reduces its stage's row of the stacked gradient-sum buffer: the largest stage's
    gradient = max(grads)
    programs, updates = _step_programs(trainer, monkeypatch)
    assert len(updates) >= 3  # first, steady, steady (and a drain for streaming)
    for name, colls in programs.values():
        data = [c for c in colls if c.kind == "all-reduce" and c.axis == "data"]
        in_scan = [c for c in data if c.loops]  # in the scan over clocks or a branch (a 1-clock scan is unrolled)
        # none on idle clocks: a per-clock data all-reduce sits in a branch that runs on some clocks only
        assert all(c.branch is not None for c in in_scan), (name, [(c.name, c.loops) for c in in_scan])
        by_branch = {}
        for c in in_scan:
            by_branch[c.branch] = by_branch.get(c.branch, 0) + c.bytes
        # the update branches (one per stage), each the whole gradient sum once; none in a task branch
        assert len(by_branch) == update_branches and set(by_branch.values()) <= {gradient}, (name, by_branch, grads)
    for control in updates[1:3]:  # steady calls (the first call fills the pipeline, the drain empties it)
        assert control.shape[0] in programs
        name, colls = programs[control.shape[0]]
        data = [c for c in colls if c.kind == "all-reduce" and c.axis == "data"]
        outside = sum(c.bytes * (c.per_step_count or 1) for c in data if not c.loops)
        for s in range(K):
            updated = int((control[:, s] != 0).sum())
            assert updated == per_step, control
            # what a device of stage s moves in this call: its update branch on each clock its stage
            # updates, plus what the program all-reduces once (a one-tree step, the call's metrics)
            moved = outside + (gradient * updated if update_branches else 0)
            formula = gradient * per_step
            assert formula <= moved <= 1.05 * formula, (name, s, moved, formula)
