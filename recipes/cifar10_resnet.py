# Run:    lpjax train --config recipes/cifar10_resnet.py:32 --config.stages=K --config.dataset.data_dir=~/tensorflow_datasets --workdir runs/cifar10_resnet32_kK
#         for K in 2, 4, 8, 16 (16 = one layer per stage: greedy layer-wise); --config.method.name=backprop
#         gives the end-to-end baseline. With K accelerators: --config.layout.executor=mpmd.
# Expect: InfoPro (Wang et al., ICLR'21, Table 2; https://github.com/blackfeather-wang/InfoPro-Pytorch
#         figs/cifar_k.png) reports greedy supervised local learning with cross-entropy heads at
#         10.30 / 16.07 / 21.19 / 24.59 % test error for K = 2 / 4 / 8 / 16, against 7.37 +- 0.10 % end
#         to end, with this schedule. Not yet reproduced with lpjax.
#
# Run:    lpjax train --config recipes/cifar10_resnet.py:110 --config.stages=K --config.dataset.data_dir=~/tensorflow_datasets --workdir runs/cifar10_resnet110_kK
#         for K in 2, 4, 8, 16 (or 55 = one layer per stage: greedy layer-wise); --config.method.name=backprop
#         gives the end-to-end baseline. With K accelerators: --config.layout.executor=mpmd.
# Expect: InfoPro (same table) reports, with this schedule, 6.50 +- 0.34 % test error end to end; DGL's
#         heads 7.70 / 10.50 / 12.46 / 13.80 % and InfoPro's 6.42 / 7.30 / 8.93 / 9.90 % for
#         K = 2 / 4 / 8 / 16. The greedy cross-entropy baseline that this recipe runs is not reported
#         there for ResNet-110. Not yet reproduced with lpjax.
#
# Run:    lpjax train --config recipes/cifar10_resnet.py:18 --config.dataset.data_dir=~/tensorflow_datasets --workdir runs/cifar10_resnet18
#         With 4 accelerators, one stage per device: --config.layout.executor=mpmd
#         --config.schedule.name=streaming --config.schedule.microbatches=4
# Expect: not measured yet. Laskin et al. (arXiv 2012.03837) report ResNet-18 on CIFAR-10 as
#         compute-efficiency curves (time and compute to a target training loss), not as an accuracy
#         table, and none of the local-learning papers we checked gives a local-learning ResNet-18
#         accuracy on CIFAR-10. Backprop with this schedule (SGD 0.1, momentum 0.9, weight decay 5e-4,
#         cosine, 200 epochs) is commonly quoted at about 95 % test accuracy (a common figure, not from
#         a local-learning paper); run --config.method.name=backprop for the baseline.
"""ResNets on CIFAR-10, the depth given as the config's argument (``cifar10_resnet:32``, ``:110``, ``:18``).

32 and 110 are He et al.'s ResNet-32 (16 layers: stem + 15 basic blocks) and ResNet-110 (55 layers:
stem + 54 basic blocks), widths 16/32/64 with option-A shortcuts, cut into K = --config.stages local
modules trained with their own cross-entropy heads (window 1, "chunked"; the InfoPro greedy
baseline). Schedule after InfoPro's train.py: batch 1024, SGD momentum 0.9 at 0.8, weight decay 1e-4,
160 epochs, 10 warmup epochs then cosine, reflect-padded crops.

18 is ResNet-18 (CIFAR variant: 3x3 stem, no max pool) with overlapping local updates (window 2) over
4 stages: stem + 2 blocks at 32x32, then 2 blocks per stage at 16x16, 8x8 and 4x4.
"""

from lpjax.config.build import base_config
from lpjax.errors import ConfigError
from lpjax.recipes.common import cifar10_dataset

# The arguments get_config() takes, each with the line `lpjax recipes` shows for it (read, not run).
VARIANTS = {
    "32": "ResNet-32 (16 layers), K chunked local modules on InfoPro's schedule; K = --config.stages",
    "110": "ResNet-110 (55 layers), K chunked local modules on InfoPro's schedule; K = --config.stages",
    "18": "ResNet-18 (9 layers), overlapping local updates (window 2) over 4 stages",
}
# Each variant was a recipe file of its own; these names (and recipes/NAME.py) still load it.
FORMER_NAMES = {"cifar10_resnet32": "32", "cifar10_resnet110": "110", "cifar10_resnet18": "18"}


def get_config(arg=None):
    """The config of one variant.

    Args:
      arg: the depth, "32", "110" or "18" (the text after the colon in ``--config cifar10_resnet:32``).

    Returns:
      The variant's config. Raises ConfigError for any other argument, or none.
    """
    if arg not in VARIANTS:
        got = "no argument" if arg is None else f"{arg!r}"
        raise ConfigError(f"cifar10_resnet takes the depth as its argument, one of {', '.join(VARIANTS)} "
                          f"(e.g. --config cifar10_resnet:32); got {got}")
    config = base_config()
    if arg == "18":
        return _resnet18(config)
    return _infopro(config, f"resnet{arg}")


def _infopro(config, model_name):
    """InfoPro's greedy supervised baseline: K chunked modules of He et al.'s CIFAR ResNet."""
    cifar10_dataset(config, pad_mode="reflect")  # as InfoPro pads before its random crops
    config.model.name = model_name
    config.model.width = 16
    config.model.head_conv = 0  # global average pool + linear: InfoPro's greedy-SL head
    config.stages = 4  # K: 2, 4, 8 or 16 near-equal cuts of the layers (earlier stages get any extra one)
    config.method.name = "chunked"  # window 1 for any K; at K = the layer count it is greedy layer-wise
    config.optimizer.name = "momentum"  # InfoPro uses Nesterov momentum; lpjax's is the plain kind
    config.optimizer.learning_rate = 0.8
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay = "cosine"
    config.optimizer.warmup_steps = 480  # 10 epochs of 48 steps
    config.batch_size = 1024
    config.num_epochs = 160
    config.log_every = 48
    config.eval_every = 480
    config.eval_batch_size = 1000
    return config


def _resnet18(config):
    cifar10_dataset(config, pad_mode="constant")  # zeros, as He et al.
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
