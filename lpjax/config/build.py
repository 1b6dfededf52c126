"""From an ml_collections config to a ready-to-train ``Experiment``.

The keys and their meaning are in lpjax/config/base.py. ``build_experiment`` validates in order
of cost (plain values, then data, model and trainer) and raises ``ConfigError`` with one line naming the problem and the fix; it writes nothing to disk.
Two checks cover whole classes of keys rather than a list of them: every float anywhere in the
config must be finite (``inf > 0`` would pass a positivity check), and every integer a model
builder is given must be at least 1 (at least 0 where the builder's default is 0).
"""

import copy
import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from lpjax.config.checks import (boolean, builder_sizes, finite_everywhere, int_list, loss_weights, no_unknown_keys,
                                 non_negative_int, one_of, positive_int, required)
from lpjax.data import DATASETS, load_dataset, steps_per_epoch
from lpjax.errors import ConfigError, first_line
from lpjax.executors.layout import Layout
from lpjax.core.remat import REMAT_POLICIES
from lpjax.core.methods import METHODS, make_method
from lpjax.models import MODELS
from lpjax.models.precision import DTYPES as PRECISIONS, with_precision
from lpjax.config.optimizer import build_optimizers, learning_rate_schedules
from lpjax.core.schedules import SCHEDULES, make_schedule
from lpjax.core.staging import stage_network
from lpjax.training.trainer import Trainer

from lpjax.config.base import EXECUTORS, NONFINITE_POLICIES, OPEN_SECTIONS, base_config  # noqa: F401


@dataclasses.dataclass
class Experiment:
    """Everything a training run needs, built and checked by ``build_experiment``: the trainer holds
    the model's arrays on their devices, and nothing has been trained or written."""

    config: dict  # the resolved config: defaults, derived model options and step count filled in
    dataset: Any  # lpjax.data.Dataset
    network: Any  # lpjax.models.Network
    model: Any  # lpjax.StagedModel
    trainer: Trainer
    num_steps: int
    stage_layers: list  # (first, last) layer index of each stage
    split: Any = None  # lpjax.research.balance.BalancedSplit of a balanced cut (split_points="balanced"), else None
    learning_rates: list | None = None  # per stage: update count -> learning rate (host side, for logs)

    def batches(self, start_step: int = 0):
        """The endless, seeded training stream, from global step ``start_step``."""
        return self.dataset.train_batches(self.config["batch_size"], seed=self.config["seed"], start_step=start_step)


def resolve(config) -> dict:
    """The user's config merged onto ``base_config()``.

    Args:
      config: an ml_collections ConfigDict (or FrozenConfigDict) or a nested dict; not changed.

    Returns:
      Plain nested dicts holding every key, the given values over the defaults. Raises ConfigError for
      a key the base config does not have (with a "did you mean"), except inside ``dataset`` and
      ``model``, whose extra keys go to the loader and builder.
    """
    given = _to_dict(config)
    merged = base_config().to_dict()
    no_unknown_keys(given, merged, open_sections=OPEN_SECTIONS)
    merge_into(merged, given)
    return merged


def build_experiment(config, *, devices=None, abstract: bool | None = None) -> Experiment:
    """Build and check everything a training run needs, cheapest checks first.

    Args:
      config: a recipe's config (ConfigDict or dict), as ``resolve`` takes it.
      devices: the devices of the layout's mesh (``jax.devices()`` when None; a topology's for compile-only).
      abstract: build the model as shapes only and give the trainer its factory, so each stage's state
        is created on the devices that hold it (the spmd executor's path: the default for it).

    Returns:
      The ``Experiment``: its ``config`` is the resolved config with the model options derived from
      the data (num_classes, input shape, ...) and the step count filled in, as config.json records it.
      Every problem is a ConfigError of one line naming the fix (plain values first, then the data,
      the model and the trainer); nothing is written to disk and nothing is trained.
    """
    cfg = resolve(config)
    _check_plain_values(cfg)
    method = make_method(cfg["method"]["name"], window=cfg["method"]["window"],
                         loss_weights=loss_weights(cfg["method"]["loss_weights"], "method.loss_weights"),
                         shared_readout=boolean(cfg["method"]["shared_readout"], "method.shared_readout"),
                         readout_refresh_steps=cfg["method"]["readout_refresh_steps"])
    schedule = make_schedule(cfg["schedule"]["name"], cfg["schedule"]["microbatches"])

    dataset = _load_dataset(cfg)
    abstract = cfg["layout"]["executor"] == "spmd" if abstract is None else abstract
    network, model, factory = _model(cfg, dataset, abstract)
    num_stages = len(model)

    num_steps = _num_steps(cfg, dataset)
    optimizer = build_optimizers(ml_collections.ConfigDict(cfg["optimizer"]), num_stages, num_steps, method)
    layout = _layout(cfg, num_stages)
    trainer = Trainer(factory if abstract else model, method=method, optimizer=optimizer, schedule=schedule,
                      layout=layout, num_classes=dataset.num_classes, remat=cfg["remat"], devices=devices,
                      nonfinite=cfg["nonfinite"])
    _dry_run_checks(trainer, dataset, cfg["batch_size"])
    return Experiment(config=cfg, dataset=dataset, network=network, model=model, trainer=trainer,
                      num_steps=num_steps, stage_layers=stage_layers(model), split=model.split,
                      learning_rates=learning_rate_schedules(ml_collections.ConfigDict(cfg["optimizer"]),
                                                             num_stages, num_steps))


# -- pieces ----------------------------------------------------------------------------------------
def _to_dict(config) -> dict:
    if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return config.to_dict()
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise ConfigError(f"a config must be an ml_collections ConfigDict or a dict, got {type(config).__name__}")


def merge_into(into: dict, given: dict) -> None:
    """Set ``given``'s keys on ``into`` in place, section by section: nested dicts merge, any other
    value replaces (a dict also replaces a non-dict). Returns None."""
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_into(into[key], value)
        else:
            into[key] = value


def _check_plain_values(cfg) -> None:
    finite_everywhere(cfg)  # every float, whatever its key: inf passes "> 0" checks and poisons training
    seed = non_negative_int(cfg["seed"], "seed")
    if seed >= 2**32:
        raise ConfigError(f"seed must be below 2**32, got {seed}")
    positive_int(cfg["batch_size"], "batch_size")
    positive_int(cfg["log_every"], "log_every")
    non_negative_int(cfg["eval_every"], "eval_every")
    positive_int(cfg["eval_batch_size"], "eval_batch_size")
    non_negative_int(cfg["checkpoint"]["every_steps"], "checkpoint.every_steps")
    positive_int(cfg["checkpoint"]["keep"], "checkpoint.keep")
    boolean(cfg["checkpoint"]["asynchronous"], "checkpoint.asynchronous")
    one_of(cfg["nonfinite"], NONFINITE_POLICIES, "nonfinite")
    one_of(cfg["remat"], tuple(REMAT_POLICIES), "remat")
    for key in ("compute", "params"):
        one_of(cfg["precision"][key], tuple(PRECISIONS), f"precision.{key}")
    non_negative_int(cfg["probe"]["alignment_every"], "probe.alignment_every")
    if cfg["num_steps"] is not None:
        positive_int(cfg["num_steps"], "num_steps")
    elif cfg["num_epochs"] is not None:
        positive_int(cfg["num_epochs"], "num_epochs")
    else:
        raise ConfigError("training length is not set; set --config.num_steps=N or --config.num_epochs=N")
    dataset = required(cfg["dataset"]["name"], "dataset.name", f"choose one of {', '.join(sorted(DATASETS))}")
    one_of(dataset, sorted(DATASETS), "dataset")
    if cfg["model"]["builder"] is None:
        model = required(cfg["model"]["name"], "model.name", f"choose one of {', '.join(sorted(MODELS))}, or set "
                         f"model.builder='my_pkg.module:function' for your own")
        one_of(model, sorted(MODELS), "model")
    method = required(cfg["method"]["name"], "method.name", f"choose one of {', '.join(METHODS)}")
    one_of(method, tuple(METHODS), "method")
    one_of(cfg["schedule"]["name"], tuple(SCHEDULES), "schedule")
    one_of(cfg["layout"]["executor"], EXECUTORS, "layout.executor")
    if cfg["stages"] is None and cfg["split_points"] is None:
        raise ConfigError("the number of stages is not set; set --config.stages=K or --config.split_points='(i, j, ...)'")


def _load_dataset(cfg):
    options = {key: value for key, value in cfg["dataset"].items() if key != "name" and value is not None}
    try:
        return load_dataset(cfg["dataset"]["name"], seed=cfg["seed"], **options)
    except (ValueError, TypeError) as err:  # the loaders' own messages already name the fix
        raise ConfigError(f"dataset {cfg['dataset']['name']!r}: {err}") from None


# What a model builder may want to know about the data; used only where the builder takes it.
def _data_derived_options(dataset) -> dict:
    shape = tuple(dataset.input_shape)
    derived = {"num_classes": dataset.num_classes, "vocab_size": dataset.num_classes, "input_shape": shape}
    if len(shape) == 3:  # NHWC images without the batch axis
        derived["in_channels"] = shape[-1]
    if len(shape) == 1:  # token sequences
        derived["seq_len"] = shape[0]
    return derived


def load_builder(spec: str) -> Callable:
    """The model builder a config names in ``model.builder``.

    Args:
      spec: ``"package.module:function"`` or ``"path/to/file.py:function"``; a module that is not
        importable as it is is also looked for in the working directory.

    Returns:
      The callable. A malformed spec, a missing file or module, an import that raises, or a missing
      or non-callable attribute is a ConfigError of one line.
    """
    module_name, sep, attribute = str(spec).partition(":")
    if not sep or not module_name or not attribute.isidentifier():
        raise ConfigError(f"model.builder {spec!r} must look like 'my_pkg.blocks:build' or 'path/to/file.py:build'")
    try:
        if module_name.endswith(".py"):
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise ConfigError(f"model.builder file {module_name!r} does not exist; give a path to a .py file")
            module_spec = importlib.util.spec_from_file_location(f"_lpjax_builder_{abs(hash(path))}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                if err.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                    raise
                sys.path.insert(0, os.getcwd())  # `lpjax train` run next to the user's own package
                module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"model.builder {spec!r}: could not import {module_name}: "
                          f"{type(err).__name__}: {first_line(err)}; "
                          f"install the package or run from the directory that holds it") from None
    builder = getattr(module, attribute, None)
    if not callable(builder):
        raise ConfigError(f"model.builder {spec!r}: {module_name} has no function {attribute!r}")
    return builder


def _build_network(cfg, dataset, rngs):
    spec = cfg["model"]["builder"]
    if spec is not None:
        builder = load_builder(spec)
        if cfg["model"]["name"] is None:
            cfg["model"]["name"] = spec
    else:
        builder = MODELS[cfg["model"]["name"]]
    name = cfg["model"]["name"]
    accepted = [p for p in inspect.signature(builder).parameters if p != "rngs"]
    given = {key: value for key, value in cfg["model"].items() if key not in ("name", "builder") and value is not None}
    unexpected = sorted(set(given) - set(accepted))
    if unexpected:
        raise ConfigError(f"model {name!r} has no option(s) {', '.join(unexpected)}; "
                          f"it accepts {', '.join(accepted)}")
    builder_sizes(given, builder, "model")  # width=0 would reach the builder as a ZeroDivisionError
    derived = {k: v for k, v in _data_derived_options(dataset).items() if k in accepted and k not in given}
    cfg["model"].update(derived)  # recorded in config.json, so the run says exactly what it built
    try:
        network = builder(**given, **derived, rngs=rngs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model {name!r}: {str(err).splitlines()[0]}") from None
    if not all(hasattr(network, attr) for attr in ("layers", "make_head", "name")):
        raise ConfigError(f"model {name!r}: the builder returned a {type(network).__name__}, not an "
                          f"lpjax.models.Network(layers, make_head, natural_splits, name); see docs/extending.md")
    precision = cfg["precision"]
    if (precision["compute"], precision["params"]) != ("float32", "float32"):
        network = with_precision(network, precision["compute"], precision["params"])
    return network


def _model(cfg, dataset, abstract):
    """``(network, model, factory)`` built with the seed (one stream for layers and heads, so no two get
    the same draws): abstract (``nnx.eval_shape``) with the factory of the real ones, or real ones."""
    def build():
        rngs = nnx.Rngs(cfg["seed"])
        network = _build_network(cfg, dataset, rngs)
        return network, _cut(cfg, network, rngs, dataset)

    if not abstract:
        return (*build(), None)
    if isinstance(cfg["split_points"], str):
        raise ConfigError(f"split_points={cfg['split_points']!r} measures a built model, and the spmd executor builds "
                          f"none on the host; give the split points as indices, or use layout.executor=mpmd")
    built = {}  # the network of the abstract build: its name and layer count are all that is read
    model = nnx.eval_shape(lambda: built.setdefault("network", build())[1])
    return built["network"][0], model, lambda: build()[1]


def _cut(cfg, network, rngs, dataset=None):
    if isinstance(cfg["split_points"], str):
        num_stages = positive_int(cfg["stages"], "stages")
        # measured at one microbatch: what a stage holds per device (abstract shapes, nothing runs)
        x, y = dataset.example_batch(1)
        batch = max(1, cfg["batch_size"] // max(1, int(cfg["schedule"]["microbatches"] or 1)))
        example = tuple(jax.ShapeDtypeStruct((batch, *np.shape(a)[1:]), np.asarray(a).dtype) for a in (x, y))
        model = stage_network(network, num_stages=num_stages, split_points=cfg["split_points"], example=example,
                              rngs=rngs)
        cfg["stages"] = len(model)
        return model
    points = int_list(cfg["split_points"], "split_points")
    if points is None:
        num_stages = positive_int(cfg["stages"], "stages")
        model = stage_network(network, num_stages=num_stages, rngs=rngs)
    else:
        if cfg["stages"] is not None and cfg["stages"] != len(points) + 1:
            raise ConfigError(f"split_points {points} make {len(points) + 1} stages but stages={cfg['stages']}; "
                              f"set --config.stages={len(points) + 1} or drop one of them")
        model = stage_network(network, split_points=list(points), rngs=rngs)
    cfg["stages"] = len(model)
    return model


def _num_steps(cfg, dataset) -> int:
    batch, count = cfg["batch_size"], dataset.num_train
    if batch > count:
        raise ConfigError(f"batch_size {batch} is larger than the {count} training examples; "
                          f"use --config.batch_size={count} or less")
    if cfg["num_steps"] is None:
        cfg["num_steps"] = cfg["num_epochs"] * steps_per_epoch(count, batch)
    return cfg["num_steps"]


def _layout(cfg, num_stages):
    spec = cfg["layout"]
    data = positive_int(spec["data"], "layout.data")
    if spec["executor"] == "reference":
        if data != 1 or spec["stages"] not in (None, 1, num_stages):
            raise ConfigError("the reference executor runs on one device; set --config.layout.executor=mpmd "
                              "to spread stages or data over devices")
        return None
    stages = num_stages if spec["stages"] is None else positive_int(spec["stages"], "layout.stages")
    if stages != num_stages:
        raise ConfigError(f"layout.stages={stages} but the model has {num_stages} stages; make them equal")
    spec["stages"] = stages
    return Layout(stages=stages, data=data, executor=spec["executor"])


def _dry_run_checks(trainer, dataset, batch_size) -> None:
    """Run the trainer's own batch and shape checks on one batch, before anything is compiled or written."""
    xs, ys = trainer.split_batch(*dataset.example_batch(batch_size))
    trainer.check_shapes(xs[0], ys[0])


def stage_layers(model) -> list:
    """``(first, last)`` layer index (both included, counted over the whole model) of each stage of a
    ``StagedModel``, from each stage's ``num_layers``."""
    spans, start = [], 0
    for stage in model:
        spans.append((start, start + stage.num_layers - 1))
        start += stage.num_layers
    return spans
