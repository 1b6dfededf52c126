"""A user's own record source and transforms that log which examples were decoded: what the
per-host data test runs in one process and across two (not part of the product)."""

import json

import numpy as np
import optax

import lpjax
from lpjax.data import StreamingDataset
from lpjax.core.schedules import Streaming

from tiny import tiny_model

NUM_TRAIN, NUM_TEST, DIN, CLASSES = 64, 24, 12, 5
BATCH, MICROBATCHES, STEPS = 8, 2, 3


def records(count, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=DIN).astype(np.float32), "y": np.int32(rng.integers(CLASSES)), "i": i}
            for i in range(count)]


class LoggedDataset:
    """Examples carry their index; every decode is logged as (split, index)."""

    def __init__(self):
        self.train_reads, self.eval_reads = [], []
        train, test = records(NUM_TRAIN, 1), records(NUM_TEST, 2)
        self.data = StreamingDataset(name="logged", num_classes=CLASSES, input_shape=(DIN,), task="classification",
                                     train=train, test=test, train_transform=self.train_example,
                                     eval_transform=self.eval_example, read_threads=0)
        self.test_ids = {id(r) for r in test}

    def train_example(self, record, rng):
        self.train_reads.append(record["i"])
        return record["x"], record["y"]

    def eval_example(self, record):
        self.eval_reads.append(("test" if id(record) in self.test_ids else "train", record["i"]))
        return record["x"], record["y"]

    def save(self, path):
        with open(path, "w") as f:
            json.dump({"train": self.train_reads, "eval": self.eval_reads}, f)


def fit(layout, workdir):
    """Trains the 2-stage overlapping pipeline (streaming, 2 microbatches) on the logged data."""
    logged = LoggedDataset()
    trainer = lpjax.Trainer(tiny_model(2, din=DIN, classes=CLASSES), method=lpjax.Overlapping(2),
                            optimizer=optax.sgd(0.1, momentum=0.9), schedule=Streaming(MICROBATCHES), layout=layout)
    results = lpjax.fit(trainer, logged.data, workdir=str(workdir), steps=STEPS, batch_size=BATCH, log_every=1,
                        checkpoint_every=0, progress=False, verbose=False)
    return trainer, logged, results
