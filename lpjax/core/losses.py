"""Losses and metrics shared by every head.

A loss takes the head's logits ``[..., classes]`` and integer labels ``[...]`` and returns the mean
over all label positions, so image classifiers and token-level language models use the same code.
"""

import jax.numpy as jnp
import optax

from lpjax.errors import ConfigError


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of integer labels, computed in float32 whatever the head computes in
    (a bfloat16 log-sum-exp over a large vocabulary loses the loss's low digits).

    Args:
      logits: ``[..., classes]`` floats.
      labels: ``[...]`` integers in ``[0, classes)``, the logits' shape without its last axis.

    Returns:
      A float32 scalar: the cross-entropy averaged over every label position (nats).
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def accuracy(logits, labels):
    """The fraction of label positions whose largest logit is the label: a scalar in [0, 1].
    Shapes as for ``softmax_cross_entropy``."""
    return (jnp.argmax(logits, axis=-1) == labels).mean()


LOSSES = {"softmax_cross_entropy": softmax_cross_entropy}


def get_loss(loss):
    """The loss function for a name in ``LOSSES`` or a callable ``loss(logits, labels) -> scalar``
    (returned as it is). Raises ConfigError for an unknown name."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(sorted(LOSSES))} or pass a callable")
    return LOSSES[loss]


def check_logits_match_labels(logits_shape, labels_shape, num_classes=None, where="head"):
    """Raise a ConfigError when a head cannot be scored against the labels.

    Args:
      logits_shape: the head's output shape, ``[*label_shape, classes]`` when it fits.
      labels_shape: the labels' shape.
      num_classes: when given, the number of classes the data has; the last logits axis must match.
      where: how the message names the head (e.g. "stage 2's head").

    Returns None when the shapes fit; the ConfigError names the shape the head must have.
    """
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
