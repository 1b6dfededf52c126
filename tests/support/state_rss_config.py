"""The run the on-device state test builds in one process and across two: 4 stages of a wide MLP,
about 470 MiB of state each (parameters, Adam's two moments, the gradient sum), on the spmd executor."""

CONFIG = {
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "depth": 8, "width": 4096},
    "stages": 4,
    "method": {"name": "chunked"},
    "optimizer": {"name": "adam", "learning_rate": 1e-3},
    "schedule": {"name": "streaming", "microbatches": 2},
    "layout": {"executor": "spmd", "data": 1},
    "batch_size": 32,
    "num_steps": 1,
}
