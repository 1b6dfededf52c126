"""``lpjax bench``: run a sweep suite, analyse it, write ``report.md`` and the figures.

``run_bench("small", workdir)`` runs ``recipes/sweeps/small.py`` (any file name in recipes/sweeps/
works as a suite name); any other suite is the path of a sweep recipe (lpjax/research/sweep.py describes the
format). The sweep resumes: runs already in ``workdir/results.jsonl`` are not trained again.

Written to ``workdir``: ``results.jsonl`` (every run's per-step curve), ``runs/RUN_ID/`` (each run's
training files), ``summary.json`` (best rates, headline ratios, alignment), ``report.md`` and
``plots/*.png|svg``.
"""

import datetime
import json
import os
import resource
import time

import jax

from lpjax.research import analysis, paper, plots

from lpjax.config import catalog
from lpjax.research.costs import format_flops
from lpjax.errors import ConfigError
from lpjax.training.metrics_log import read_records, write_json
from lpjax.research.sweep import RESULTS, check_sweep, compilation_cache, load_config_file, plan_runs, run_sweep



def builtin_suites() -> list:
    """The suites that ship in the package (lpjax.recipes.sweeps, the checkout's recipes/sweeps/)."""
    return catalog.suite_names()


def suite_path(suite: str) -> str:
    """The sweep file of a suite: a shipped suite's name, or the path of a sweep file. Raises
    ConfigError for an unknown name or a missing file, naming the choices."""
    if not isinstance(suite, str) or not suite:
        raise ConfigError(f"suite must be a name ({', '.join(builtin_suites()) or 'small'}) or a sweep recipe path, "
                          f"got {suite!r}")
    if suite in builtin_suites():
        return os.path.join(catalog.sweeps_dir(), f"{suite}.py")
    if suite.endswith(".py") or os.sep in suite:
        if not os.path.isfile(suite):
            raise ConfigError(f"sweep recipe {suite!r} does not exist; give a path to a .py file with get_config()")
        return suite
    raise ConfigError(f"unknown suite {suite!r}; use one of {', '.join(builtin_suites()) or 'small'} "
                      f"or the path of a sweep recipe (.py)")


def run_bench(suite: str, workdir: str, *, verbose: bool = True, train: bool = True) -> dict:
    """Run (or resume) a suite's sweep, then write its analysis, report and plots.

    Args:
      suite: a shipped suite's name (``small``, ``paper``, ...) or the path of a sweep file.
      workdir: the directory for ``results.jsonl``, ``runs/``, ``summary.json``, ``report.md`` and
        ``plots/``; created if missing. A run already in ``results.jsonl`` is not trained again.
      verbose: print progress lines.
      train: False trains nothing: the report covers the runs already in ``results.jsonl`` and lists
        the planned runs that are missing (an interrupted sweep's interim report).

    Returns:
      The summary written to ``summary.json`` (best runs, headline ratios, alignment, critical batch
      sizes, missing runs, findings and memory when the suite has them, times and load averages),
      plus ``report`` (the report's path) and ``plots`` (the figures' paths). Every sweep and recipe
      is checked before anything is trained: a problem is a ConfigError of one line.
    """
    started, cpu_started, load_started = time.perf_counter(), _cpu_seconds(), _load()
    if not workdir:
        raise ConfigError("no workdir given; pass the directory that should receive the bench results")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} exists and is not a directory; choose another --workdir")
    path = suite_path(suite)
    sweep = check_sweep(load_config_file(path))
    specs = plan_runs(sweep, path)  # loads every recipe before anything is trained, so a bad one fails fast
    if verbose:
        print(f"bench {suite}: started {_now()}, load average {_load_text(load_started)}", flush=True)
    if train:
        records = run_sweep(sweep, workdir, sweep_path=path, verbose=verbose)
    else:
        done = {r["run_id"]: r for r in read_records(os.path.join(workdir, RESULTS))}
        records = [done[s.run_id] for s in specs if s.run_id in done]
    missing = [s.run_id for s in specs if s.run_id not in {r["run_id"] for r in records}]
    window = sweep["smooth_window"]

    # "final" problems (the paper suite's F3, F4) count only their final figures: no Pareto analysis
    curves = [name for name, p in sweep["problems"].items() if p["measure"] == "time_to_target"]
    all_records, records = records, [r for r in records if r["problem"] in curves]
    best = []
    for problem in curves:
        best += analysis.best_runs([r for r in records if r["problem"] == problem],
                                   sweep["problems"][problem]["target_loss"], window)
    by_id = {r["run_id"]: r for r in records}
    alignment_rows = [{"problem": e["problem"], "label": e["label"], "batch_size": e["batch_size"],
                       "alignment": by_id[e["run_id"]].get("alignment")} for e in best
                      if e["run_id"] in set(_alignment_runs(best))]
    headline = analysis.headline(best)

    plot_dir = os.path.join(workdir, "plots")
    title = f"lpjax bench {suite}"
    figures = []
    if best:  # none when every problem is "final", or an interim report has no curve runs yet
        figures = plots.pareto_figure(best, plot_dir, title=title)
        for x in ("compute", "ideal_time", "wall_time"):
            figures += plots.loss_curves_figure(records, best, plot_dir, x=x, window=window, title=title)
        figures += plots.steps_to_target_figure(best, plot_dir, title=title)
        figures += plots.alignment_figure(alignment_rows, plot_dir, title=title)

    elapsed = time.perf_counter() - started
    summary = {"suite": suite, "sweep_file": os.path.abspath(path), "elapsed_s": round(elapsed, 1),
               "smooth_window": window, "best": best, "headline": headline, "alignment": alignment_rows,
               "critical_batch_size": {f"{p}/{label}": analysis.critical_batch_size(pairs)
                                       for (p, label), pairs in analysis.steps_vs_batch(best).items()},
               "plots": [os.path.relpath(f, workdir) for f in figures]}
    summary["missing_runs"] = missing
    if sweep.get("memory"):
        if verbose:
            print("memory per device: compiling the stage programs (nothing is trained)", flush=True)
        memory_started = time.perf_counter()
        summary["memory"] = _memory(sweep["memory"], workdir)
        summary["memory_s"] = round(time.perf_counter() - memory_started, 1)  # ~0 when memory.json had it
        if verbose:
            print(f"memory per device: {summary['memory_s']:.0f}s", flush=True)
    if sweep.get("findings") or sweep.get("memory"):
        summary["findings"] = paper.findings(summary, all_records, sweep)
    elapsed = time.perf_counter() - started
    summary["elapsed_s"] = round(elapsed, 1)
    # the machine's load beside the times: on a shared machine wall time says little without it
    summary["cpu_s"] = round(_cpu_seconds() - cpu_started, 1)
    summary["load_average"] = {"start": load_started, "end": _load()}
    write_json(os.path.join(workdir, "summary.json"), summary)
    report = os.path.join(workdir, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write(render_report(summary, sweep, all_records))
    if verbose:
        print(f"bench {suite}: {len(all_records)} runs, report in {report} ({elapsed:.0f} s wall, "
              f"{summary['cpu_s']:.0f} s CPU; ended {_now()}, load average {_load_text(summary['load_average']['end'])})",
              flush=True)
    return {"report": report, "plots": figures, **summary}


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _load() -> list | None:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them); None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _load_text(load) -> str:
    return "unknown" if not load else ", ".join(f"{v:.2f}" for v in load)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S UTC")


def _memory(memory: dict, workdir: str) -> list:
    """The memory-per-device rows, kept in ``workdir/memory.json`` for the same ``memory`` section:
    compiled peaks do not change between calls, and compiling them takes minutes."""
    cache = os.path.join(workdir, "memory.json")
    spec = json.loads(json.dumps(memory))
    if os.path.isfile(cache):
        with open(cache, encoding="utf-8") as f:
            kept = json.load(f)
        if kept.get("spec") == spec:
            return [{**row, "local": {int(k): v for k, v in row["local"].items()}} for row in kept["rows"]]
    # identical stage programs (the LM's middle blocks at K = 4 and 8) compile once through the cache
    with compilation_cache(os.path.join(workdir, "jax_cache")):
        rows = paper.memory_table(memory)
    write_json(cache, {"spec": spec, "rows": rows})
    return rows


def _alignment_runs(best) -> list:
    """The best-rate run of every method at its problem's largest batch size: the regime the headline
    ratios describe."""
    largest = {}
    for e in best:
        largest[e["problem"]] = max(largest.get(e["problem"], 0), e["batch_size"])
    return [e["run_id"] for e in best if e["batch_size"] == largest[e["problem"]]]


# -- report ---------------------------------------------------------------------------------------------
def time_lines(records: list, summary: dict) -> list:
    """Wall seconds per problem (each run's compiling, training and evaluating), for budgeting a suite."""
    per_problem = {}
    for r in records:
        if r.get("run_s") is not None:
            n, total, longest = per_problem.get(r["problem"], (0, 0.0, 0.0))
            per_problem[r["problem"]] = (n + 1, total + r["run_s"], max(longest, r["run_s"]))
    if not per_problem:
        return []
    lines = ["## Where the time went", "",
             "Wall seconds of each problem's runs as measured when they were trained (load average "
             f"{_load_text(_loads(summary, 'start'))} when this call started); the rest of a call is the "
             "cost analyses and, once, the memory table.", "",
             "| problem | runs | wall s | longest run s |", "|---|---|---|---|"]
    for problem, (n, total, longest) in per_problem.items():
        lines.append(f"| {problem} | {n} | {total:.0f} | {longest:.0f} |")
    lines.append("")
    return lines


def _loads(summary, when):
    return (summary.get("load_average") or {}).get(when)


def _num(value, fmt=".3g"):
    return "-" if value is None else format(value, fmt)


def _ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def _rates_text(problem: dict) -> str:
    """``1e-3, 3e-3`` for one grid, ``batch 32: 1e-3; batch 2048: 3e-3, 1e-2`` for one per batch size."""
    rates = problem["learning_rates"]
    if isinstance(rates, (list, tuple)) and rates and isinstance(rates[0], (list, tuple)):
        return "; ".join(f"batch {b}: " + ", ".join(f"{lr:g}" for lr in grid)
                         for b, grid in zip(problem["batch_sizes"], rates))
    return ", ".join(f"{lr:g}" for lr in (rates if isinstance(rates, (list, tuple)) else (rates,)))


def render_report(summary: dict, sweep: dict, records: list) -> str:
    """``report.md``'s Markdown, from ``run_bench``'s summary, the checked sweep and every run record."""
    best, window = summary["best"], summary["smooth_window"]
    costs = {}
    for r in records:
        costs.setdefault((r["problem"], r["label"]), (r["stages"], r["cost"]))
    lines = [
        f"# lpjax bench: {summary['suite']}",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}); {len(records)} runs; "
        f"this call took {summary['elapsed_s']:.0f} s of wall time and {summary.get('cpu_s', 0):.0f} s of CPU time "
        f"(runs trained by an earlier call are not counted); load average {_load_text(_loads(summary, 'start'))} "
        f"at the start, {_load_text(_loads(summary, 'end'))} at the end.",
        "",
        "Ideal time: FLOPs on the critical path of one device per step with perfect data parallelism "
        "(backprop: one example through the whole network, forward + backward; local methods: the "
        "slowest stage with its head and any overlapping backward). Compute: steps x batch x FLOPs per "
        "example, every trained head included. The optimizer update is left out of both. Wall time is "
        "measured on this machine, all stages on one device one after another, without the first step's "
        "compilation.",
        f"Reaching the target: the first step whose training loss (last head), averaged over a centred "
        f"window of {window} steps, is at or below the target; for each method and batch size the "
        f"learning rate that gets there in the fewest steps is shown.",
        "",
    ]
    if summary.get("findings"):
        lines += paper.render(summary["findings"], summary.get("memory"))
    for problem, p in sweep["problems"].items():
        if p["measure"] != "time_to_target":
            continue  # reported in the findings section above
        lines += [f"## {problem}", "", f"Recipe `{p['recipe']}`, target training loss {p['target_loss']}, "
                  f"learning rates {_rates_text(p)}.", ""]
        lines += ["| method | stages | FLOPs / example | ideal FLOPs / step | optimizer FLOPs / step "
                  "| peak memory / device |", "|---|---|---|---|---|---|"]
        for (prob, label), (stages, cost) in costs.items():
            if prob == problem:
                peak = cost.get("peak_bytes_per_device")
                lines.append(f"| {label} | {stages} | {format_flops(cost['flops_per_example'])} | "
                             f"{format_flops(cost['ideal_flops_per_step'])} | "
                             f"{format_flops(cost['update_flops_per_step'])} | "
                             f"{'-' if peak is None else f'{peak / 2**20:.1f} MiB'} |")
        lines += ["", "| method | batch | best lr | steps to target | ideal time to target | "
                  "compute to target | wall s to target | final loss |", "|---|---|---|---|---|---|---|---|"]
        for e in (e for e in best if e["problem"] == problem):
            lines.append(f"| {e['label']} | {e['batch_size']} | {e['learning_rate']:g} | {_num(e['steps'], 'd')} | "
                         f"{format_flops(e['ideal_time'])} | {format_flops(e['compute'])} | "
                         f"{_num(e['wall_time'], '.1f')} | {_num(e['final_loss'], '.4f')} |")
        h = summary["headline"].get(problem)
        if h:
            base, local = h["baseline"], h["best_local"]
            lines += ["", f"At the largest batch size ({h['batch_size']}): "
                      + (f"best local method **{local['label']}**; local / backprop ratio of ideal time to target "
                         f"**{_ratio(h['ideal_time_ratio'])}**, of compute to target **{_ratio(h['compute_ratio'])}**, "
                         f"of steps {_ratio(h['steps_ratio'])}, of wall time {_ratio(h['wall_time_ratio'])}."
                         if local else "no local method reached the target.")
                      + ("" if base is None or base["reached"] else " Backprop did not reach the target there.")]
        crit = [f"{key.split('/', 1)[1]} {_num(v, '.0f')}" for key, v in summary["critical_batch_size"].items()
                if key.split("/", 1)[0] == problem]
        lines += ["", "Critical batch size estimate E_min / S_min (McCandlish et al. 2018): " + ", ".join(crit) + "."]
        rows = [r for r in summary["alignment"] if r["problem"] == problem]
        width = max((len(r["alignment"] or []) for r in rows), default=0)
        if width:
            lines += ["", "Gradient alignment at the end of training (cosine of each stage's local gradient "
                      "with the true gradient of the last head's loss; best-rate run at the largest batch size):",
                      "", "| method | " + " | ".join(f"stage {k}" for k in range(width)) + " |",
                      "|---|" + "---|" * width]
            for r in rows:
                values = list(r["alignment"] or [])
                cells = [_num(v, ".3f") for v in values] + [""] * (width - len(values))
                lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary.get("missing_runs"):
        lines += [f"**Incomplete:** {len(summary['missing_runs'])} planned runs are not in results.jsonl yet "
                  f"(rerun the same command to train them): " + ", ".join(f"`{r}`" for r in summary["missing_runs"]),
                  ""]
    lines += time_lines(records, summary)
    lines += ["## Figures", ""]
    for rel in summary["plots"]:
        if rel.endswith(".png"):
            lines.append(f"- [{os.path.basename(rel)[:-4]}]({rel}) ([svg]({rel[:-4]}.svg))")
    lines += ["", "Raw data: `results.jsonl` (per-step curves), `summary.json`, `runs/`.", ""]
    return "\n".join(lines)

