"""SOLO's shared read-only readout (lpjax/core/shared_readout.py, docs/semantics.md "Shared readout"):
the rule against a hand-written JAX computation, the refresh interval on every executor, resume,
and the combinations that are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.config.build import base_config
from lpjax.core.methods import make_method
from lpjax.core.schedules import GPipe, OneFOneB, Sequential, Streaming
from lpjax.training.loop import train_and_evaluate

from tiny import Dense, assert_trees_close, assert_trees_equal, lm_batch, lm_model, tiny_batch, tiny_model

LR = 0.5


def shared(name="chunked", refresh=1, **options):
    return make_method(name, shared_readout=True, readout_refresh_steps=refresh, **options)


def linear(module):
    return {"kernel": jnp.asarray(module.kernel[...]), "bias": jnp.asarray(module.bias[...])}


@pytest.mark.parametrize("refresh", [1, 2])
def test_two_stage_update_equals_the_hand_written_rule(refresh):
    """Stage 0's loss reads a stop-gradient copy of stage 1's readout, refreshed before every
    ``refresh``-th step; stage 1's loss alone trains the readout. Written out with jax.grad."""
    model = tiny_model(2)
    theta = {"W0": linear(model[0].body.layers[0].linear), "W1": linear(model[1].body.layers[0].linear),
             "R": linear(model[1].head)}
    copy = dict(theta["R"])
    trainer = lpjax.Trainer(model, method=shared(refresh=refresh), optimizer=optax.sgd(LR))

    def ce(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def losses(theta, copy, x, y):
        h0 = jnp.tanh(x @ theta["W0"]["kernel"] + theta["W0"]["bias"])
        aux = h0 @ jax.lax.stop_gradient(copy["kernel"]) + jax.lax.stop_gradient(copy["bias"])
        h1 = jnp.tanh(jax.lax.stop_gradient(h0) @ theta["W1"]["kernel"] + theta["W1"]["bias"])
        return ce(aux, y) + ce(h1 @ theta["R"]["kernel"] + theta["R"]["bias"], y)

    x, y = tiny_batch(8)
    for step in range(4):
        xs, ys = np.roll(x, step, 0), np.roll(y, step)
        if step > 0 and step % refresh == 0:
            copy = dict(theta["R"])
        theta = jax.tree.map(lambda p, g: p - LR * g, theta, jax.grad(losses)(theta, copy, xs, ys))
        trainer.step(xs, ys)

    states = jax.device_get(trainer.stage_states)
    got = {"W0": states[0].params["body"]["layers"][0]["linear"], "W1": states[1].params["body"]["layers"][0]["linear"],
           "R": states[1].params["head"]}
    assert_trees_close(jax.tree.map(np.asarray, theta), {k: {n: v[...] for n, v in t.items()} for k, t in got.items()},
                       atol=1e-6)
    assert_trees_close(copy, {n: v[...] for n, v in states[0].rest["head"].items()}, atol=1e-6)
    assert not jax.tree.leaves(states[0].params["head"])  # the auxiliary head holds no trainable readout
    # the aux loss really reached the readout's input: a copy used without refresh is a different run
    if refresh == 2:
        assert not np.allclose(copy["kernel"], theta["R"]["kernel"])


def readouts(trainer):
    """(the readers' copies, the owner's readout), as numpy."""
    states = jax.device_get(trainer.stage_states)
    copies = [{n: np.asarray(v[...]) for n, v in s.rest["head"].items()} for s in states[:-1]]
    return copies, {n: np.asarray(v[...]) for n, v in states[-1].params["head"].items()}


EXECUTORS = [(None, Sequential), (lpjax.Layout(stages=3, executor="mpmd"), GPipe),
             (lpjax.Layout(stages=3, executor="spmd"), OneFOneB), (lpjax.Layout(stages=3, data=2, executor="spmd"), GPipe)]


@pytest.mark.parametrize("layout,schedule", EXECUTORS, ids=["reference", "mpmd-gpipe", "spmd-1f1b", "spmd2-gpipe"])
def test_refresh_interval_is_honoured_on_every_executor(layout, schedule):
    """Refresh every 3 steps: the copy used during step s is the readout after step 3*(s//3) - 1
    (the initial one before step 3), on every executor, and parameters equal the reference's."""
    def train(layout, schedule):
        trainer = lpjax.Trainer(tiny_model(3), method=shared("overlapping", refresh=3), optimizer=optax.sgd(LR),
                                schedule=schedule(2), layout=layout)
        x, y = tiny_batch(8)
        initial = readouts(trainer)[1]
        history = []  # per step: (copies in use during it, readout after it)
        for step in range(7):
            trainer.step(np.roll(x, step, 0), np.roll(y, step))
            history.append(readouts(trainer))
        return initial, history, jax.device_get([s.params for s in trainer.stage_states])

    initial, history, params = train(layout, schedule)
    for step, (copies, _) in enumerate(history):
        expected = initial if step < 3 else history[3 * (step // 3) - 1][1]
        for copy in copies:
            assert_trees_equal(expected, copy, err_msg=f"step {step}")
        if step:
            changed = not np.array_equal(copies[0]["kernel"], history[step - 1][0][0]["kernel"])
            assert changed == (step % 3 == 0), f"step {step}: the copy changed={changed}"
    if layout is not None:
        ref_initial, ref_history, ref_params = train(None, Sequential)
        assert_trees_close(ref_params, params, atol=1e-6)
        assert_trees_close(ref_history, history, atol=1e-6)


def test_private_head_layers_train_and_the_lm_unembedding_is_shared():
    """On the LM the auxiliary heads keep their own LayerNorm (trained by their loss) in front of a
    copy of the last stage's unembedding."""
    model = lm_model(3)
    norm_before = np.asarray(model[0].head.norm.scale[...])
    trainer = lpjax.Trainer(model, method=shared(), optimizer=optax.adam(1e-2))
    x, y = lm_batch(8)
    owner_after = []
    for _ in range(3):
        trainer.step(x, y)
        owner_after.append(readouts_lm(jax.device_get(trainer.stage_states))[1])
    states = jax.device_get(trainer.stage_states)
    assert "norm" in states[0].params["head"] and "linear" not in states[0].params["head"]
    assert not np.allclose(states[0].params["head"]["norm"]["scale"][...], norm_before)
    copies, owner = readouts_lm(states)
    # refreshed before step 2 (0-based) from the readout after step 1; step 2 then moved the readout on
    assert_trees_equal(owner_after[1], copies)
    assert not np.array_equal(owner["kernel"], copies["kernel"])
    assert isinstance(trainer.export()[0].head.linear, lpjax.core.shared_readout.ReadOnlyReadout)
    # that model now has read-only heads: a private-head trainer on it would silently not train them
    with pytest.raises(lpjax.ConfigError, match="build a fresh model"):
        lpjax.Trainer(model, method=lpjax.Chunked(), optimizer=optax.adam(1e-2))


def readouts_lm(states):
    return ({n: np.asarray(v[...]) for n, v in states[0].rest["head"]["linear"].items()},
            {n: np.asarray(v[...]) for n, v in states[-1].params["head"]["linear"].items()})


def test_resume_is_bit_exact_across_a_refresh(tmp_path):
    """Checkpoint at step 2, resume to 5 (refresh every 3, so before step 3): the same parameters and
    copies as 5 steps straight. The copies are in the checkpoint and the step count is restored."""
    def config(steps):
        cfg = base_config()
        cfg.dataset.name, cfg.dataset.test_size = "digits", 100
        cfg.model.name, cfg.model.depth, cfg.model.width = "mlp", 2, 16
        cfg.stages, cfg.method.name, cfg.batch_size = 2, "chunked", 16
        cfg.method.shared_readout, cfg.method.readout_refresh_steps = True, 3
        cfg.num_steps, cfg.checkpoint.every_steps, cfg.checkpoint.asynchronous = steps, 0, False
        return cfg

    def final(workdir):
        from lpjax.training.checkpoint import Checkpointer
        trainer = lpjax.config.build.build_experiment(config(5)).trainer
        states, meta = Checkpointer(str(workdir / "checkpoints"), 2).restore_latest(trainer.stage_states)
        assert meta["step"] == 5
        return jax.device_get([(s.params, s.rest, s.opt_state) for s in states])

    train_and_evaluate(config(5), str(tmp_path / "straight"), progress=False)
    train_and_evaluate(config(2), str(tmp_path / "resumed"), progress=False)
    train_and_evaluate(config(5), str(tmp_path / "resumed"), progress=False)
    assert_trees_equal(final(tmp_path / "straight"), final(tmp_path / "resumed"))


def test_combinations_that_cannot_work_are_config_errors():
    for build, words in [
        (lambda: make_method("backprop", shared_readout=True), "drop method.shared_readout"),
        (lambda: make_method("chunked", readout_refresh_steps=5), "shared_readout=True"),
        (lambda: shared(refresh=0), "readout_refresh_steps must be an integer >= 1"),
        (lambda: lpjax.Trainer(tiny_model(3), method=shared(), optimizer=optax.sgd(0.1), schedule=Streaming(2)),
         "flushing schedule"),
        (lambda: lpjax.Trainer(tiny_model(1), method=shared(), optimizer=optax.sgd(0.1)), "at least 2 stages"),
        (lambda: lpjax.Trainer(tiny_model(2), method=shared(loss_weights=(1.0, 0.0)), optimizer=optax.sgd(0.1)),
         "non-zero loss weight"),
        (lambda: lpjax.Trainer(mismatched(), method=shared(), optimizer=optax.sgd(0.1)), "private layer of width 6"),
        (lambda: lpjax.Trainer(unrecognised(), method=shared(), optimizer=optax.sgd(0.1)), "name the head's final Dense"),
    ]:
        with pytest.raises(lpjax.ConfigError, match=words):
            build()


def mismatched():
    rngs = nnx.Rngs(0)
    widths = [8, 6]
    layers = [Dense(12 if i == 0 else 8, widths[i], rngs) for i in range(2)]
    return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(widths[i], 5, rngs=r), num_stages=2, rngs=rngs)


def unrecognised():
    rngs = nnx.Rngs(0)
    layers = [Dense(12 if i == 0 else 8, 8, rngs) for i in range(2)]
    return lpjax.cut_layers(layers, lambda i, r: nnx.Sequential(nnx.Linear(8, 5, rngs=r)), num_stages=2, rngs=rngs)


def test_config_keys_reach_the_method():
    from lpjax.config.build import build_experiment

    cfg = base_config()
    cfg.dataset.name, cfg.model.name, cfg.model.depth, cfg.model.width = "digits", "mlp", 2, 16
    cfg.stages, cfg.method.name, cfg.num_steps = 2, "greedy", 1
    cfg.method.shared_readout, cfg.method.readout_refresh_steps = True, 50
    method = build_experiment(cfg).trainer.method
    assert method.shared == lpjax.SharedReadout(50) and method.describe().endswith("every 50 steps)")
    cfg.method.name = "backprop"
    with pytest.raises(lpjax.ConfigError, match="drop method.shared_readout"):
        build_experiment(cfg)
