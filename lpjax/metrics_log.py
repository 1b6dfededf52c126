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


def mean_per_stage(step_metrics, num_stages: int, names=METRIC_NAMES) -> list:
    """Per stage, the mean of each metric over the steps in ``step_metrics``; None where none ran.

    ``step_metrics`` is a list of ``Trainer.step`` results (a list per step, one entry per stage, each a
    dict of device scalars or None).
    """
    host = jax.device_get(step_metrics)
    means = []
    for k in range(num_stages):
        entries = [step[k] for step in host if step is not None and step[k] is not None]
        means.append({name: float(np.mean([e[name] for e in entries])) for name in names}
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
    """Appends one JSON object per line to ``path`` and mirrors every number into TensorBoard event
    files under ``tensorboard_dir`` (tensorboardX: no TensorFlow needed), flushing each record.

    A fresh run replaces an old file. A resumed run (``resume_step``) keeps the records up to that
    step and drops the rest, which the killed run wrote after its last checkpoint and the resumed run
    is about to write again; TensorBoard is told to purge them too.
    """

    def __init__(self, path: str, tensorboard_dir: str | None = None, resume_step: int = 0):
        self.path = path
        kept = _records_up_to(path, resume_step) if resume_step else []
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        self._file = open(path, "a", encoding="utf-8")
        self._board = None
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter  # imported here: only training runs need it

            self._board = SummaryWriter(tensorboard_dir, purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, time_s: float, split: str, stages: list, **extra) -> None:
        """``stages``: one dict of metrics per stage (or None); ``extra``: further whole-run numbers."""
        record = {"step": step, "time": round(time_s, 3), "split": split}
        names = list(dict.fromkeys(name for s in stages if s is not None for name in s))
        for name in names:
            record[name] = [None if s is None else s.get(name) for s in stages]
        record.update(extra)
        record = finite_or_none(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._board is not None:
            for name in names:
                for k, value in enumerate(record[name]):
                    if value is not None:
                        self._board.add_scalar(f"{split}/{name}/stage{k}", value, step)
            for name, value in extra.items():
                if isinstance(value, (int, float)) and value is not None:
                    self._board.add_scalar(f"{split}/{name}", value, step)
            self._board.flush()

    def write_config(self, config: dict) -> None:
        """The resolved config into TensorBoard: as JSON text, and its scalar values as hparams
        (compared across runs in TensorBoard's HParams tab against the final test figures)."""
        if self._board is None:
            return
        from tensorboardX.summary import hparams

        self._board.add_text("config", "```json\n" + json.dumps(finite_or_none(config), indent=2, default=str)
                             + "\n```", 0)
        flat = {key: value for key, value in _flatten(config).items()
                if isinstance(value, (bool, int, float, str)) and value is not None}
        experiment, session_start, session_end = hparams(flat, {"final/test_loss": None, "final/test_accuracy": None})
        for summary in (experiment, session_start, session_end):
            self._board.file_writer.add_summary(summary)
        self._board.flush()

    def write_final(self, step: int, test: list) -> None:
        """The last head's test figures under the names ``write_config`` declared as hparam metrics."""
        if self._board is None or not test:
            return
        for name in ("loss", "accuracy"):
            value = finite_or_none(test[-1].get(name))
            if value is not None:
                self._board.add_scalar(f"final/test_{name}", value, step)
        self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = str(list(value))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _records_up_to(path: str, step: int) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by the kill: nothing after it is trustworthy
    return kept


def read_records(path: str) -> list:
    """Every complete JSON line of ``path``, in order ([] if there is no file); a line cut short by
    a killed run is left out."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(finite_or_none(obj), f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)  # a reader never sees half a file
