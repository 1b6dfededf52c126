"""Configurable auxiliary heads: depth, width, norm, learned temperature and bias, AugLocal's pyramid."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from models import mnist_resnet, transformer_lm
from models.heads import DeepLMHead, DeepPoolHead, LMHead, PoolLinear, aux_head_depth


def test_defaults_leave_every_head_as_it_was():
    net = mnist_resnet(rngs=nnx.Rngs(0))
    assert all(type(net.make_head(i, nnx.Rngs(0))) is PoolLinear for i in range(len(net.layers)))
    lm = transformer_lm(vocab_size=16, seq_len=4, dim=8, depth=2, heads=2, rngs=nnx.Rngs(0))
    assert all(type(lm.make_head(i, nnx.Rngs(0))) is LMHead for i in range(len(lm.layers)))


def test_depth_applies_to_auxiliary_heads_only_and_the_pyramid_shrinks():
    net = mnist_resnet(head_depth=2, head_width=8, head_norm=True, rngs=nnx.Rngs(0))
    last = len(net.layers) - 1
    heads = [net.make_head(i, nnx.Rngs(0)) for i in range(len(net.layers))]
    assert type(heads[last]) is PoolLinear  # the output head, so backprop's model is unchanged
    assert all(isinstance(h, DeepPoolHead) and len(h.convs) == 2 for h in heads[:last])
    depths = [aux_head_depth(4, True, i, 9) for i in range(9)]
    assert depths[0] == 4 and depths[7] == 1 and depths[8] == 0
    assert all(a >= b for a, b in zip(depths, depths[1:]))
    assert [aux_head_depth(4, False, i, 9) for i in range(9)] == [4] * 8 + [0]


def test_learned_temperature_starts_as_the_identity():
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype(np.float32)
    plain = DeepPoolHead(4, 3, depth=1, width=5, rngs=nnx.Rngs(1))
    scaled = DeepPoolHead(4, 3, depth=1, width=5, temperature=True, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(scaled(x), plain(x), rtol=1e-6)
    scaled.temperature.log_scale[...] = np.log(2.0)
    np.testing.assert_allclose(scaled(x), 2.0 * plain(x), rtol=1e-5)


def test_bad_options_are_refused():
    for options in ({"head_depth": -1}, {"head_depth": 1.5}, {"head_pyramid": "yes"}):
        with pytest.raises(ValueError):
            mnist_resnet(rngs=nnx.Rngs(0), **options)


def test_deep_lm_heads_train_under_a_local_method():
    rngs = nnx.Rngs(0)
    net = transformer_lm(vocab_size=16, seq_len=4, dim=8, depth=3, heads=2, mlp_ratio=2, head_depth=1,
                         head_temperature=True, rngs=rngs)
    model = lpjax.stage_network(net, split_points=[2, 3], rngs=rngs)
    assert isinstance(model[0].head, DeepLMHead) and len(model[0].head.blocks) == 1
    trainer = lpjax.Trainer(model, method=lpjax.Chunked(), optimizer=optax.adam(1e-2))
    tokens = np.random.default_rng(0).integers(0, 16, (8, 4)).astype(np.int32)
    before = jax.device_get(trainer.stage_states[0].params["head"])
    metrics = trainer.step(tokens, np.roll(tokens, -1, axis=1))
    after = jax.device_get(trainer.stage_states[0].params["head"])
    assert all(np.isfinite(float(m["loss"])) for m in metrics)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed), "every parameter of the deep head (blocks, temperature, bias) gets a gradient"
