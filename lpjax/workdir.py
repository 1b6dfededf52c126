"""What a run keeps in its workdir, and the checks made before anything there is created or changed.

    config.json     the resolved config
    metrics.jsonl   training and evaluation records (lpjax.metrics_log)
    results.json    per-stage figures after training
    tb/             TensorBoard event files
    checkpoints/    orbax checkpoints, one directory per step
    corrupt/        checkpoints that failed to read back, moved aside (never deleted)

A workdir that holds checkpoints is resumed; a config that changes what is being trained is refused
there, because its checkpoints would not fit.
"""

import json
import os

from .errors import ConfigError

CONFIG, METRICS, RESULTS, TENSORBOARD, CHECKPOINTS = "config.json", "metrics.jsonl", "results.json", "tb", "checkpoints"

# Keys that may change between a run and its resumption: how long, how often, on which devices.
RESUMABLE_CHANGES = ("layout", "num_steps", "num_epochs", "log_every", "eval_every", "eval_batch_size",
                     "checkpoint", "nonfinite", "probe", "distributed")


def path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def check_writable(workdir) -> None:
    """Refuse a missing, file-like or unwritable workdir before anything is built or written."""
    if not workdir:
        raise ConfigError("no workdir given; pass the directory that should receive the run's files")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} exists and is not a directory; choose another --workdir")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir!r} is not writable ({existing} does not let this user write); "
                          f"choose another --workdir or fix its permissions")


def create(workdir) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create workdir {workdir!r}: {err.strerror}; choose another --workdir") from None


def has_checkpoints(workdir) -> bool:
    directory = path(workdir, CHECKPOINTS)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_resumable(workdir, cfg: dict) -> None:
    """A workdir with checkpoints may only be resumed by a config that trains the same thing."""
    if not has_checkpoints(workdir):
        return
    try:
        with open(path(workdir, CONFIG), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise ConfigError(f"workdir {workdir!r} has checkpoints but no readable {CONFIG}; "
                          f"choose a new --workdir") from None
    for key in sorted(set(saved) | set(cfg)):
        if key in RESUMABLE_CHANGES:
            continue
        if _comparable(saved.get(key)) != _comparable(cfg.get(key)):
            raise ConfigError(f"workdir {workdir!r} holds a run with a different {key} ({saved.get(key)!r}, "
                              f"now {cfg.get(key)!r}); resume with the same config or choose a new --workdir")


def _comparable(value):
    """JSON's view of a value (tuples become lists), so a saved and a live config compare equal."""
    return json.loads(json.dumps(value, default=str))
