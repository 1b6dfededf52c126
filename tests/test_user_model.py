"""A user's own NNX model end to end: the trainer trains copies, hands the trained model back
(export), predicts at any time, and ``lpjax.fit`` runs the full loop on it."""

import json
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.data import batch_iterator, load_dataset


class Block(nnx.Module):
    """A user's layer with batch statistics, so export must carry non-trainable state too."""

    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.norm = nnx.BatchNorm(dout, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.norm(self.linear(x.reshape(x.shape[0], -1))))


def user_model(seed=0):
    rngs = nnx.Rngs(seed)
    return lpjax.StagedModel([
        lpjax.Stage(body=Block(64, 32, rngs=rngs), head=nnx.Linear(32, 10, rngs=rngs)),
        lpjax.Stage(body=Block(32, 32, rngs=rngs), head=nnx.Linear(32, 10, rngs=rngs)),
    ])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def trainer_for(model, executor=None):
    layout = None if executor is None else lpjax.Layout(stages=2, data=1, executor=executor)
    schedule = lpjax.core.schedules.GPipe(2) if executor == "spmd" else lpjax.core.schedules.Streaming(2)
    return lpjax.Trainer(model, method=lpjax.Greedy(), optimizer=optax.adam(1e-2), schedule=schedule,
                         layout=layout, num_classes=10)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_close(a, b, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


@pytest.mark.parametrize("executor", [None, "mpmd", "spmd"])
def test_two_trainers_from_one_model_train_and_export_round_trips(digits, executor):
    model = user_model()
    initial = host(nnx.state(model))
    first, second = trainer_for(model, executor), trainer_for(model, executor)
    batches = batch_iterator(digits.train_x, digits.train_y, 64, seed=0)
    for _ in range(3):  # streaming: microbatches are still in flight afterwards; export and predict drain
        x, y = next(batches)
        first.step(x, y)
        second.step(x, y)
    # the user's arrays were not donated away, and training did not touch them
    assert_trees_close(host(nnx.state(model)), initial, atol=0)
    model(digits.test_x[:4])
    # both trainers trained, from the same start, to the same parameters
    x = digits.test_x[:32]
    predicted = second.predict(x)
    trained = host(second.stage_states[0].params["body"])
    assert any(not np.allclose(p, q) for p, q in
               zip(jax.tree.leaves(trained), jax.tree.leaves(host(nnx.state(model.stages[0].body, nnx.Param)))))

    exported = first.export()
    assert exported is model
    for k, stage_state in enumerate(first.stage_states):
        for part in ("body", "head"):
            module = getattr(exported.stages[k], part)
            assert_trees_close(host(nnx.state(module, nnx.Param)), host(stage_state.params[part]), atol=0)
            assert_trees_close(host(nnx.state(module, nnx.Not(nnx.Param))), host(stage_state.rest[part]), atol=0)
    assert_trees_close(exported(x), predicted, atol=1e-5)
    # nnx.state of the exported model goes into a fresh model and predicts the same
    fresh = user_model(seed=7)
    fresh.eval()
    nnx.update(fresh, nnx.state(exported))
    assert_trees_close(fresh(x), exported(x), atol=0)
    # further training does not reach into the exported arrays
    before = host(nnx.state(exported))
    first.step(*next(batches))
    first.drain()
    assert_trees_close(host(nnx.state(exported)), before, atol=0)


def test_after_fit_the_users_model_predicts_with_the_trained_parameters(digits, tmp_path):
    model = user_model()
    untrained_accuracy = float(np.mean(np.argmax(model(digits.test_x)[-1], -1) == digits.test_y))
    trainer = trainer_for(model)
    results = lpjax.fit(trainer, digits, workdir=str(tmp_path / "run"), steps=30, batch_size=64, log_every=10,
                        eval_every=15, progress=False, verbose=False)
    predicted = np.argmax(np.asarray(model(digits.test_x)[-1]), -1)
    accuracy = float(np.mean(predicted == digits.test_y))
    assert accuracy == pytest.approx(results["final"]["test_accuracy"], abs=1e-6)
    assert accuracy > untrained_accuracy + 0.3
    for name in ("config.json", "metrics.jsonl", "results.json"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "run" / "checkpoints" / "30").is_dir()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "test"] == [15, 30]
    assert results["environment"]["versions"]["jax"] == jax.__version__
    assert results["stages"][0]["parameters"]["body"] == 64 * 32 + 32 + 2 * 32  # linear + batch-norm scale/bias

    # the same call again resumes: nothing left to run, and the model is the checkpoint's
    again = lpjax.fit(trainer_for(user_model(seed=3)), digits, workdir=str(tmp_path / "run"), steps=30,
                      batch_size=64, log_every=10, eval_every=15, progress=False, verbose=False)
    assert again["steps_run"] == 0 and again["resumed_from_step"] == 30
    assert again["final"]["test_accuracy"] == pytest.approx(results["final"]["test_accuracy"], abs=1e-6)


def test_fit_logs_the_injected_learning_rate_and_takes_arrays(digits, tmp_path):
    model = user_model()
    schedule = optax.linear_schedule(1e-2, 1e-3, 8)
    trainer = lpjax.Trainer(model, method=lpjax.Greedy(), optimizer=optax.inject_hyperparams(optax.adam)(schedule),
                            num_classes=10)
    data = (digits.train_x, digits.train_y, digits.test_x, digits.test_y)
    lpjax.fit(trainer, data, workdir=str(tmp_path), steps=8, batch_size=32, log_every=4, progress=False,
              verbose=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [r["learning_rate"] for r in records if r["split"] == "train"]
    # the rate of the last update at steps 4 and 8: counts 3 and 7 of the schedule
    assert rates == [pytest.approx([float(schedule(3))] * 2), pytest.approx([float(schedule(7))] * 2)]


def test_fit_refuses_data_that_is_not_a_data_source(tmp_path):
    trainer = trainer_for(user_model())
    with pytest.raises(lpjax.ConfigError, match="lpjax data source"):
        lpjax.fit(trainer, [1, 2, 3], workdir=str(tmp_path), steps=2)


@pytest.mark.parametrize("spec, words", [
    ("no_colon_here", "must look like 'my_pkg.blocks:build'"),
    ("lpjax_no_such_module_xyz:build", "could not import lpjax_no_such_module_xyz"),
    ("math:no_such_function", "math has no function 'no_such_function'"),
    ("missing/file.py:build", "does not exist"),
])
def test_a_bad_model_builder_is_one_config_error(spec, words):
    from lpjax.config.build import load_builder

    with pytest.raises(lpjax.ConfigError, match=re.escape(words)):
        load_builder(spec)


def test_a_builder_that_returns_no_network_is_refused(tmp_path):
    from lpjax.config.build import base_config, build_experiment

    (tmp_path / "wrong.py").write_text("def build(num_classes, *, rngs):\n    return [num_classes]\n")
    config = base_config()
    config.dataset.name = "digits"
    config.model.builder = f"{tmp_path / 'wrong.py'}:build"
    config.stages, config.method.name, config.num_steps = 1, "backprop", 1
    with pytest.raises(lpjax.ConfigError, match="returned a list, not an lpjax.models.Network"):
        build_experiment(config)
