"""Deterministic, resumable, shardable minibatches over in-memory arrays, built on grain.

Batch number `step` is a pure function of (seed, step): grain's `MapDataset`
is random access, `shuffle` before `repeat` reshuffles each epoch with a seed
folded with the epoch number, and batching happens before `repeat` so no batch
straddles two epochs. Resuming at `start_step` is therefore a slice, not a
replay, and the returned grain iterator can also report and restore its
position with `get_state()` / `set_state()`.
"""

import functools

import grain
import numpy as np

from lpjax.data.checks import check_stream
from lpjax.errors import ConfigError

# The arrays already live in memory; reader threads would only contend for the
# GIL and a deep prefetch buffer would hold hundreds of batches in RAM.
_IN_MEMORY_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    full, remainder = divmod(num_examples, batch_size)
    return full + (1 if remainder and not drop_remainder else 0)


def global_batch_indices(
    num_examples: int, batch_size: int, *, seed: int, drop_remainder: bool = True
) -> grain.MapDataset:
    """Infinite random-access dataset whose element `step` is that step's example indices."""
    return (
        grain.MapDataset.range(num_examples)
        .shuffle(seed=seed)
        .batch(batch_size, drop_remainder=drop_remainder)
        .repeat()
    )


def _take_shard(indices: np.ndarray, shard_index: int, shard_count: int, microbatches: int = 1) -> np.ndarray:
    # Proportional bounds give equal slices for full batches and still partition
    # a short final batch (drop_remainder=False) as evenly as possible.
    if microbatches > 1:  # this shard's slice of every microbatch, in microbatch order
        return np.concatenate([_take_shard(part, shard_index, shard_count)
                               for part in np.array_split(indices, microbatches)])
    start = len(indices) * shard_index // shard_count
    stop = len(indices) * (shard_index + 1) // shard_count
    return indices[start:stop]


def _gather(indices: np.ndarray, x: np.ndarray, y: np.ndarray):
    return x[indices], y[indices]


def batch_iterator(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    drop_remainder: bool = True,
    start_step: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    microbatches: int = 1,
) -> grain.DatasetIterator:
    """Endless (x_batch, y_batch) numpy pairs, reshuffled every epoch.

    `batch_size` is the global batch; this shard receives its
    `batch_size // shard_count` rows, and the shards' outputs concatenated in
    shard order equal the global batch. With `microbatches=M` the global batch
    is M equal microbatches and the shard takes its slice of each (rows
    [i*b/n, (i+1)*b/n) of every microbatch of b rows, in microbatch order): the
    rows a process feeds when it holds part of every stage's data axis. The
    first item yielded is global step `start_step`. With `drop_remainder=False` the last batch of each epoch is
    shorter and shards may differ by one row on that step.
    """
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} rows but y has {len(y)}; pass matching arrays")
    check_stream(len(x), batch_size, seed, start_step, shard_index, shard_count, microbatches)
    batches = (
        global_batch_indices(len(x), batch_size, seed=seed, drop_remainder=drop_remainder)
        .map(functools.partial(_take_shard, shard_index=shard_index, shard_count=shard_count,
                               microbatches=microbatches))
        .map(functools.partial(_gather, x=x, y=y))
    )
    return iter(batches[start_step:].to_iter_dataset(_IN_MEMORY_READ_OPTIONS))
