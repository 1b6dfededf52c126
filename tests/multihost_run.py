"""The training run the multi-host test repeats in one process and across two."""

import numpy as np
import optax

import lpjax
from lpjax.schedules import Streaming

from tiny import tiny_batch, tiny_model


def train_four_stages(layout, steps=2):
    x, y = tiny_batch(8)
    trainer = lpjax.Trainer(tiny_model(4), method=lpjax.Overlapping(2), optimizer=optax.sgd(0.1, momentum=0.9),
                            schedule=Streaming(2), layout=layout)
    for i in range(steps):
        trainer.step(np.roll(x, i, axis=0), np.roll(y, i, axis=0))
    trainer.drain()
    return trainer
