"""Tiny user-style NNX modules and data shared by the tests (not part of the product)."""

import jax
import numpy as np
from flax import nnx

import lpjax
from lpjax.models import transformer_lm

SEQ, VOCAB = 8, 32


class Dense(nnx.Module):
    """A user's own layer: nothing of lpjax is subclassed."""

    def __init__(self, din, dout, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x):
        return jax.nn.tanh(self.linear(x.reshape(x.shape[0], -1)))


def tiny_model(num_stages=3, width=8, din=12, classes=5, seed=0, layers_per_stage=1):
    rngs = nnx.Rngs(seed)
    count = num_stages * layers_per_stage
    layers = [Dense(din if i == 0 else width, width, rngs) for i in range(count)]
    return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(width, classes, rngs=r), num_stages=num_stages, rngs=rngs)


def tiny_batch(n=8, din=12, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, din)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def stage_params(trainer):
    return [jax.device_get(s.params) for s in trainer.stage_states]


def assert_trees_close(a, b, atol=1e-6, err_msg=""):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b), err_msg
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=err_msg)


def assert_trees_equal(a, b, err_msg=""):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b), err_msg
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=err_msg)


def lm_model(num_stages, seed=0):
    """A tiny byte-level LM cut so that the embedding rides with the first block (stage 0 differs)."""
    rngs = nnx.Rngs(seed)
    net = transformer_lm(vocab_size=VOCAB, seq_len=SEQ, dim=16, depth=num_stages, heads=2, mlp_ratio=2, rngs=rngs)
    return lpjax.stage_network(net, split_points=list(range(2, num_stages + 1)), rngs=rngs)


def lm_batch(n=8, seed=0):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def digits_recipe(**settings) -> str:
    """Source of a recipe file for the cheapest real run (digits, a 2-layer MLP cut in 2 chunked
    stages, batch 32); ``settings`` override config keys, with ``__`` for dots
    (``checkpoint__every_steps=3``)."""
    base = {"dataset__name": "digits", "model__name": "mlp", "model__depth": 2, "model__width": 32,
            "stages": 2, "method__name": "chunked", "batch_size": 32}
    lines = [f"    config.{key.replace('__', '.')} = {value!r}" for key, value in {**base, **settings}.items()]
    return "\n".join(["from lpjax.config.build import base_config", "", "", "def get_config():",
                      "    config = base_config()", *lines, "    return config", ""])
