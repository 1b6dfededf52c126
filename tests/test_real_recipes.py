"""The real-dataset recipes (CIFAR-10, ImageNet, LM1B) end to end on tfds.testing.mock_data, shrunk by
config overrides (widths, image size, sequence length, stages, two steps); nothing is downloaded.

Each run costs 10-40 s of one CPU core, almost all of it XLA compiling the model's initialisers and
per-stage programs, which no override shrinks. So that the file stays near a minute, the default runs
cover each dataset once (CIFAR-10 through the MLP recipe, ImageNet through ResNet-50, LM1B through the
Transformer), and the other CIFAR-10 ResNet recipes train only with LPJAX_SLOW_TESTS=1: ResNet-18,
ResNet-32 and ResNet-110 (whose recipe is ResNet-32's with a deeper model, checked below, and whose
54 blocks compile for over a minute). Their configs are still validated below.
"""

import importlib.util
import math
import os
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from lpjax.config.build import build_experiment
from lpjax.errors import ConfigError
from lpjax.training.loop import train_and_evaluate

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NUM_EXAMPLES = 16  # per split, from the mock

# Per recipe: the overrides that make it tiny (widths, depths, image size, stages); everything else,
# including the dataset, model family and method, comes from the recipe.
SHRINK = {
    "cifar10_mlp": {"model.width": 16},
    "cifar10_resnet18": {"model.width": 4, "stages": 2},
    "cifar10_resnet32": {"model.width": 4, "stages": 2},
    "imagenet_resnet50": {"model.width": 2, "stages": 2, "dataset.image_size": 32},
    "lm1b_transformer": {"model.dim": 16, "model.depth": 1, "model.heads": 2, "stages": 2, "dataset.seq_len": 16},
    "cifar10_resnet110": {"model.width": 2, "stages": 2},
}
SLOW = {"cifar10_resnet18", "cifar10_resnet32", "cifar10_resnet110"}


def recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def override(config, updates):
    for key, value in updates.items():
        node, *path = key.split(".")
        if path:
            config[node][path[0]] = value
        else:
            config[node] = value
    return config


def tiny(name, data_dir):
    config = override(recipe(name), SHRINK[name])
    return override(config, {
        "dataset.data_dir": str(data_dir), "dataset.read_threads": 1,
        "batch_size": 8, "num_steps": 2, "num_epochs": None, "log_every": 1, "eval_every": 1,
        "eval_batch_size": 8, "optimizer.warmup_steps": 0,
        # two steps of batch 8 at the recipes' large-batch rates can blow BatchNorm statistics up
        "optimizer.learning_rate": 1e-3,
    })


def test_every_real_recipe_says_how_to_run_it_and_what_to_expect():
    for name in SHRINK:
        head = (RECIPES / f"{name}.py").read_text().splitlines()
        assert head[0].startswith(f"# Run:    lpjax train --config recipes/{name}.py"), name
        assert any(line.startswith("# Expect: ") for line in head[:12]), name


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_recipe_defaults_pass_validation_up_to_the_data(name, tmp_path):
    """The recipe as shipped: every key is known and every plain value valid; only the (absent)
    prepared dataset stops it, with the command that prepares it."""
    config = recipe(name)
    config.dataset.data_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=f"tfds build {config.dataset.name} "):
        build_experiment(config)


def test_resnet110_recipe_is_the_resnet32_recipe_with_a_deeper_model():
    deep, shallow = recipe("cifar10_resnet110").to_dict(), recipe("cifar10_resnet32").to_dict()
    assert deep["model"].pop("name") == "resnet110" and shallow["model"].pop("name") == "resnet32"
    assert deep == shallow


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1",
                                                reason="slow to compile on CPU; LPJAX_SLOW_TESTS=1 runs it"))
    if name in SLOW else name
    for name in SHRINK
])
def test_recipe_trains_end_to_end_on_mock_data(name, tmp_path):
    config = tiny(name, tmp_path / "data")
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        results = train_and_evaluate(config, str(tmp_path / "run"), progress=False, verbose=False)
    assert results["dataset"] == config.dataset.name
    assert results["num_steps"] == 2 and results["num_stages"] == config.stages
    assert results["method"] == config.method.name
    for stage in results["stages"]:
        assert math.isfinite(stage["test_loss"]) and 0 <= stage["test_accuracy"] <= 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"test"' in line for line in lines) == 2  # eval_every=1: after both steps


@pytest.mark.parametrize("name, num_layers", [("cifar10_resnet32", 16), ("cifar10_resnet110", 55)])
@pytest.mark.parametrize("stages", [2, 4, 8, 16])
def test_k_grid_cuts_the_cifar_resnets_into_k_chunks(name, num_layers, stages):
    """The InfoPro grid K = 2, 4, 8, 16 is just --config.stages=K: near-equal runs of layers, window 1."""
    from lpjax.core.methods import make_method
    from lpjax.core.staging import even_split_points

    config = recipe(name)
    assert config.method.name == "chunked" and make_method("chunked").window == 1
    bounds = [0, *even_split_points(num_layers, stages), num_layers]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert len(sizes) == stages and max(sizes) - min(sizes) <= 1
    if num_layers == stages:
        assert sizes == [1] * stages  # ResNet-32 at K=16: greedy layer-wise
