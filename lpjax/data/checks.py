"""What arrays of examples and labels, and the arguments of a training stream, must be; one
``ConfigError`` (a ``ValueError``) naming the problem and the fix otherwise. The data sources check
their arrays with these, and so does the trainer (lpjax/training/batch_checks.py) with every batch."""

import numpy as np

from lpjax.errors import ConfigError


def as_array(a, what: str, where: str):
    """``a`` as an array (a ``jax.Array`` or other array with a dtype is left as it is)."""
    if hasattr(a, "dtype") and hasattr(a, "shape"):
        return a
    try:
        return np.asarray(a)
    except ValueError:  # numpy refuses rows of different lengths
        raise ConfigError(f"{where}: the {what} are ragged (rows of different shapes); pad or crop every row to "
                          f"one shape") from None


def inputs(x, where: str):
    """``x`` as an array of at least one numeric row, or ``ConfigError``."""
    x = as_array(x, "inputs", where)
    if not (np.issubdtype(np.dtype(x.dtype), np.number) or np.dtype(x.dtype) == np.bool_ or _ml_float(x.dtype)):
        raise ConfigError(f"{where}: inputs must be numbers, got dtype {x.dtype}; convert them to a float array "
                          f"(np.asarray(x, np.float32))")
    if x.ndim == 0:
        raise ConfigError(f"{where}: the inputs are a scalar; pass an array with one row per example")
    if len(x) == 0:
        raise ConfigError(f"{where}: the batch is empty (0 rows); pass at least one example")
    return x


def examples(x, y, where: str):
    """``(x, y)`` as arrays: numeric inputs and integer labels, one label (or row of labels) per input."""
    x = inputs(x, where)
    y = as_array(y, "labels", where)
    if not np.issubdtype(np.dtype(y.dtype), np.integer):
        raise ConfigError(f"{where}: labels must be integers (class indices), got dtype {y.dtype}; pass "
                          f"y.astype(np.int32)")
    if y.ndim == 0 or len(y) != len(x):
        raise ConfigError(f"{where}: there are {len(x)} inputs but {y.size if y.ndim == 0 else len(y)} labels; "
                          f"pass one label (or one row of labels) per input")
    return x, y


def check_labels(y, num_classes, where: str, origin: str = "the last head's output width") -> None:
    """Raise ``ConfigError`` unless every label of the host array ``y`` is in ``[0, num_classes)``;
    ``origin`` says where ``num_classes`` came from."""
    if num_classes is None or np.size(y) == 0:
        return
    low, high = int(np.min(y)), int(np.max(y))
    if low < 0 or high >= num_classes:
        wider = f", or allow {high + 1} classes" if low >= 0 else ""
        raise ConfigError(f"{where}: label {low if low < 0 else high} is outside [0, {num_classes}) ({origin}); "
                          f"labels must be integers 0 <= y < {num_classes}: fix the labels{wider}")


def check_stream(num_examples, batch_size, seed, start_step, shard_index, shard_count, microbatches=1) -> None:
    """The arguments of a training stream over ``num_examples`` examples (``train_batches``)."""
    if not 0 < batch_size <= num_examples:
        raise ConfigError(f"batch_size={batch_size} must be between 1 and the {num_examples} training examples; "
                          "lower batch_size or use more data")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count}); "
                          "pass jax.process_index() and jax.process_count()")
    if microbatches < 1 or batch_size % (shard_count * microbatches):
        raise ConfigError(f"global batch_size={batch_size} is not divisible by shard_count={shard_count} x "
                          f"microbatches={microbatches}; choose a batch size that is a multiple of "
                          f"{shard_count * max(microbatches, 1)}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed} must be in [0, 2**32) for grain's shuffle")
    if start_step < 0:
        raise ConfigError(f"start_step={start_step} must be >= 0")


def _ml_float(dtype) -> bool:
    """bfloat16 and the other ml_dtypes floats, which numpy does not count as numbers."""
    return getattr(dtype, "kind", "") == "V" and "float" in str(dtype)
