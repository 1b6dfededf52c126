"""The human-readable parts of a run: a summary and per-stage parameter counts before training, the
per-stage table after, and the software and hardware a run records in results.json."""

import functools
import os
import subprocess
import sys
from importlib import metadata

import jax
import numpy as np
from flax import nnx


def describe(experiment) -> str:
    cfg, data, trainer = experiment.config, experiment.dataset, experiment.trainer
    layout = cfg["layout"]
    where = ("reference executor, one device" if layout["executor"] == "reference"
             else f"{layout['executor']} executor on {layout['stages']}x{layout['data']} devices")
    return (f"{experiment.network.name} ({len(experiment.network.layers)} layers) on {data.name} "
            f"({data.num_train} train / {data.num_test} test) | {trainer.method.describe()}, {trainer.num_stages} stages, "
            f"{cfg['schedule']['name']} schedule x{trainer.microbatches} microbatches, {where} | "
            f"{experiment.num_steps} steps of batch {cfg['batch_size']}"
            + (f" | {experiment.split.describe()}" if getattr(experiment, "split", None) is not None else ""))


def describe_fit(trainer, data, cfg, name) -> str:
    """The run header of ``lpjax.fit``, in the words of ``describe``."""
    layout = trainer.layout
    where = ("reference executor, one device" if layout is None
             else f"{layout.executor} executor on {layout.stages}x{layout.data} devices")
    return (f"{name} on {data.name} ({data.num_train} train / {getattr(data, 'num_test', '?')} test) | "
            f"{trainer.method.describe()}, {trainer.num_stages} stages, {cfg['schedule']['name']} schedule "
            f"x{trainer.microbatches} microbatches, {where} | {cfg['num_steps']} steps of batch {cfg['batch_size']}")


def parameter_counts(model) -> list:
    """Per stage of a ``StagedModel``: ``{"body": n, "head": n}``, the number of trainable parameters."""
    def count(module):
        return int(sum(np.size(leaf) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))))

    return [{"body": count(stage.body), "head": count(stage.head)} for stage in model]


def _short(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def parameter_table(model) -> str:
    """One line: trainable parameters of each stage's body and head, and the total."""
    counts = parameter_counts(model)
    parts = [f"{k}: {_short(c['body'])} + {_short(c['head'])}" for k, c in enumerate(counts)]
    total = sum(c["body"] + c["head"] for c in counts)
    return f"parameters per stage (body + head): {' | '.join(parts)} | total {_short(total)} ({total:,})"


def environment() -> dict:
    """What produced a run: package versions, the devices, and lpjax's git commit when it runs from a
    checkout (None when installed from a wheel)."""
    versions = {"python": sys.version.split()[0]}
    for package in ("lpjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": {"count": len(devices), "kind": devices[0].device_kind if devices else None,
                    "processes": jax.process_count()},
        "git_commit": _git_commit(),
    }


@functools.lru_cache(maxsize=1)
def _git_commit():
    """``HEAD`` of the checkout lpjax was imported from, with ``+dirty`` when it has local changes."""
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", source, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        lines = head.stdout.split()
        # an installed copy inside some other checkout (a venv in a repo) is not that repo's HEAD
        if head.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(source):
            return None
        dirty = subprocess.run(["git", "-C", source, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return lines[1] + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _layers(span) -> str:
    first, last = span
    return str(first) if first == last else f"{first}-{last}"


def _number(value, fmt) -> str:
    return "-" if value is None else format(value, fmt)


def stage_table(stages: list) -> str:
    """``stages``: the per-stage dicts of results.json."""
    header = f"{'stage':>5}  {'layers':>6}  {'train loss':>10}  {'test loss':>9}  {'test acc':>8}"
    lines = [header, "-" * len(header)]
    for row in stages:
        acc = None if row["test_accuracy"] is None else 100 * row["test_accuracy"]
        mark = "" if row["head_trained"] else "  (head not trained by this method)"
        lines.append(f"{row['stage']:>5}  {_layers(row['layers']):>6}  {_number(row['train_loss'], '.4f'):>10}  "
                     f"{_number(row['test_loss'], '.4f'):>9}  {_number(acc, '.2f'):>7}%{mark}")
    return "\n".join(lines)
