"""The training run the multi-host test repeats in one process and across two, and the evaluation
it checks afterwards."""

import numpy as np
import optax

import lpjax
from lpjax.core.schedules import Streaming

from tiny import tiny_batch, tiny_model

# 23 held-out rows in batches of 6 (the last ragged); over 2 processes the local shards are rows
# [0, 15) and [15, 23): different lengths and batch counts, as a split's shards may have
EVAL_ROWS, EVAL_BATCH, SHARD_ENDS = 23, 6, (0, 15, 23)


def train_four_stages(layout, steps=2, stages=4):
    x, y = tiny_batch(8)
    trainer = lpjax.Trainer(tiny_model(stages), method=lpjax.Overlapping(2), optimizer=optax.sgd(0.1, momentum=0.9),
                            schedule=Streaming(2), layout=layout)
    for i in range(steps):
        trainer.step(np.roll(x, i, axis=0), np.roll(y, i, axis=0))
    trainer.drain()
    return trainer


def eval_split():
    return tiny_batch(EVAL_ROWS, seed=5)


def local_eval_batches(process, processes):
    """This process's contiguous shard of the split, batched like a data source's eval stream."""
    x, y = eval_split()
    start, stop = (SHARD_ENDS[process], SHARD_ENDS[process + 1]) if processes == 2 else (0, EVAL_ROWS)
    return [(x[s:min(s + EVAL_BATCH, stop)], y[s:min(s + EVAL_BATCH, stop)]) for s in range(start, stop, EVAL_BATCH)]
