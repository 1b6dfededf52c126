"""The data-source interface the training loop uses, and the in-memory dataset that implements it.

Every loader returns an object with these attributes and methods; the in-memory ``Dataset`` below
and the streaming TFDS sources (array_record + grain) both do:

    name, num_classes, input_shape, task        what a model needs to know to fit the data
    num_train, num_test                         examples per split (one epoch of training)
    train_batches(batch_size, *, seed, start_step=0, shard_index=0, shard_count=1, microbatches=1)
                                                the endless, seeded, augmented training stream of
                                                (x, y) numpy batches; a grain iterator, so its
                                                position can be saved with get_state() and restored
                                                with set_state(); batch ``step`` is a pure function
                                                of (seed, step), and shard i of n gets rows
                                                [i*B/n, (i+1)*B/n) of the global batch; with
                                                microbatches=M, rows [i*b/n, (i+1)*b/n) of each
                                                of the M microbatches of b = B/M rows
    eval_batches(split, batch_size, *, max_examples=None, shard_index=0, shard_count=1)
                                                "test" or "train" without augmentation, each example
                                                once, in a fixed order; "train" with max_examples is a
                                                seeded sample, so eval-mode training figures stay cheap
    example_batch(batch_size)                   the first training rows, for shape checks before
                                                anything is compiled

For language models ``num_classes`` is the vocabulary size and ``input_shape`` is ``(seq_len,)``.
"""

import dataclasses

import numpy as np

from lpjax.data.batching import batch_iterator
from lpjax.data.checks import check_labels, examples

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"
SPLITS = ("train", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def shard_bounds(count: int, shard_index: int, shard_count: int) -> tuple:
    """Rows [start, stop) of ``count`` that belong to one shard; the shards cover each row once."""
    return count * shard_index // shard_count, count * (shard_index + 1) // shard_count


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays held in memory, plus what a model needs to know to fit them."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    input_shape: tuple
    task: str
    sample_seed: int = 0  # seeds the "train" evaluation sample

    @classmethod
    def from_arrays(cls, train_x, train_y, test_x, test_y, *, name: str = "arrays", num_classes: int | None = None,
                    task: str = CLASSIFICATION) -> "Dataset":
        """Your own arrays as a data source (``lpjax.fit``): numeric inputs, integer labels
        ``0 <= y < num_classes`` (for a language model, tokens below the vocabulary size), one per
        input; ``num_classes`` defaults to the largest label + 1. Anything else raises ``ConfigError``
        naming the split and the fix (lpjax/data/checks.py)."""
        splits = [examples(x, y, f"Dataset.from_arrays: the {split} split")
                  for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y))]
        (train_x, train_y), (test_x, test_y) = [(np.asarray(x), np.asarray(y)) for x, y in splits]
        origin = "num_classes"
        if num_classes is None:
            num_classes, origin = int(max(train_y.max(), test_y.max())) + 1, "the largest label + 1"
        for split, y in (("train", train_y), ("test", test_y)):
            check_labels(y, num_classes, f"Dataset.from_arrays: the {split} split", origin)
        return cls(name, train_x, train_y, test_x, test_y, num_classes, tuple(train_x.shape[1:]), task)

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    @property
    def num_test(self) -> int:
        return len(self.test_x)

    def train_batches(self, batch_size, *, seed, start_step=0, shard_index=0, shard_count=1, microbatches=1):
        return batch_iterator(self.train_x, self.train_y, batch_size, seed=seed, start_step=start_step,
                              shard_index=shard_index, shard_count=shard_count, microbatches=microbatches)

    def eval_batches(self, split, batch_size, *, max_examples=None, shard_index=0, shard_count=1):
        check_split(split)
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        if max_examples is not None and max_examples < len(x):
            rng = np.random.default_rng(self.sample_seed)
            index = np.sort(rng.choice(len(x), max_examples, replace=False))
            x, y = x[index], y[index]
        start, stop = shard_bounds(len(x), shard_index, shard_count)
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            yield x[first:last], y[first:last]

    def example_batch(self, batch_size):
        return self.train_x[:batch_size], self.train_y[:batch_size]
