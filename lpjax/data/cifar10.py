"""CIFAR-10 from a prepared TFDS array_record copy: 50,000 train / 10,000 test 32x32 RGB images.

Training: pad 4 pixels (zeros, or ``pad_mode="reflect"`` as InfoPro does), random 32x32 crop,
random left-right flip, per-channel normalisation. Evaluation: normalisation only.

With ``in_memory=True`` (the default) both splits are read and decoded once at load time (about
180 MB of uint8 pixels; some seconds) instead of every epoch, which made the pipeline about 5x
faster in a measurement on 2 CPU cores; the batches are identical either way.
"""

import functools

import numpy as np

from lpjax.data import augment as aug
from lpjax.data.dataset import CLASSIFICATION
from lpjax.data.streaming import Prefix, Records, StreamingDataset, check_choice, check_flag, check_option
from lpjax.data.tfds_source import open_split

PREPARE = "tfds build cifar10 --data_dir {data_dir} --file_format array_record"
PAD_MODES = ("constant", "reflect")


def _train_example(record, rng, *, augment_images: bool, pad_mode: str):
    image = record["image"]
    if augment_images:
        image = aug.pad_crop_flip(image, rng, padding=4, pad_mode=pad_mode)
    return aug.normalise(image, aug.CIFAR10_MEAN, aug.CIFAR10_STD), np.int32(record["label"])


def _eval_example(record):
    return aug.normalise(record["image"], aug.CIFAR10_MEAN, aug.CIFAR10_STD), np.int32(record["label"])


def load_cifar10(*, seed: int = 0, data_dir=None, max_train=None, augment: bool = True,
                 pad_mode: str = "constant", in_memory: bool = True, read_threads=None,
                 prefetch_batches: int = 2):
    """CIFAR-10 streamed from ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    ``seed`` picks the evaluation sample of the training split; ``max_train`` keeps the first N
    training images; ``augment=False`` turns crops and flips off; ``in_memory=False`` decodes every
    image from the array_record files each time it is used. ``read_threads`` defaults to 0 in memory
    (numpy crops of 32x32 images run fastest in the training loop's own thread: about 12,000 images/s
    against 6,000 with grain threads, measured on 2 busy cores) and to 8 when streaming.
    """
    max_train = check_option(max_train, "max_train", allow_none=True)
    check_flag(augment, "augment")
    check_choice(pad_mode, "pad_mode", PAD_MODES)
    check_flag(in_memory, "in_memory")
    read_threads = check_option(read_threads, "read_threads", minimum=0, allow_none=True)
    if read_threads is None:
        read_threads = 0 if in_memory else 8
    prefetch_batches = check_option(prefetch_batches, "prefetch_batches")
    train = Prefix(open_split("cifar10", "train", data_dir=data_dir, prepare=PREPARE), max_train)
    test = open_split("cifar10", "test", data_dir=data_dir, prepare=PREPARE)
    if in_memory:
        train, test = (Records.read(split, ("image", "label"), threads=read_threads) for split in (train, test))
    return StreamingDataset(
        name="cifar10", num_classes=10, input_shape=(32, 32, 3), task=CLASSIFICATION,
        train=train, test=test,
        train_transform=functools.partial(_train_example, augment_images=augment, pad_mode=pad_mode),
        eval_transform=_eval_example, sample_seed=seed, read_threads=read_threads,
        prefetch_batches=prefetch_batches)
