"""Default auxiliary/output heads. Each maps a feature array to logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class PoolLinear(nnx.Module):
    """NHWC features -> [optional 3x3 conv + relu] -> global average pool -> Dense."""

    def __init__(self, channels: int, num_classes: int, *, hidden_conv: int = 0, rngs: nnx.Rngs):
        # Early cuts see low-level features; a conv before pooling gives their
        # head some spatial capacity of its own instead of a bare linear probe.
        self.conv = (
            nnx.Conv(channels, hidden_conv, (3, 3), rngs=rngs) if hidden_conv else None
        )
        pooled = hidden_conv or channels
        self.linear = nnx.Linear(pooled, num_classes, rngs=rngs)

    def __call__(self, h):
        if self.conv is not None:
            h = jax.nn.relu(self.conv(h))
        return self.linear(jnp.mean(h, axis=(1, 2)))


class FlattenLinear(nnx.Module):
    """Flatten every non-batch dimension, then one Dense layer."""

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, num_classes, rngs=rngs)

    def __call__(self, h):
        return self.linear(h.reshape(h.shape[0], -1))


class LMHead(nnx.Module):
    """Per-token LayerNorm + projection to the vocabulary: [B, T, dim] -> [B, T, vocab].

    The LayerNorm is here because the blocks are pre-LN: their output stream is
    never normalised, so every cut point needs its own final norm.
    """

    def __init__(self, dim: int, vocab_size: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.linear = nnx.Linear(dim, vocab_size, rngs=rngs)

    def __call__(self, h):
        return self.linear(self.norm(h))
