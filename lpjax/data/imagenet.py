"""ImageNet (ILSVRC 2012) from a prepared TFDS array_record copy: 1,281,167 train / 50,000 validation.

Training: Inception random-resized crop (area fraction in ``[min_crop_area, 1]``, aspect 3/4..4/3)
resized to ``image_size``, random left-right flip, per-channel normalisation. Evaluation (the
validation split stands in for "test"): the centre 87.5 % of the shorter side resized to
``image_size`` (224 of 256 at the default size). TFDS decodes the JPEGs (OpenCV when installed,
else Pillow); crops and resizes use Pillow.
"""

import functools

import numpy as np

from lpjax.data import augment as aug
from lpjax.data.dataset import CLASSIFICATION
from lpjax.data.streaming import Prefix, StreamingDataset, check_flag, check_option
from lpjax.data.tfds_source import open_split

PREPARE = ("tfds build imagenet2012 --data_dir {data_dir} --manual_dir DIR_WITH_ILSVRC2012_TARS "
           "--file_format array_record")
EVAL_CROP_FRACTION = 0.875


def _train_example(record, rng, *, image_size: int, augment_images: bool, min_crop_area: float):
    if augment_images:
        image = aug.random_resized_crop_flip(record["image"], rng, image_size, scale=(min_crop_area, 1.0))
    else:
        image = aug.center_crop(record["image"], image_size, EVAL_CROP_FRACTION)
    return aug.normalise(image, aug.IMAGENET_MEAN, aug.IMAGENET_STD), np.int32(record["label"])


def _eval_example(record, *, image_size: int):
    image = aug.center_crop(record["image"], image_size, EVAL_CROP_FRACTION)
    return aug.normalise(image, aug.IMAGENET_MEAN, aug.IMAGENET_STD), np.int32(record["label"])


def load_imagenet2012(*, seed: int = 0, data_dir=None, image_size: int = 224, max_train=None,
                      augment: bool = True, min_crop_area: float = 0.08, read_threads: int = 16,
                      prefetch_batches: int = 2):
    """ImageNet streamed from ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    ``image_size`` sets the square crop fed to the model (smaller sizes make quick runs cheap);
    ``max_train`` keeps the first N training images; ``seed`` picks the evaluation sample of the
    training split.
    """
    image_size = check_option(image_size, "image_size")
    max_train = check_option(max_train, "max_train", allow_none=True)
    check_flag(augment, "augment")
    if isinstance(min_crop_area, bool) or not isinstance(min_crop_area, (int, float)) \
            or not 0 < min_crop_area <= 1:
        raise ValueError(f"dataset.min_crop_area must be in (0, 1], got {min_crop_area!r}; "
                         "set --config.dataset.min_crop_area=0.08")
    read_threads = check_option(read_threads, "read_threads", minimum=0)
    prefetch_batches = check_option(prefetch_batches, "prefetch_batches")
    train = open_split("imagenet2012", "train", data_dir=data_dir, prepare=PREPARE)
    validation = open_split("imagenet2012", "validation", data_dir=data_dir, prepare=PREPARE)
    return StreamingDataset(
        name="imagenet2012", num_classes=1000, input_shape=(image_size, image_size, 3), task=CLASSIFICATION,
        train=Prefix(train, max_train), test=validation,
        train_transform=functools.partial(_train_example, image_size=image_size, augment_images=augment,
                                          min_crop_area=float(min_crop_area)),
        eval_transform=functools.partial(_eval_example, image_size=image_size), sample_seed=seed,
        read_threads=read_threads, prefetch_batches=prefetch_batches)
