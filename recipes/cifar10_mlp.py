# Run:    lpjax train --config recipes/cifar10_mlp.py --config.dataset.data_dir=~/tensorflow_datasets --workdir runs/cifar10_mlp
#         (prepare CIFAR-10 once first: BUILD_NOTES.md, "Real datasets")
# Expect: not measured yet. Laskin et al. (arXiv 2012.03837) train MLPs on CIFAR-10 but report them as
#         compute-efficiency curves (time and compute to a target training loss), not as an accuracy
#         table; no local-learning paper we checked reports
#         an MLP on CIFAR-10 either. Compare against the same recipe with --config.method.name=backprop.
"""A 4-layer, 1024-wide ReLU MLP on CIFAR-10 trained greedily: one layer per stage, 4 stages."""

from lpjax.config.build import base_config
from lpjax.recipes.common import cifar10_dataset


def get_config():
    config = base_config()
    cifar10_dataset(config, pad_mode="constant")  # zeros, as He et al.
    config.model.name = "mlp"
    config.model.depth = 4
    config.model.width = 1024
    config.stages = 4
    config.method.name = "greedy"  # --config.method.name=overlapping (window 2) or backprop to compare
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.decay = "cosine"
    config.optimizer.warmup_steps = 390  # one epoch
    config.batch_size = 128
    config.num_epochs = 50
    config.log_every = 100
    config.eval_every = 1950  # every 5 epochs; 390 steps per epoch
    config.eval_batch_size = 1000
    return config
