"""Model zoo: shapes through every layer and head, train/eval BatchNorm, causality."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lpjax.models import (
    MODELS, FlattenLinear, LMHead, Network, PoolLinear, build, cifar_resnet, mlp, mnist_resnet,
    resnet, resnet18, resnet32, resnet50, resnet110, transformer_lm,
)

B = 2
NUM_CLASSES = 5


def _shapes_through_every_layer_and_head(builder, x_shape, x_dtype=jnp.float32):
    """Trace (no compile, no FLOPs) a build plus a pass through every layer and every
    default head; returns [(feature shape, logits shape)] per layer."""

    def run(x):
        net = builder(nnx.Rngs(0))
        out = []
        for i, layer in enumerate(net.layers):
            x = layer(x)
            out.append((x, net.make_head(i, nnx.Rngs(1))(x)))
        return out

    traced = jax.eval_shape(run, jax.ShapeDtypeStruct(x_shape, x_dtype))
    return [(h.shape, logits.shape) for h, logits in traced]


def _abstract(builder) -> Network:
    """Build a network with shapes only (no parameter initialisation): fast for big models."""
    built = {}

    def init():
        built["net"] = builder(nnx.Rngs(0))
        return nnx.List(built["net"].layers)

    layers = nnx.eval_shape(init)
    return dataclasses.replace(built["net"], layers=list(layers))


def _param_count(net: Network) -> int:
    params = [nnx.state(layer, nnx.Param) for layer in net.layers]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


IMAGE_CASES = {
    "mlp": (lambda r: mlp(input_shape=(8, 8, 3), num_classes=NUM_CLASSES, depth=3, width=16, rngs=r),
            (8, 8, 3), 3),
    "resnet18": (lambda r: resnet18(num_classes=NUM_CLASSES, width=4, rngs=r), (16, 16, 3), 9),
    "resnet32": (lambda r: resnet32(num_classes=NUM_CLASSES, width=4, rngs=r), (16, 16, 3), 16),
    "resnet50": (lambda r: resnet50(num_classes=NUM_CLASSES, width=4, rngs=r), (32, 32, 3), 17),
    "mnist_resnet": (lambda r: mnist_resnet(num_classes=NUM_CLASSES, width=4, rngs=r), (28, 28, 1), 9),
    "cifar_resnet14_head_conv": (
        lambda r: cifar_resnet(14, num_classes=NUM_CLASSES, width=4, head_conv=8, rngs=r), (16, 16, 3), 7),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_image_models_every_layer_and_head(case):
    builder, shape, num_layers = IMAGE_CASES[case]
    shapes = _shapes_through_every_layer_and_head(builder, (B, *shape))
    assert len(shapes) == num_layers
    for i, (h_shape, logits_shape) in enumerate(shapes):
        assert h_shape[0] == B, (i, h_shape)
        assert logits_shape == (B, NUM_CLASSES), (i, logits_shape)
    with pytest.raises(IndexError):
        _abstract(builder).make_head(num_layers, nnx.Rngs(0))


def test_small_resnet_runs_for_real():
    net = mnist_resnet(num_classes=NUM_CLASSES, width=2, blocks_per_stage=(1, 1, 1, 1), head_conv=4,
                       rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (B, 28, 28, 1))
    logits = net.make_head(len(net.layers) - 1, nnx.Rngs(1))(net(x))
    assert logits.shape == (B, NUM_CLASSES)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("builder, num_layers, splits", [
    (resnet18, 1 + 8, (3, 5, 7)),
    (resnet32, 1 + 15, (6, 11)),
    (resnet110, 1 + 54, (19, 37)),
    (resnet50, 1 + 16, (4, 8, 14)),
    (mnist_resnet, 1 + 8, (3, 5, 7)),
])
def test_layer_counts_and_natural_splits(builder, num_layers, splits):
    net = _abstract(lambda r: builder(rngs=r))
    assert len(net.layers) == num_layers
    assert net.natural_splits == splits


def test_cifar_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(33, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("case", ["resnet18", "resnet32", "resnet50", "mnist_resnet"])
def test_resnet_resolution_halves_exactly_at_natural_splits(case):
    builder, shape, _ = IMAGE_CASES[case]
    shapes = [h for h, _ in _shapes_through_every_layer_and_head(builder, (1, *shape))]
    changes = [i for i in range(1, len(shapes)) if shapes[i][1] != shapes[i - 1][1]]
    assert tuple(changes) == _abstract(builder).natural_splits


def test_known_parameter_counts():
    # He et al. report 0.46M for ResNet-32 and 1.7M for ResNet-110 (option-A shortcuts).
    # Heads are not part of the body; the 64x10 classifier adds only 650.
    assert 0.44e6 < _param_count(_abstract(lambda r: resnet32(rngs=r))) < 0.48e6
    assert 1.6e6 < _param_count(_abstract(lambda r: resnet110(rngs=r))) < 1.8e6
    # ResNet-50's body is ~23.5M (25.6M with its 2048x1000 classifier).
    assert 23.0e6 < _param_count(_abstract(lambda r: resnet50(rngs=r))) < 24.0e6


def test_transformer_shapes_every_layer_and_head():
    vocab, seq_len, dim = 11, 8, 16
    builder = lambda r: transformer_lm(vocab_size=vocab, seq_len=seq_len, dim=dim, depth=3, heads=2, rngs=r)
    shapes = _shapes_through_every_layer_and_head(builder, (B, seq_len), jnp.int32)
    assert shapes == [((B, seq_len, dim), (B, seq_len, vocab))] * (1 + 3)
    # Sequences shorter than seq_len are fine (the position table is sliced).
    shorter = _shapes_through_every_layer_and_head(builder, (B, 5), jnp.int32)
    assert shorter[-1] == ((B, 5, dim), (B, 5, vocab))
    assert _abstract(builder).natural_splits == (1, 2, 3)


def test_transformer_blocks_are_homogeneous():
    net = transformer_lm(vocab_size=11, seq_len=8, dim=16, depth=3, heads=2, rngs=nnx.Rngs(0))
    graphdefs, states = zip(*(nnx.split(layer) for layer in net.layers[1:]))
    structures = {jax.tree.structure(s) for s in states}
    shapes = {tuple(leaf.shape for leaf in jax.tree.leaves(s)) for s in states}
    assert len(structures) == 1 and len(shapes) == 1
    assert len(set(graphdefs)) == 1
    # ...and they can actually be stacked and run with one merged module.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    x = jax.random.normal(jax.random.key(0), (B, 8, 16))

    def body(h, state):
        return nnx.merge(graphdefs[0], state)(h), None

    scanned, _ = jax.lax.scan(body, x, stacked)
    expected = x
    for layer in net.layers[1:]:
        expected = layer(expected)
    np.testing.assert_allclose(scanned, expected, rtol=1e-5, atol=1e-5)


def test_transformer_is_causal():
    vocab, seq_len = 13, 10
    net = transformer_lm(vocab_size=vocab, seq_len=seq_len, dim=16, depth=2, heads=2, rngs=nnx.Rngs(0))
    head = net.make_head(len(net.layers) - 1, nnx.Rngs(1))
    logits_of = lambda t: head(net(t))
    tokens = jax.random.randint(jax.random.key(0), (1, seq_len), 0, vocab)
    base = logits_of(tokens)
    t = 4
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % vocab)
    after = logits_of(changed)
    np.testing.assert_allclose(after[:, : t + 1], base[:, : t + 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(after[:, t + 1:], base[:, t + 1:])


def _batch_stats(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.BatchStat))


def test_batchnorm_train_updates_stats_eval_does_not():
    net = resnet32(num_classes=NUM_CLASSES, width=2, rngs=nnx.Rngs(0))
    layer = net.layers[1]
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 2)) * 3 + 1

    before = _batch_stats(layer)
    layer.train()
    layer(x)
    after_train = _batch_stats(layer)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after_train)))

    layer.eval()
    y = layer(x)
    after_eval = _batch_stats(layer)
    jax.tree.map(np.testing.assert_array_equal, after_train, after_eval)
    # In eval mode a sample's output must not depend on its batch mates.
    other = x.at[1:].set(jax.random.normal(jax.random.key(1), (3, 8, 8, 2)))
    np.testing.assert_allclose(layer(other)[0], y[0], rtol=1e-6, atol=1e-6)
    layer.train()
    assert not np.allclose(layer(other)[0], layer(x)[0])


JIT_CASES = {
    # (builder, layer index, input): one layer of every kind the zoo has.
    "mnist_stem": (lambda r: mnist_resnet(width=2, rngs=r), 0, ((3, 28, 28, 1), jnp.float32)),
    "pad_shortcut_block": (lambda r: cifar_resnet(8, width=2, rngs=r), 2, ((3, 8, 8, 2), jnp.float32)),
    "bottleneck_block": (lambda r: resnet((1, 1), "bottleneck", num_classes=3, width=2, stem="imagenet",
                                          rngs=r), 2, ((3, 8, 8, 8), jnp.float32)),
    "dense_relu": (lambda r: mlp(input_shape=(4, 4), num_classes=3, width=8, rngs=r), 0,
                   ((3, 4, 4), jnp.float32)),
    "token_embedding": (lambda r: transformer_lm(vocab_size=7, seq_len=6, dim=8, heads=2, rngs=r), 0,
                        ((3, 6), jnp.int32)),
    "transformer_block": (lambda r: transformer_lm(vocab_size=7, seq_len=6, dim=8, heads=2, rngs=r), 2,
                          ((3, 6, 8), jnp.float32)),
}


@pytest.mark.parametrize("case", sorted(JIT_CASES))
def test_layer_jits_through_split_merge(case):
    builder, index, (shape, dtype) = JIT_CASES[case]
    layer = builder(nnx.Rngs(0)).layers[index]
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(0), shape) if dtype == jnp.float32 else \
        jax.random.randint(jax.random.key(0), shape, 0, 7)

    @jax.jit
    def forward(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    stats_before = _batch_stats(layer)
    y, new_state = forward(state, x)
    stats_jit = jax.tree.map(np.asarray, nnx.state(nnx.merge(graphdef, new_state), nnx.BatchStat))
    if jax.tree.leaves(stats_before):  # train mode: the jitted call must hand back new stats
        assert any(not np.allclose(a, b) for a, b in
                   zip(jax.tree.leaves(stats_before), jax.tree.leaves(stats_jit)))
    np.testing.assert_allclose(y, layer(x), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stats_jit, _batch_stats(layer))


@pytest.mark.parametrize("make_head, in_shape, out_shape", [
    (lambda r: PoolLinear(4, 3, rngs=r), (2, 5, 5, 4), (2, 3)),
    (lambda r: PoolLinear(4, 3, hidden_conv=6, rngs=r), (2, 5, 5, 4), (2, 3)),
    (lambda r: FlattenLinear(20, 3, rngs=r), (2, 4, 5), (2, 3)),
    (lambda r: LMHead(4, 3, rngs=r), (2, 5, 4), (2, 5, 3)),
])
def test_heads_jit_through_split_merge(make_head, in_shape, out_shape):
    head = make_head(nnx.Rngs(0))
    graphdef, state = nnx.split(head)
    x = jax.random.normal(jax.random.key(0), in_shape)
    y = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    assert y.shape == out_shape
    np.testing.assert_allclose(y, head(x), rtol=1e-5, atol=1e-6)


def test_registry_and_build():
    assert set(MODELS) == {"mlp", "deep_mlp", "resnet18", "resnet32", "resnet110", "resnet50",
                           "mnist_resnet", "transformer_lm"}
    net = build("resnet32", num_classes=3, width=2, rngs=nnx.Rngs(0))
    assert isinstance(net, Network) and len(net.layers) == 16
    with pytest.raises(ValueError, match="known models: .*resnet32"):
        build("resnet33", rngs=nnx.Rngs(0))
