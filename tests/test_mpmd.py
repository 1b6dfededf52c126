"""The per-stage (MPMD) executor matches the reference and keeps each stage on its own devices."""

import jax
import numpy as np
import optax
import pytest

import lpjax
from lpjax.core.schedules import GPipe, Streaming

from tiny import assert_trees_close, stage_params, tiny_batch, tiny_model


def train(layout, method, schedule, steps=3, num_stages=2, batch=16):
    x, y = tiny_batch(batch)
    trainer = lpjax.Trainer(tiny_model(num_stages), method=method, optimizer=optax.adam(1e-2),
                            schedule=schedule, layout=layout)
    for i in range(steps):
        trainer.step(np.roll(x, i, axis=0), np.roll(y, i))
    trainer.drain()
    return trainer


@pytest.mark.parametrize("num_stages,data,method", [
    (2, 1, lpjax.Greedy()), (4, 2, lpjax.Greedy()), (2, 2, lpjax.Overlapping(2)), (4, 1, lpjax.Overlapping(2))],
    ids=["greedy-2x1", "greedy-4x2", "overlapping-2x2", "overlapping-4x1"])
def test_matches_reference(num_stages, data, method):
    schedule = Streaming(2)
    reference = train(None, method, schedule, num_stages=num_stages)
    pipelined = train(lpjax.Layout(stages=num_stages, data=data), method, schedule, num_stages=num_stages)
    assert_trees_close(stage_params(reference), stage_params(pipelined), atol=1e-6)


def test_gpipe_backprop_matches_reference():
    reference = train(None, lpjax.Backprop(), GPipe(4), num_stages=4)
    pipelined = train(lpjax.Layout(stages=4, data=2), lpjax.Backprop(), GPipe(4), num_stages=4)
    assert_trees_close(stage_params(reference), stage_params(pipelined), atol=1e-6)


def test_stage_state_stays_on_its_devices():
    trainer = train(lpjax.Layout(stages=4, data=2), lpjax.Overlapping(2), Streaming(2), num_stages=4)
    devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
    for k, state in enumerate(trainer.stage_states):
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.device_set == set(devices[k]), f"stage {k} leaf on {leaf.sharding.device_set}"


def test_layout_larger_than_devices_is_refused():
    with pytest.raises(lpjax.ConfigError, match="needs 32 devices"):
        lpjax.Trainer(tiny_model(4), method=lpjax.Greedy(), optimizer=optax.sgd(0.1),
                      layout=lpjax.Layout(stages=4, data=8))


def test_streaming_with_window_two_stops_compiling_once_the_pipeline_is_full():
    """Residuals cross jit boundaries as leaves, so later steps reuse every compiled cell."""
    x, y = tiny_batch(16)
    trainer = lpjax.Trainer(tiny_model(3), method=lpjax.Overlapping(2), optimizer=optax.adam(1e-2),
                            schedule=Streaming(4))
    for _ in range(3):
        trainer.step(x, y)
    compiled = sum(cell._cache_size() for cell in trainer.executor._cells.values())
    for _ in range(6):
        trainer.step(x, y)
    assert sum(cell._cache_size() for cell in trainer.executor._cells.values()) == compiled


def test_resnet_stages_with_data_axis_match_reference():
    """Heterogeneous stages (the resolution halves between them) with BatchNorm, 2 devices per stage."""
    from flax import nnx
    from lpjax.models import mnist_resnet

    def model():
        rngs = nnx.Rngs(0)
        return lpjax.stage_network(mnist_resnet(width=4, blocks_per_stage=(1, 1, 1, 1), rngs=rngs),
                                   split_points=[3], rngs=rngs)

    x = np.random.default_rng(0).normal(size=(16, 12, 12, 1)).astype(np.float32)
    y = np.arange(16, dtype=np.int32) % 10
    runs = []
    for layout in (None, lpjax.Layout(stages=2, data=2)):
        trainer = lpjax.Trainer(model(), method=lpjax.Chunked(), optimizer=optax.sgd(0.1, momentum=0.9),
                                schedule=Streaming(2), layout=layout)
        for i in range(2):
            trainer.step(np.roll(x, i, axis=0), np.roll(y, i))
        trainer.drain()
        runs.append(trainer)
    assert_trees_close(stage_params(runs[0]), stage_params(runs[1]), atol=1e-6)
    assert_trees_close([jax.device_get(s.rest) for s in runs[0].stage_states],
                       [jax.device_get(s.rest) for s in runs[1].stage_states], atol=1e-5)
