# Run:    JAX_NUM_CPU_DEVICES=4 lpjax train --config recipes/mnist_resnet.py --workdir runs/demo  (or: make demo)
# Expect: final head (stage 3) test accuracy 97.2% (stages 0-3: 56.3 / 94.9 / 97.1 / 97.2%), 620 steps;
#         about 30 s in all on 2 idle CPU cores (Python 3.11, jax 0.10.2), 20 s of it training;
#         45 s when the cores are shared.
"""The default demo: greedy local training of a small ResNet on MNIST-5k, one layer per stage."""

from ml_collections.config_dict import placeholder

from lpjax.config.build import base_config


def get_config():
    config = base_config()
    config.dataset.name = "mnist5k"
    config.dataset.test_size = 1000  # held out from the 5,000 images with the seed
    config.dataset.max_train = placeholder(int)  # None: all 4,000 training images
    config.model.name = "mnist_resnet"
    # Greedy training needs one layer per stage. No blocks at 14x14 leaves four layers: the stride-2 stem
    # (14x14x16) and one residual block at each of 7x7x32, 4x4x64 and 2x2x64.
    config.model.blocks_per_stage = (0, 1, 1, 1)
    config.model.width = 16
    config.model.head_conv = 32  # a 3x3 conv in every auxiliary head: early stages need it to classify
    config.stages = 4
    config.method.name = "greedy"
    # The pipelined per-stage executor: stage k on device k, microbatches streaming through with no
    # flush. On a CPU-only machine `make demo` simulates the 4 devices (JAX_NUM_CPU_DEVICES=4); set
    # --config.layout.executor=reference to run everything on one device instead.
    config.schedule.name = "streaming"
    config.schedule.microbatches = 1
    config.layout.executor = "mpmd"
    config.layout.stages = 4
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.decay = "cosine"
    config.batch_size = 64
    config.num_epochs = 10
    config.log_every = 25
    config.eval_every = 250
    return config
