"""Default auxiliary/output heads. Each maps a feature array to logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .transformer_blocks import TransformerBlock


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


# -- configurable auxiliary heads (DGL / AugLocal's deeper heads, SOLO's temperature) ---------------
class LearnedTemperature(nnx.Module):
    """``logits · exp(s) + b`` with a learned scalar ``s`` (init 0) and per-class bias ``b`` (init 0), as in
    SOLO's head; starts as the identity so a head with it begins exactly where one without it does."""

    def __init__(self, num_classes: int):
        self.log_scale = nnx.Param(jnp.zeros(()))
        self.bias = nnx.Param(jnp.zeros((num_classes,)))

    def __call__(self, logits):
        return logits * jnp.exp(self.log_scale[...]) + self.bias[...]


class DeepPoolHead(nnx.Module):
    """NHWC features -> ``depth`` x (3x3 conv [-> LayerNorm] -> relu) -> global average pool
    [-> LayerNorm] -> Dense [-> learned temperature and bias]. ``depth=0`` is ``PoolLinear``."""

    def __init__(self, channels: int, num_classes: int, *, depth: int, width: int | None = None,
                 norm: bool = False, temperature: bool = False, rngs: nnx.Rngs):
        width = width or channels
        self.convs = nnx.List([nnx.Conv(channels if d == 0 else width, width, (3, 3), rngs=rngs)
                               for d in range(depth)])
        self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(depth)]) if norm else None
        pooled = width if depth else channels
        self.pool_norm = nnx.LayerNorm(pooled, rngs=rngs) if norm else None
        self.linear = nnx.Linear(pooled, num_classes, rngs=rngs)
        self.temperature = LearnedTemperature(num_classes) if temperature else None

    def __call__(self, h):
        for d, conv in enumerate(self.convs):
            h = conv(h)
            if self.norms is not None:
                h = self.norms[d](h)
            h = jax.nn.relu(h)
        h = jnp.mean(h, axis=(1, 2))
        if self.pool_norm is not None:
            h = self.pool_norm(h)
        logits = self.linear(h)
        return logits if self.temperature is None else self.temperature(logits)


class DeepLMHead(nnx.Module):
    """[B, T, dim] -> ``depth`` pre-LN Transformer blocks -> LayerNorm -> Dense to the vocabulary
    [-> learned temperature and bias]. ``depth=0`` is ``LMHead`` (its LayerNorm is always there:
    the blocks are pre-LN, so the stream is never normalised)."""

    def __init__(self, dim: int, vocab_size: int, *, depth: int, heads: int, mlp_ratio: int,
                 temperature: bool = False, rngs: nnx.Rngs):
        self.blocks = nnx.List([TransformerBlock(dim, heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.linear = nnx.Linear(dim, vocab_size, rngs=rngs)
        self.temperature = LearnedTemperature(vocab_size) if temperature else None

    def __call__(self, h):
        for block in self.blocks:
            h = block(h)
        logits = self.linear(self.norm(h))
        return logits if self.temperature is None else self.temperature(logits)


def aux_head_depth(depth: int, pyramid: bool, i: int, num_layers: int) -> int:
    """Depth of the auxiliary head after layer ``i`` of ``num_layers``; the output head (the last
    layer's) is never deepened, so backprop's model is unchanged. With ``pyramid`` (AugLocal) the
    depth shrinks linearly from ``depth`` after layer 0 to 1 at the last auxiliary head."""
    if i >= num_layers - 1 or depth <= 0:
        return 0
    if not pyramid or num_layers <= 2:
        return depth
    return max(1, round(depth - (depth - 1) * i / (num_layers - 2)))



def check_aux_head(options: dict) -> dict:
    """The auxiliary-head builder keywords, type-checked (config values arrive untyped)."""
    for key in ("head_depth", "head_width"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    for key in ("head_norm", "head_temperature", "head_pyramid"):
        if key in options and not isinstance(options[key], bool):
            raise ValueError(f"{key} must be true or false, got {options[key]!r}")
    return dict(options)
