"""The paper suite's findings (``lpjax bench --suite paper``): each of Laskin, Metz et al.'s findings
measured, set beside the paper's figure and marked "reproduced" or "not reproduced".

A sweep recipe opts in with two sections (recipes/sweeps/paper.py):

    findings.pareto    problems (time_to_target) for F1, the Pareto crossover, and F2, alignment
    findings.capacity  a "final" problem on shuffled labels for F3, random-label capacity
    findings.ranking   "final" problems, several seeds, for F4, the ranking of the methods
    memory             {stages, models}: memory per device from compiled programs (``memory_table``)

The criteria are written next to each verdict in the report, so a reader can disagree with them.
"""

import math
from collections import defaultdict

import numpy as np

from lpjax.research import analysis
# the memory table lives in lpjax.research.memory; the suite's report and bench reach it through here
from lpjax.research.memory import MEMORY_GOAL, memory_lines, memory_table, memory_verdict  # noqa: F401

COMMAND = "lpjax bench --suite paper --workdir runs/bench_paper"
# Goals from issue 13 and the paper's figures (arXiv 2012.03837; InfoPro for memory)
PARETO_GOALS = {"mlp": 0.2, "transformer": 0.5}  # best local / backprop ideal time to target, largest batch
PAPER_PARETO = {"mlp": "well under 0.5 (more than 2x faster)", "transformer": "about 0.5 (about 2x faster)"}
CAPACITY_GAP = 0.2  # backprop train accuracy above the best local method by at least this much
PAPER_CAPACITY = "backprop 0.78 against local about 0.28 train accuracy after 100 epochs (figure, read off)"
RANKING_GAP_PT = 0.5  # backprop - best local, test accuracy points


def _kind(problem: str) -> str:
    return "transformer" if "transformer" in problem or "lm" in problem else "mlp"


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None, 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


# -- F1 and F2 -------------------------------------------------------------------------------------------
def pareto_finding(summary: dict, records: list, problems) -> list:
    rows = []
    for problem in _as_list(problems):
        h = summary["headline"].get(problem)
        kind = _kind(problem)
        if not h:  # no run of it yet (an interim report): a row that says so
            rows.append({"problem": problem, "kind": kind, "batch_size": None, "critical_batch_size": None,
                         "best_local": None, "ideal_time_ratio": None, "compute_ratio": None, "steps_ratio": None,
                         "per_step_ratio": {}, "fastest": fastest_to_target([], problem),
                         "goal": PARETO_GOALS[kind], "paper": PAPER_PARETO[kind], "reproduced": False})
            continue
        local = h["best_local"]
        crit = summary["critical_batch_size"].get(f"{problem}/backprop")
        per_step = {}
        for r in records:
            if r["problem"] == problem and r["method"] != "backprop" and r["batch_size"] == h["batch_size"]:
                per_step[r["label"]] = r["cost"]["ideal_flops_per_step"]
        base_cost = next((r["cost"]["ideal_flops_per_step"] for r in records
                          if r["problem"] == problem and r["method"] == "backprop"), None)
        ratio = h["ideal_time_ratio"]
        fastest = fastest_to_target(summary["best"], problem)
        rows.append({"by_batch": ratios_by_batch(summary["best"], problem),
            "problem": problem, "kind": kind, "batch_size": h["batch_size"], "critical_batch_size": crit,
            "best_local": local["label"] if local else None, "ideal_time_ratio": ratio,
            "compute_ratio": h["compute_ratio"], "steps_ratio": h["steps_ratio"],
            "per_step_ratio": {label: (v / base_cost if base_cost else None) for label, v in sorted(per_step.items())},
            "fastest": fastest,
            "goal": PARETO_GOALS[kind], "paper": PAPER_PARETO[kind],
            "reproduced": ratio is not None and ratio <= PARETO_GOALS[kind],
        })
    return rows


def ratios_by_batch(best: list, problem: str) -> list:
    """The paper's figure, one row per batch size: each local method's ideal time to target over
    backprop's at that batch size (None where either did not reach the target), the best of them,
    and the steps each took."""
    rows = []
    for batch in sorted({e["batch_size"] for e in best if e["problem"] == problem}):
        at = {e["label"]: e for e in best if e["problem"] == problem and e["batch_size"] == batch}
        base = at.get("backprop")
        ok = base is not None and base["reached"] and base["ideal_time"]
        ratios = {label: (e["ideal_time"] / base["ideal_time"] if ok and e["reached"] else None)
                  for label, e in sorted(at.items()) if label != "backprop"}
        done = {label: v for label, v in ratios.items() if v is not None}
        winner = min(done, key=done.get) if done else None
        rows.append({"batch_size": batch, "ratios": ratios, "best_local": winner,
                     "best_ratio": done.get(winner), "steps": {label: e["steps"] for label, e in sorted(at.items())}})
    return rows


def fastest_to_target(best: list, problem: str) -> dict:
    """The paper's frontier reading: each method's least ideal time to target over every batch size
    (the left end of its Pareto frontier), and the best local method's over backprop's. It differs
    from the largest-batch ratio when a method is fastest at a smaller batch."""
    least = {}
    for e in best:
        if e["problem"] == problem and e["reached"]:
            if e["label"] not in least or e["ideal_time"] < least[e["label"]]["ideal_time"]:
                least[e["label"]] = e
    base = least.get("backprop")
    local = [e for label, e in least.items() if label != "backprop"]
    winner = min(local, key=lambda e: e["ideal_time"]) if local else None
    ratio = winner["ideal_time"] / base["ideal_time"] if base and winner and base["ideal_time"] else None
    return {"label": winner["label"] if winner else None, "batch_size": winner["batch_size"] if winner else None,
            "backprop_batch_size": base["batch_size"] if base else None, "ratio": ratio}


def alignment_finding(summary: dict, problems) -> list:
    """Per local method at the largest batch: does the cosine with the true gradient fall with distance
    from the output (stage 0 below the second-to-last stage)?"""
    rows = []
    for r in summary["alignment"]:
        values = r.get("alignment") or []
        if r["problem"] not in _as_list(problems) or r["label"] == "backprop" or len(values) < 3:
            continue
        first, near = values[0], values[-2]
        rows.append({"problem": r["problem"], "label": r["label"], "alignment": values,
                     "falls": first is not None and near is not None and first < near})
    return rows


# -- F3 and F4 -------------------------------------------------------------------------------------------
def final_table(records: list, problem: str) -> dict:
    """Per label: mean, spread (sample std) and count over seeds of the final figures."""
    by_label = defaultdict(list)
    for r in records:
        if r["problem"] == problem:
            by_label[r["label"]].append(r)
    out = {}
    for label, runs in by_label.items():
        out[label] = {key: _mean_std([r.get(key) for r in runs])
                      for key in ("train_accuracy", "train_loss", "test_accuracy", "test_loss")}
    return out


def capacity_finding(records: list, problem: str) -> dict | None:
    table = final_table(records, problem)
    if "backprop" not in table:
        return None
    base = table["backprop"]["train_accuracy"][0]
    local = {label: row["train_accuracy"][0] for label, row in table.items() if label != "backprop"}
    best = max((v for v in local.values() if v is not None), default=None)
    gap = None if base is None or best is None else base - best
    return {"problem": problem, "backprop": base, "local": local, "gap": gap, "paper": PAPER_CAPACITY,
            "reproduced": gap is not None and gap >= CAPACITY_GAP}


def ranking_finding(records: list, problem: str) -> dict | None:
    """Test accuracy (classification) or test loss (LM, lower is better) per method over seeds."""
    table = final_table(records, problem)
    if "backprop" not in table:
        return None
    use_accuracy = table["backprop"]["test_accuracy"][0] is not None and _kind(problem) != "transformer"
    key = "test_accuracy" if use_accuracy else "test_loss"
    scale = 100.0 if use_accuracy else 1.0  # accuracy in points
    sign = 1.0 if use_accuracy else -1.0  # "better" is higher accuracy, lower loss
    rows = {label: (None if row[key][0] is None else scale * row[key][0],
                    None if row[key][1] is None else scale * row[key][1], row[key][2]) for label, row in table.items()}
    base = rows["backprop"][0]
    local = {label: v for label, v in rows.items() if label != "backprop" and v[0] is not None}
    order = sorted(local, key=lambda label: -sign * local[label][0])  # best first
    best = order[0] if order else None
    greedy = next((label for label in local if label.startswith("greedy")), None)
    gap_best = None if best is None else sign * (base - local[best][0])
    gap_greedy = None if greedy is None else sign * (base - local[greedy][0])
    expected = bool(order) and order[0].startswith("chunked") and order[-1].startswith("greedy")
    # per seed, as "goodness" (accuracy points, or minus the loss): the paired comparisons need the seeds
    per_seed = defaultdict(dict)
    for r in records:
        if r["problem"] == problem and r.get(key) is not None:
            per_seed[r["label"]][r.get("seed")] = sign * scale * r[key]
    paired = {label: analysis.paired_bootstrap(per_seed["backprop"], per_seed[label]) for label in order}
    checks = order_checks(per_seed, order)
    gap_goal = RANKING_GAP_PT if use_accuracy else None
    resolved = bool(checks) and all(c["holds"] for c in checks)
    return {"problem": problem, "metric": "test accuracy (%)" if use_accuracy else "test loss (nats/byte)",
            "rows": rows, "order": order, "best_local": best, "gap_best": gap_best, "gap_greedy": gap_greedy,
            "gap_goal": gap_goal, "ordering_as_paper": expected, "paired": paired, "checks": checks,
            "contrary": [c for c in checks if c["high"] is not None and c["high"] < 0],
            "reproduced": resolved and (gap_goal is None or (gap_best is not None and gap_best <= gap_goal))}


def order_checks(per_seed: dict, order: list) -> list:
    """The paper's order as paired comparisons ``better - worse`` over seeds (``per_seed``: label ->
    {seed: goodness}; ``order``: the local labels): the closest chunked method above every other kind
    of local method, and every local method above greedy. Each comparison ``holds`` when its
    bootstrap interval (``analysis.paired_bootstrap``) lies above 0."""
    chunked = [label for label in order if label.startswith("chunked")]
    greedy = next((label for label in order if label.startswith("greedy")), None)
    pairs = []
    if chunked:
        pairs += [(chunked[0], label) for label in order if not label.startswith("chunked")]
    if greedy:
        pairs += [(label, greedy) for label in order if label != greedy and (label, greedy) not in pairs]
    checks = []
    for better, worse in pairs:
        b = analysis.paired_bootstrap(per_seed[better], per_seed[worse])
        checks.append({"better": better, "worse": worse, **b, "holds": b["low"] is not None and b["low"] > 0})
    return checks


# -- all together ----------------------------------------------------------------------------------------
def findings(summary: dict, records: list, sweep: dict) -> dict:
    spec = sweep.get("findings") or {}
    missing = defaultdict(int)  # problem -> planned runs not in results.jsonl (an interim report)
    for run_id in summary.get("missing_runs", ()):
        problem = next((p for p in sweep["problems"] if run_id.startswith(p + "_")), None)
        missing[problem] += 1
    out = {"pareto": pareto_finding(summary, records, spec.get("pareto", ())),
           "alignment": alignment_finding(summary, spec.get("pareto", ())),
           "capacity": [c for c in (capacity_finding(records, p) for p in _as_list(spec.get("capacity", ()))) if c],
           "ranking": [r for r in (ranking_finding(records, p) for p in _as_list(spec.get("ranking", ()))) if r],
           "missing": dict(missing), "expected_time": dict(spec.get("expected_time") or {})}
    for key in ("pareto", "capacity", "ranking"):
        for row in out[key]:
            row["missing_runs"] = missing.get(row["problem"], 0)
    if summary.get("memory"):
        out["memory"] = memory_verdict(summary["memory"])
    return out


def _fmt(value, fmt=".2f", suffix=""):
    return "-" if value is None else f"{format(value, fmt)}{suffix}"


def _interval(b, unit: str) -> str:
    if not b or b.get("mean") is None:
        return "-"
    return f"{b['mean']:+.2f}{unit} [{b['low']:+.2f}, {b['high']:+.2f}] ({b['n']} seeds)"


def _check_text(c: dict) -> str:
    if c["holds"]:
        return "holds"
    return "the order is reversed" if c["high"] is not None and c["high"] < 0 else "not resolved"


def _ranking_reason(r: dict, unit: str) -> str:
    """Why the order is or is not the paper's, from the paired comparisons."""
    if r["contrary"]:
        return "the order differs from the paper's beyond the interval (a finding of ours): " + "; ".join(
            f"{c['worse']} above {c['better']} by {-c['mean']:.2f}{unit} [{-c['high']:.2f}, {-c['low']:.2f}]"
            for c in r["contrary"])
    unresolved = [c for c in r.get("checks", []) if not c["holds"]]
    if unresolved:
        return "not resolved by the seeds: " + "; ".join(
            f"{c['better']} - {c['worse']} {_interval(c, unit)}" for c in unresolved)
    return "every comparison beyond its interval"


def _fastest_text(f: dict) -> str:
    if f["ratio"] is None:
        return "-"
    return (f"{f['ratio']:.2f}x ({f['label']} at batch {f['batch_size']} against backprop at batch "
            f"{f['backprop_batch_size']})")


def _verdict(ok, row=None) -> str:
    if row is not None and row.get("missing_runs"):
        return f"**not measured yet** ({row['missing_runs']} runs missing; figures so far)"
    return "**reproduced**" if ok else "**not reproduced**"


def render(found: dict, memory_rows: list | None = None) -> list:
    """The report's "Paper findings" section, as markdown lines."""
    lines = ["## Paper findings (Laskin, Metz et al. 2020)", "",
             f"Command: `{COMMAND}`. Every figure below is measured by this run; the paper's figure is "
             "quoted beside it, and the criterion for \"reproduced\" is stated with each finding.", "",
             *([("Expected run time of the suite: " + "; ".join(f"{machine}: {t}" for machine, t in
                                                           found["expected_time"].items()) + "."), ""]
               if found.get("expected_time") else []),
             "| finding | ours | paper | verdict |", "|---|---|---|---|"]
    for row in found["pareto"]:
        lines.append(f"| F1 Pareto crossover, {row['problem']} (best local / backprop ideal time to target, "
                     f"batch {row['batch_size'] or '-'}; goal <= {row['goal']}) | {_fmt(row['ideal_time_ratio'], '.2f', 'x')} "
                     f"({row['best_local'] or 'no local method reached the target'}; compute "
                     f"{_fmt(row['compute_ratio'], '.2f', 'x')}, steps {_fmt(row['steps_ratio'], '.2f', 'x')}); "
                     f"least over all batch sizes {_fastest_text(row['fastest'])} | {row['paper']} | "
                     f"{_verdict(row['reproduced'], row)} |")
    if found["alignment"]:
        falls = sum(r["falls"] for r in found["alignment"])
        lines.append(f"| F2 alignment falls with distance from the output (stage 0 below the second-to-last) | "
                     f"{falls} of {len(found['alignment'])} local methods | falls with depth | "
                     f"{_verdict(falls == len(found['alignment']))} |")
    for c in found["capacity"]:
        local = ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in sorted(c["local"].items()))
        lines.append(f"| F3 random-label train accuracy, {c['problem']} (backprop above every local method by "
                     f">= {CAPACITY_GAP}) | backprop {_fmt(c['backprop'], '.2f')}; {local} | {c['paper']} | "
                     f"{_verdict(c['reproduced'], c)} |")
    for r in found["ranking"]:
        unit = " pt" if r["gap_goal"] is not None else " nats"
        goal = f"; backprop - best local <= {r['gap_goal']} pt" if r["gap_goal"] is not None else ""
        lines.append(f"| F4 ranking, {r['problem']} ({r['metric']}; chunked closest, greedy furthest, each "
                     f"beyond the paired 95 % bootstrap interval over seeds{goal}) | "
                     f"order {' > '.join(r['order'])}; backprop - best local {_fmt(r['gap_best'], '.2f', unit)}, "
                     f"backprop - greedy {_fmt(r['gap_greedy'], '.2f', unit)}; {_ranking_reason(r, unit)} | "
                     f"chunked closest to backprop, greedy furthest | {_verdict(r['reproduced'], r)} |")
    if "memory" in found:
        m = found["memory"]
        even = m.get("even_k4") or {}
        ours = ", ".join(f"{k} {_fmt(v, '.2f', 'x')} (even cut {_fmt(even.get(k), '.2f', 'x')})"
                         for k, v in m["ratios_k4"].items())
        remat = m.get("remat_k4") or {}
        if remat:  # beside the verdict, not judged: the paper's backprop does not recompute
            ours += "; with remat " + ", ".join(
                f"{k} ({r['policy']}) {_fmt(r['vs_plain'], '.2f', 'x')} of backprop without remat, "
                f"{_fmt(r['vs_remat'], '.2f', 'x')} of backprop with it" for k, r in remat.items())
        lines.append(f"| Memory per device, largest local stage / backprop at K = 4 (goal <= {m['goal']}) | {ours} | "
                     f"{m['paper']} | {_verdict(m['reproduced'])} |")
    lines.append("")

    if found["pareto"]:
        lines += ["### F1: ideal time per step, each local method against backprop", "",
                  "The slowest stage's FLOPs per example (balanced cut) over backprop's whole network: the best a "
                  "method can do per step, before any extra steps it needs.", "",
                  "| problem | batch | critical batch (backprop) | " + "per-step ratio by method |", "|---|---|---|---|"]
        for row in found["pareto"]:
            ratios = ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in row["per_step_ratio"].items())
            lines.append(f"| {row['problem']} | {row['batch_size']} | {_fmt(row['critical_batch_size'], '.0f')} | "
                         f"{ratios} |")
        lines += ["", "### F1: ideal time to target at every batch size, local / backprop", "",
                  "As the paper's figure: at each batch size, each local method's ideal time to target (its best "
                  "learning rate) over backprop's at the same batch size; steps to target in brackets.", "",
                  "| problem | batch | backprop steps | best local | ratio by method (steps) |",
                  "|---|---|---|---|---|"]
        for row in found["pareto"]:
            for b in row.get("by_batch", []):
                ratios = ", ".join(f"{label} {_fmt(v, '.2f', 'x')} ({_fmt(b['steps'].get(label), 'd')})"
                                   for label, v in b["ratios"].items())
                best = "-" if b["best_local"] is None else f"{b['best_local']} {_fmt(b['best_ratio'], '.2f', 'x')}"
                lines.append(f"| {row['problem']} | {b['batch_size']} | {_fmt(b['steps'].get('backprop'), 'd')} | "
                             f"{best} | {ratios} |")
        lines.append("")
    for r in found["ranking"]:
        unit = " pt" if r["gap_goal"] is not None else " nats"
        lines += [f"### F4: {r['problem']}, {r['metric']}, mean ± std over seeds", "",
                  "Backprop - method: how much better backprop is (accuracy points, or nats of loss), the mean of "
                  "the per-seed differences with its 95 % paired bootstrap interval.", "",
                  "| method | mean | std | seeds | backprop - method [95 % interval] |", "|---|---|---|---|---|"]
        for label in ["backprop", *r["order"]]:
            mean, std, n = r["rows"][label]
            lines.append(f"| {label} | {_fmt(mean, '.3f')} | {_fmt(std, '.3f')} | {n} | "
                         f"{_interval(r.get('paired', {}).get(label), unit)} |")
        lines += ["", "The paper's order as paired comparisons (better - worse; holds when the interval is "
                  "above 0):", ""]
        lines += [f"- {c['better']} - {c['worse']}: {_interval(c, unit)}: {_check_text(c)}" for c in r.get("checks", [])]
        lines.append("")
    if memory_rows:
        lines += memory_lines(memory_rows)
    return lines
