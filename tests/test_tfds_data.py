"""The TFDS array_record + grain pipelines (cifar10, imagenet2012, lm1b) under tfds.testing.mock_data,
plus tiny prepared copies written here without TensorFlow; nothing is downloaded."""

import contextlib
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lpjax.data import DATASETS, StreamingDataset, load_dataset
from lpjax.data import augment as aug
from lpjax.data.packing import PackedWindows, sentence_lengths

# Small, fast variants of every pipeline; read_threads=2 keeps grain's thread pool in play.
OPTIONS = {
    "cifar10": dict(read_threads=2),
    "imagenet2012": dict(image_size=24, read_threads=2),
    "lm1b": dict(seq_len=16, read_threads=2),
}
SHAPES = {"cifar10": (32, 32, 3), "imagenet2012": (24, 24, 3), "lm1b": (16,)}
NUM_EXAMPLES = 24


@contextlib.contextmanager
def mocked(num_examples=NUM_EXAMPLES):
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def load(name, tmp_path, **options):
    # data_dir only matters to lm1b here: its packing cache goes to <data_dir>/lpjax_cache
    return load_dataset(name, seed=0, data_dir=str(tmp_path), **{**OPTIONS[name], **options})


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.fixture(params=sorted(OPTIONS))
def mocked_dataset(request, tmp_path):
    with mocked():
        yield load(request.param, tmp_path)


# ------------------------------------------------------------------------------------- interface


def test_new_datasets_are_registered():
    assert {"cifar10", "imagenet2012", "lm1b"} <= set(DATASETS)


def test_shapes_dtypes_and_metadata(mocked_dataset):
    ds = mocked_dataset
    assert isinstance(ds, StreamingDataset)
    shape = SHAPES[ds.name]
    assert ds.input_shape == shape
    x, y = next(ds.train_batches(8, seed=0))
    xe, ye = next(ds.eval_batches("test", 8))
    xs, ys = ds.example_batch(5)
    if ds.name == "lm1b":
        assert ds.task == "language_model" and ds.num_classes == 256
        for xb, yb in ((x, y), (xe, ye), (xs, ys)):
            assert xb.dtype == yb.dtype == np.int32 and xb.shape == yb.shape and xb.shape[1:] == shape
            assert xb.min() >= 0 and xb.max() < 256
            np.testing.assert_array_equal(xb[:, 1:], yb[:, :-1])  # targets are the next bytes
    else:
        assert ds.task == "classification" and ds.num_classes == {"cifar10": 10, "imagenet2012": 1000}[ds.name]
        for xb, yb in ((x, y), (xe, ye), (xs, ys)):
            assert xb.dtype == np.float32 and yb.dtype == np.int32 and xb.shape[1:] == shape
            assert np.isfinite(xb).all() and 0 <= yb.min() and yb.max() < ds.num_classes
        assert abs(float(xe.mean())) < 1.5  # normalised, not 0..255
    assert len(x) == 8 and len(xe) == 8 and len(xs) == 5


def test_eval_covers_the_split_once_with_a_short_last_batch(mocked_dataset):
    ds = mocked_dataset
    batches = list(ds.eval_batches("test", 10))
    full, rest = divmod(ds.num_test, 10)
    assert [len(x) for x, _ in batches] == [10] * full + ([rest] if rest else [])
    again = list(ds.eval_batches("test", 10))
    assert_batches_equal(batches, again)


def test_train_eval_sample_is_seeded_and_sized(mocked_dataset):
    ds = mocked_dataset
    sample = list(ds.eval_batches("train", 4, max_examples=6))
    assert sum(len(x) for x, _ in sample) == 6
    assert_batches_equal(sample, list(ds.eval_batches("train", 4, max_examples=6)))


# --------------------------------------------------------------- determinism and augmentation


def test_training_stream_is_a_function_of_the_seed(mocked_dataset):
    ds = mocked_dataset
    first = take(ds.train_batches(8, seed=3), 4)
    assert_batches_equal(first, take(ds.train_batches(8, seed=3), 4))
    other = take(ds.train_batches(8, seed=4), 4)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_each_epoch_visits_every_example_once(tmp_path):
    with mocked():
        ds = load("cifar10", tmp_path, augment=False)
        plain = {xb.tobytes() for xb, _ in zip(*next(ds.eval_batches("train", NUM_EXAMPLES)))}
        for epoch in range(2):
            seen = [row.tobytes() for x, _ in take(ds.train_batches(8, seed=1, start_step=3 * epoch), 3)
                    for row in x]
            assert sorted(seen) == sorted(plain)


def test_lm1b_epoch_visits_every_window_once(tmp_path):
    with mocked():
        ds = load("lm1b", tmp_path)
        batch = 4
        steps = ds.num_train // batch
        seen = [row.tobytes() for x, _ in take(ds.train_batches(batch, seed=2), steps) for row in x]
        windows = {ds.train[i][:-1].astype(np.int32).tobytes() for i in range(ds.num_train)}
        assert len(windows) == ds.num_train  # random mock sentences: no two windows alike
        assert len(set(seen)) == len(seen) == steps * batch and set(seen) <= windows


def _find_crop(augmented, original, padding=4):
    """The (top, left, flipped) of CIFAR's pad-crop-flip that turns ``original`` into ``augmented``."""
    padded = np.pad(original, ((padding, padding), (padding, padding), (0, 0)))
    h, w = original.shape[:2]
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[top:top + h, left:left + w]
            for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
                if np.array_equal(candidate, augmented):
                    return top, left, flipped
    return None


def test_cifar10_augmentation_is_a_padded_crop_and_flip_of_the_same_example(tmp_path):
    with mocked():
        plain = take(load("cifar10", tmp_path, augment=False).train_batches(8, seed=5), 3)
        augmented = take(load("cifar10", tmp_path).train_batches(8, seed=5), 3)
    unnormalise = lambda x: np.rint(x * aug.CIFAR10_STD + aug.CIFAR10_MEAN).astype(np.uint8)  # noqa: E731
    crops = []
    for (xp, yp), (xa, ya) in zip(plain, augmented):
        np.testing.assert_array_equal(yp, ya)  # augmentation never changes which example comes when
        for original, changed in zip(unnormalise(xp), unnormalise(xa)):
            crop = _find_crop(changed, original)
            assert crop is not None
            crops.append(crop)
    assert len(set(crops)) > 5  # offsets and flips vary from example to example


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_augmentation_depends_on_the_seed_only(tmp_path, name):
    with mocked():
        ds = load(name, tmp_path)
        record = ds.train[0]
        def draw(seed):
            return [ds.train_transform(record, np.random.default_rng((seed, 0, row)))[0] for row in range(6)]
        same, again, other = draw(7), draw(7), draw(8)
    assert all(np.array_equal(a, b) for a, b in zip(same, again))
    assert any(not np.array_equal(a, b) for a, b in zip(same, other))
    assert any(not np.array_equal(same[0], x) for x in same[1:])  # and on the row


# ----------------------------------------------------------------------- checkpoint / resume


def test_iterator_state_restores_exactly(mocked_dataset):
    ds = mocked_dataset
    iterator = ds.train_batches(8, seed=6)
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 4)
    restored = ds.train_batches(8, seed=6)
    restored.set_state(state)
    assert_batches_equal(expected, take(restored, 4))
    assert_batches_equal(expected, take(ds.train_batches(8, seed=6, start_step=3), 4))


def test_start_step_is_an_offset_not_a_replay(tmp_path):
    with mocked():
        ds = load("cifar10", tmp_path)
        x, y = next(ds.train_batches(8, seed=0, start_step=10**12))
    assert x.shape == (8, 32, 32, 3)


# ----------------------------------------------------------------------------- per-host shards


def test_shards_of_the_training_stream_make_up_the_global_batch(mocked_dataset):
    ds = mocked_dataset
    global_batches = take(ds.train_batches(8, seed=2, start_step=1), 4)
    shards = [take(ds.train_batches(8, seed=2, start_step=1, shard_index=i, shard_count=2), 4)
              for i in range(2)]
    for step, (x, y) in enumerate(global_batches):
        assert all(len(shard[step][0]) == 4 for shard in shards)
        np.testing.assert_array_equal(np.concatenate([s[step][0] for s in shards]), x)
        np.testing.assert_array_equal(np.concatenate([s[step][1] for s in shards]), y)


def test_microbatch_shards_of_the_training_stream_take_their_slice_of_every_microbatch(mocked_dataset):
    ds = mocked_dataset
    global_batches = take(ds.train_batches(8, seed=2, start_step=1), 3)
    shards = [take(ds.train_batches(8, seed=2, start_step=1, shard_index=i, shard_count=2, microbatches=2), 3)
              for i in range(2)]
    for step, (x, y) in enumerate(global_batches):
        # microbatch m of the global batch = shard 0's slice of it, then shard 1's (2 rows each)
        rows = np.concatenate([s[step][0][m * 2:(m + 1) * 2] for m in range(2) for s in shards])
        labels = np.concatenate([s[step][1][m * 2:(m + 1) * 2] for m in range(2) for s in shards])
        np.testing.assert_array_equal(rows, x)
        np.testing.assert_array_equal(labels, y)


def test_shard_state_restores_exactly(tmp_path):
    with mocked():
        ds = load("lm1b", tmp_path)
        iterator = ds.train_batches(8, seed=1, shard_index=1, shard_count=2)
        take(iterator, 2)
        state = iterator.get_state()
        expected = take(iterator, 3)
        restored = ds.train_batches(8, seed=1, shard_index=1, shard_count=2)
        restored.set_state(state)
        assert_batches_equal(expected, take(restored, 3))


@pytest.mark.parametrize("split, max_examples", [("test", None), ("train", 13)])
def test_eval_shards_cover_the_split_exactly_once(mocked_dataset, split, max_examples):
    ds = mocked_dataset
    whole = list(ds.eval_batches(split, 5, max_examples=max_examples))
    parts = [list(ds.eval_batches(split, 5, max_examples=max_examples, shard_index=i, shard_count=2))
             for i in range(2)]
    total = max_examples or ds.num_test
    assert [sum(len(x) for x, _ in part) for part in parts] == [total // 2, total - total // 2]
    for k in (0, 1):  # inputs, then labels: shard 0's rows followed by shard 1's are the whole split
        joined = np.concatenate([batch[k] for part in parts for batch in part])
        np.testing.assert_array_equal(joined, np.concatenate([batch[k] for batch in whole]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=NUM_EXAMPLES + 1), "batch_size"),
    (dict(batch_size=9, shard_count=2), "divisible"),
    (dict(batch_size=8, shard_index=2, shard_count=2), "shard_index"),
    (dict(batch_size=8, start_step=-1), "start_step"),
])
def test_bad_stream_arguments_are_rejected(tmp_path, kwargs, match):
    with mocked():
        ds = load("cifar10", tmp_path)
    with pytest.raises(ValueError, match=match):
        ds.train_batches(seed=0, **kwargs)


@pytest.mark.parametrize("name, options, key", [
    ("cifar10", dict(pad_mode="wrap"), "pad_mode"),
    ("cifar10", dict(max_train=0), "max_train"),
    ("cifar10", dict(in_memory="yes"), "in_memory"),
    ("imagenet2012", dict(image_size=0), "image_size"),
    ("imagenet2012", dict(min_crop_area=1.5), "min_crop_area"),
    ("lm1b", dict(seq_len=0), "seq_len"),
    ("lm1b", dict(read_threads=-1), "read_threads"),
])
def test_bad_options_name_the_key(tmp_path, name, options, key):
    with mocked(), pytest.raises(ValueError, match=f"dataset.{key}"):
        load(name, tmp_path, **options)


def test_max_train_truncates(tmp_path):
    with mocked():
        assert load("cifar10", tmp_path, max_train=10).num_train == 10
        assert load("imagenet2012", tmp_path, max_train=10).num_train == 10
        assert load("lm1b", tmp_path, max_train=10).num_train < load("lm1b", tmp_path).num_train


# ---------------------------------------------------------------------- missing / prepared data


@pytest.mark.parametrize("name, words", [
    ("cifar10", ["tfds build cifar10", "--file_format array_record"]),
    ("imagenet2012", ["tfds build imagenet2012", "--manual_dir"]),
    ("lm1b", ["tfds build lm1b"]),
])
def test_missing_dataset_says_where_it_looked_and_how_to_prepare(tmp_path, name, words):
    from lpjax.config.build import base_config, build_experiment
    from lpjax.errors import ConfigError

    missing = str(tmp_path / "empty")
    with pytest.raises(ValueError) as raised:
        load_dataset(name, data_dir=missing)
    message = str(raised.value)
    assert "\n" not in message and missing in message and "does not exist" in message
    assert all(word in message for word in words)
    config = base_config()
    config.dataset.name, config.dataset.data_dir = name, missing
    config.model.name, config.method.name, config.stages, config.num_steps = "mlp", "backprop", 1, 1
    with pytest.raises(ConfigError, match=f"dataset '{name}'.*tfds build {name}"):
        build_experiment(config)


def _prepare(builder_cls, data_dir):
    builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_reads_a_prepared_array_record_cifar10_without_mocks(tmp_path):
    """A tiny CIFAR-10 written here (TFDS encodes PIL images with Pillow, so no TensorFlow is needed)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {split: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for split, n in (("train", 12), ("test", 5))}

    class TinyCifar10(tfds.builder_cls("cifar10"), skip_registration=True):
        name = "cifar10"

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {split: self._examples(split) for split in images}

        def _examples(self, split):
            for i, image in enumerate(images[split]):
                yield i, {"id": f"{split}_{i}", "image": Image.fromarray(image), "label": i % 10}

    _prepare(TinyCifar10, tmp_path)
    ds = load_dataset("cifar10", data_dir=str(tmp_path), read_threads=2, in_memory=False)
    assert (ds.num_train, ds.num_test) == (12, 5)
    x, y = next(ds.eval_batches("test", 5))
    ids = [ds.test[i]["id"] for i in range(5)]  # TFDS stores examples in a shuffled order
    assert all(isinstance(i, bytes) for i in ids)  # prepared Text features read back as bytes
    stored = np.stack([images["test"][int(i.split(b"_")[1])] for i in ids])
    np.testing.assert_array_equal(y, [int(i.split(b"_")[1]) % 10 for i in ids])
    np.testing.assert_allclose(x, aug.normalise(stored, aug.CIFAR10_MEAN, aug.CIFAR10_STD), rtol=1e-6)
    streamed = take(ds.train_batches(4, seed=0), 4)
    assert streamed[0][0].shape == (4, 32, 32, 3)
    # decoded once and held in memory (the default), the batches are the same
    held = load_dataset("cifar10", data_dir=str(tmp_path), read_threads=2)
    assert_batches_equal(streamed, take(held.train_batches(4, seed=0), 4))
    assert_batches_equal(list(ds.eval_batches("test", 3)), list(held.eval_batches("test", 3)))


def test_reads_and_packs_a_prepared_array_record_lm1b_without_mocks(tmp_path):
    sentences = {"train": [f"sentence {i} \u00e9" + "x" * (i % 23) for i in range(40)],
                 "test": [f"held out {i}" for i in range(6)]}

    class TinyLm1b(tfds.builder_cls("lm1b"), skip_registration=True):
        name = "lm1b"

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: ((i, {"text": text}) for i, text in enumerate(texts)) for split, texts in sentences.items()}

    _prepare(TinyLm1b, tmp_path)
    ds = load_dataset("lm1b", data_dir=str(tmp_path), seq_len=8, read_threads=2)
    source = ds.test.source
    stream = b"".join(source[i]["text"] + b"\n" for i in range(len(source)))  # stored (shuffled) order
    assert sorted(stream.decode().splitlines()) == sorted(sentences["test"])
    assert ds.num_test == (len(stream) - 1) // 8
    x, y = next(ds.eval_batches("test", ds.num_test))
    for w in range(ds.num_test):
        np.testing.assert_array_equal(x[w], np.frombuffer(stream[8 * w:8 * w + 8], np.uint8))
        np.testing.assert_array_equal(y[w], np.frombuffer(stream[8 * w + 1:8 * w + 9], np.uint8))
    cached = sorted(os.listdir(tmp_path / "lpjax_cache"))
    assert cached == ["lm1b-1.1.0-test-6.lengths.npy", "lm1b-1.1.0-train-40.lengths.npy"]


# ------------------------------------------------------------------------------------ packing


class Sentences:
    def __init__(self, texts):
        self.texts, self.reads = texts, 0

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        self.reads += 1
        return {"text": self.texts[i]}


def test_packed_windows_tile_the_stream_and_read_only_what_they_need(tmp_path):
    texts = ["ab", "", "cdefghij", "k" * 30, "\u00fcber"]
    source = Sentences(texts)
    lengths = sentence_lengths(source, cache_path=str(tmp_path / "lengths.npy"))
    stream = b"".join(t.encode() + b"\n" for t in texts)
    windows = PackedWindows(source, lengths, seq_len=5)
    assert len(windows) == (len(stream) - 1) // 5
    source.reads = 0
    for w in range(len(windows)):
        assert windows[w].tobytes() == stream[5 * w:5 * w + 6]
    assert source.reads < 3 * len(windows)
    source.reads = 0
    np.testing.assert_array_equal(sentence_lengths(source, cache_path=str(tmp_path / "lengths.npy")), lengths)
    assert source.reads == 0  # the cached lengths were used
    with pytest.raises(IndexError):
        windows[len(windows)]


# ------------------------------------------------------------------------------- image transforms


def test_random_resized_crop_boxes_stay_inside_and_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for height, width in [(50, 80), (300, 200), (7, 5)]:
        for _ in range(200):
            left, top, right, bottom = aug.random_resized_crop_box(height, width, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
    # an extreme panorama never fits a 3/4..4/3 box at 8-100 % of its area: the fallback is centred
    box = aug.random_resized_crop_box(10, 400, rng)
    assert box == (int((400 - round(10 * 4 / 3)) // 2), 0, int((400 - round(10 * 4 / 3)) // 2) + 13, 10)


def test_center_crop_is_the_middle_of_the_shorter_side():
    assert aug.center_crop_box(256, 512, 0.875) == (144.0, 16.0, 368.0, 240.0)
    image = np.zeros((60, 80, 3), np.uint8)
    image[8:52, 18:62] = 255  # white around the centre 30x30 (half the shorter side), with a margin
    # for the antialiasing filter, which reads a few pixels beyond the box when it shrinks 3x
    np.testing.assert_array_equal(aug.center_crop(image, 10, fraction=0.5), np.full((10, 10, 3), 255, np.uint8))
    image[8:52, 18:62] = 0
    image[:, :40] = 255  # left half white: the crop's left half is white, its right half black
    crop = aug.center_crop(image, 10, fraction=0.5)
    assert (crop[:, :4] == 255).all() and (crop[:, 6:] == 0).all()


def test_pad_crop_flip_keeps_shape_and_pixels():
    rng = np.random.default_rng(0)
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    for mode in ("constant", "reflect"):
        out = aug.pad_crop_flip(image, rng, pad_mode=mode)
        assert out.shape == image.shape and out.dtype == np.uint8


def test_grain_shuffle_is_what_the_stream_documents():
    # The documented epoch order: grain's shuffle seeded with seed + epoch. If a grain release changed
    # it, runs would still be deterministic but no longer comparable with earlier ones.
    order = grain.MapDataset.range(10).shuffle(seed=3).repeat()
    first, second = [order[k] for k in range(10)], [order[k] for k in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert second == [order2 for order2 in (grain.MapDataset.range(10).shuffle(seed=4)[k] for k in range(10))]
