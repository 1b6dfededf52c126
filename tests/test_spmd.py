"""The SPMD executor (one program over the stage axis) matches the reference, clock for clock."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.executors.spmd.executor import SpmdExecutor
from lpjax.models import mnist_resnet
from lpjax.core.schedules import Flow, GPipe, OneFOneB, Sequential, Streaming

from tiny import assert_trees_close, lm_batch, lm_model, stage_params, tiny_batch, tiny_model

# Adam divides by sqrt(v): on near-zero gradients it turns last-bit differences between two
# compiled programs into visible ones, so the equality tests use SGD with momentum.
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


def run(model_fn, batch, method, schedule, layout, steps=3):
    x, y = batch
    trainer = lpjax.Trainer(model_fn(), method=method, optimizer=OPTIMIZER, schedule=schedule, layout=layout)
    for i in range(steps):
        trainer.step(np.roll(x, i, axis=0), np.roll(y, i, axis=0))
    trainer.drain()
    return trainer


@pytest.mark.parametrize("num_stages,method", [(2, lpjax.Chunked()), (4, lpjax.Overlapping(2))],
                         ids=["chunked-2", "overlapping-4"])
def test_transformer_matches_reference(num_stages, method):
    model_fn = lambda: lm_model(num_stages)
    reference = run(model_fn, lm_batch(), method, Streaming(2), None)
    spmd = run(model_fn, lm_batch(), method, Streaming(2), lpjax.Layout(stages=num_stages, executor="spmd"))
    assert_trees_close(stage_params(reference), stage_params(spmd), atol=1e-6)
    # only stage 0 reads the input stream: the other stages' devices, and only they, keep zeros shards
    executor = spmd.executor
    later = set(np.asarray(executor.mesh.devices).reshape(num_stages, -1)[1:].ravel())
    assert {device for device, _ in executor.streams.idle_inputs} == later
    assert not any(np.any(np.asarray(shard)) for shard in executor.streams.idle_inputs.values())


def test_gpipe_backprop_matches_reference():
    model_fn = lambda: lm_model(2)
    reference = run(model_fn, lm_batch(), lpjax.Backprop(), GPipe(4), None, steps=2)
    spmd = run(model_fn, lm_batch(), lpjax.Backprop(), GPipe(4), lpjax.Layout(stages=2, executor="spmd"), steps=2)
    assert_trees_close(stage_params(reference), stage_params(spmd), atol=1e-6)


def test_heterogeneous_resnet_stages_match_reference():
    def model_fn():
        rngs = nnx.Rngs(0)
        net = mnist_resnet(width=4, blocks_per_stage=(1, 1, 1, 1), rngs=rngs)
        return lpjax.stage_network(net, split_points=[3], rngs=rngs)

    x = np.random.default_rng(0).normal(size=(8, 12, 12, 1)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 10
    reference = run(model_fn, (x, y), lpjax.Overlapping(2), Streaming(2), None, steps=2)
    spmd = run(model_fn, (x, y), lpjax.Overlapping(2), Streaming(2), lpjax.Layout(stages=2, executor="spmd"), steps=2)
    assert_trees_close(stage_params(reference), stage_params(spmd), atol=1e-5)
    assert_trees_close([jax.device_get(s.rest) for s in reference.stage_states],
                       [jax.device_get(s.rest) for s in spmd.stage_states], atol=1e-5)


@pytest.mark.parametrize("method,schedule", [(lpjax.Overlapping(2), Streaming(2)), (lpjax.Backprop(), GPipe(2)),
                                             (lpjax.Overlapping(2), OneFOneB(2)), (lpjax.Backprop(), Sequential(2))],
                         ids=["streaming", "gpipe", "1f1b", "sequential"])
def test_nan_in_bubbles_never_reaches_parameters(method, schedule):
    """Fill every bubble slot with NaN (praxis-style): parameters stay finite and equal the reference."""
    x, y = tiny_batch(16)
    reference = lpjax.Trainer(tiny_model(4), method=method, optimizer=optax.adam(1e-2), schedule=schedule)
    poisoned = lpjax.Trainer(tiny_model(4), method=method, optimizer=optax.adam(1e-2), schedule=schedule,
                             layout=lpjax.Layout(stages=4, executor="spmd"))
    poisoned.executor = SpmdExecutor(poisoned.rules, schedule, poisoned.executor.mesh, bubble_fill=np.nan)
    metrics = []
    for trainer in (reference, poisoned):
        metrics.append([])
        for i in range(3):
            if i == 2:  # what this drain runs is reported with the next step's tasks (two host calls)
                trainer.executor.drain()
            metrics[-1].append(trainer.step(x, y))
        metrics[-1].append(trainer.drain())
    params = stage_params(poisoned)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    assert_trees_close(stage_params(reference), params, atol=1e-6)
    for want, got in zip(*metrics, strict=True):  # per call, per stage: the mean over its tasks, or None
        assert [m is None for m in want] == [m is None for m in got]
        assert_trees_close([m for m in want if m is not None], [m for m in got if m is not None], atol=1e-5)


def test_stage_buffers_live_on_their_own_device():
    trainer = run(lambda: tiny_model(4), tiny_batch(16), lpjax.Overlapping(2), Streaming(2),
                  lpjax.Layout(stages=4, executor="spmd"))
    devices = jax.devices()[:4]
    for leaf in jax.tree.leaves(trainer.executor.state_buffers()):
        for shard in leaf.addressable_shards:
            assert shard.device == devices[shard.index[0].start]
    for k, state in enumerate(trainer.stage_states):
        assert all(leaf.sharding.device_set == {devices[k]} for leaf in jax.tree.leaves(state))


def test_transformer_with_data_axis_matches_reference():
    """Each stage's microbatch split over 2 devices; gradients averaged over the stage's row."""
    model_fn = lambda: lm_model(2)
    reference = run(model_fn, lm_batch(), lpjax.Overlapping(2), Streaming(2), None)
    spmd = run(model_fn, lm_batch(), lpjax.Overlapping(2), Streaming(2),
               lpjax.Layout(stages=2, data=2, executor="spmd"))
    assert_trees_close(stage_params(reference), stage_params(spmd), atol=1e-6)


# -- the host-side lowering (no device) ----------------------------------------------------------

def _lowering(flow):
    from lpjax.executors.spmd.lowering import Lowering

    K = flow.num_stages
    sends = [k > 0 and k in flow.sources[k - 1] for k in range(K)]
    passes = [{j: k > 0 and j in flow.sources[k - 1] for j in flow.sources[k]} for k in range(K)]
    return Lowering(flow, sends, passes)


@pytest.mark.parametrize("schedule,flow", [
    (OneFOneB(8), Flow(((3,), (3,), (3,), ()))),
    (GPipe(8), Flow(((3,), (3,), (3,), ()))),
    (Streaming(4), Flow(((1, 2), (2, 3), (3,), ()))),
], ids=["1f1b-backprop", "gpipe-backprop", "streaming-window3"])
def test_lowering_frees_every_slot_it_takes(schedule, flow):
    """Mailbox slots are recycled: 50 steps with a drain after each need no more slots than 3, and
    a flushed schedule ends every step with empty mailboxes."""
    short, long = _lowering(flow), _lowering(flow)
    short.lower(schedule.table(4, 3, flow=flow, drain_every_step=True).clocks)
    long.lower(schedule.table(4, 50, flow=flow, drain_every_step=True).clocks)
    assert long.capacities() == short.capacities()
    if schedule.synchronous:
        assert not long.act_at and not long.cot_at and not long.res_at
        residual_slots = long.capacities()[2]
        assert residual_slots == (8 if isinstance(schedule, GPipe) else 4)  # GPipe: M; 1F1B: K-k at stage k


def test_lowering_refuses_a_cotangent_that_was_never_sent():
    from lpjax.core.schedules import BACKWARD, Task

    lowering = _lowering(Flow(((1,), ())))
    with pytest.raises(AssertionError, match="before it was sent"):
        lowering.lower([(Task(0, 0, BACKWARD, consumes=((1, 0),)), None)])


def test_lowering_gives_each_task_the_opcode_of_what_it_runs():
    """A forward that consumes nothing must not run the backward branch (it computed, then threw
    away, a VJP per forward); a backward with nothing to consume runs nothing but keeps its update."""
    from lpjax.executors.spmd.lowering import Op

    flow = Flow(((1,), ()))  # backprop, 2 stages
    table = OneFOneB(4).table(2, 1, flow=flow)
    ops = _lowering(flow).lower(table.clocks)
    for t, clock in enumerate(table.clocks):
        for k, task in enumerate(clock):
            want = (Op.IDLE if task is None else Op.FORWARD if task.runs_forward else
                    Op.BACKWARD if task.consumes else Op.IDLE)
            assert ops["op"][t, k] == want, (t, k, task)
            assert ops["update"][t, k] == (task is not None and task.update)
    # the last stage's final backward consumes nothing and carries the update: idle, update kept
    assert any(task is not None and not task.runs_forward and task.update for clock in table.clocks for task in clock[1:])

    window3 = Flow(((1, 2), (2,), ()))
    stream = Streaming(2).table(3, 3, flow=window3)
    lowered = _lowering(window3).lower(stream.clocks)
    for t, clock in enumerate(stream.clocks):
        for k, task in enumerate(clock):
            if task is not None:
                assert lowered["op"][t, k] == (Op.LOCAL if task.consumes else Op.FORWARD)
    assert (lowered["op"] == Op.LOCAL).any() and (lowered["op"] == Op.FORWARD).any()


def test_split_state_refuses_a_write_to_the_other_part():
    """Inside the scan a task's writes to parameters (or an optimizer step's to the gradient sum)
    would be dropped silently; the trace-time check turns that into an error."""
    import dataclasses

    from lpjax.executors.spmd.state import FIXED_FIELDS, TASK_FIELDS, check_unchanged

    state = lpjax.Trainer(tiny_model(2), method=lpjax.Greedy(), optimizer=optax.sgd(0.1)).stage_states[0]
    check_unchanged(state, dataclasses.replace(state, grad_sum=jax.tree.map(lambda g: g + 1, state.grad_sum)),
                     FIXED_FIELDS, "a task")
    with pytest.raises(AssertionError, match="StageState.params"):
        check_unchanged(state, dataclasses.replace(state, params=jax.tree.map(lambda p: p * 2, state.params)),
                         FIXED_FIELDS, "a task")
    with pytest.raises(AssertionError, match="StageState.grad_sum"):
        check_unchanged(state, dataclasses.replace(state, grad_sum=jax.tree.map(lambda g: g + 1, state.grad_sum)),
                         TASK_FIELDS, "an optimizer step")


class ReluDense(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x):
        h = self.linear(x)  # times a constant array: the residual keeps it, and it matters to the gradient
        return jax.nn.relu(h) * jnp.full(h.shape, 0.5, h.dtype)


@pytest.mark.parametrize("method,schedule", [(lpjax.Backprop(), OneFOneB(2)), (lpjax.Overlapping(2), Streaming(2))],
                         ids=["1f1b-backprop", "streaming-overlapping"])
def test_residual_constants_are_rebuilt_not_stored(method, schedule):
    """A ReLU's VJP residual holds a broadcast zero array; the SPMD executor builds it again at the
    backward instead of storing it (executors/residuals.py), and still equals the reference."""
    def model_fn():
        rngs = nnx.Rngs(0)
        layers = [ReluDense(12 if i == 0 else 8, 8, rngs) for i in range(4)]
        return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(8, 5, rngs=r), num_stages=2, rngs=rngs)

    batch = tiny_batch(8)
    reference = run(model_fn, batch, method, schedule, None)
    spmd = run(model_fn, batch, method, schedule, lpjax.Layout(stages=2, executor="spmd"))
    plan = spmd.executor.shapes.res_plans[0]
    assert any(c is not None for c in plan.constants)  # the ReLU zeros are not stored
    assert len(plan.stored) < len(plan.constants)
    assert_trees_close(stage_params(reference), stage_params(spmd), atol=1e-6)
