"""Image transforms in numpy and Pillow (no TensorFlow): crops, flips and per-channel normalisation.

Every random transform takes a ``np.random.Generator``; the streaming pipeline seeds one per example
from ``(seed, step, row)``, which makes the augmentation deterministic.
"""

import math

import numpy as np

# Per-channel statistics of the training splits, on the 0..255 scale.
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32) * 255
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32) * 255
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def normalise(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 HWC with zero mean and unit variance per channel."""
    return (image.astype(np.float32) - mean) / std


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, *, padding: int = 4,
                  pad_mode: str = "constant") -> np.ndarray:
    """CIFAR augmentation: pad every side by ``padding`` (zeros, or ``"reflect"``), take a random crop
    of the original size, and flip left-right with probability 1/2."""
    height, width = image.shape[:2]
    top, left = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
    if pad_mode == "constant":  # the same crop without building the padded image (np.pad is slow)
        crop = np.zeros_like(image)
        dy, dx = top - padding, left - padding  # crop[y, x] = image[y + dy, x + dx] where inside
        crop[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = \
            image[max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)]
    else:
        padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode=pad_mode)
        crop = padded[top:top + height, left:left + width]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, *,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """The Inception crop: a box covering a uniform ``scale`` fraction of the image area with a
    log-uniform aspect ``ratio``; after ``attempts`` misses, the largest centred box within ``ratio``.

    Returns ``(left, top, right, bottom)`` in pixels, as Pillow's ``resize(box=...)`` takes it.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target * aspect)))
        crop_h = int(round(math.sqrt(target / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, left + crop_w, top + crop_h
    aspect = width / height
    if aspect < ratio[0]:
        crop_w, crop_h = width, min(height, int(round(width / ratio[0])))
    elif aspect > ratio[1]:
        crop_w, crop_h = min(width, int(round(height * ratio[1]))), height
    else:
        crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


def center_crop_box(height: int, width: int, fraction: float = 0.875):
    """The centred square whose side is ``fraction`` of the shorter side; resizing it to S pixels
    equals resizing the shorter side to S / fraction and cropping the centre S x S (224 of 256)."""
    side = fraction * min(height, width)
    top, left = (height - side) / 2, (width - side) / 2
    return left, top, left + side, top + side


def crop_resize(image: np.ndarray, box, size: int) -> np.ndarray:
    """Crop ``box`` out of a uint8 HWC image and resize it to ``size x size`` (bilinear, antialiased)."""
    from PIL import Image

    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=tuple(box))
    return np.asarray(resized)


def random_resized_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int, *,
                             scale=(0.08, 1.0)) -> np.ndarray:
    """ImageNet training augmentation: Inception crop resized to ``size``, then a random left-right flip."""
    box = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale=scale)
    crop = crop_resize(image, box, size)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def center_crop(image: np.ndarray, size: int, fraction: float = 0.875) -> np.ndarray:
    """ImageNet evaluation: the centre ``fraction`` of the shorter side, resized to ``size``."""
    return crop_resize(image, center_crop_box(image.shape[0], image.shape[1], fraction), size)
