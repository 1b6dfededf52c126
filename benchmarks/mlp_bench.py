"""The MLP, random data and wait helper that the pipeline benchmarks share."""

import jax
import numpy as np
from flax import nnx

import lpjax


class ReluDense(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.linear(x))


def mlp_stages(*, width, layers_per_stage, classes, num_stages, seed=0):
    """``num_stages`` equal stages of ``layers_per_stage`` square ReLU layers, linear heads."""
    rngs = nnx.Rngs(seed)
    layers = [ReluDense(width, width, rngs) for _ in range(num_stages * layers_per_stage)]
    return lpjax.cut_layers(layers, lambda i, r: nnx.Linear(width, classes, rngs=r),
                            num_stages=num_stages, rngs=rngs)


def random_batches(seed, batch, width, classes, count=4):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(batch, width)).astype(np.float32),
             rng.integers(0, classes, batch).astype(np.int32)) for _ in range(count)]


def wait_for(trainer, metrics):
    """Block until the trainer's parameters (and the given metrics) are computed."""
    executor = trainer.executor
    jax.block_until_ready((getattr(executor, "buffers", None) or executor.states, metrics))



def run_steps(trainer, batches, first, steps):
    """``steps`` training steps cycling through ``batches`` from index ``first``; waits for the end."""
    metrics = None
    for i in range(first, first + steps):
        metrics = trainer.step(*batches[i % len(batches)])
    wait_for(trainer, metrics)
