"""The real-dataset recipes (CIFAR-10, ImageNet, LM1B) end to end on tfds.testing.mock_data, shrunk by
config overrides (widths, image size, sequence length, stages, two steps); nothing is downloaded.

Each run costs 10-40 s of one CPU core, almost all of it XLA compiling the model's initialisers and
per-stage programs, which no override shrinks. So that the file stays near a minute, the default runs
cover each dataset once (CIFAR-10 through the MLP recipe, ImageNet through ResNet-50, LM1B through the
Transformer), and the CIFAR-10 ResNets (``cifar10_resnet:18``, ``:32`` and ``:110``, whose 54 blocks
compile for over a minute) train only with LPJAX_SLOW_TESTS=1. Their configs are still validated below.

The three CIFAR ResNets were one file each (``cifar10_resnet18.py``, ``cifar10_resnet32.py``,
``cifar10_resnet110.py``) until 845e0bd; they are one parametrised recipe now, and the old names and
paths still load the same config.
"""

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from ml_collections.config_dict import FieldReference

from lpjax.cli import parse
from lpjax.config import catalog
from lpjax.config.build import build_experiment
from lpjax.config.recipe_file import load_recipe
from lpjax.errors import ConfigError
from lpjax.training.loop import train_and_evaluate

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
NUM_EXAMPLES = 16  # per split, from the mock

# Per recipe (as `lpjax train --config` names it): the overrides that make it tiny (widths, depths,
# image size, stages); everything else, including the dataset, model family and method, comes from the recipe.
SHRINK = {
    "cifar10_mlp": {"model.width": 16},
    "cifar10_resnet:18": {"model.width": 4, "stages": 2},
    "cifar10_resnet:32": {"model.width": 4, "stages": 2},
    "imagenet_resnet50": {"model.width": 2, "stages": 2, "dataset.image_size": 32},
    "lm1b_transformer": {"model.dim": 16, "model.depth": 1, "model.heads": 2, "stages": 2, "dataset.seq_len": 16},
    "cifar10_resnet:110": {"model.width": 2, "stages": 2},
}
SLOW = {"cifar10_resnet:18", "cifar10_resnet:32", "cifar10_resnet:110"}
FORMER = {"cifar10_resnet18": "cifar10_resnet:18", "cifar10_resnet32": "cifar10_resnet:32",
          "cifar10_resnet110": "cifar10_resnet:110"}
BEFORE_THE_FOLD = "845e0bd"


def recipe(name):
    config, reason = load_recipe(catalog.find_recipe(name))
    assert reason is None, reason
    return config


def resolved(config) -> dict:
    """The config as plain values, with each placeholder's declared type (it decides what an override
    may set), so that two configs compare equal only if they build and override alike."""
    def plain(value):
        if isinstance(value, FieldReference):
            return ("placeholder", value.get_type().__name__, plain(value.get()))
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value
    return plain(config.to_dict(preserve_field_references=True))


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
    """Each recipe, and each variant of a parametrised one, opens with its own `# Run:` line, the
    command for exactly that name, and an `# Expect:` line before the next `# Run:`."""
    for name in SHRINK:
        stem, _, arg = name.partition(":")
        header = []
        for line in (RECIPES / f"{stem}.py").read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        command = f"# Run:    lpjax train --config recipes/{stem}.py{':' + arg if arg else ''} "
        assert header[0].startswith("# Run:    lpjax train --config recipes/"), name
        starts = [i for i, line in enumerate(header) if line.startswith(command)]
        assert len(starts) == 1, name
        block = header[starts[0] + 1:]
        block = block[:next((i for i, line in enumerate(block) if line.startswith("# Run:")), len(block))]
        assert any(line.startswith("# Expect: ") for line in block), name


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_recipe_defaults_pass_validation_up_to_the_data(name, tmp_path):
    """The recipe as shipped: every key is known and every plain value valid; only the (absent)
    prepared dataset stops it, with the command that prepares it."""
    config = recipe(name)
    config.dataset.data_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=f"tfds build {config.dataset.name} "):
        build_experiment(config)


def test_resnet110_recipe_is_the_resnet32_recipe_with_a_deeper_model():
    deep, shallow = recipe("cifar10_resnet:110").to_dict(), recipe("cifar10_resnet:32").to_dict()
    assert deep["model"].pop("name") == "resnet110" and shallow["model"].pop("name") == "resnet32"
    assert deep == shallow


@pytest.mark.parametrize("former, name", sorted(FORMER.items()))
def test_a_former_recipe_name_or_path_loads_the_same_config_as_its_variant(former, name, tmp_path, monkeypatch):
    """What `lpjax train --config X` loads (the CLI's own flag parsing, config_flags included) is one
    config whether X is the old name, the old recipes/ path, NAME:ARG or the file's path with :ARG."""
    monkeypatch.chdir(tmp_path)  # outside the checkout: no recipes/ folder here, the package's are used
    stem, _, arg = name.partition(":")
    spellings = [former, f"recipes/{former}.py", name, f"recipes/{stem}.py:{arg}", f"{RECIPES / stem}.py:{arg}"]
    loaded = []
    for given in spellings:
        _, options = parse(["lpjax", "train", "--config", catalog.find_recipe(given), "--print-config"])
        loaded.append(resolved(options["config"]))
    assert all(config == loaded[0] for config in loaded[1:]), spellings
    assert loaded[0] == resolved(recipe(name))
    assert former in catalog.former_names() and name in catalog.recipe_names() and former not in catalog.recipe_names()


@pytest.mark.parametrize("former, name", [*sorted(FORMER.items()), ("cifar10_mlp", "cifar10_mlp")])
def test_each_variant_is_the_config_its_own_file_held_before_the_fold(former, name):
    """The fold changed no value: each variant equals the recipe file it replaced, and the MLP recipe
    (which now takes its dataset block from recipes/common.py) equals itself, read from git.
    When a recipe is changed on purpose, this comparison is what has to be told (or retired)."""
    try:
        old = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_THE_FOLD}:recipes/{former}.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with {BEFORE_THE_FOLD} here (an installed copy or a shallow clone)")
    old = old.replace("from lpjax.config import base_config", "from lpjax.config.build import base_config")  # moved since
    namespace = {}
    exec(compile(old, f"{BEFORE_THE_FOLD}:recipes/{former}.py", "exec"), namespace)
    assert resolved(recipe(name)) == resolved(namespace["get_config"]())


def test_the_cifar_dataset_block_is_shared_and_the_mlp_recipe_keeps_its_values():
    mlp, resnet18, resnet32 = (recipe(n).dataset.to_dict() for n in ("cifar10_mlp", "cifar10_resnet:18",
                                                                      "cifar10_resnet:32"))
    assert mlp == resnet18 == {**resnet32, "pad_mode": "constant"}
    assert resnet32["pad_mode"] == "reflect" and mlp["name"] == "cifar10" and mlp["in_memory"] is True
    for stem in ("cifar10_mlp", "cifar10_resnet"):
        assert "from lpjax.recipes.common import cifar10_dataset" in (RECIPES / f"{stem}.py").read_text()
        assert not re.search(r"config\.dataset\.name = ", (RECIPES / f"{stem}.py").read_text())


@pytest.mark.parametrize("given, words", [
    ("cifar10_resnet", ["takes the depth as its argument", "32, 110, 18", "got no argument"]),
    ("cifar10_resnet:7", ["one of 32, 110, 18", "got '7'"]),
])
def test_a_parametrised_recipe_without_a_known_argument_says_which_it_takes(given, words):
    config, reason = load_recipe(catalog.find_recipe(given))
    assert config is None and "\n" not in reason
    for word in words:
        assert word in reason, reason


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


@pytest.mark.parametrize("name, num_layers", [("cifar10_resnet:32", 16), ("cifar10_resnet:110", 55)])
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
