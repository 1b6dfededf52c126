"""Convolutional building blocks for the ResNets (NHWC, BatchNorm).

BatchNorm follows the NNX convention: ``module.train()`` normalises with batch
statistics and updates the running averages, ``module.eval()`` uses the
running averages. No ``train`` argument is threaded through ``__call__``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM = 0.9


class ConvBN(nnx.Module):
    """Conv (no bias: BatchNorm's shift replaces it) followed by BatchNorm."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_ch, out_ch, (kernel, kernel), strides=stride, use_bias=False, rngs=rngs
        )
        self.bn = nnx.BatchNorm(out_ch, momentum=BN_MOMENTUM, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


class CifarStem(nnx.Module):
    """3x3 conv + BN + ReLU; keeps the resolution unless ``stride`` says otherwise."""

    def __init__(self, in_ch, out_ch, *, stride=1, rngs: nnx.Rngs):
        self.conv_bn = ConvBN(in_ch, out_ch, 3, stride, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.conv_bn(x))


class ImageNetStem(nnx.Module):
    """7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max pool (4x downsampling)."""

    def __init__(self, in_ch, out_ch, *, rngs: nnx.Rngs):
        self.conv_bn = ConvBN(in_ch, out_ch, 7, 2, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv_bn(x))
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")


class PadShortcut(nnx.Module):
    """He et al.'s parameter-free CIFAR shortcut ("option A"): subsample, zero-pad channels."""

    def __init__(self, in_ch, out_ch, stride):
        self.extra = out_ch - in_ch
        self.stride = stride

    def __call__(self, x):
        x = x[:, :: self.stride, :: self.stride, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.extra)))


def make_shortcut(kind, in_ch, out_ch, stride, rngs):
    """Identity when shapes match, else a 1x1 ConvBN ("projection") or PadShortcut ("pad")."""
    if stride == 1 and in_ch == out_ch:
        return None
    if kind == "projection":
        return ConvBN(in_ch, out_ch, 1, stride, rngs=rngs)
    if kind == "pad":
        if out_ch < in_ch:
            raise ValueError("pad shortcut cannot reduce channels")
        return PadShortcut(in_ch, out_ch, stride)
    raise ValueError(f"unknown shortcut kind {kind!r}; use 'projection' or 'pad'")


class BasicBlock(nnx.Module):
    """Two 3x3 ConvBNs with a residual connection (ResNet-18/34, CIFAR ResNets)."""

    expansion = 1

    def __init__(self, in_ch, width, stride=1, *, shortcut="projection", rngs: nnx.Rngs):
        self.conv1 = ConvBN(in_ch, width, 3, stride, rngs=rngs)
        self.conv2 = ConvBN(width, width, 3, rngs=rngs)
        self.shortcut = make_shortcut(shortcut, in_ch, width, stride, rngs)

    def __call__(self, x):
        residual = x if self.shortcut is None else self.shortcut(x)
        y = jax.nn.relu(self.conv1(x))
        return jax.nn.relu(self.conv2(y) + residual)


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 (carries the stride, as in ResNet v1.5) -> 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_ch, width, stride=1, *, shortcut="projection", rngs: nnx.Rngs):
        out_ch = width * self.expansion
        self.conv1 = ConvBN(in_ch, width, 1, rngs=rngs)
        self.conv2 = ConvBN(width, width, 3, stride, rngs=rngs)
        self.conv3 = ConvBN(width, out_ch, 1, rngs=rngs)
        self.shortcut = make_shortcut(shortcut, in_ch, out_ch, stride, rngs)

    def __call__(self, x):
        residual = x if self.shortcut is None else self.shortcut(x)
        y = jax.nn.relu(self.conv1(x))
        y = jax.nn.relu(self.conv2(y))
        return jax.nn.relu(self.conv3(y) + residual)
