"""Pieces that several recipes share (installed as lpjax.recipes.common). Not a recipe: it has no
get_config(), so ``lpjax recipes`` does not list it."""

from ml_collections.config_dict import placeholder


def cifar10_dataset(config, *, pad_mode: str):
    """Sets ``config.dataset`` to CIFAR-10 as the CIFAR recipes train on it.

    Args:
      config: a recipe's config (from ``lpjax.config.build.base_config()``); changed in place.
      pad_mode: how the pad-4 random crop pads: "constant" (zeros, as He et al.) or "reflect" (as
        InfoPro).

    Returns:
      ``config``. Every key the command line may set without a value in the recipe (``data_dir``,
      ``max_train``, ``read_threads``) is a typed placeholder, None by default: the loader's default.
    """
    config.dataset.name = "cifar10"
    config.dataset.data_dir = placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.dataset.max_train = placeholder(int)  # None: all 50,000 training images
    config.dataset.augment = True  # pad-4 random crop and horizontal flip
    config.dataset.pad_mode = pad_mode
    config.dataset.in_memory = True  # decode the 60,000 images once (180 MB) instead of every epoch
    config.dataset.read_threads = placeholder(int)  # None: the loader's default
    return config
