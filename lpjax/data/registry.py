"""Name -> loader lookup, so configs can refer to datasets by string."""

import inspect

from lpjax.data.cifar10 import load_cifar10
from lpjax.data.dataset import Dataset
from lpjax.data.embedded_images import load_digits, load_mnist5k
from lpjax.data.imagenet import load_imagenet2012
from lpjax.data.lm1b import load_lm1b
from lpjax.data.text_bytes import load_text_bytes

DATASETS = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "text_bytes": load_text_bytes,
    # prepared TFDS array_record copies, streamed with grain (BUILD_NOTES.md, "Real datasets")
    "cifar10": load_cifar10,
    "imagenet2012": load_imagenet2012,
    "lm1b": load_lm1b,
}


def _accepted_options(loader) -> list:
    return [name for name in inspect.signature(loader).parameters if name != "seed"]


def load_dataset(name: str, *, seed: int = 0, **options) -> Dataset:
    """Loads a registered dataset; `options` are the loader's keyword arguments."""
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    loader = DATASETS[name]
    accepted = _accepted_options(loader)
    unexpected = sorted(set(options) - set(accepted))
    if unexpected:
        raise ValueError(
            f"dataset {name!r} got unknown option(s) {', '.join(unexpected)}; "
            f"accepted options: {', '.join(accepted)}")
    return loader(seed=seed, **options)
