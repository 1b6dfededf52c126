"""Bad batches at every entry point of the Python API (Trainer.step, evaluate, evaluate_batches, predict,
lpjax.fit): each either trains correctly (NaN inputs: the update is skipped and counted) or raises
ConfigError, never another exception and never a silent update. The issue's table first, then random
bad batches from a seeded generator."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpjax
from lpjax.errors import ConfigError
from tiny import VOCAB, lm_batch, lm_model, stage_params, tiny_batch, tiny_model

CLASSES, DIN, ROWS = 10, 12, 64


def trainer(layout=None, num_stages=2):
    return lpjax.Trainer(tiny_model(num_stages=num_stages, din=DIN, classes=CLASSES), method=lpjax.methods.Greedy(),
                         optimizer=optax.sgd(0.1), layout=layout)


def good(n=ROWS, seed=0):
    return tiny_batch(n=n, din=DIN, classes=CLASSES, seed=seed)


def unchanged(before, after):
    return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def skipped(t):
    return [int(h["skipped"]) for h in jax.device_get(t.health())]


# -- the table ------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", [14, -1])
def test_an_out_of_range_label_is_refused_naming_it_and_the_range(label):
    t = trainer()
    x, y = good()
    y[7] = label
    before = stage_params(t)
    with pytest.raises(ConfigError, match=rf"^Trainer.step: label {label} is outside \[0, 10\) \(the last head's "):
        t.step(x, y)
    with pytest.raises(ConfigError, match=rf"^evaluation: label {label} is outside \[0, 10\)"):
        t.evaluate(x, y)
    assert unchanged(before, stage_params(t)) and skipped(t) == [0, 0]


def test_float_labels_are_refused():
    x, y = good()
    with pytest.raises(ConfigError, match="labels must be integers .*got dtype float32; pass y.astype"):
        trainer().step(x, y.astype(np.float32))


def test_an_empty_batch_is_refused():
    x, y = good()
    for call in (lambda t: t.step(x[:0], y[:0]), lambda t: t.evaluate(x[:0], y[:0]), lambda t: t.predict(x[:0])):
        with pytest.raises(ConfigError, match="the batch is empty"):
            call(trainer())


def test_evaluate_with_64_inputs_and_5_labels_is_refused_as_step_refuses_it():
    x, y = good()
    with pytest.raises(ConfigError, match="^evaluate: there are 64 inputs but 5 labels"):
        trainer().evaluate(x, y[:5])
    with pytest.raises(ConfigError, match="^Trainer.step: there are 64 inputs but 5 labels"):
        trainer().step(x, y[:5])


def test_a_language_model_refuses_a_token_past_the_vocabulary():
    t = lpjax.Trainer(lm_model(2), method=lpjax.methods.Chunked(), optimizer=optax.sgd(0.1))
    x, y = lm_batch()
    t.step(x, y)  # tokens below the vocabulary train
    y[0, 3] = VOCAB
    with pytest.raises(ConfigError, match=rf"label {VOCAB} is outside \[0, {VOCAB}\)"):
        t.step(x, y)


def test_nan_inputs_train_as_a_non_finite_loss_does_skipped_and_counted():
    t = trainer()
    x, y = good()
    x[3] = np.nan
    before = stage_params(t)
    t.step(x, y)
    assert unchanged(before, stage_params(t)) and skipped(t) == [1, 1]
    assert np.isnan(t.evaluate(x, y)[-1]["loss"])  # evaluation reports it


def test_device_labels_out_of_range_skip_the_update_and_fit_raises_at_its_next_record(tmp_path):
    """Device labels are checked inside the step program: no host sync, no update, and the loop raises
    ConfigError where it reads its figures."""
    t = trainer()
    x, y = good()
    y[0] = CLASSES
    before = stage_params(t)
    metrics = t.step(x, jnp.asarray(y))
    assert unchanged(before, stage_params(t)) and skipped(t) == [1, 1]
    assert all(float(m["bad_labels"]) == 1 for m in metrics)

    class DeviceLabels:
        """A data source whose training labels arrive as device arrays, one of them out of range."""

        def __init__(self, data):
            self.data, self.name, self.num_train = data, data.name, data.num_train
            self.eval_batches, self.example_batch = data.eval_batches, data.example_batch

        def train_batches(self, batch_size, **options):
            return Stream(self.data.train_batches(batch_size, **options))

    class Stream:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            xb, yb = next(self.inner)
            return xb, jnp.asarray(yb).at[0].set(CLASSES)

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(128, DIN)).astype(np.float32), rng.integers(0, CLASSES, 128).astype(np.int32)
    source = DeviceLabels(lpjax.data.Dataset.from_arrays(xs, ys, xs, ys))
    fitted = trainer()
    with pytest.raises(ConfigError, match=r"labels outside \[0, 10\) reached Trainer.step as device arrays by step 2"):
        lpjax.fit(fitted, source, workdir=str(tmp_path / "fit"), steps=4, batch_size=16, log_every=2,
                  progress=False, verbose=False)
    assert skipped(fitted) == [2, 2]  # both steps' updates were skipped


def test_fit_refuses_bad_labels_in_the_data_before_writing_anything(tmp_path):
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(128, DIN)).astype(np.float32), rng.integers(0, CLASSES, 128).astype(np.int32)
    ys[5] = 12  # past the heads' 10 outputs
    with pytest.raises(ConfigError, match=r"the data's train split: label 12 is outside \[0, 10\)"):
        lpjax.fit(trainer(), (xs, ys, xs, ys), workdir=str(tmp_path / "fit"), steps=4, batch_size=16,
                  progress=False, verbose=False)
    assert not (tmp_path / "fit").exists()


# -- random bad batches -------------------------------------------------------------------------------------
KINDS = ("float labels", "string inputs", "object inputs", "label too large", "negative label", "device labels",
         "nan inputs", "empty", "ragged inputs", "ragged labels", "mismatched lengths", "good")


def bad_batch(kind, rng, n=None):
    """A batch of the kind named, otherwise random (of ``n`` rows when given); returns ``(x, y)``."""
    n = int(rng.choice([8, 16, 64])) if n is None else n
    x, y = good(n=n, seed=int(rng.integers(1 << 16)))
    row = int(rng.integers(n))
    if kind == "float labels":
        return x, y.astype(rng.choice([np.float32, np.float64]))
    if kind == "string inputs":
        return x.astype(str), y
    if kind == "object inputs":
        return np.array([None] * n, dtype=object), y
    if kind == "label too large":
        y[row] = CLASSES + int(rng.integers(0, 1000))
        return x, y
    if kind == "negative label":
        y[row] = -int(rng.integers(1, 1000))
        return x, y
    if kind == "device labels":
        y[row] = CLASSES + int(rng.integers(0, 3)) if rng.random() < 0.5 else -1
        return x, jnp.asarray(y)
    if kind == "nan inputs":
        x[row, int(rng.integers(DIN))] = np.nan
        return x, y
    if kind == "empty":
        return x[:0], y[:0]
    if kind == "ragged inputs":
        rows = [list(r) for r in x]
        rows[row] = rows[row][:-1]
        return rows, y
    if kind == "ragged labels":
        return x, [[int(v)] * (1 + (i == row)) for i, v in enumerate(y)]
    if kind == "mismatched lengths":
        return x, y[: int(rng.integers(0, n))] if rng.random() < 0.5 else np.concatenate([y, y[:3]])
    return x, y


ENTRY_POINTS = {
    "step": lambda t, x, y: t.step(x, y),
    "evaluate": lambda t, x, y: t.evaluate(x, y, batch_size=8),
    "evaluate_batches": lambda t, x, y: t.evaluate_batches([(x, y)]),
    "predict": lambda t, x, y: t.predict(x),
}


def expect(t, kind, entry, call):
    """Run ``call``; it raises ConfigError (nothing trained), or trains correctly."""
    before, skips = stage_params(t), skipped(t)
    try:
        out = call()
    except ConfigError:
        assert unchanged(before, stage_params(t)) and skipped(t) == skips, f"{kind} at {entry}: changed the model"
        return "refused"
    if entry != "step":
        assert unchanged(before, stage_params(t))
        return "ran"
    if kind == "good":
        assert not unchanged(before, stage_params(t)) and skipped(t) == skips
        return "trained"
    # the only bad batches that train: their updates are skipped and counted, never applied
    assert kind in ("nan inputs", "device labels"), f"{kind} was accepted by step"
    assert unchanged(before, stage_params(t)), f"{kind}: a silent update"
    assert all(now == then + 1 for now, then in zip(skipped(t), skips))
    if kind == "device labels":
        assert all(float(m["bad_labels"]) > 0 for m in out)
    return "skipped"


def test_random_bad_batches_at_every_entry_point_never_update_silently():
    rng = np.random.default_rng(2028)
    t = trainer()
    t.step(*good())  # shapes and classes known, the programs compiled
    outcomes = {}
    for case in range(48):
        # every kind once at step, then random kinds at random entry points
        kind = KINDS[case] if case < len(KINDS) else str(rng.choice(KINDS))
        entry = "step" if case < len(KINDS) else str(rng.choice(sorted(ENTRY_POINTS)))
        x, y = bad_batch(kind, rng)
        if entry == "predict" and kind in ("float labels", "label too large", "negative label", "device labels",
                                           "ragged labels", "mismatched lengths"):
            entry = "step"  # predict takes no labels: give this one to step
        outcome = expect(t, kind, entry, lambda: ENTRY_POINTS[entry](t, x, y))
        outcomes.setdefault(outcome, set()).add(kind)
        if kind in ("float labels", "string inputs", "object inputs", "empty", "ragged inputs", "mismatched lengths",
                    "label too large", "negative label"):
            assert outcome == "refused", (kind, entry)
    assert {"refused", "skipped", "ran", "trained"} <= set(outcomes), outcomes


@pytest.mark.parametrize("executor", ["mpmd", "spmd"])
def test_a_bad_batch_on_the_multi_device_executors(executor):
    rng = np.random.default_rng(7)
    t = trainer(layout=lpjax.Layout(stages=2, executor=executor))
    t.step(*good())
    for kind in ("label too large", "device labels", "nan inputs", "mismatched lengths"):
        x, y = bad_batch(kind, rng, n=ROWS)  # the spmd executor takes one batch shape
        outcome = expect(t, kind, "step", lambda: t.step(x, y))
        assert outcome == ("refused" if kind in ("label too large", "mismatched lengths") else "skipped"), kind
    expect(t, "good", "step", lambda: t.step(*good(seed=3)))
    if executor == "spmd":  # its programs are built for the first batch's shape
        assert expect(t, "other size", "step", lambda: t.step(*good(n=16))) == "refused"
