"""Time-to-target, compute-to-target and Pareto frontiers from per-step training curves (pure functions).

A *run* is a dict as the sweep writes it (lpjax/research/sweep.py): ``problem``, ``label`` (the method, with its
stage count when a sweep varies it), ``batch_size``, ``learning_rate`` and equally long per-step lists
``steps``, ``loss`` (training loss of the last head), ``compute``, ``ideal_time`` and ``wall_time``.

Smoothing: a step's training loss is the loss of one minibatch, so it is noisy, and the first step
whose raw loss dips under the target is mostly luck. Before thresholding, the curve is replaced by
a centred running mean over ``window`` steps (shrinking at the ends), an estimate of the expected
loss at that step. Centred rather than trailing, so that the mean does not lag the curve and add
``window / 2`` steps to every run. A step whose loss is missing or not finite makes every mean that
covers it NaN, so a run that diverged never counts as having reached the target there.
"""

import math
from collections import defaultdict

import numpy as np

DEFAULT_WINDOW = 9
BASELINE = "backprop"


def smooth(values, window: int = DEFAULT_WINDOW) -> np.ndarray:
    """Centred running mean over ``window`` steps (an odd window is symmetric); NaN for a missing value."""
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    v[~np.isfinite(v)] = np.nan
    if window <= 1 or len(v) == 0:
        return v
    before, after = (window - 1) // 2, window // 2
    out = np.empty_like(v)
    for i in range(len(v)):
        out[i] = np.mean(v[max(0, i - before):i + after + 1])  # NaN inside stays NaN
    return out


def first_below(values, target: float, window: int = DEFAULT_WINDOW):
    """Index of the first step whose smoothed loss is at or below ``target``; None if none is."""
    hits = np.flatnonzero(smooth(values, window) <= target)
    return int(hits[0]) if hits.size else None


def at_target(run: dict, target: float, window: int = DEFAULT_WINDOW):
    """``{steps, ideal_time, compute, wall_time}`` when ``run`` first reaches ``target``; None if never."""
    i = first_below(run["loss"], target, window)
    if i is None:
        return None
    return {"steps": run["steps"][i], "ideal_time": run["ideal_time"][i], "compute": run["compute"][i],
            "wall_time": run["wall_time"][i]}


def final_loss(run: dict, window: int = DEFAULT_WINDOW) -> float:
    smoothed = smooth(run["loss"], window)
    return float(smoothed[-1]) if len(smoothed) else math.nan


def best_runs(runs, target: float, window: int = DEFAULT_WINDOW) -> list:
    """The best learning rate per (problem, label, batch size): fewest steps to ``target`` (the same
    choice by ideal time or compute, which are fixed multiples of the step count for a given method
    and batch size); ties, and groups where no rate reached the target, go to the lowest final loss.

    Returns dicts with ``problem, label, method, batch_size, learning_rate, run_id, reached`` and the
    ``at_target`` figures (None where not reached), sorted by problem, label and batch size.
    """
    groups = defaultdict(list)
    for run in runs:
        groups[(run["problem"], run["label"], run["batch_size"])].append(run)
    best = []
    for (problem, label, batch), group in sorted(groups.items(), key=lambda kv: _group_order(kv[0])):
        scored = [(at_target(run, target, window), final_loss(run, window), run) for run in group]
        reached = [s for s in scored if s[0] is not None]
        if reached:
            hit, loss, run = min(reached, key=lambda s: (s[0]["steps"], _nan_last(s[1])))
        else:
            hit, loss, run = min(scored, key=lambda s: _nan_last(s[1]))
        best.append({
            "problem": problem, "label": label, "method": run.get("method", label), "batch_size": batch,
            "learning_rate": run["learning_rate"], "run_id": run.get("run_id"), "reached": hit is not None,
            "final_loss": loss, "steps": None, "ideal_time": None, "compute": None, "wall_time": None,
            **(hit or {}),
        })
    return best


def _group_order(key):
    problem, label, batch = key
    return problem, label != BASELINE, label, batch


def _nan_last(x):
    return math.inf if x is None or not math.isfinite(x) else x


def pareto_frontier(points) -> list:
    """Indices of the lower-left Pareto frontier of ``(x, y)`` points (no other point is at least as
    good in both and better in one), ordered by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    frontier, lowest = [], math.inf
    for i in order:
        if points[i][1] < lowest:
            frontier.append(i)
            lowest = points[i][1]
    return frontier


def frontiers(best) -> dict:
    """Per ``(problem, label)``: the best-rate entries on the (ideal time, compute) frontier."""
    by_method = defaultdict(list)
    for entry in best:
        if entry["reached"]:
            by_method[(entry["problem"], entry["label"])].append(entry)
    out = {}
    for key, entries in by_method.items():
        idx = pareto_frontier([(e["ideal_time"], e["compute"]) for e in entries])
        out[key] = [entries[i] for i in idx]
    return out


def steps_vs_batch(best) -> dict:
    """Per ``(problem, label)``: ``[(batch size, steps to target or None)]`` by batch size."""
    out = defaultdict(list)
    for entry in best:
        out[(entry["problem"], entry["label"])].append((entry["batch_size"], entry["steps"]))
    return {key: sorted(pairs) for key, pairs in out.items()}


def critical_batch_size(pairs):
    """``E_min / S_min`` (McCandlish et al. 2018): the fewest examples to target over the fewest steps,
    from ``[(batch, steps)]``; below it a larger batch saves steps almost for free, above it mostly
    costs examples. None with fewer than two batch sizes that reached the target."""
    done = [(b, s) for b, s in pairs if s is not None]
    if len(done) < 2:
        return None
    return min(b * s for b, s in done) / min(s for _, s in done)


def headline(best, baseline: str = BASELINE) -> dict:
    """Per problem, at the largest batch size that the sweep ran: the baseline's and the best local
    method's (least ideal time to target) figures, and the local / baseline ratios of ideal time,
    compute and wall time. A ratio is None when either side did not reach the target."""
    out = {}
    for problem in sorted({e["problem"] for e in best}):
        entries = [e for e in best if e["problem"] == problem]
        largest = max(e["batch_size"] for e in entries)
        at_largest = [e for e in entries if e["batch_size"] == largest]
        base = next((e for e in at_largest if e["label"] == baseline), None)
        local = [e for e in at_largest if e["label"] != baseline and e["reached"]]
        winner = min(local, key=lambda e: e["ideal_time"]) if local else None
        row = {"batch_size": largest, "baseline": base, "best_local": winner}
        for name in ("ideal_time", "compute", "wall_time", "steps"):
            ok = base is not None and base["reached"] and winner is not None
            row[f"{name}_ratio"] = winner[name] / base[name] if ok and base[name] else None
        out[problem] = row
    return out


def paired_bootstrap(base: dict, other: dict, *, resamples: int = 10000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean over seeds of ``base[s] - other[s]`` and its percentile bootstrap interval: the seeds that
    both have (``{seed: value}``) are resampled with replacement, ``resamples`` times. Pairing by seed
    takes out what the two runs of a seed share (data order, initial body). With one common seed the
    interval is that one difference; with none, every figure is None.

    Returns ``{"mean", "low", "high", "n", "level"}``."""
    seeds = sorted(s for s in base if s in other and _finite(base[s]) and _finite(other[s]))
    if not seeds:
        return {"mean": None, "low": None, "high": None, "n": 0, "level": level}
    diffs = np.array([base[s] - other[s] for s in seeds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(diffs.mean()), "low": float(low), "high": float(high), "n": len(seeds), "level": level}


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
