# Run:    lpjax bench --suite tiny --workdir runs/bench_tiny
# Expect: 8 short runs on the 8x8 digits and a report.md with plots in about a minute on 2 CPU cores;
#         a smoke check of the whole bench path, too short to say anything about the methods.
"""The smallest sweep that exercises every part of ``lpjax bench``."""

import ml_collections


def get_config():
    sweep = ml_collections.ConfigDict()
    sweep.smooth_window = 3
    sweep.cost_batch = 16
    sweep.problems = {
        "digits_mlp": {
            "recipe": "recipes/mnist_mlp.py",
            "overrides": {"dataset": {"name": "digits"}, "model": {"depth": 4, "width": 32},
                          "optimizer": {"decay": "constant"}, "eval_batch_size": 300},
            "methods": {"backprop": 1, "greedy": 4, "chunked": 2, "overlapping": 4},
            "batch_sizes": (16, 64),
            "learning_rates": (1e-2,),
            "num_steps": (24, 12),
            "target_loss": 1.5,
        },
    }
    return sweep
