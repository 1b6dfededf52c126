# Run:    lpjax train --config recipes/cifar10_resnet18.py --config.dataset.data_dir=~/tensorflow_datasets --workdir runs/cifar10_resnet18
#         With 4 accelerators, one stage per device: --config.layout.executor=mpmd
#         --config.schedule.name=streaming --config.schedule.microbatches=4
# Expect: not measured yet. Laskin et al. (arXiv 2012.03837) report ResNet-18 on CIFAR-10 as
#         compute-efficiency curves (time and compute to a target training loss), not as an accuracy
#         table, and none of the local-learning papers we checked gives a
#         local-learning ResNet-18 accuracy on CIFAR-10. Backprop with this schedule (SGD 0.1,
#         momentum 0.9, weight decay 5e-4, cosine, 200 epochs) is commonly quoted at about 95 % test
#         accuracy (a common figure, not from a local-learning paper); run --config.method.name=backprop for the baseline.
"""ResNet-18 (CIFAR variant: 3x3 stem, no max pool) on CIFAR-10, overlapping local updates (window 2)
over 4 stages: stem + 2 blocks at 32x32, then 2 blocks per stage at 16x16, 8x8 and 4x4."""

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
    config.model.name = "resnet18"
    config.model.width = 64
    config.model.head_conv = 0  # auxiliary heads: global average pool + linear
    # 9 layers (stem + 8 blocks) cut into 4 near-equal stages: the cuts fall on the downsampling blocks.
    config.stages = 4
    config.method.name = "overlapping"
    config.method.window = 2
    config.optimizer.name = "momentum"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.optimizer.decay = "cosine"
    config.optimizer.warmup_steps = 390  # one epoch
    config.batch_size = 128
    config.num_epochs = 200
    config.log_every = 100
    config.eval_every = 3900  # every 10 epochs; 390 steps per epoch
    config.eval_batch_size = 1000
    return config
