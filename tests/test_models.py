"""Model zoo: shapes through every layer and head, train/eval BatchNorm, causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lpjax.models import (
    MODELS, Network, build, cifar_resnet, mlp, mnist_resnet, resnet18, resnet32, resnet50,
    resnet110, transformer_lm,
)

B = 2
NUM_CLASSES = 5


def _run_all_heads(net: Network, x):
    """Push x through every layer and check every default head; returns the final features."""
    assert net.layers
    rngs = nnx.Rngs(1)
    for i, layer in enumerate(net.layers):
        x = layer(x)
        logits = net.make_head(i, rngs)(x)
        yield i, x, logits


def _param_count(net: Network) -> int:
    params = [nnx.state(layer, nnx.Param) for layer in net.layers]
    return sum(leaf.size for leaf in jax.tree.leaves(params))


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
    net = builder(nnx.Rngs(0))
    assert len(net.layers) == num_layers
    x = jax.random.normal(jax.random.key(0), (B, *shape))
    for i, h, logits in _run_all_heads(net, x):
        assert h.shape[0] == B, (i, h.shape)
        assert logits.shape == (B, NUM_CLASSES), (i, logits.shape)
        assert np.all(np.isfinite(logits))
    with pytest.raises(IndexError):
        net.make_head(num_layers, nnx.Rngs(0))


def test_layer_counts_and_natural_splits():
    r = nnx.Rngs(0)
    assert len(resnet32(width=2, rngs=r).layers) == 1 + 15
    assert len(resnet110(width=2, rngs=r).layers) == 1 + 54
    assert len(resnet50(width=2, rngs=r).layers) == 1 + 16
    assert resnet32(width=2, rngs=r).natural_splits == (6, 11)
    assert resnet110(width=2, rngs=r).natural_splits == (19, 37)
    assert resnet50(width=2, rngs=r).natural_splits == (4, 8, 14)
    assert resnet18(width=2, rngs=r).natural_splits == (3, 5, 7)
    assert mnist_resnet(width=2, rngs=r).natural_splits == (3, 5, 7)
    with pytest.raises(ValueError):
        cifar_resnet(33, rngs=r)


def test_resnet_resolution_changes_exactly_at_natural_splits():
    net = resnet18(num_classes=NUM_CLASSES, width=2, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 16, 16, 3))
    changes = []
    for i, layer in enumerate(net.layers):
        y = layer(x)
        if i and y.shape[1] != x.shape[1]:
            changes.append(i)
        x = y
    assert tuple(changes) == net.natural_splits


def test_known_parameter_counts():
    # He et al. report 0.46M for ResNet-32 and 1.7M for ResNet-110 (option-A shortcuts).
    # Heads are not part of the body; the 64x10 classifier adds only 650.
    assert 0.44e6 < _param_count(resnet32(rngs=nnx.Rngs(0))) < 0.48e6
    assert 1.6e6 < _param_count(resnet110(rngs=nnx.Rngs(0))) < 1.8e6


def test_transformer_shapes_every_layer_and_head():
    vocab, seq_len, dim = 11, 8, 16
    net = transformer_lm(vocab_size=vocab, seq_len=seq_len, dim=dim, depth=3, heads=2, rngs=nnx.Rngs(0))
    assert len(net.layers) == 1 + 3
    assert net.natural_splits == (1, 2, 3)
    tokens = jax.random.randint(jax.random.key(0), (B, seq_len), 0, vocab)
    for i, h, logits in _run_all_heads(net, tokens):
        assert h.shape == (B, seq_len, dim)
        assert logits.shape == (B, seq_len, vocab)
    # Shorter sequences than seq_len are fine (the position table is sliced).
    assert net(tokens[:, :5]).shape == (B, 5, dim)


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


def test_layers_jit_through_split_merge_and_return_new_batch_stats():
    net = mnist_resnet(num_classes=NUM_CLASSES, width=2, rngs=nnx.Rngs(0))
    stem = net.layers[0]
    graphdef, state = nnx.split(stem)

    @jax.jit
    def forward(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    old_mean = np.asarray(state["conv_bn"]["bn"]["mean"][...])
    y, new_state = forward(state, x)
    assert not np.allclose(new_state["conv_bn"]["bn"]["mean"][...], old_mean)
    np.testing.assert_allclose(y, stem(x), rtol=1e-5, atol=1e-5)  # eager, also train mode


def test_registry_and_build():
    assert set(MODELS) == {"mlp", "resnet18", "resnet32", "resnet110", "resnet50",
                           "mnist_resnet", "transformer_lm"}
    net = build("resnet32", num_classes=3, width=2, rngs=nnx.Rngs(0))
    assert isinstance(net, Network) and len(net.layers) == 16
    with pytest.raises(ValueError, match="known models: .*resnet32"):
        build("resnet33", rngs=nnx.Rngs(0))
