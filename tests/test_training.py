"""Every method learns MNIST-5k; backprop and 2-chunk training reach a high test accuracy."""

import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.data import batch_iterator, load_dataset
from lpjax.models import mlp


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k", seed=0)


def train_mlp(data, method, num_stages, steps=300, batch=100):
    rngs = nnx.Rngs(0)
    net = mlp(input_shape=data.input_shape, num_classes=10, depth=4, width=128, rngs=rngs)
    model = lpjax.stage_network(net, num_stages=num_stages, rngs=rngs)
    trainer = lpjax.Trainer(model, method=method, optimizer=optax.adam(1e-3), num_classes=10)
    batches = batch_iterator(data.train_x, data.train_y, batch, seed=0)
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        metrics = trainer.step(x, y)
        losses.append([float(m["loss"]) if m is not None else np.nan for m in metrics])
    return trainer, np.array(losses)


@pytest.mark.parametrize("method,num_stages", [
    (lpjax.Backprop(), 4), (lpjax.Greedy(), 4), (lpjax.Chunked(), 2), (lpjax.Overlapping(2), 4)],
    ids=["backprop", "greedy", "chunked2", "overlapping"])
def test_every_method_lowers_the_training_loss(mnist, method, num_stages):
    trainer, losses = train_mlp(mnist, method, num_stages)
    last = losses[:, -1]  # the output head's loss is defined for every method
    assert last[-20:].mean() < 0.35 * last[:5].mean(), (last[:5], last[-20:])
    accuracy = trainer.evaluate(mnist.test_x, mnist.test_y)[-1]["accuracy"]
    if method.name in ("backprop", "chunked"):
        assert accuracy >= 0.91, accuracy
    else:
        assert accuracy >= 0.85, accuracy
