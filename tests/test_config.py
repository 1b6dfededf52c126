"""Config -> Experiment: what gets built, what is derived, and what is refused (in process, no training
except one tiny run per schedule family)."""

import json
import runpy
from pathlib import Path

import jax.numpy as jnp
import pytest

import lpjax
from lpjax.config.build import base_config, build_experiment, resolve
from lpjax.training.loop import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


def recipe(name):
    return runpy.run_path(str(REPO / "recipes" / f"{name}.py"))["get_config"]()


def tiny(**changes):
    config = base_config()
    config.dataset.name = "digits"
    config.model.name = "mlp"
    config.model.depth = 2
    config.model.width = 16
    config.stages = 2
    config.method.name = "chunked"
    config.batch_size = 32
    config.num_steps = 4
    config.log_every = 2
    for key, value in changes.items():
        node, *path = key.split("__")
        target = config
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return config


def test_demo_recipe_is_greedy_over_four_one_layer_stages():
    config = recipe("mnist_resnet")
    config.dataset.max_train = 256
    experiment = build_experiment(config)
    assert experiment.trainer.method.name == "greedy"
    assert [stage.num_layers for stage in experiment.model] == [1, 1, 1, 1]
    assert experiment.stage_layers == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert experiment.config["model"]["in_channels"] == 1 and experiment.config["model"]["num_classes"] == 10
    assert experiment.num_steps == 10 * (256 // 64)  # num_epochs=10 over 256 images in batches of 64


def test_text_recipe_derives_vocabulary_and_length_from_the_data():
    config = recipe("text_transformer")
    config.dataset.max_train = 64
    experiment = build_experiment(config)
    assert experiment.config["model"]["vocab_size"] == 256 and experiment.config["model"]["seq_len"] == 64
    assert experiment.trainer.method.window == 2 and experiment.trainer.num_stages == 4


def test_mlp_recipe_builds():
    config = recipe("mnist_mlp")
    config.dataset.max_train = 128
    assert build_experiment(config).trainer.method.name == "chunked"


def test_num_steps_wins_over_num_epochs():
    experiment = build_experiment(tiny(num_epochs=3, num_steps=7))
    assert experiment.num_steps == 7
    experiment = build_experiment(tiny(num_epochs=2, num_steps=None))
    assert experiment.num_steps == 2 * (1497 // 32)


def test_split_points_cut_where_asked():
    experiment = build_experiment(tiny(model__depth=4, stages=None, split_points=(1, 3)))
    assert [stage.num_layers for stage in experiment.model] == [1, 2, 1]
    assert experiment.config["stages"] == 3


def test_per_stage_learning_rates_give_one_optimizer_per_stage():
    experiment = build_experiment(tiny(optimizer__learning_rates=(0.1, 0.01), optimizer__name="sgd"))
    first, second = (rule.tx for rule in experiment.trainer.rules)
    assert first is not second
    params, grads = {"w": jnp.ones(())}, {"w": jnp.ones(())}
    step_0 = first.update(grads, first.init(params), params)[0]["w"]
    step_1 = second.update(grads, second.init(params), params)[0]["w"]
    assert float(step_0) == pytest.approx(-0.1) and float(step_1) == pytest.approx(-0.01)


@pytest.mark.parametrize("changes, words", [
    (dict(split_points=(1,), stages=3), "split_points (1,) make 2 stages but stages=3"),
    (dict(layout__data=2), "reference executor runs on one device"),
    (dict(num_steps=None), "training length is not set"),
    (dict(method__name="backprop", optimizer__learning_rates=(0.1, 0.1)), "backprop trains the whole model"),
    (dict(optimizer__name="lion"), "unknown optimizer.name 'lion'"),
    (dict(model__name="vgg"), "unknown model 'vgg'"),
    (dict(model__heads=2), "model 'mlp' has no option(s) heads"),
    (dict(batch_size=5000), "larger than the 1497 training examples"),
    (dict(dataset__test_size=0), "dataset 'digits': test_size=0"),
    (dict(schedule__name="zigzag"), "unknown schedule 'zigzag'"),
    (dict(method__name="greedy", model__depth=4), "use Chunked"),
])
def test_bad_values_raise_one_config_error(changes, words):
    with pytest.raises(lpjax.ConfigError) as info:
        build_experiment(tiny(**changes))
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_a_typo_in_a_recipe_is_refused():
    config = tiny().to_dict()
    config["optimizer"]["learnig_rate"] = 0.1
    with pytest.raises(lpjax.ConfigError, match="unknown config key 'optimizer.learnig_rate'"):
        resolve(config)


def test_bad_config_leaves_no_workdir(tmp_path):
    with pytest.raises(lpjax.ConfigError):
        train_and_evaluate(tiny(stages=9), str(tmp_path / "run"), progress=False, verbose=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule, microbatches", [("sequential", 1), ("streaming", 2)])
def test_train_and_evaluate_logs_every_stage(tmp_path, schedule, microbatches):
    config = tiny(schedule__name=schedule, schedule__microbatches=microbatches)
    results = train_and_evaluate(config, str(tmp_path), progress=False, verbose=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(2, "train"), (4, "train"), (4, "test")]
    assert all(loss is not None for r in records for loss in r["loss"])
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert results["final"]["stage"] == 1 and results["microbatches"] == microbatches


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    with pytest.raises(lpjax.ConfigError, match="exists and is not a directory"):
        train_and_evaluate(tiny(), str(path), progress=False, verbose=False)
