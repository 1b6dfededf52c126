# Run:    lpjax bench --suite paper_long --workdir runs/bench_paper_long
# Expect: the paper suite's report (F1-F4 and memory per device, each "reproduced" or "not reproduced")
#         at the recipes' full sizes, embedded data only; not run yet. Expected run time, estimated (not
#         measured) from the planned FLOPs (174 runs, 1.3e15 FLOPs, 131,500 steps): about 8 hours on 2 idle
#         CPU cores (at the 50 GFLOP/s of recipes/text_transformer.py's measured 4.5 minutes; 5 of the
#         hours are the F1 Transformer); about 1 hour on one H100 or H200, mostly compiling (about 15 s a
#         run) and per-step dispatch. It resumes run by run like every sweep.
"""The paper suite at the recipes' full sizes (about 8 hours on 2 idle CPU cores, 1 hour on one GPU).

The findings, criteria and report are those of ``recipes/sweeps/paper.py`` (``lpjax bench --suite
paper``, about 25 minutes on 2 idle cores); only the sizes change:

- F1 MLP: the deep uniform MLP at width 256 over the 2x2-pooled image (196 inputs, so the first
  layer stays the cheapest), batch sizes 32 to 2048 (past the critical batch size), steps to match,
  a grid of 3 or 4 rates per batch size.
- F1 Transformer: ``recipes/text_transformer.py``'s width (128, 4 heads) and window (64 bytes), 8
  blocks (K = 4: two blocks per stage; greedy at K = 9, one layer per stage), batch sizes 16 to 256.
- F3: the paper's 100 epochs on shuffled labels (4,000 steps of 100 images).
- F4: ``recipes/mnist_resnet.py``'s 620 steps (10 epochs) over 10 seeds; the byte LM at
  ``recipes/text_transformer.py``'s size and 1,000 steps over 5 seeds.
- Memory per device: as the quick suite (it trains nothing).
"""

from lpjax.recipes.sweeps.paper import get_config as quick_config

# Expected wall time per machine type (README.md, "The paper suite", says how it was estimated)
EXPECTED_TIME = {"2 idle CPU cores": "about 8 hours", "1 GPU (H100 or H200)": "about 1 hour"}


def get_config():
    sweep = quick_config()
    problems = sweep.problems
    constant = {"decay": "constant", "warmup_steps": 0}

    mlp = problems.f1_mlp
    mlp.overrides.model.width = 256
    mlp.overrides.model.pool = 2
    mlp.batch_sizes = (32, 128, 512, 2048)
    mlp.learning_rates = ((3e-4, 1e-3, 3e-3), (1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2, 3e-2))
    mlp.num_steps = (1500, 600, 300, 200)
    mlp.target_loss = 0.1

    lm_model = {"dim": 128, "depth": 8, "heads": 4}
    problems.f1_transformer = {
        "priority": 1,
        "recipe": "recipes/text_transformer.py",
        "overrides": {"dataset": {"seq_len": 64}, "model": lm_model, "optimizer": constant, "eval_batch_size": 1024,
                      "checkpoint": {"every_steps": 0}},
        "split_points": "balanced",
        "methods": {"backprop": 1, "chunked": (2, 4), "overlapping": 4, "greedy": 9},
        "batch_sizes": (16, 64, 256),
        "learning_rates": ((1e-3, 3e-3), (1e-3, 3e-3), (3e-3, 1e-2)),
        "num_steps": (1200, 500, 250),
        "target_loss": 2.0,
    }

    problems.f3_random_labels.num_steps = (4000,)  # 100 epochs of the 4,000 training images, as the paper

    problems.f4_mnist_resnet.num_steps = (620,)  # recipes/mnist_resnet.py: 10 epochs at batch 64
    problems.f4_mnist_resnet.seeds = tuple(range(10))
    lm = problems.f4_byte_lm
    lm.overrides.dataset.seq_len = 64
    lm.overrides.model = {"dim": 128, "depth": 4, "heads": 4}
    lm.overrides.optimizer.warmup_steps = 100
    lm.num_steps = (1000,)
    lm.methods.greedy = 5  # one layer per stage: the embedding and 4 blocks
    lm.seeds = tuple(range(5))
    sweep.findings.expected_time = EXPECTED_TIME
    return sweep
