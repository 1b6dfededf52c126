"""Losses and metrics shared by every head.

A loss takes the head's logits ``[..., classes]`` and integer labels ``[...]`` and returns the mean
over all label positions, so image classifiers and token-level language models use the same code.
"""

import jax.numpy as jnp
import optax

from lpjax.errors import ConfigError


def softmax_cross_entropy(logits, labels):
    # in float32 whatever the head computes in: a bfloat16 log-sum-exp over a large vocabulary loses
    # the loss's low digits
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def accuracy(logits, labels):
    return (jnp.argmax(logits, axis=-1) == labels).mean()


LOSSES = {"softmax_cross_entropy": softmax_cross_entropy}


def get_loss(loss):
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(sorted(LOSSES))} or pass a callable")
    return LOSSES[loss]


def check_logits_match_labels(logits_shape, labels_shape, num_classes=None, where="head"):
    """Raise a ConfigError when a head cannot be scored against the labels."""
    logits_shape, labels_shape = tuple(logits_shape), tuple(labels_shape)
    if logits_shape[:-1] != labels_shape:
        raise ConfigError(
            f"{where} outputs shape {logits_shape} but labels have shape {labels_shape}; "
            f"the head must output [*label_shape, num_classes]"
        )
    if num_classes is not None and logits_shape[-1] != num_classes:
        raise ConfigError(
            f"{where} outputs {logits_shape[-1]} classes but the data has {num_classes}; "
            f"build the head with num_classes={num_classes}"
        )
