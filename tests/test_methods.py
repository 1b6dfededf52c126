"""Each method's update equals an independent hand-written JAX computation of the rule in docs/semantics.md."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.core.schedules import GPipe, Sequential, Streaming

from tiny import assert_trees_close, assert_trees_equal, stage_params, tiny_batch, tiny_model

LR = 0.5


def initial_params(model):
    return [(nnx.state(s.body, nnx.Param), nnx.state(s.head, nnx.Param)) for s in model]


def graphdefs(model):
    return [(nnx.graphdef(s.body), nnx.graphdef(s.head)) for s in model]


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def hand_loss(method_name, window, weights, defs, params, x, y):
    """The method's total surrogate loss, written directly from the definitions."""
    apply = lambda k, h: nnx.merge(defs[k][0], params[k][0])(h)
    head = lambda k, h: nnx.merge(defs[k][1], params[k][1])(h)
    K = len(params)
    if method_name == "backprop":
        h = x
        for k in range(K):
            h = apply(k, h)
        return ce(head(K - 1, h), y)
    # values of every stage's input, with no gradient path at all
    inputs, h = [], x
    for k in range(K):
        inputs.append(jax.lax.stop_gradient(h))
        h = apply(k, h)
    total = 0.0
    for k in range(K):
        first = max(0, k - window + 1)
        h = inputs[first]  # stop_gradient at the input of stage k-w+1
        for j in range(first, k + 1):
            h = apply(j, h)
        total = total + weights[k] * ce(head(k, h), y)
    return total


def expected_after_one_sgd_step(method, model, x, y):
    defs, params = graphdefs(model), initial_params(model)
    K = len(model)
    grads = jax.grad(lambda p: hand_loss(method.name, method.window, method.weights(K), defs, p, x, y))(params)
    return [jax.tree.map(lambda p, g: p - LR * g, (b, h), gr) for (b, h), gr in zip(params, grads)]


def assert_matches(trainer, expected, check_heads=True, atol=1e-6):
    got = stage_params(trainer)
    for k, (exp_body, exp_head) in enumerate(expected):
        assert_trees_close(got[k]["body"], nnx.to_pure_dict(exp_body), atol, f"stage {k} body")
        if check_heads:
            assert_trees_close(got[k]["head"], nnx.to_pure_dict(exp_head), atol, f"stage {k} head")


METHODS = {
    "greedy": lambda: lpjax.Greedy(),
    "chunked": lambda: lpjax.Chunked(),
    "weighted": lambda: lpjax.Chunked(loss_weights=(0.5, 2.0, 1.0)),
    "overlapping": lambda: lpjax.Overlapping(2),
    "overlapping3": lambda: lpjax.Overlapping(3, loss_weights=(1.0, 0.3, 2.0)),
    "backprop": lambda: lpjax.Backprop(),
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("microbatches", [1, 2])
def test_one_update_equals_hand_written_math(name, microbatches):
    method = METHODS[name]()
    x, y = tiny_batch()
    expected = expected_after_one_sgd_step(method, tiny_model(), x, y)
    trainer = lpjax.Trainer(tiny_model(), method=method, optimizer=optax.sgd(LR),
                            schedule=Sequential(microbatches))
    trainer.step(x, y)
    # backprop leaves the auxiliary heads untouched: they are not part of its loss
    assert_matches(trainer, expected, check_heads=name != "backprop")


def test_overlapping_gradient_is_sum_of_two_windows():
    """Stage 0's body gradient under w=2 is ∂L_0/∂θ_0 + ∂L_1/∂θ_0, and differs from greedy's."""
    x, y = tiny_batch()
    greedy = lpjax.Trainer(tiny_model(), method=lpjax.Greedy(), optimizer=optax.sgd(1.0))
    overlap = lpjax.Trainer(tiny_model(), method=lpjax.Overlapping(2), optimizer=optax.sgd(1.0))
    greedy.step(x, y)
    overlap.step(x, y)
    model = tiny_model()
    defs, params = graphdefs(model), initial_params(model)

    def loss1_through_stage0(body0):
        p = list(params)
        p[0] = (body0, p[0][1])
        h = nnx.merge(defs[0][0], p[0][0])(x)
        return ce(nnx.merge(defs[1][1], p[1][1])(nnx.merge(defs[1][0], p[1][0])(h)), y)

    extra = jax.tree.leaves(jax.grad(loss1_through_stage0)(params[0][0]))
    start = jax.tree.leaves(params[0][0])
    g_greedy = [a - b for a, b in zip(start, jax.tree.leaves(stage_params(greedy)[0]["body"]))]
    g_overlap = [a - b for a, b in zip(start, jax.tree.leaves(stage_params(overlap)[0]["body"]))]
    assert_trees_close(g_overlap, [a + b for a, b in zip(g_greedy, extra)])
    assert max(float(jnp.abs(e).max()) for e in extra) > 1e-4


@pytest.mark.parametrize("method", [lpjax.Greedy(), lpjax.Chunked()], ids=["greedy", "chunked"])
@pytest.mark.parametrize("k", [0, 1])
def test_later_stage_never_changes_earlier_update(method, k):
    layers = 1 if method.name == "greedy" else 2
    x, y = tiny_batch()
    base = lpjax.Trainer(tiny_model(layers_per_stage=layers), method=method, optimizer=optax.adam(1e-2))
    changed_model = tiny_model(layers_per_stage=layers)
    other = tiny_model(layers_per_stage=layers, seed=7)
    nnx.update(changed_model[k + 1], nnx.state(other[k + 1]))  # new body and head for stage k+1
    changed = lpjax.Trainer(changed_model, method=method, optimizer=optax.adam(1e-2))
    for _ in range(3):
        base.step(x, y)
        changed.step(x, y)
    for j in range(k + 1):
        assert_trees_equal(stage_params(base)[j], stage_params(changed)[j])
    assert not np.allclose(jax.tree.leaves(stage_params(base)[k + 1])[0], jax.tree.leaves(stage_params(changed)[k + 1])[0])


def test_schedules_agree_for_window_one():
    """Greedy's math does not depend on the order: sequential, GPipe and streaming give the same params."""
    x, y = tiny_batch(16)
    results = []
    for schedule in (Sequential(2), GPipe(2), Streaming(2)):
        trainer = lpjax.Trainer(tiny_model(), method=lpjax.Greedy(), optimizer=optax.adam(1e-2), schedule=schedule)
        for _ in range(3):
            trainer.step(x, y)
        trainer.drain()
        results.append(jax.tree.leaves(stage_params(trainer)))
    for other in results[1:]:
        assert_trees_close(results[0], other)


def test_gpipe_backprop_equals_sequential_backprop():
    """Also: the reference executor can run a flushed step as one compiled program (GPipe here; its
    default for one-microbatch steps) and gives exactly what it gives task by task (Sequential here),
    the one-tree update included."""
    x, y = tiny_batch(16)
    runs = []
    for schedule, whole_steps in ((Sequential(4), False), (GPipe(4), True)):
        trainer = lpjax.Trainer(tiny_model(), method=lpjax.Backprop(), optimizer=optax.adam(1e-2), schedule=schedule)
        assert not trainer.executor.whole_steps  # the default for steps of several microbatches
        trainer.executor.whole_steps = whole_steps
        metrics = [trainer.step(x, y) for _ in range(3)]
        assert sum(key[0] == "step" for key in trainer.executor._cells) == whole_steps  # one program for all steps
        runs.append(jax.device_get((jax.tree.leaves(trainer.stage_states), metrics)))
    assert_trees_equal(*runs)


def test_per_stage_optimizers_get_their_own_learning_rate():
    x, y = tiny_batch()
    frozen_first = [optax.sgd(0.0), optax.sgd(LR), optax.sgd(LR)]
    trainer = lpjax.Trainer(tiny_model(), method=lpjax.Greedy(), optimizer=frozen_first)
    before = stage_params(trainer)
    trainer.step(x, y)
    after = stage_params(trainer)
    assert_trees_equal(before[0], after[0])
    assert not np.allclose(jax.tree.leaves(before[1])[0], jax.tree.leaves(after[1])[0])


# -- backprop's optimizer is one optax tree over the whole model ---------------------------------

def unstaged_optax_steps(model, tx, batches):
    """optax on the unstaged network (every body, then the last head): the whole model as one tree."""
    defs, params = graphdefs(model), initial_params(model)
    K = len(model)
    tree = {"bodies": [b for b, _ in params], "head": params[-1][1]}

    def loss(t, x, y):
        h = x
        for k in range(K):
            h = nnx.merge(defs[k][0], t["bodies"][k])(h)
        return ce(nnx.merge(defs[-1][1], t["head"])(h), y)

    state = tx.init(tree)
    for x, y in batches:
        updates, state = tx.update(jax.grad(loss)(tree, x, y), state, tree)
        tree = optax.apply_updates(tree, updates)
    return tree


@pytest.mark.parametrize("layout", [None, lpjax.Layout(stages=3), lpjax.Layout(stages=3, executor="spmd")],
                         ids=["reference", "mpmd", "spmd"])
def test_backprop_with_global_clipping_equals_optax_on_the_unstaged_model(layout):
    """Repro 3: one transformation used to be applied per stage, clipping each stage by its own norm."""
    tx = optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(0.1, weight_decay=0.1))
    x, y = tiny_batch(8)
    batches = [(x, y), (np.roll(x, 3, axis=0), np.roll(y, 3))]
    expected = unstaged_optax_steps(tiny_model(), tx, batches)
    trainer = lpjax.Trainer(tiny_model(), method=lpjax.Backprop(), optimizer=tx, schedule=GPipe(2), layout=layout)
    for xb, yb in batches:
        trainer.step(xb, yb)
    got = stage_params(trainer)
    for k in range(3):
        assert_trees_close(got[k]["body"], nnx.to_pure_dict(expected["bodies"][k]), 1e-6, f"stage {k} body")
    assert_trees_close(got[-1]["head"], nnx.to_pure_dict(expected["head"]), 1e-6, "last head")
    # the clip really bites: per-stage clipping would have given a different step
    norms = [float(h["grad_norm"]) for h in trainer.health()]
    assert norms[0] == pytest.approx(norms[-1]) and norms[0] > 0.05


def test_config_grad_clip_norm_clips_backprop_globally():
    from ml_collections import ConfigDict

    from lpjax.config.optimizer import build_optimizers

    opt = ConfigDict({"name": "sgd", "learning_rate": 1.0, "learning_rates": None, "weight_decay": 0.0,
                      "momentum": 0.0, "decay": "constant", "warmup_steps": 0, "grad_clip_norm": 0.05})
    tx = build_optimizers(opt, 3, 1, lpjax.Backprop())
    x, y = tiny_batch(8)
    expected = unstaged_optax_steps(tiny_model(), optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(1.0)),
                                    [(x, y)])
    trainer = lpjax.Trainer(tiny_model(), method=lpjax.Backprop(), optimizer=tx)
    trainer.step(x, y)
    got = stage_params(trainer)
    for k in range(3):
        assert_trees_close(got[k]["body"], nnx.to_pure_dict(expected["bodies"][k]), 1e-6, f"stage {k} body")
