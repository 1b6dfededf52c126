# Run:    lpjax bench --suite small --workdir runs/bench_small
# Expect: 48 runs (MLP on MNIST-5k, byte-level Transformer on CPython's pydoc text; backprop, greedy,
#         chunked, overlapping; 4 batch sizes each) and report.md with plots, in under 30 minutes on
#         2 CPU cores. The closing figures are in report.md ("At the largest batch size ...").
"""The small compute-efficiency suite: the paper's headline comparison on embedded data, CPU-sized.

Each problem sweeps every method over four batch sizes; the learning rates are a short grid (two for
the MLP, one for the Transformer, whose runs cost the most). Backprop runs as one stage: its cost
and its result do not depend on how the network is cut, and one stage compiles fastest. Steps per
run shrink as the batch grows, so that every batch size can reach the target within its budget.
"""

import ml_collections


def get_config():
    sweep = ml_collections.ConfigDict()
    sweep.smooth_window = 9
    sweep.cost_batch = 32
    sweep.alignment = True
    sweep.problems = {
        "mnist_mlp": {
            # 4 ReLU layers of width 256; greedy and overlapping cut one layer per stage
            "recipe": "recipes/mnist_mlp.py",
            "overrides": {"optimizer": {"decay": "constant"}, "eval_batch_size": 1000},
            "methods": {"backprop": 1, "greedy": 4, "chunked": 2, "overlapping": 4},
            "batch_sizes": (32, 128, 512, 2048),
            "learning_rates": (1e-3, 3e-3),
            "num_steps": (500, 250, 120, 100),
            "target_loss": 0.25,
        },
        "text_transformer": {
            # embedding + 3 pre-LN blocks of width 32 on 16-byte windows: one stage per layer for
            # greedy and overlapping, two chunks of two layers for chunked
            "recipe": "recipes/text_transformer.py",
            "overrides": {"dataset": {"seq_len": 16}, "model": {"dim": 32, "depth": 3, "heads": 2},
                          "optimizer": {"decay": "constant", "warmup_steps": 0, "learning_rate": 3e-3},
                          "eval_batch_size": 4096},
            "methods": {"backprop": 1, "greedy": 4, "chunked": 2, "overlapping": 4},
            "batch_sizes": (8, 32, 128, 512),
            "learning_rates": (3e-3,),
            "num_steps": (600, 300, 200, 150),
            "target_loss": 2.7,
        },
    }
    return sweep
