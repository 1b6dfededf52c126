"""The data-source interface (lpjax.data.dataset) over random-access record sources, streamed
through grain: TFDS array_record splits read on demand, or ``Records`` decoded once into memory.

Training stream. Epoch ``e`` visits the examples in the order of grain's ``shuffle`` seeded with
``seed + e``; step ``s`` of the epoch takes positions ``[s*B, (s+1)*B)`` of that order (the remainder
of an epoch is dropped, so no batch straddles two epochs). Row ``p`` of global batch ``step`` is
transformed with a generator seeded by ``(seed, step, p)``, so every batch, augmentation included, is
a pure function of ``(seed, step)`` and independent of how many hosts share it: shard ``i`` of ``n``
reads and transforms only rows ``[i*B/n, (i+1)*B/n)`` (with ``microbatches=M``: its slice
``[i*b/n, (i+1)*b/n)`` of each microbatch of ``b = B/M`` rows). Starting at ``start_step`` is an offset, not a
replay. Examples are read and transformed by grain's thread pool (``read_threads``; 0: in the
caller's thread), then batched; the returned grain iterator's ``get_state()`` / ``set_state()`` save
and restore its position exactly.

Evaluation stream: the split (or a seeded sample of it) in index order, shard ``i`` of ``n`` taking a
contiguous slice, no augmentation, a short last batch.
"""

import dataclasses
from typing import Any, Callable, Sequence

import grain
import numpy as np

from lpjax.data.checks import check_stream
from lpjax.data.dataset import check_split, shard_bounds

_ENDLESS = 2**62  # elements in a training stream: endless in practice, and grain wants a length


def check_option(value, key: str, *, minimum: int = 1, allow_none: bool = False):
    """An integer dataset option >= minimum (or None when allowed); ValueError naming the key otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"dataset.{key} must be an integer >= {minimum}, got {value!r}; "
                         f"set --config.dataset.{key}=N")
    return int(value)


def check_choice(value, key: str, choices: Sequence[str]):
    if value not in choices:
        raise ValueError(f"dataset.{key} must be one of {', '.join(map(repr, choices))}, got {value!r}; "
                         f"set --config.dataset.{key}={choices[0]}")
    return value


def check_flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"dataset.{key} must be True or False, got {value!r}; set --config.dataset.{key}=False")
    return value


class Prefix:
    """The first ``count`` records of a random-access source (``max_train``); the source itself if None."""

    def __init__(self, source, count=None):
        self.source = source
        self.count = len(source) if count is None else min(int(count), len(source))

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if not 0 <= index < self.count:
            raise IndexError(f"record {index} is outside the first {self.count}")
        return self.source[index]


class Records:
    """Decoded records held as numpy arrays, one per field: a random-access source like a TFDS split,
    minus the cost of reading and decoding each record again every epoch."""

    def __init__(self, **fields: np.ndarray):
        lengths = {len(array) for array in fields.values()}
        if len(lengths) != 1:
            raise ValueError(f"fields of different lengths: {sorted(lengths)}")
        self.fields = fields
        self.count = lengths.pop()

    @classmethod
    def read(cls, source, fields: Sequence[str], *, threads: int = 8) -> "Records":
        """Reads every record of ``source`` once (in ``threads`` threads) and keeps ``fields``."""
        if not len(source):
            return cls(**{field: np.zeros(0) for field in fields})
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads) if threads \
            else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        stream = grain.MapDataset.source(source).map(_Fields(tuple(fields))).to_iter_dataset(options)
        return cls(**{field: np.stack(column) for field, column in zip(fields, zip(*stream))})

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return {field: array[index] for field, array in self.fields.items()}


@dataclasses.dataclass(frozen=True)
class _Fields:
    names: tuple

    def __call__(self, record):
        return tuple(np.asarray(record[name]) for name in self.names)


@dataclasses.dataclass(frozen=True)
class _Locate:
    """Element ``j`` of one shard's training stream -> (global step, row in the global batch, record)."""

    order: Any  # grain.MapDataset: global position in the epoch-by-epoch shuffle -> record index
    num_examples: int
    batch_size: int
    rows: int  # rows per shard
    shard_index: int
    start_step: int
    microbatches: int = 1  # the shard takes its slice of each of this many microbatches

    def __call__(self, j):
        step = self.start_step + j // self.rows
        per = self.rows // self.microbatches  # the shard's rows of one microbatch
        r = j % self.rows
        row = (r // per) * (self.batch_size // self.microbatches) + self.shard_index * per + r % per
        epoch, step_in_epoch = divmod(step, self.num_examples // self.batch_size)
        return step, row, self.order[epoch * self.num_examples + step_in_epoch * self.batch_size + row]


@dataclasses.dataclass(frozen=True)
class _TrainElement:
    records: Any
    transform: Callable  # (record, np.random.Generator) -> (x, y)
    seed: int

    def __call__(self, located):
        step, row, index = located
        return self.transform(self.records[int(index)], np.random.default_rng((self.seed, step, row)))


@dataclasses.dataclass(frozen=True)
class _EvalElement:
    records: Any
    transform: Callable  # record -> (x, y)

    def __call__(self, index):
        return self.transform(self.records[int(index)])


class StreamingDataset:
    """The lpjax data-source interface over random-access train/test record sources.

    ``train_transform(record, rng)`` makes one augmented training example ``(x, y)`` of numpy arrays;
    ``eval_transform(record)`` the deterministic one used for evaluation and ``example_batch``.
    ``read_threads`` examples are read and transformed at once; ``prefetch_batches`` batches are
    kept ready ahead of the training loop.
    """

    def __init__(self, *, name: str, num_classes: int, input_shape: tuple, task: str, train: Sequence,
                 test: Sequence, train_transform: Callable, eval_transform: Callable, sample_seed: int = 0,
                 read_threads: int = 8, prefetch_batches: int = 2):
        if len(train) == 0 or len(test) == 0:
            raise ValueError(f"dataset {name!r} has an empty split ({len(train)} train / {len(test)} test "
                             "examples); check data_dir and max_train")
        self.name = name
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.task = task
        self.train = train
        self.test = test
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.sample_seed = sample_seed
        self.read_threads = read_threads
        self.prefetch_batches = prefetch_batches

    def __repr__(self):
        return (f"StreamingDataset({self.name!r}, {self.num_train} train / {self.num_test} test, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def _read_options(self, rows: int) -> grain.ReadOptions:
        if self.read_threads == 0:
            return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        return grain.ReadOptions(num_threads=self.read_threads,
                                 prefetch_buffer_size=max(self.read_threads, self.prefetch_batches * rows))

    def train_batches(self, batch_size, *, seed, start_step=0, shard_index=0, shard_count=1, microbatches=1):
        check_stream(self.num_train, batch_size, seed, start_step, shard_index, shard_count, microbatches)
        rows = batch_size // shard_count
        order = grain.MapDataset.range(self.num_train).shuffle(seed=seed).repeat()
        locate = _Locate(order, self.num_train, batch_size, rows, shard_index, start_step, microbatches)
        stream = (grain.MapDataset.range(_ENDLESS)
                  .map(locate)
                  .map(_TrainElement(self.train, self.train_transform, seed)))
        return iter(stream.to_iter_dataset(self._read_options(rows)).batch(rows, drop_remainder=True))

    def eval_batches(self, split, batch_size, *, max_examples=None, shard_index=0, shard_count=1):
        check_split(split)
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
        records = self.train if split == "train" else self.test
        if max_examples is not None and max_examples < len(records):
            index = np.sort(np.random.default_rng(self.sample_seed).choice(len(records), max_examples,
                                                                           replace=False))
        else:
            index = np.arange(len(records))
        start, stop = shard_bounds(len(index), shard_index, shard_count)
        stream = grain.MapDataset.source(index[start:stop]).map(_EvalElement(records, self.eval_transform))
        return iter(stream.to_iter_dataset(self._read_options(batch_size)).batch(batch_size))

    def example_batch(self, batch_size):
        batches = self.eval_batches("train", batch_size)
        try:
            return next(batches)
        finally:
            batches.close()
