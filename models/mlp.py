"""Plain ReLU MLP, the paper's smallest CIFAR-10 model family."""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx

from .base import Network, check_head_index
from .heads import FlattenLinear


class DenseReLU(nnx.Module):
    """Flatten (a no-op after the first layer) -> Dense -> ReLU."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, out_features, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.linear(x.reshape(x.shape[0], -1)))


def _flatten_head(width, num_classes, num_layers, i, rngs):
    check_head_index(i, num_layers)
    return FlattenLinear(width, num_classes, rngs=rngs)


def mlp(*, input_shape, num_classes: int, depth: int = 4, width: int = 256, rngs: nnx.Rngs) -> Network:
    """An MLP of ``depth`` Dense+ReLU layers, each ``width`` wide.

    Args:
      input_shape: one example's shape without the batch axis, e.g. ``(32, 32, 3)``; the first layer
        flattens it.
      num_classes: the width of every head.
      depth: the number of layers (>= 1, else ValueError).
      width: every layer's width.
      rngs: the random streams the layers are initialised from.

    Returns:
      A ``Network`` named ``mlp{depth}x{width}`` of ``depth`` layers. Every layer, the last included,
      gets a ``FlattenLinear(width, num_classes)`` head, so the output head is a linear readout of the
      last hidden layer. No natural splits: all layers are alike.
    """
    if depth < 1:
        raise ValueError(f"mlp depth must be >= 1, got {depth}")
    in_features = math.prod(input_shape)
    return _dense_stack(DenseReLU(in_features, width, rngs=rngs), width, depth, num_classes, f"mlp{depth}x{width}", rngs)


class PooledDenseReLU(nnx.Module):
    """Average-pool the image ``pool`` x ``pool`` (a fixed input projection), flatten, Dense, ReLU."""

    def __init__(self, in_features: int, out_features: int, pool: int, *, rngs: nnx.Rngs):
        self.pool = pool
        self.dense = DenseReLU(in_features, out_features, rngs=rngs)

    def __call__(self, x):
        if self.pool > 1:
            x = nnx.avg_pool(x, (self.pool, self.pool), strides=(self.pool, self.pool))
        return self.dense(x)


def deep_mlp(*, input_shape, num_classes: int, depth: int = 8, width: int = 256, pool: int = 2,
             rngs: nnx.Rngs) -> Network:
    """A deep uniform MLP shaped like the paper's: ``depth`` Dense+ReLU layers of ``width``, the image
    first average-pooled ``pool`` x ``pool`` so that the first layer is no wider than the others
    (28x28 digits: 196 inputs against 256), and a light linear head on every layer.

    Every layer then costs about the same, so any cut into K stages is close to balanced.

    Args:
      input_shape: NHWC without the batch axis; a flat input is not pooled.
      num_classes, depth, width, rngs: as for ``mlp``.
      pool: the average-pooling window and stride of the first layer (1: none).

    Returns:
      A ``Network`` named ``deep_mlp{depth}x{width}``, heads and splits as ``mlp``'s.
    """
    if depth < 1:
        raise ValueError(f"mlp depth must be >= 1, got {depth}")
    if len(input_shape) == 3 and pool > 1:
        height, width_px, channels = input_shape
        in_features = (height // pool) * (width_px // pool) * channels
    else:
        in_features, pool = math.prod(input_shape), 1
    return _dense_stack(PooledDenseReLU(in_features, width, pool, rngs=rngs), width, depth, num_classes,
                        f"deep_mlp{depth}x{width}", rngs)


def _dense_stack(first, width, depth, num_classes, name, rngs):
    """``first`` then ``depth - 1`` equal DenseReLU layers, with the flattening head on each stage."""
    layers = [first] + [DenseReLU(width, width, rngs=rngs) for _ in range(depth - 1)]
    return Network(layers=layers, make_head=functools.partial(_flatten_head, width, num_classes, depth),
                   natural_splits=(), name=name)
