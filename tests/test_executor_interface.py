"""Every executor implements the one interface the trainer uses (lpjax/executors/base.py), and each
method of it does what the protocol says, on the reference, the per-stage (MPMD) and the SPMD executor."""

import jax
import numpy as np
import optax
import pytest

import lpjax
from lpjax.core.methods import make_method
from lpjax.core.schedules import GPipe
from lpjax.core.state_summary import state_summaries
from lpjax.errors import ConfigError
from lpjax.executors.base import Executor, ShardedStates, ShardedTarget

from tiny import assert_trees_equal, tiny_batch, tiny_model

LAYOUTS = {"reference": None, "mpmd": lpjax.Layout(stages=2), "spmd": lpjax.Layout(stages=2, executor="spmd")}


def trainer_on(layout):
    # a shared readout, so that refresh_shared has something to copy; GPipe(2): two microbatches per step
    return lpjax.Trainer(tiny_model(2), method=make_method("chunked", shared_readout=True), optimizer=optax.sgd(0.1),
                         schedule=GPipe(2), layout=layout)


def params(states):
    return [jax.device_get(s.params) for s in states]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_executor_implements_the_interface(name):
    trainer = trainer_on(LAYOUTS[name])
    executor = trainer.executor
    assert isinstance(executor, Executor)
    assert executor.data_shard == (0, 1)  # one process feeds every row
    assert executor.placement.num_data == 1

    x, y = tiny_batch(8)
    executor.feed([x[:4], x[4:]], [y[:4], y[4:]])
    metrics = executor.take_metrics()
    assert len(metrics) == 2 and all(set(m) == {"loss", "accuracy", "bad_labels"} for m in metrics)
    assert all(np.isfinite(float(m["loss"])) for m in metrics)
    assert executor.take_metrics() == [None, None]  # taken: nothing ran since
    assert executor.done == [2, 2]  # both microbatches reached both stages (a flushing schedule)
    executor.drain()
    assert executor.take_metrics() == [None, None]  # a flushed step leaves nothing to drain
    executor.flush()
    assert executor.done == [0, 0]

    states = executor.states
    assert len(states) == 2 and all(s is not None for s in states)
    saved = executor.host_states()
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(saved))
    assert_trees_equal(params(states), params(saved))

    norms, skipped, finite = executor.stage_scalars()
    assert [float(n) for n in norms] == [float(s.grad_norm) for s in states]
    assert min(float(n) for n in norms) > 0 and [int(s) for s in skipped] == [0, 0]
    assert [bool(f) for f in finite] == [True, True]

    totals, count = executor.evaluate([(x, y)])
    assert np.shape(totals) == (2, 2) and count == len(y)
    assert all(0 <= correct <= count for _, correct in totals)

    # the readers' copy of the readout becomes the owner's readout
    executor.refresh_shared()
    after = jax.device_get(executor.states)
    assert_trees_equal(after[0].rest["head"], after[1].params["head"])

    assert_trees_equal(params(executor.checkpoint_states(False)), params(after))
    target = executor.checkpoint_target()
    if name == "spmd":
        assert isinstance(target, ShardedTarget)
        sharded = executor.checkpoint_states(True)
        assert isinstance(sharded, ShardedStates)
        assert sharded.summaries == state_summaries(executor.states)
        assert target.summarize(sharded.tree) == sharded.summaries
    else:
        assert_trees_equal(params(target), params(after))
        with pytest.raises(ConfigError, match="needs the spmd executor"):
            executor.checkpoint_states(True)

    # loading the saved states puts the parameters back, after another step changed them
    executor.feed([x[:4], x[4:]], [y[:4], y[4:]])
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params(executor.states)),
                                                          jax.tree.leaves(params(saved))))
    executor.load_states(saved)
    assert_trees_equal(params(executor.states), params(saved))
    assert executor.done == [0, 0]


def test_the_spmd_executor_loads_its_own_sharded_states():
    trainer = trainer_on(LAYOUTS["spmd"])
    x, y = tiny_batch(8)
    trainer.step(x, y)
    sharded, before = trainer.checkpoint_states(sharded=True), params(trainer.stage_states)
    trainer.step(x, y)
    trainer.load_states(sharded)
    assert_trees_equal(params(trainer.stage_states), before)


def test_the_dataflow_executor_refuses_sharded_states():
    trainer = trainer_on(None)
    sharded = trainer_on(LAYOUTS["spmd"]).checkpoint_states(sharded=True)
    with pytest.raises(ConfigError, match="resumes with the spmd executor"):
        trainer.load_states(sharded)


def test_a_one_stage_spmd_layout_hands_out_its_state_and_trains_as_the_reference():
    """With one stage the ``stage`` axis has size 1 and a shard's index along it is ``slice(None)``,
    not ``slice(0, 1)``: the state is still found (it once came back as None)."""
    x, y = tiny_batch(8)
    trained = []
    for layout in (None, lpjax.Layout(stages=1, data=2, executor="spmd")):
        trainer = lpjax.Trainer(tiny_model(1), method=make_method("chunked"), optimizer=optax.sgd(0.1),
                                schedule=GPipe(2), layout=layout)
        trainer.step(x, y)
        (state,) = trainer.stage_states
        assert state is not None
        trained.append(jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(trained[0]), jax.tree.leaves(trained[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
