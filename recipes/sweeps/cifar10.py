# Run:    lpjax bench --suite recipes/sweeps/cifar10.py --workdir runs/bench_cifar10
#         (prepare CIFAR-10 first, BUILD_NOTES.md "Real datasets"; set the data_dir and a layout in
#         "overrides" below, e.g. {"dataset": {"data_dir": "/data/tfds"}, "layout": {...}})
# Expect: not run yet (accelerator-sized: 2 problems x 4 methods x 4 batch sizes x 3 learning rates).
#         Laskin et al. (arXiv 2012.03837, Fig. 3-4) find the local methods' Pareto frontier of time
#         against compute below backprop's past the critical batch size, for MLPs and ResNets on CIFAR-10.
"""The paper's CIFAR-10 compute-efficiency sweep: the 4x1024 MLP and ResNet-18, backprop against
greedy, chunked and overlapping local updates, batch sizes from below to well past the critical one,
a constant learning rate per run (the paper tunes it per batch size), target training losses."""

import ml_collections


def get_config():
    sweep = ml_collections.ConfigDict()
    sweep.smooth_window = 25
    sweep.cost_batch = 32
    sweep.alignment = True
    constant = {"decay": "constant", "warmup_steps": 0}
    sweep.problems = {
        "cifar10_mlp": {
            "recipe": "recipes/cifar10_mlp.py",  # 4 layers of width 1024: greedy is one layer per stage
            "overrides": {"optimizer": constant, "eval_every": 0, "num_epochs": None},
            "methods": {"backprop": 1, "greedy": 4, "chunked": 2, "overlapping": 4},
            "batch_sizes": (128, 512, 2048, 8192),
            "learning_rates": (1e-4, 3e-4, 1e-3),
            "num_steps": (20000, 8000, 4000, 2000),
            "target_loss": 1.0,
        },
        "cifar10_resnet18": {
            "recipe": "recipes/cifar10_resnet.py:18",  # ResNet-18: 9 layers (stem + 8 blocks)
            "overrides": {"optimizer": constant, "eval_every": 0, "num_epochs": None},
            "methods": {"backprop": 1, "greedy": 9, "chunked": 4, "overlapping": 4},
            "batch_sizes": (128, 512, 2048, 8192),
            "learning_rates": (0.05, 0.1, 0.4),
            "num_steps": (20000, 8000, 4000, 2000),
            "target_loss": 0.2,
        },
    }
    return sweep
