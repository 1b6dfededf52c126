# Run:    lpjax bench --suite recipes/sweeps/lm1b.py --workdir runs/bench_lm1b
#         (prepare LM1B first, BUILD_NOTES.md "Real datasets"; set "overrides" below for data_dir and layout)
# Expect: not run yet (accelerator-sized: 4 methods x 4 batch sizes x 3 learning rates of an 8-block
#         Transformer). Laskin et al. (arXiv 2012.03837) report about 2x less ideal time to a target
#         loss for local parallelism than for backprop on Transformer LMs at large batch sizes.
"""The paper's Transformer compute-efficiency sweep on LM1B (byte level, 256-byte windows): backprop
against greedy (one layer per stage: embedding + 8 blocks), chunked and overlapping over 4 stages."""

import ml_collections


def get_config():
    sweep = ml_collections.ConfigDict()
    sweep.smooth_window = 25
    sweep.cost_batch = 8
    sweep.alignment = True
    sweep.problems = {
        "lm1b_transformer": {
            "recipe": "recipes/lm1b_transformer.py",
            "overrides": {"optimizer": {"decay": "constant", "warmup_steps": 500}, "eval_every": 0},
            "methods": {"backprop": 1, "greedy": 9, "chunked": 4, "overlapping": 4},
            "batch_sizes": (32, 128, 512, 2048),
            "learning_rates": (3e-4, 6e-4, 1e-3),
            "num_steps": (60000, 30000, 15000, 8000),
            "target_loss": 1.1,  # nats per byte on the training stream
        },
    }
    return sweep
