"""Metrics as JSON lines, and the per-stage averaging that turns device arrays into numbers.

Training metrics stay on the device between log steps; ``mean_per_stage`` is the one place that
waits for them, so the training loop syncs with the host only every ``log_every`` steps.
"""

import json
import math
import os

import jax
import numpy as np

METRIC_NAMES = ("loss", "accuracy")


def mean_per_stage(step_metrics, num_stages: int) -> list:
    """Per stage, the mean of each metric over the steps in ``step_metrics``; None where none ran.

    ``step_metrics`` is a list of ``Trainer.step`` results (a list per step, one entry per stage, each a
    dict of device scalars or None).
    """
    host = jax.device_get(step_metrics)
    means = []
    for k in range(num_stages):
        entries = [step[k] for step in host if step is not None and step[k] is not None]
        means.append({name: float(np.mean([e[name] for e in entries])) for name in METRIC_NAMES}
                     if entries else None)
    return means


def finite_or_none(value):
    """JSON has no NaN; a stage whose head is not trained (backprop) reports NaN and is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per line to ``path`` (replacing a previous run's file) and flushes each."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "w", encoding="utf-8")

    def write(self, step: int, time_s: float, split: str, stages: list) -> None:
        record = {"step": step, "time": round(time_s, 3), "split": split}
        for name in METRIC_NAMES:
            record[name] = [None if s is None else s[name] for s in stages]
        self._file.write(json.dumps(finite_or_none(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(finite_or_none(obj), f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)  # a reader never sees half a file
