"""Tests for lpjax.data: embedded dataset loaders and the grain batch iterator."""

import itertools

import numpy as np
import pytest

from lpjax.data import DATASETS, Dataset, batch_iterator, load_dataset
from lpjax.data.splits import shuffled_split_indices
from lpjax.data.text_bytes import TRAIN_FRACTION, cpython_reference_text


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k", seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def text():
    return load_dataset("text_bytes")


def _row_set(x):
    return {row.tobytes() for row in x.reshape(len(x), -1)}


# ---------------------------------------------------------------- loaders


@pytest.mark.parametrize("fixture_name, num_train, num_test, shape", [
    ("mnist", 4000, 1000, (28, 28, 1)),
    ("digits", 1497, 300, (8, 8, 1)),
])
def test_image_dataset_shapes_and_dtypes(request, fixture_name, num_train, num_test, shape):
    ds = request.getfixturevalue(fixture_name)
    assert isinstance(ds, Dataset)
    assert ds.train_x.shape == (num_train, *shape) and ds.test_x.shape == (num_test, *shape)
    assert ds.train_y.shape == (num_train,) and ds.test_y.shape == (num_test,)
    assert ds.train_x.dtype == np.float32 and ds.test_x.dtype == np.float32
    assert ds.train_y.dtype == np.int32 and ds.test_y.dtype == np.int32
    assert ds.num_classes == 10 and ds.input_shape == shape and ds.task == "classification"
    assert set(np.unique(ds.train_y)) == set(range(10))
    # Normalised with train statistics: train is standardised exactly, test only roughly.
    assert abs(ds.train_x.mean()) < 1e-4 and abs(ds.train_x.std() - 1) < 1e-4
    assert abs(ds.test_x.mean()) < 0.1


def test_mnist_test_split_is_class_balanced(mnist):
    counts = np.bincount(mnist.test_y, minlength=10)
    assert len(counts) == 10 and counts.min() >= 70 and counts.max() <= 130


@pytest.mark.parametrize("fixture_name", ["mnist", "digits"])
def test_image_train_and_test_share_no_examples(request, fixture_name):
    ds = request.getfixturevalue(fixture_name)
    # Every image in these sets is unique, so a shared row would mean a shared example.
    assert not _row_set(ds.train_x) & _row_set(ds.test_x)


def test_split_indices_partition_every_example():
    train_idx, test_idx = shuffled_split_indices(5000, 1000, seed=3)
    assert len(test_idx) == 1000
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(5000))
    with pytest.raises(ValueError, match="test_size"):
        shuffled_split_indices(10, 10, seed=0)


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_image_split_depends_only_on_seed(name):
    first, again, other = (load_dataset(name, seed=s) for s in (0, 0, 1))
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
    assert not np.array_equal(first.test_y, other.test_y)
    assert _row_set(first.test_x[:50]) != _row_set(other.test_x[:50])


def test_test_size_and_max_train_options(digits):
    small = load_dataset("digits", seed=0, test_size=97, max_train=64)
    assert len(small.test_x) == 97 and len(small.train_x) == 64
    truncated = load_dataset("digits", seed=0, max_train=100)
    # Truncation must not shift the test split or its normalisation.
    assert np.array_equal(truncated.test_x, digits.test_x)
    assert np.array_equal(truncated.train_x, digits.train_x[:100])


def test_text_bytes_shapes_and_dtypes(text):
    assert text.input_shape == (64,) and text.num_classes == 256
    assert text.task == "language_model"
    for array in (text.train_x, text.train_y, text.test_x, text.test_y):
        assert array.dtype == np.int32 and array.ndim == 2 and array.shape[1] == 64
        assert array.min() >= 0 and array.max() <= 255
    assert len(text.train_x) > 5 * len(text.test_x) > 0


def test_text_bytes_targets_are_inputs_shifted_by_one(text):
    assert np.array_equal(text.train_x[:, 1:], text.train_y[:, :-1])
    assert np.array_equal(text.test_x[:, 1:], text.test_y[:, :-1])


def test_text_bytes_is_english(text):
    window = bytes(text.train_x[100].astype(np.uint8)).decode("utf-8", errors="replace")
    assert len(window.split()) >= 5
    assert sum(ch.isalpha() or ch.isspace() for ch in window) / len(window) > 0.7
    opening = bytes(text.train_x[:50].astype(np.uint8).reshape(-1)).decode("utf-8", "replace")
    for common_word in (" the ", " is ", " of "):
        assert common_word in opening


def test_text_bytes_train_and_test_are_disjoint_stretches(text):
    stream = np.frombuffer(cpython_reference_text(), dtype=np.uint8)
    boundary = int(len(stream) * TRAIN_FRACTION)
    window = 64 + 1

    def stitched(x, y):
        # Non-overlapping windows: each row's inputs plus its final target cover one window.
        return np.concatenate([x, y[:, -1:]], axis=1).reshape(-1)

    train_bytes = stitched(text.train_x, text.train_y)
    test_bytes = stitched(text.test_x, text.test_y)
    assert np.array_equal(train_bytes, stream[:len(train_bytes)])
    assert np.array_equal(test_bytes, stream[boundary:boundary + len(test_bytes)])
    assert len(train_bytes) <= boundary
    assert len(train_bytes) == len(text.train_x) * window


def test_text_bytes_seq_len_option():
    ds = load_dataset("text_bytes", seq_len=16, max_train=10)
    assert ds.train_x.shape == (10, 16) and ds.input_shape == (16,)


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ValueError) as error:
        load_dataset("foo")
    message = str(error.value)
    assert "\n" not in message
    assert message == "unknown dataset 'foo'; known datasets: " + ", ".join(sorted(DATASETS))
    assert all(n in message for n in ("digits", "mnist5k", "text_bytes", "cifar10", "imagenet2012", "lm1b"))


def test_unknown_option_is_rejected_with_the_accepted_list():
    with pytest.raises(ValueError, match="accepted options: seq_len, max_train"):
        load_dataset("text_bytes", sequence_length=8)


# ---------------------------------------------------------------- batch_iterator


NUM_EXAMPLES = 53


@pytest.fixture()
def ids():
    # x holds each example's own index so batches reveal exactly which examples they contain.
    x = np.arange(NUM_EXAMPLES)
    return x, -x


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


def test_batches_are_deterministic_per_seed(ids):
    x, y = ids
    first = _take(batch_iterator(x, y, 8, seed=5), 12)
    again = _take(batch_iterator(x, y, 8, seed=5), 12)
    other = _take(batch_iterator(x, y, 8, seed=6), 12)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    for xb, yb in first:
        assert xb.shape == (8,) and np.array_equal(yb, -xb)


def test_each_epoch_sees_every_example_once(ids):
    x, y = ids
    batch_size = 10
    per_epoch = NUM_EXAMPLES // batch_size
    batches = _take(batch_iterator(x, y, batch_size, seed=0), 3 * per_epoch)
    epochs = [np.concatenate([xb for xb, _ in batches[e * per_epoch:(e + 1) * per_epoch]])
              for e in range(3)]
    for epoch in epochs:
        assert len(np.unique(epoch)) == len(epoch) == per_epoch * batch_size
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_keeping_the_remainder_covers_the_whole_epoch(ids):
    x, y = ids
    batches = _take(batch_iterator(x, y, 10, seed=0, drop_remainder=False), 6)
    assert [len(xb) for xb, _ in batches] == [10] * 5 + [3]
    assert np.array_equal(np.sort(np.concatenate([xb for xb, _ in batches])), x)


@pytest.mark.parametrize("start_step", [1, 4, 5, 11])
def test_start_step_equals_skipping(ids, start_step):
    x, y = ids
    skipped = _take(batch_iterator(x, y, 10, seed=2), start_step + 7)[start_step:]
    resumed = _take(batch_iterator(x, y, 10, seed=2, start_step=start_step), 7)
    for (a, _), (b, _) in zip(skipped, resumed, strict=True):
        assert np.array_equal(a, b)


def test_start_step_is_random_access(ids):
    x, y = ids
    # Replaying 10**12 steps would never finish; a random-access slice is instant.
    xb, _ = next(batch_iterator(x, y, 10, seed=2, start_step=10**12))
    assert xb.shape == (10,) and len(np.unique(xb)) == 10


def test_iterator_state_round_trips(ids):
    x, y = ids
    iterator = batch_iterator(x, y, 10, seed=4)
    _take(iterator, 7)
    state = iterator.get_state()
    expected = _take(iterator, 5)
    restored = batch_iterator(x, y, 10, seed=4)
    restored.set_state(state)
    for (a, _), (b, _) in zip(expected, _take(restored, 5), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_shards_partition_the_global_batch(ids, drop_remainder):
    x, y = ids
    steps, shard_count, batch_size = 14, 4, 12
    global_batches = _take(
        batch_iterator(x, y, batch_size, seed=9, drop_remainder=drop_remainder), steps)
    shards = [
        _take(batch_iterator(x, y, batch_size, seed=9, drop_remainder=drop_remainder,
                             shard_index=i, shard_count=shard_count), steps)
        for i in range(shard_count)
    ]
    for step, (global_x, global_y) in enumerate(global_batches):
        pieces = [shard[step] for shard in shards]
        if len(global_x) == batch_size:
            assert all(len(piece_x) == batch_size // shard_count for piece_x, _ in pieces)
        assert np.array_equal(np.concatenate([p[0] for p in pieces]), global_x)
        assert np.array_equal(np.concatenate([p[1] for p in pieces]), global_y)


def test_microbatch_shards_take_their_slice_of_every_microbatch(ids):
    """What a process holding data columns of every stage reads: its slice of each microbatch."""
    x, y = ids
    microbatches, shard_count, batch_size = 3, 2, 12
    global_batches = _take(batch_iterator(x, y, batch_size, seed=5), 8)
    shards = [_take(batch_iterator(x, y, batch_size, seed=5, shard_index=i, shard_count=shard_count,
                                   microbatches=microbatches), 8) for i in range(shard_count)]
    for step, (global_x, global_y) in enumerate(global_batches):
        for m, (mx, my) in enumerate(zip(np.split(global_x, microbatches), np.split(global_y, microbatches))):
            pieces = [np.split(shard[step][0], microbatches)[m] for shard in shards]
            assert np.array_equal(np.concatenate(pieces), mx)
            assert np.array_equal(np.concatenate([np.split(s[step][1], microbatches)[m] for s in shards]), my)


def test_sharded_resume_matches(ids):
    x, y = ids
    fresh = _take(batch_iterator(x, y, 12, seed=1, shard_index=2, shard_count=3), 9)[6:]
    resumed = _take(batch_iterator(x, y, 12, seed=1, shard_index=2, shard_count=3,
                                   start_step=6), 3)
    for (a, _), (b, _) in zip(fresh, resumed, strict=True):
        assert np.array_equal(a, b)


def test_batch_iterator_on_a_real_dataset(digits):
    xb, yb = next(batch_iterator(digits.train_x, digits.train_y, 32, seed=0))
    assert xb.shape == (32, 8, 8, 1) and xb.dtype == np.float32
    assert yb.shape == (32,) and yb.dtype == np.int32


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=NUM_EXAMPLES + 1), "batch_size"),
    (dict(batch_size=10, shard_count=3), "divisible"),
    (dict(batch_size=12, shard_index=3, shard_count=3), "shard_index"),
    (dict(batch_size=12, shard_count=2, microbatches=4), "divisible"),
    (dict(batch_size=10, start_step=-1), "start_step"),
])
def test_batch_iterator_rejects_bad_arguments(ids, kwargs, match):
    x, y = ids
    with pytest.raises(ValueError, match=match):
        batch_iterator(x, y, seed=0, **kwargs)


# ---------------------------------------------------------------- your own arrays


def _arrays(n=20, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def test_from_arrays_takes_good_arrays_and_infers_the_classes():
    x, y = _arrays()
    y[0] = 3
    data = Dataset.from_arrays(x, y, x[:5], y[:5])
    assert data.num_classes == 4 and data.input_shape == (3,) and data.train_y.dtype == np.int32
    assert Dataset.from_arrays(x.tolist(), y.tolist(), x, y).train_x.shape == (20, 3)  # lists become arrays


@pytest.mark.parametrize("change, words", [
    (lambda x, y: (x, y.astype(np.float32)), "the train split: labels must be integers"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 3, -1, y)), r"the train split: label -1 is outside \[0, 4\)"),
    (lambda x, y: (x, y[:-1]), "the train split: there are 20 inputs but 19 labels"),
    (lambda x, y: (x[:0], y[:0]), "the train split: the batch is empty"),
    (lambda x, y: (x.astype(str), y), "the train split: inputs must be numbers"),
    (lambda x, y: ([list(r) for r in x[:-1]] + [[1.0]], y), "the train split: the inputs are ragged"),
])
def test_from_arrays_refuses_bad_arrays_with_one_line(change, words):
    from lpjax.errors import ConfigError

    x, y = _arrays()
    bad_x, bad_y = change(x, y)
    with pytest.raises(ConfigError, match=f"^Dataset.from_arrays: {words}"):
        Dataset.from_arrays(bad_x, bad_y, x, y, num_classes=4)


def test_from_arrays_refuses_a_label_past_the_classes_given():
    from lpjax.errors import ConfigError

    x, y = _arrays()
    y[2] = 4
    with pytest.raises(ConfigError, match=r"the test split: label 4 is outside \[0, 4\) \(num_classes\).*allow 5 classes"):
        Dataset.from_arrays(x, np.minimum(y, 3), x, y, num_classes=4)


def test_the_in_memory_and_streaming_sources_check_their_stream_arguments_alike():
    """One check (lpjax.data.checks.check_stream) behind both; the in-memory one adds the lengths."""
    from lpjax.data import batching, streaming
    from lpjax.data.checks import check_stream

    assert batching.check_stream is check_stream and streaming.check_stream is check_stream
    x, y = _arrays()
    with pytest.raises(ValueError, match="x has 20 rows but y has 19"):
        batch_iterator(x, y[:-1], 4, seed=0)
