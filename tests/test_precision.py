"""Mixed precision (lpjax/models/precision.py): bfloat16 compute with float32 parameters and optimizer
state, or bfloat16 parameters; float32 losses; executors agree with the reference in bfloat16 too."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.config.build import base_config, build_experiment
from lpjax.models import mnist_resnet, transformer_lm, with_precision
from lpjax.schedules import GPipe
from tiny import assert_trees_close, lm_batch, stage_params


def _dtypes(tree):
    return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def _lm(compute, params, seed=0):
    rngs = nnx.Rngs(seed)
    net = with_precision(transformer_lm(vocab_size=32, seq_len=8, dim=16, depth=3, heads=2, mlp_ratio=2, rngs=rngs),
                         compute, params)
    return lpjax.stage_network(net, split_points=[2, 3], rngs=rngs)


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer_state_and_sends_bfloat16():
    model = _lm("bfloat16", "float32")
    x, y = lm_batch(n=4)
    h, logits = model.stages[0].body(x), None
    assert h.dtype == jnp.bfloat16
    logits = model.stages[0].head(h)
    assert logits.dtype == jnp.bfloat16
    trainer = lpjax.Trainer(model, method=lpjax.Overlapping(window=2), optimizer=optax.adam(1e-2))
    first = trainer.step(x, y)
    for _ in range(5):
        last = trainer.step(x, y)
    state = trainer.stage_states[1]
    assert _dtypes(state.params) == {jnp.dtype(jnp.float32)}
    assert _dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}
    assert float(last[2]["loss"]) < float(first[2]["loss"])  # it learns, and the loss is float32
    assert last[2]["loss"].dtype == jnp.float32


def test_bfloat16_parameters_store_bfloat16_and_train():
    model = _lm("bfloat16", "bfloat16")
    x, y = lm_batch(n=4)
    trainer = lpjax.Trainer(model, method=lpjax.Chunked(), optimizer=optax.sgd(0.5))
    losses = [float(trainer.step(x, y)[0]["loss"]) for _ in range(6)]
    assert _dtypes(trainer.stage_states[0].params) == {jnp.dtype(jnp.bfloat16)}
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize("executor", ["mpmd", "spmd"])
def test_bfloat16_executors_equal_the_reference(executor):
    x, y = lm_batch(n=8)
    trained = []
    for layout in (None, lpjax.Layout(stages=3, executor=executor)):
        trainer = lpjax.Trainer(_lm("bfloat16", "float32"), method=lpjax.Chunked(), optimizer=optax.adam(1e-2),
                                schedule=GPipe(2), layout=layout)
        for _ in range(2):
            trainer.step(x, y)
        trained.append(stage_params(trainer))
    assert_trees_close(*trained, atol=1e-6)


def test_batch_statistics_stay_float32_in_a_bfloat16_resnet():
    net = with_precision(mnist_resnet(width=8, rngs=nnx.Rngs(0)), "bfloat16", "bfloat16")
    out = net(jnp.zeros((2, 28, 28, 1)))
    assert out.dtype == jnp.bfloat16
    assert _dtypes(nnx.state(net.layers[0], nnx.BatchStat)) == {jnp.dtype(jnp.float32)}


def test_the_config_key_builds_a_bfloat16_model_and_refuses_other_dtypes():
    config = base_config()
    config.dataset.name, config.model.name, config.model.depth, config.model.width = "digits", "mlp", 2, 16
    config.stages, config.method.name, config.batch_size, config.num_steps = 2, "greedy", 32, 1
    config.precision.compute = "bfloat16"
    experiment = build_experiment(config)
    x, y = next(iter(experiment.batches()))
    assert experiment.model.stages[0].body(jnp.asarray(x)).dtype == jnp.bfloat16
    config.precision.compute = "float16"
    with pytest.raises(lpjax.ConfigError, match="precision.compute"):
        build_experiment(config)
