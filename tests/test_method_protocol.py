"""The public method protocol: the built-in methods as declarations, the registry, the rules' surface."""

import dataclasses
import pathlib
import re

import jax
import numpy as np
import optax
import pytest

import lpjax
from lpjax.core.methods import EVERY_STAGE, LAST_STAGE, METHODS, ONE_TREE, PER_STAGE, Method, make_method

from tiny import tiny_batch, tiny_model

DECLARED = {  # name -> (losses, window, needs_flush, optimizer, one_layer_per_stage)
    "backprop": (LAST_STAGE, None, True, ONE_TREE, False),
    "greedy": (EVERY_STAGE, 1, False, PER_STAGE, True),
    "chunked": (EVERY_STAGE, 1, False, PER_STAGE, False),
    "overlapping": (EVERY_STAGE, 2, False, PER_STAGE, False),
}


@pytest.mark.parametrize("name", list(DECLARED))
def test_builtin_methods_round_trip_through_the_protocol(name):
    method = make_method(name)
    assert (method.losses, method.window, method.needs_flush, method.optimizer,
            method.one_layer_per_stage) == DECLARED[name]
    # a plain Method built from the declared fields is the same method
    rebuilt = Method(**dataclasses.asdict(method))
    assert rebuilt == method
    for k in range(4):
        assert rebuilt.sources(k, 4) == method.sources(k, 4)
    assert rebuilt.weights(4) == method.weights(4)


def test_backprop_is_expressed_by_its_fields_not_by_its_name():
    """A method that declares backprop's fields under another name trains exactly like backprop."""
    x, y = tiny_batch()
    renamed = dataclasses.replace(lpjax.Backprop(), name="global")
    results = []
    for method in (lpjax.Backprop(), renamed):
        trainer = lpjax.Trainer(tiny_model(), method=method, optimizer=optax.chain(optax.clip_by_global_norm(0.1),
                                                                                  optax.sgd(0.5)))
        trainer.step(x, y)
        results.append(jax.device_get([s.params for s in trainer.stage_states]))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(a, b)


def test_registry_options_are_validated_by_the_factory():
    assert make_method("overlapping", window=3).window == 3
    assert make_method("chunked", loss_weights=[1, 2]).loss_weights == (1, 2)
    for name, options, words in [("backprop", {"loss_weights": (1.0,)}, "last head"),
                                 ("backprop", {"window": 2}, "window"),
                                 ("greedy", {"window": 2}, "overlapping"),
                                 ("nope", {}, "choose one of")]:
        with pytest.raises(lpjax.ConfigError, match=words):
            make_method(name, **options)


def test_bad_declarations_are_config_errors():
    for fields in ({"losses": "some"}, {"optimizer": "shared"}, {"window": 0}, {"window": True}):
        with pytest.raises(lpjax.ConfigError):
            Method("bad", **fields)


def test_public_kernel_surface_reproduces_the_forward_rule():
    """apply_body + head_loss give the activation and the metric loss the update rule computes."""
    x, y = tiny_batch()
    trainer = lpjax.Trainer(tiny_model(), method=lpjax.Chunked(loss_weights=(0.5, 2.0, 1.0)),
                            optimizer=optax.sgd(0.1))
    h = x
    for rule in trainer.rules:
        state = rule.init_state()
        _, h_rule, _, _, metrics = rule.forward(state, h, y, True)
        h_pub, _ = rule.apply_body(state.params["body"], state.rest["body"], h)
        loss, (logits, _) = rule.head_loss(state.params["head"], state.rest["head"], h_pub, y)
        np.testing.assert_allclose(h_pub, h_rule, rtol=0, atol=0)
        np.testing.assert_allclose(loss, metrics["loss"], rtol=1e-6)
        assert logits.shape == (len(y), 5)
        h = h_rule


def test_docs_example_runs():
    """docs/methods.md's "write your own method" example, executed as written."""
    text = (pathlib.Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    code = re.search(r"## Write your own method.*?```python\n(.*?)```", text, re.S).group(1)
    METHODS.pop("wide-window", None)
    namespace = {}
    try:
        exec(compile(code, "docs/methods.md", "exec"), namespace)
    finally:
        METHODS.pop("wide-window", None)
    losses = namespace["losses"]
    assert namespace["trainer"].method.window == 3 and namespace["trainer"].method.weights(4)[-1] == 2.0
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


def test_shared_state_round_trips_through_the_protocol():
    """A method's shared state is part of its declaration: asdict -> Method gives the same method."""
    for name in ("greedy", "chunked", "overlapping"):
        method = make_method(name, shared_readout=True, readout_refresh_steps=50)
        assert method.shared == lpjax.SharedReadout(50)
        assert Method(**dataclasses.asdict(method)) == method
        assert dataclasses.replace(make_method(name), shared=lpjax.SharedReadout(50)) == method
