"""Byte-level language-modelling corpus built from English text that ships with CPython."""

import numpy as np

from lpjax.data.dataset import LANGUAGE_MODEL, Dataset
from lpjax.data.splits import truncate_train

BYTE_VOCAB_SIZE = 256
TRAIN_FRACTION = 0.9


def cpython_reference_text() -> bytes:
    """The pydoc topic help (about 466 KB of English prose) as UTF-8 bytes."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise RuntimeError(
            "dataset 'text_bytes' needs the standard-library module pydoc_data, which this "
            "Python build omits; use a full CPython install or pick another dataset"
        ) from error
    # Sorted keys make the byte stream independent of dict ordering across versions.
    return "".join(topics[key] for key in sorted(topics)).encode("utf-8")


def next_token_windows(tokens: np.ndarray, seq_len: int):
    """Cuts tokens into non-overlapping (seq_len + 1)-windows; returns (inputs, targets)."""
    num_windows = len(tokens) // (seq_len + 1)
    windows = tokens[:num_windows * (seq_len + 1)].reshape(num_windows, seq_len + 1)
    return windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32)


def load_text_bytes(*, seed: int = 0, seq_len: int = 64, max_train=None) -> Dataset:
    """Train on the first 90% of the byte stream, test on the last 10%.

    `seed` only picks the evaluation sample of the training split: the split is
    positional so that train and test are contiguous, disjoint stretches of text
    (shuffling windows across the boundary would leak neighbouring context).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be a positive int")
    tokens = np.frombuffer(cpython_reference_text(), dtype=np.uint8)
    boundary = int(len(tokens) * TRAIN_FRACTION)
    train_x, train_y = next_token_windows(tokens[:boundary], seq_len)
    test_x, test_y = next_token_windows(tokens[boundary:], seq_len)
    if len(test_x) == 0:
        raise ValueError(
            f"seq_len={seq_len} is longer than the {len(tokens) - boundary}-byte test "
            "stretch of 'text_bytes'; use a smaller seq_len")
    train_x, train_y = truncate_train(train_x, train_y, max_train)
    return Dataset(
        name="text_bytes", train_x=train_x, train_y=train_y, test_x=test_x,
        test_y=test_y, num_classes=BYTE_VOCAB_SIZE, input_shape=(seq_len,),
        task=LANGUAGE_MODEL, sample_seed=seed)
