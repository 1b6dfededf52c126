"""Metrics as JSON lines, and the per-stage averaging that turns device arrays into numbers.

Training metrics stay on the device between log steps; ``mean_per_stage`` is the one place that
waits for them, so the training loop syncs with the host only every ``log_every`` steps.
"""

import contextlib
import json
import math
import os
import tempfile

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
        self._board = self._file = None
        with self._writing():
            kept = _records_up_to(path, resume_step) if resume_step else []
            replace_file(path, lambda f: f.writelines(kept))
            self._file = open(path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter  # imported here: only training runs need it

            with self._writing("the TensorBoard events", tensorboard_dir):
                self._board = SummaryWriter(tensorboard_dir, purge_step=resume_step + 1 if resume_step else None)

    def _writing(self, what="the metrics log", where=None):
        from lpjax.training.workdir import writing  # a full disk becomes one WriteError line naming this file

        return writing(what, where or self.path, os.path.dirname(os.path.abspath(self.path)))

    def write(self, step: int, time_s: float, split: str, stages: list, **extra) -> None:
        """``stages``: one dict of metrics per stage (or None); ``extra``: further whole-run numbers."""
        with self._writing("the metrics log and TensorBoard events"):
            self._write(step, time_s, split, stages, **extra)

    def _write(self, step, time_s, split, stages, **extra) -> None:
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
        with self._writing("the metrics log and TensorBoard events"):
            if self._file is not None:
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
    """The lines of records up to ``step``, stopping at the first line that is not a whole record:
    a line cut short by a kill, or bytes that are not UTF-8 JSON (a damaged disk block)."""
    if not os.path.exists(path):
        return []
    kept = []
    for line in _lines(path):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not _is_number(record["step"]) or "\ufffd" in line:
                break
            if record["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError):
            break  # nothing after a damaged line is trustworthy
    return kept


def _lines(path: str) -> list:
    """The non-blank lines of ``path`` without their newline; bytes that are not UTF-8 become U+FFFD,
    which no JSON record contains (``json.dumps`` writes ASCII), so such a line never parses as one."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n") for line in f if line.strip() and line.strip("\x00").strip()]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_records(path: str) -> list:
    """Every complete record of ``path``, in order ([] if there is no file): JSON objects only, so a
    line cut short by a killed run, damaged bytes or a stray value are left out."""
    if not os.path.exists(path):
        return []
    records = []
    for line in _lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "\ufffd" not in line:
            records.append(record)
    return records


def plottable_records(records) -> list:
    """The records whose step is a number and whose per-stage metrics are lists of numbers or nulls;
    a record edited by hand or written by another tool (``"loss": null``) is left out, not plotted."""
    def per_stage(value) -> bool:
        return isinstance(value, list) and all(v is None or _is_number(v) for v in value)

    kept = []
    for record in records:
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            continue
        names = ("alignment",) if record.get("split") == "alignment" else METRIC_NAMES
        if all(per_stage(record.get(name)) for name in names):
            kept.append(record)
    return kept


def replace_file(path: str, write) -> None:
    """Write a new ``path`` through ``write(file)`` into a temporary file of a unique name beside it,
    then rename it over ``path``: a reader never sees half a file, and two writers never share a
    temporary file."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # what open() would have given under the usual umask, not mkstemp's 0o600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    def dump(f):
        json.dump(finite_or_none(obj), f, indent=2, default=str)
        f.write("\n")

    replace_file(path, dump)
