# Run:    lpjax train --config recipes/cifar10_mlp.py --config.dataset.data_dir=~/tensorflow_datasets --workdir runs/cifar10_mlp
#         (prepare CIFAR-10 once first: BUILD_NOTES.md, "Real datasets")
# Expect: not measured yet. Laskin et al. (arXiv 2012.03837) train MLPs on CIFAR-10 but report them as
#         compute-efficiency curves (time and compute to a target training loss), not as an accuracy
#         table; no local-learning paper we checked reports
#         an MLP on CIFAR-10 either. Compare against the same recipe with --config.method.name=backprop.
"""A 4-layer, 1024-wide ReLU MLP on CIFAR-10 trained greedily: one layer per stage, 4 stages."""

from ml_collections.config_dict import placeholder

from lpjax.config.build import base_config


def get_config():
    config = base_config()
    config.dataset.name = "cifar10"
    config.dataset.data_dir = placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.dataset.max_train = placeholder(int)  # None: all 50,000 training images
    config.dataset.augment = True  # pad-4 random crop and horizontal flip
    config.dataset.pad_mode = "constant"  # zeros, as He et al.; "reflect" as InfoPro
    config.dataset.in_memory = True  # decode the 60,000 images once (180 MB) instead of every epoch
    config.dataset.read_threads = placeholder(int)  # None: the loader's default
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
