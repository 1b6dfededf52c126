"""LM1B (One Billion Word benchmark) from a prepared TFDS array_record copy, as byte-level language
modelling: 30,301,028 training / 306,688 test sentences, UTF-8 bytes (vocabulary 256), a newline
after every sentence, packed into windows of ``seq_len + 1`` bytes (``lpjax.data.packing``).

An example is ``x = window[:-1]``, ``y = window[1:]`` (int32). Training shuffles the windows each
epoch; evaluation reads the test windows in order.
"""

import os

import numpy as np

from lpjax.data.dataset import LANGUAGE_MODEL
from lpjax.data.packing import PackedWindows, sentence_lengths
from lpjax.data.streaming import Prefix, StreamingDataset, check_option
from lpjax.data.tfds_source import dataset_version, default_data_dir, open_split

PREPARE = "tfds build lm1b --data_dir {data_dir} --file_format array_record"
VOCAB_SIZE = 256


def _example(window, rng=None):
    tokens = window.astype(np.int32)
    return tokens[:-1], tokens[1:]


def _packed(split: str, *, data_dir, cache_dir, seq_len: int, max_sentences=None) -> PackedWindows:
    source = Prefix(open_split("lm1b", split, data_dir=data_dir, prepare=PREPARE), max_sentences)
    version = dataset_version(source.source)
    cache = os.path.join(cache_dir, f"lm1b-{version}-{split}-{len(source)}.lengths.npy")
    lengths = sentence_lengths(source, cache_path=cache, label=f"lm1b {split}")
    windows = PackedWindows(source, lengths, seq_len)
    if len(windows) == 0:
        raise ValueError(f"the lm1b {split} split holds fewer than seq_len={seq_len} bytes; "
                         "use a smaller --config.dataset.seq_len")
    return windows


def load_lm1b(*, seed: int = 0, data_dir=None, seq_len: int = 256, max_train=None, cache_dir=None,
              read_threads: int = 4, prefetch_batches: int = 2):
    """Byte-level LM1B streamed from ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    ``max_train`` keeps the windows packed from the first N training sentences. The sentence lengths
    that packing needs are measured once per split and cached in ``cache_dir`` (default
    ``<data_dir>/lpjax_cache``). ``seed`` picks the evaluation sample of the training windows.
    """
    seq_len = check_option(seq_len, "seq_len")
    max_train = check_option(max_train, "max_train", allow_none=True)
    read_threads = check_option(read_threads, "read_threads", minimum=0)
    prefetch_batches = check_option(prefetch_batches, "prefetch_batches")
    root = os.path.expanduser(str(data_dir)) if data_dir is not None else default_data_dir()
    cache_dir = os.path.join(root, "lpjax_cache") if cache_dir is None else os.path.expanduser(str(cache_dir))
    options = dict(data_dir=data_dir, cache_dir=cache_dir, seq_len=seq_len)
    return StreamingDataset(
        name="lm1b", num_classes=VOCAB_SIZE, input_shape=(seq_len,), task=LANGUAGE_MODEL,
        train=_packed("train", max_sentences=max_train, **options), test=_packed("test", **options),
        train_transform=_example, eval_transform=_example, sample_seed=seed,
        read_threads=read_threads, prefetch_batches=prefetch_batches)
