"""Figures of a sweep (PNG + SVG) and of a single training run (PNG), with matplotlib's Agg backend.

Sweep figures take the run records of ``lpjax.sweep`` and the best-rate table of
``lpjax.analysis.best_runs``; each has one panel per problem and one colour per method.
"""

import os
import zlib

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from . import analysis  # noqa: E402
from .metrics_log import read_records  # noqa: E402

FORMATS = ("png", "svg")
COLORS = {"backprop": "black", "greedy": "tab:orange", "chunked": "tab:blue", "overlapping": "tab:green"}


def _color(label):
    if label in COLORS:
        return COLORS[label]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return palette[zlib.crc32(label.encode()) % len(palette)]  # stable across processes, unlike hash()


def _panels(problems, width=5.0, height=4.0):
    fig, axes = plt.subplots(1, len(problems), figsize=(width * len(problems), height), squeeze=False)
    return fig, dict(zip(problems, axes[0]))


def _save(fig, outdir, name) -> list:
    os.makedirs(outdir, exist_ok=True)
    paths = []
    fig.tight_layout()
    for fmt in FORMATS:
        path = os.path.join(outdir, f"{name}.{fmt}")
        fig.savefig(path, dpi=120)
        paths.append(path)
    plt.close(fig)
    return paths


def _problems(entries):
    return sorted({e["problem"] for e in entries})


# -- sweep figures --------------------------------------------------------------------------------------
def pareto_figure(best, outdir, name="pareto") -> list:
    """The paper's headline figure: ideal time to target against compute to target, one point per
    (method, batch size) at its best rate, labelled with the batch size; the lines join each
    method's lower-left frontier."""
    problems = _problems(best)
    fig, panels = _panels(problems)
    fronts = analysis.frontiers(best)
    for problem, ax in panels.items():
        entries = [e for e in best if e["problem"] == problem and e["reached"]]
        for label in dict.fromkeys(e["label"] for e in best if e["problem"] == problem):
            mine = [e for e in entries if e["label"] == label]
            if not mine:
                continue
            color = _color(label)
            ax.scatter([e["ideal_time"] for e in mine], [e["compute"] for e in mine], color=color, s=18, alpha=0.6)
            for e in mine:
                ax.annotate(str(e["batch_size"]), (e["ideal_time"], e["compute"]), fontsize=7, color=color,
                            xytext=(3, 3), textcoords="offset points")
            front = fronts.get((problem, label), [])
            ax.plot([e["ideal_time"] for e in front], [e["compute"] for e in front], "-o", color=color,
                    label=label, markersize=4)
        _log_axes(ax, "ideal time to target [FLOPs on the critical path]", "compute to target [FLOPs]",
                  f"{problem}: time vs compute to target")
    return _save(fig, outdir, name)


def loss_curves_figure(runs, best, outdir, x="compute", name=None, window=analysis.DEFAULT_WINDOW) -> list:
    """Training loss (last head, smoothed as in the analysis) against ``x`` (compute, ideal_time or
    wall_time) for each method's best-rate run at every batch size; darker lines are larger batches."""
    names = {"compute": "compute [FLOPs]", "ideal_time": "ideal time [FLOPs on the critical path]",
             "wall_time": "wall time [s]", "steps": "steps"}
    by_id = {r["run_id"]: r for r in runs}
    problems = _problems(best)
    fig, panels = _panels(problems)
    for problem, ax in panels.items():
        chosen = [e for e in best if e["problem"] == problem and e["run_id"] in by_id]
        batches = sorted({e["batch_size"] for e in chosen})
        for e in chosen:
            run = by_id[e["run_id"]]
            shade = 0.35 + 0.65 * (batches.index(e["batch_size"]) + 1) / len(batches)
            first = e["batch_size"] == batches[-1]
            ax.plot(run[x], analysis.smooth(run["loss"], window), color=_color(e["label"]), alpha=shade, linewidth=1.2,
                    label=e["label"] if first else None)
        targets = {by_id[e["run_id"]].get("target_loss") for e in chosen} - {None}
        for target in targets:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        if ax.has_data():
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(names.get(x, x))
        ax.set_ylabel("training loss (last head)")
        ax.set_title(f"{problem}: loss vs {x.replace('_', ' ')} (dashed: target)")
        ax.legend(fontsize=8)
    return _save(fig, outdir, name or f"loss_vs_{x}")


def steps_to_target_figure(best, outdir, name="steps_vs_batch") -> list:
    """Steps to target against batch size per method; the dotted line is perfect scaling (steps ∝ 1/B)
    from the smallest batch, so the critical batch size is where the curves leave it."""
    problems = _problems(best)
    fig, panels = _panels(problems)
    curves = analysis.steps_vs_batch(best)
    for problem, ax in panels.items():
        ticks = set()
        for (p, label), pairs in curves.items():
            if p != problem:
                continue
            done = [(b, s) for b, s in pairs if s is not None]
            if not done:
                continue
            b, s = zip(*done)
            ax.plot(b, s, "-o", color=_color(label), label=label, markersize=4)
            ticks.update(b)
            if label == analysis.BASELINE:
                ax.plot(b, [s[0] * b[0] / bb for bb in b], ":", color=_color(label), linewidth=0.8,
                        label="perfect scaling")
        _log_axes(ax, "batch size", "steps to target", f"{problem}: steps to target vs batch size")
        if ticks:  # batch sizes as plain numbers, not powers of ten
            ax.set_xticks(sorted(ticks))
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    return _save(fig, outdir, name)


def alignment_figure(rows, outdir, name="alignment") -> list:
    """Cosine between each stage's local gradient and the true gradient, by stage, per method.

    ``rows``: dicts with ``problem``, ``label`` and ``alignment`` (one value or None per stage)."""
    rows = [r for r in rows if r.get("alignment")]
    problems = _problems(rows) or ["(no alignment measured)"]
    fig, panels = _panels(problems)
    for problem, ax in panels.items():
        for row in (r for r in rows if r["problem"] == problem):
            values = [np.nan if v is None else v for v in row["alignment"]]
            # counted from the output stage, so that methods cut into different numbers of stages line up
            ax.plot(range(1 - len(values), 1), values, "-o", color=_color(row["label"]), label=row["label"],
                    markersize=4)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("stage, counted from the output stage (0)")
        ax.set_ylabel("cosine(local gradient, true gradient)")
        ax.set_title(f"{problem}: gradient alignment at end of training")
        if rows:
            ax.legend(fontsize=8)
    return _save(fig, outdir, name)


def _log_axes(ax, xlabel, ylabel, title):
    if ax.has_data():
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no run reached the target", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


# -- one training run -------------------------------------------------------------------------------------
def plot_run(workdir: str) -> list:
    """Learning curves of one training run from ``workdir/metrics.jsonl``: per-stage loss and accuracy,
    train (solid) and test (circles); a third panel with gradient alignment when the run logged it.
    Writes ``workdir/curves.png`` and returns its path in a list."""
    from .errors import ConfigError

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"no metrics.jsonl in {workdir!r}; pass the --workdir of a training run")
    records = read_records(path)
    train = [r for r in records if r.get("split") == "train"]
    test = [r for r in records if r.get("split") == "test"]
    probes = [r for r in records if r.get("split") == "alignment"]
    if not train and not test:
        raise ConfigError(f"{path} holds no train or test records; train first with lpjax train")
    num_stages = max(len(r.get("loss", [])) for r in train + test)
    panels = 3 if probes else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 4.0), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], ("loss", "accuracy")):
        for k in range(num_stages):
            color = palette[k % len(palette)]
            for split, style in ((train, "-"), (test, "o")):
                points = [(r["step"], r[metric][k]) for r in split
                          if k < len(r.get(metric, [])) and r[metric][k] is not None]
                if points:
                    ax.plot(*zip(*points), style, color=color, markersize=4,
                            label=f"stage {k}" if split is train or not train else None)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if metric == "loss":
            ax.set_yscale("log")
        ax.set_title(f"{metric} per stage's head (lines: train, dots: test)", fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if probes:
        ax = axes[0][2]
        for k in range(len(probes[-1]["alignment"])):
            points = [(r["step"], r["alignment"][k]) for r in probes if r["alignment"][k] is not None]
            if points:
                ax.plot(*zip(*points), "-o", color=palette[k % len(palette)], markersize=3, label=f"stage {k}")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("step")
        ax.set_ylabel("cosine(local, true gradient)")
        ax.set_title("gradient alignment")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(workdir, "curves.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]
