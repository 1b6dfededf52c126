"""One optax transformation per stage, given as one for all or as a list."""

from collections.abc import Sequence

import optax

from lpjax.errors import ConfigError
from lpjax.core.methods import ONE_TREE


def per_stage_optimizers(optimizer, num_stages: int, method) -> list:
    """Each stage's optax transformation.

    Args:
      optimizer: one ``optax.GradientTransformation`` for every stage, or a sequence of one per stage
        (not for a ``ONE_TREE`` method such as backprop, whose one optimizer spans the model).
      num_stages: K.
      method: the ``Method`` being trained.

    Returns:
      A list of K transformations (the same object K times when one was given). Raises ConfigError
      for a wrong count, a non-optax entry, or a list given to a ONE_TREE method.
    """
    if isinstance(optimizer, optax.GradientTransformation):
        return [optimizer] * num_stages
    if isinstance(optimizer, Sequence) and not isinstance(optimizer, str):
        optimizers = list(optimizer)
        if method.optimizer == ONE_TREE:
            raise ConfigError("backprop uses one optimizer for the whole model; pass a single optax transformation")
        if len(optimizers) != num_stages:
            raise ConfigError(
                f"{len(optimizers)} optimizers for {num_stages} stages; pass one per stage or a single one for all"
            )
        for i, tx in enumerate(optimizers):
            if not isinstance(tx, optax.GradientTransformation):
                raise ConfigError(f"optimizer {i} is a {type(tx).__name__}, not an optax GradientTransformation")
        return optimizers
    raise ConfigError(f"optimizer must be an optax GradientTransformation or a list of them, got {type(optimizer).__name__}")
