"""Opening a prepared TFDS split for random access (array_record), with no TensorFlow.

``open_split`` wraps ``tfds.data_source``: it never downloads or prepares anything (``download=False``),
and when the split is missing it raises one ``ValueError`` line that says where it looked and how to
prepare the dataset, which ``lpjax.config.build`` turns into a ConfigError (exit code 2).
"""

import glob
import os


def default_data_dir() -> str:
    """Where TFDS looks when no data_dir is given: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    from tensorflow_datasets.core import constants

    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or constants.DATA_DIR)


def open_split(name: str, split: str, *, data_dir, prepare: str):
    """``tfds.data_source(name, split=split)``: a sequence of decoded example dicts.

    ``prepare`` is the shell command that prepares the dataset; it is quoted in the error, with
    ``{data_dir}`` filled in.
    """
    import tensorflow_datasets as tfds

    where = os.path.expanduser(str(data_dir)) if data_dir is not None else default_data_dir()
    try:
        return tfds.data_source(name, split=split, data_dir=where, download=False)
    except Exception as err:  # tfds raises assorted types (NotImplementedError, AssertionError, ...)
        fix = prepare.format(data_dir=where)
        raise ValueError(
            f"no prepared array_record copy of {name!r} split {split!r} under data_dir {where!r} "
            f"({_diagnose(where, name, err)}); prepare it once with `{fix}` (see BUILD_NOTES.md, "
            f"'Real datasets') or point --config.dataset.data_dir at the directory that holds {name}/"
        ) from None


def _diagnose(where: str, name: str, err: Exception) -> str:
    """What is wrong with ``where/name``, in a few words (tfds's own message misleads when nothing is
    there: it then says that TFRecord files cannot be read)."""
    root = os.path.join(where, name)
    if not os.path.isdir(root):
        return f"{root} does not exist"
    found = glob.glob(os.path.join(root, "**", f"{name}-*"), recursive=True)
    if found and not any(".array_record-" in os.path.basename(f) for f in found):
        return f"{root} holds no array_record files, only e.g. {os.path.basename(found[0])}"
    message = str(err).strip()
    return f"{type(err).__name__}: {message.splitlines()[0] if message else 'no details'}"


def dataset_version(source) -> str:
    """The prepared dataset's version (e.g. '1.1.0'), or 'unknown' for sources that do not say."""
    info = getattr(source, "dataset_info", None)
    version = getattr(info, "version", None)
    return str(version) if version is not None else "unknown"
