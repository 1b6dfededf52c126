"""Figures of a sweep and of a single training run, each as PNG and SVG, with matplotlib's Agg backend.

Sweep figures take the run records of ``lpjax.research.sweep`` and the best-rate table of
``lpjax.research.analysis.best_runs``; each has one panel per problem, one colour per method and, where runs
of several batch sizes share a panel, one line style per batch size, with every (method, batch size)
in the legend. Every figure has a title naming the run or suite; log axes are labelled at 1-2-5 steps
(or every digit across less than a decade); stages are numbered 0..K-1 from the input side, as
everywhere else in lpjax. SVG text stays text (``svg.fonttype = none``), so labels remain editable
and searchable in a paper's figure.

The sweep figures share their arguments: ``best`` (the entries of ``analysis.best_runs``: one per
problem, method and batch size), ``outdir`` (created if missing), ``name`` (the file name without
its suffix) and ``title`` (the figure's title, e.g. the suite). Each returns the paths it wrote,
``outdir/NAME.png`` and ``outdir/NAME.svg``, overwriting files of those names.
"""

import math
import os
import zlib

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from lpjax.research import analysis  # noqa: E402
from lpjax.training.metrics_log import plottable_records, read_records  # noqa: E402

FORMATS = ("png", "svg")
COLORS = {"backprop": "black", "greedy": "tab:orange", "chunked": "tab:blue", "overlapping": "tab:green"}
LINE_STYLES = ("-", "--", "-.", ":")
STYLE = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 7,
         "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5}


def _color(label):
    if label in COLORS:
        return COLORS[label]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return palette[zlib.crc32(label.encode()) % len(palette)]  # stable across processes, unlike hash()


def _panels(problems, width=5.0, height=4.0):
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(problems), figsize=(width * len(problems), height), squeeze=False)
    return fig, dict(zip(problems, axes[0]))


def _save(fig, outdir, name, title=None) -> list:
    os.makedirs(outdir, exist_ok=True)
    paths = []
    with plt.rc_context(STYLE):
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        for fmt in FORMATS:
            path = os.path.join(outdir, f"{name}.{fmt}")
            fig.savefig(path, dpi=150)
            paths.append(path)
    plt.close(fig)
    return paths


def _readable_log(axis) -> None:
    """Label a log axis so that it carries several readable numbers: powers of ten across many
    decades, 1-2-5 across a few, and evenly spaced round numbers across less than one."""
    limits = axis.axes.get_xlim() if axis is axis.axes.xaxis else axis.axes.get_ylim()  # settles autoscaling
    low, high = sorted(abs(v) for v in limits)
    if not (low > 0 and math.isfinite(high)):
        return
    decades = math.log10(high / low)
    if decades < 1.0:
        axis.set_major_locator(ticker.MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    else:
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0,) if decades > 5 else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(_short_number))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(float(d) for d in range(1, 10))))
    axis.set_minor_formatter(ticker.NullFormatter())


def _short_number(value, _position=None) -> str:
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"fontsize": 7, "framealpha": 0.8, **kwargs})


def _problems(entries):
    return sorted({e["problem"] for e in entries})


# -- sweep figures --------------------------------------------------------------------------------------
def pareto_figure(best, outdir, name="pareto", title=None) -> list:
    """The paper's headline figure: ideal time to target against compute to target, one point per
    (method, batch size) at its best rate, labelled with the batch size; the lines join each
    method's lower-left frontier. Arguments and return value: the module docstring. Runs that did
    not reach the target are left out."""
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
                  f"{problem}: time vs compute to target\n(labels: batch size; lines: frontiers)")
    return _save(fig, outdir, name, title)


def loss_curves_figure(runs, best, outdir, x="compute", name=None, window=analysis.DEFAULT_WINDOW,
                       title=None) -> list:
    """Training loss (last head, smoothed as in the analysis) for each method's best-rate run at every
    batch size: colour = method, line style = batch size, and each (method, batch size) in the legend.

    Args:
      runs: the sweep's run records (``results.jsonl``), which hold the curves ``best`` points at.
      x: the horizontal axis, a curve of the records: "compute", "ideal_time", "wall_time" or "steps".
      name: default ``loss_vs_X``.
      window: the running-mean width the loss is smoothed with.
      best, outdir, title: as in the module docstring.

    Returns:
      The paths written.
    """
    names = {"compute": "compute [FLOPs]", "ideal_time": "ideal time [FLOPs on the critical path]",
             "wall_time": "wall time [s]", "steps": "steps"}
    by_id = {r["run_id"]: r for r in runs}
    problems = _problems(best)
    fig, panels = _panels(problems, width=7.0)
    for problem, ax in panels.items():
        chosen = [e for e in best if e["problem"] == problem and e["run_id"] in by_id]
        batches = sorted({e["batch_size"] for e in chosen})
        for e in sorted(chosen, key=lambda e: (e["label"], e["batch_size"])):
            run = by_id[e["run_id"]]
            style = LINE_STYLES[batches.index(e["batch_size"]) % len(LINE_STYLES)]
            ax.plot(run[x], analysis.smooth(run["loss"], window), style, color=_color(e["label"]), linewidth=1.2,
                    label=f"{e['label']}, batch {e['batch_size']}")
        targets = {by_id[e["run_id"]].get("target_loss") for e in chosen} - {None}
        for target in targets:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        if ax.has_data():
            ax.set_xscale("log")
            ax.set_yscale("log")
            _readable_log(ax.xaxis)
            _readable_log(ax.yaxis)
        ax.set_xlabel(names.get(x, x))
        ax.set_ylabel("training loss (last head)")
        ax.set_title(f"{problem}: loss vs {x.replace('_', ' ')} (grey dashes: target)")
        # outside the axes: with many (method, batch size) runs an inside legend hides curves
        _legend(ax, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _save(fig, outdir, name or f"loss_vs_{x}", title)


def steps_to_target_figure(best, outdir, name="steps_vs_batch", title=None) -> list:
    """Steps to target against batch size per method; the dotted line is perfect scaling (steps ∝ 1/B)
    from the smallest batch, so the critical batch size is where the curves leave it. Arguments and
    return value: the module docstring."""
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
            ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(ticks)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(_short_number))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
    return _save(fig, outdir, name, title)


def alignment_figure(rows, outdir, name="alignment", title=None) -> list:
    """Cosine between each stage's local gradient and the true gradient, by stage (0 = the input
    side, K-1 = the output stage), per method and batch size.

    Args:
      rows: dicts with ``problem``, ``label``, ``alignment`` (one value or None per stage) and
        optionally ``batch_size``; rows without alignment are left out.
      outdir, name, title: as in the module docstring.

    Returns:
      The paths written (a figure saying "no alignment measured" when no row has any).
    """
    rows = [r for r in rows if r.get("alignment")]
    problems = _problems(rows) or ["(no alignment measured)"]
    fig, panels = _panels(problems)
    for problem, ax in panels.items():
        for row in (r for r in rows if r["problem"] == problem):
            values = [np.nan if v is None else v for v in row["alignment"]]
            stages = f"{len(values)} stage{'s' if len(values) != 1 else ''}"
            batch = f", batch {row['batch_size']}" if row.get("batch_size") is not None else ""
            ax.plot(range(len(values)), values, "-o", color=_color(row["label"]),
                    label=f"{row['label']} ({stages}){batch}", markersize=4)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("stage k (0 = input side)")
        ax.set_ylabel("cosine(local gradient, true gradient)")
        ax.set_title(f"{problem}: gradient alignment at end of training")
        _legend(ax)
    return _save(fig, outdir, name, title)


def _log_axes(ax, xlabel, ylabel, title):
    if ax.has_data():
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no run reached the target", ha="center", va="center", transform=ax.transAxes)
    if ax.has_data():
        _readable_log(ax.xaxis)
        _readable_log(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax)


# -- one training run -------------------------------------------------------------------------------------
def plot_run(workdir: str) -> list:
    """Learning curves of one training run: per-stage loss and accuracy, train (solid) and test
    (circles); a third panel with gradient alignment when the run logged it.

    Args:
      workdir: a training run's directory, holding ``metrics.jsonl``.

    Returns:
      The paths of ``workdir/curves.png`` and ``curves.svg``. Records it cannot draw are skipped; no
      metrics file, no drawable record or an unwritable workdir is a ConfigError of one line.
    """
    from lpjax.errors import ConfigError

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"no metrics.jsonl in {workdir!r}; pass the --workdir of a training run")
    out = os.path.join(workdir, "curves.png")
    if not os.access(workdir, os.W_OK | os.X_OK) or (os.path.lexists(out) and not os.path.isfile(out)):
        raise ConfigError(f"cannot write {out}: the workdir is read-only for this user or curves.png is not a file; "
                          f"fix its permissions, or copy the run somewhere writable and plot that")
    try:
        records = plottable_records(read_records(path))
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}; fix its permissions") from None
    train = [r for r in records if r.get("split") == "train"]
    test = [r for r in records if r.get("split") == "test"]
    probes = [r for r in records if r.get("split") == "alignment"]
    if not train and not test:
        raise ConfigError(f"{path} holds no train or test records; train first with lpjax train")
    num_stages = max(len(r.get("loss", [])) for r in train + test)
    panels = 3 if probes else 2
    with plt.rc_context(STYLE):
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
        if metric == "loss" and ax.has_data():
            ax.set_yscale("log")
            _readable_log(ax.yaxis)
        ax.set_title(f"{metric} per stage's head (lines: train, dots: test)")
        _legend(ax)
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
        _legend(ax)
    try:
        return _save(fig, workdir, "curves", _run_title(workdir))
    except OSError as err:
        plt.close(fig)
        raise ConfigError(f"cannot write {out}: {err.strerror}; free some space or fix its permissions, "
                          f"then plot again") from None


def _run_title(workdir: str) -> str:
    """``DIR: model on dataset, method, K stages, batch B`` from the run's config.json (just DIR without one)."""
    import json

    name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    try:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        return (f"{name}: {cfg['model']['name']} on {cfg['dataset']['name']}, {cfg['method']['name']}, "
                f"{cfg['stages']} stage{'s' if cfg['stages'] != 1 else ''}, batch {cfg['batch_size']}")
    except (OSError, ValueError, KeyError, TypeError):
        return name
