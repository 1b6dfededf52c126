"""Seeded train/test splitting and train-statistics normalisation for image arrays."""

import numpy as np


def shuffled_split_indices(num_examples: int, test_size: int, seed: int):
    """Returns (train_indices, test_indices), a seeded partition of range(num_examples).

    The embedded image sets are stored sorted by class, so a plain head/tail cut
    would leave whole classes out of one side; permuting first avoids that.
    """
    if not 0 < test_size < num_examples:
        raise ValueError(
            f"test_size={test_size} must be between 1 and {num_examples - 1}; "
            "pick a smaller test_size")
    order = np.random.default_rng(seed).permutation(num_examples)
    return order[test_size:], order[:test_size]


def truncate_train(x: np.ndarray, y: np.ndarray, max_train):
    if max_train is None:
        return x, y
    if max_train <= 0:
        raise ValueError(f"max_train={max_train} must be a positive int or None")
    return x[:max_train], y[:max_train]


def normalise_with_train_stats(train_x: np.ndarray, test_x: np.ndarray):
    """Standardises both splits with the train split's mean and std.

    Test statistics are never used, so nothing about the held-out data leaks
    into training inputs.
    """
    mean = train_x.mean(dtype=np.float64)
    std = train_x.std(dtype=np.float64)
    scale = 1.0 / max(std, 1e-8)
    return (((train_x - mean) * scale).astype(np.float32),
            ((test_x - mean) * scale).astype(np.float32))
