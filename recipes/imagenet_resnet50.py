# Run:    lpjax train --config recipes/imagenet_resnet50.py --config.dataset.data_dir=~/tensorflow_datasets --workdir runs/imagenet_resnet50
#         (prepare ImageNet once first, from the ILSVRC2012 tars: BUILD_NOTES.md, "Real datasets").
#         With 4 accelerators, one stage per device: --config.layout.executor=mpmd
#         --config.schedule.name=streaming --config.schedule.microbatches=4
# Expect: not measured yet. Laskin et al. (arXiv 2012.03837) report ResNet-50 on ImageNet as
#         compute-efficiency curves, not as an accuracy table. Backprop with this schedule (batch 1024,
#         SGD 0.4, 5 warmup epochs, 90 epochs) is Goyal et al.'s (arXiv 1706.02677) 76.3 % top-1
#         baseline (with step decay). The nearest local-learning results are for deeper nets: InfoPro* ResNet-101 / -152 at
#         K=2, 21.85 / 21.45 % top-1 error against 22.03 / 21.60 % end to end.
"""ResNet-50 (7x7/2 stem + max pool, bottleneck blocks [3, 4, 6, 3]) on ImageNet at 224x224,
overlapping local updates (window 2) over 4 stages of 17 layers (5, 4, 4, 4)."""

from ml_collections.config_dict import placeholder

from lpjax.config.build import base_config


def get_config():
    config = base_config()
    config.dataset.name = "imagenet2012"
    config.dataset.data_dir = placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.dataset.image_size = 224
    config.dataset.max_train = placeholder(int)  # None: all 1,281,167 training images
    config.dataset.augment = True  # random-resized crop and horizontal flip
    config.dataset.min_crop_area = 0.08
    config.dataset.read_threads = 16  # decoding and cropping JPEGs: raise it on hosts with many cores
    config.model.name = "resnet50"
    config.model.width = 64
    config.model.head_conv = 0
    config.stages = 4
    config.method.name = "overlapping"
    config.method.window = 2
    config.optimizer.name = "momentum"
    config.optimizer.learning_rate = 0.4  # 0.1 per 256 examples (Goyal et al.)
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay = "cosine"
    config.optimizer.warmup_steps = 6255  # 5 epochs of 1,251 steps
    config.batch_size = 1024
    config.num_epochs = 90
    config.log_every = 250
    config.eval_every = 6255  # every 5 epochs, on the 50,000 validation images
    config.eval_batch_size = 500
    return config
