"""Rematerialisation (lpjax/core/remat.py): the same parameters with and without a policy, on every
executor and method family, and a smaller residual where the policy saves less."""

import jax
import numpy as np
import optax
import pytest

import lpjax
from lpjax.schedules import GPipe, Streaming
from tiny import assert_trees_close, lm_batch, lm_model, stage_params, tiny_batch, tiny_model

CASES = [
    ("greedy", lambda: lpjax.Greedy(), GPipe(2), None),
    ("overlapping streaming mpmd", lambda: lpjax.Overlapping(window=2), Streaming(2), lpjax.Layout(stages=3)),
    ("backprop spmd", lambda: lpjax.Backprop(), GPipe(2), lpjax.Layout(stages=3, executor="spmd")),
]


@pytest.mark.parametrize("name,method,schedule,layout", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("policy", ["nothing_saved", "dots_saved", "layers_nothing_saved"])
def test_a_remat_policy_trains_the_same_parameters_as_none(name, method, schedule, layout, policy):
    x, y = tiny_batch(n=8)
    trained = []
    for remat in ("none", policy):
        trainer = lpjax.Trainer(tiny_model(), method=method(), optimizer=optax.adam(1e-2), schedule=schedule,
                                layout=layout, remat=remat)
        for step in range(3):
            trainer.step(x + step, y)
        trainer.drain()
        trained.append(stage_params(trainer))
    assert_trees_close(*trained, atol=1e-6, err_msg=f"{name} with remat={policy}")


def _residual_bytes(rule, state, x, y):
    _, _, _, residual, _ = jax.eval_shape(lambda s, a, b: rule.forward(s, a, b, True), state, x, y)
    return sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(residual))


def test_nothing_saved_keeps_a_smaller_residual_than_none():
    """A window-2 stage keeps its body's VJP residual for a later loss; under ``nothing_saved`` that
    residual holds the stage's input and parameters, not every intermediate of the block."""
    x, y = lm_batch(n=4)
    sizes = {}
    for remat in ("none", "nothing_saved"):
        trainer = lpjax.Trainer(lm_model(3), method=lpjax.Overlapping(window=2), optimizer=optax.sgd(0.1), remat=remat)
        rule = trainer.rules[1]
        h = jax.eval_shape(lambda s, a: trainer.rules[0].predict(s, a)[0], trainer.stage_states[0], x)
        sizes[remat] = _residual_bytes(rule, trainer.stage_states[1], h, y)
    assert sizes["nothing_saved"] < sizes["none"], sizes


def test_an_unknown_policy_is_one_line_naming_the_choices():
    with pytest.raises(lpjax.ConfigError, match="unknown remat policy 'some'.*nothing_saved"):
        lpjax.Trainer(tiny_model(), method=lpjax.Greedy(), optimizer=optax.sgd(0.1), remat="some")


def test_per_layer_remat_trains_the_lm_the_same_from_its_token_ids():
    """Stage 0 reads int token ids: the per-layer backward waits on the parameters instead of the input.
    SGD, not Adam: the attention's key bias has a zero gradient up to rounding, which Adam's first step
    turns into +-lr whatever the rounding's sign (it differs between the op orders)."""
    x, y = lm_batch(n=4)
    trained = []
    for remat in ("none", "layers_nothing_saved"):
        trainer = lpjax.Trainer(lm_model(2), method=lpjax.Overlapping(window=2), optimizer=optax.sgd(0.1), remat=remat)
        for step in range(2):
            trainer.step(x, y)
        trainer.drain()
        trained.append(stage_params(trainer))
    assert_trees_close(*trained, atol=1e-6, err_msg="lm with remat=layers_nothing_saved")


def test_per_layer_remat_lowers_a_stage_peak_where_stage_remat_does_not():
    """A stage's own backward follows its forward: one checkpoint around the body recomputes every
    intermediate at once and holds them all again; one per layer holds one layer's at a time."""
    from flax import nnx

    from lpjax.models import mlp
    from lpjax.research.costs import stage_peak

    x = jax.ShapeDtypeStruct((256, 16, 16, 1), np.float32)
    y = jax.ShapeDtypeStruct((256,), np.int32)
    peaks = {}
    for remat in ("none", "nothing_saved", "layers_nothing_saved"):
        net = mlp(input_shape=(16, 16, 1), num_classes=10, depth=6, width=256, rngs=nnx.Rngs(0))
        model = lpjax.stage_network(net, num_stages=1, rngs=nnx.Rngs(1))
        rule = lpjax.Trainer(model, method=lpjax.Chunked(), optimizer=optax.sgd(0.1), remat=remat).rules[0]
        peaks[remat] = stage_peak(rule, jax.eval_shape(rule.init_state), x, y)["peak"]
    assert peaks["layers_nothing_saved"] < peaks["none"] <= peaks["nothing_saved"], peaks
