"""Sweep runner: methods × batch sizes × learning rates (× stage counts) of a base recipe, resumable.

A sweep recipe (``recipes/sweeps/NAME.py``) has ``get_config()`` returning an ml_collections config:

    problems.NAME.recipe          a training recipe: PATH or PATH:ARG (ARG goes to its get_config);
                                  a relative path is looked up in the working directory, then from
                                  the sweep file's folder upwards, then among the shipped recipes
    problems.NAME.overrides       nested config keys set on top of the recipe (e.g. {"model": {"width": 64}})
    problems.NAME.methods         {method: stages}, stages an int or a tuple of ints to sweep
    problems.NAME.batch_sizes     tuple of batch sizes
    problems.NAME.learning_rates  tuple of peak learning rates, tried at every batch size; or a tuple
                                  with one tuple of rates per batch size (the best rate grows with
                                  the batch, so each batch size can try its own grid)
    problems.NAME.num_steps       steps per run: an int, or a tuple with one entry per batch size
    problems.NAME.target_loss     training loss (last head, smoothed) that counts as reaching the target
    problems.NAME.split_points    optional: "balanced" / "balanced_memory" cuts every run's stages by
                                  measured cost (lpjax.research.balance); default an even cut by layer count
    problems.NAME.seeds           optional tuple of seeds: every run is repeated with each (default: the
                                  recipe's own seed, once)
    problems.NAME.measure         "time_to_target" (default): Pareto analysis of the curves; "final":
                                  only the final train/test figures count (target_loss may be left out)
    problems.NAME.priority        optional int (default 0): problems run in increasing priority, then
                                  by name (ml_collections sorts the names); results do not depend on it
    findings, memory              optional sections read by the paper suite's report (lpjax.research.paper)
    smooth_window                 steps of the centred running mean before thresholding (lpjax.research.analysis)
    cost_batch                    batch at which the kernels' costs are measured (lpjax.research.costs)
    cost_compile                  True (default): costs of the compiled kernels, with peak memory;
                                  False: FLOPs of the lowered programs, much faster for many-stage
                                  models, no peak memory (lpjax.research.costs.analyse)
    alignment                     measure gradient alignment at the end of training (see below)
    compilation_cache             keep compiled programs in WORKDIR/jax_cache (see below)

Every run trains with ``lpjax.training.loop.train_and_evaluate`` and ``log_every=1`` in
``WORKDIR/runs/RUN_ID``; its per-step curve then goes as one JSON line into ``WORKDIR/results.jsonl``:
``steps``, ``loss`` (training loss of the last head), ``compute`` (cumulative FLOPs), ``ideal_time``
(cumulative FLOPs on the critical path, lpjax.research.costs) and ``wall_time`` (measured seconds since the
training loop started, less compilation: see below), plus the run's cost breakdown. A run whose id
is already in ``results.jsonl`` is skipped, so an interrupted sweep resumes where it stopped; the id
holds a hash of the run's full config, so a changed recipe or override is a new run.

Gradient alignment: with ``alignment`` on, the runs at each problem's largest batch size (the regime
of the headline ratios) set ``probe.alignment_every = num_steps``, so the training loop logs one
``{"split": "alignment"}`` record after the last step; the probe costs a compilation, which is why
the other runs skip it.

Compilation cache: a sweep compiles many identical programs (initialisation, evaluation and every
cell that does not apply the learning rate are the same across rates, and across batch sizes for
evaluation). With ``compilation_cache`` on (the default) and no cache configured by the user, the
sweep points JAX's persistent compilation cache at ``WORKDIR/jax_cache`` while it runs, which about
halves a small sweep's time on CPU; the previous settings come back afterwards. Because of it, and
because compilation is not what the figures compare, ``wall_time`` leaves the first step's
compilation out: step 1 is counted as long as a typical (median) step.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import time

import jax
import ml_collections
import numpy as np
from jax.experimental.compilation_cache import compilation_cache as cc

from lpjax.config import catalog
from lpjax.config.build import build_experiment, merge_into
from lpjax.config.checks import positive_int, positive_number
from lpjax.config.recipe_file import load_recipe
from lpjax.training.metrics_log import read_records
from lpjax.research.costs import DEFAULT_COST_BATCH, experiment_cost
from lpjax.errors import ConfigError
from lpjax.core.methods import METHODS

RESULTS = "results.jsonl"
IN_RECIPE = "fix it in the sweep recipe"
SWEEP_KEYS = {"problems", "smooth_window", "cost_batch", "cost_compile", "alignment", "compilation_cache", "findings",
              "memory"}
PROBLEM_KEYS = {"recipe", "overrides", "methods", "batch_sizes", "learning_rates", "num_steps", "target_loss",
                "split_points", "seeds", "measure", "priority"}
OPTIONAL_PROBLEM_KEYS = {"overrides", "split_points", "seeds", "measure", "priority"}
MEASURES = ("time_to_target", "final")


@dataclasses.dataclass
class RunSpec:
    """One planned training run of a sweep; ``run_id`` is unique in the sweep and changes with the config."""

    run_id: str
    problem: str
    method: str
    stages: int
    label: str  # how plots and tables name the method: with the stage count when the sweep varies it
    seed: int | None  # the run's seed when the problem lists seeds, else None (the recipe's own)
    batch_size: int
    learning_rate: float
    num_steps: int
    target_loss: float
    config: dict  # the full training config handed to train_and_evaluate


# -- loading -------------------------------------------------------------------------------------------
def load_config_file(path: str):
    """The config a sweep (or recipe) file's ``get_config()`` returns.

    Args:
      path: ``PATH`` or ``PATH:ARG`` of a Python file defining ``get_config``.

    Returns:
      Its ml_collections config. Any failure (no file, an exception, no config returned) is a
      ConfigError of one line naming the file and, where the file raised, the line.
    """
    config, reason = load_recipe(path)
    if reason:
        raise ConfigError(reason)
    return config


def check_sweep(sweep) -> dict:
    """A sweep checked against the format in this module's docstring.

    Args:
      sweep: the sweep file's config (a ConfigDict or a dict).

    Returns:
      The sweep as plain dicts with the optional keys' defaults filled in. Raises ConfigError naming
      the first problem (an unknown key, a value of the wrong type or range) and the fix.
    """
    cfg = sweep.to_dict() if isinstance(sweep, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)) \
        else dict(sweep)
    unknown = sorted(set(cfg) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"unknown sweep key {unknown[0]!r}; a sweep has {', '.join(sorted(SWEEP_KEYS))}")
    cfg.setdefault("smooth_window", 9)
    cfg.setdefault("cost_batch", DEFAULT_COST_BATCH)
    cfg.setdefault("alignment", True)
    cfg.setdefault("compilation_cache", True)
    cfg.setdefault("cost_compile", True)
    for key in ("smooth_window", "cost_batch"):
        positive_int(cfg[key], key, fix=IN_RECIPE)
    for key in ("alignment", "compilation_cache", "cost_compile"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"{key} must be True or False, got {cfg[key]!r}; fix it in the sweep recipe")
    problems = cfg.get("problems")
    if not isinstance(problems, dict) or not problems:
        raise ConfigError("the sweep has no problems; set config.problems = {NAME: {recipe, methods, batch_sizes, "
                          "learning_rates, num_steps, target_loss}}")
    for name, problem in problems.items():
        _check_problem(name, problem)
    return cfg


def _check_problem(name, problem) -> None:
    where = f"problems.{name}"
    if not isinstance(problem, dict):
        raise ConfigError(f"{where} must be a section with keys {', '.join(sorted(PROBLEM_KEYS))}")
    unknown = sorted(set(problem) - PROBLEM_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; a problem has {', '.join(sorted(PROBLEM_KEYS))}")
    problem.setdefault("measure", "time_to_target")
    if problem["measure"] not in MEASURES:
        raise ConfigError(f"{where}.measure must be one of {', '.join(MEASURES)}, got {problem['measure']!r}")
    if problem["measure"] == "final":
        problem.setdefault("target_loss", 1.0)  # not used: only the final figures count
    needed = sorted(PROBLEM_KEYS - OPTIONAL_PROBLEM_KEYS)
    missing = [key for key in needed if key not in problem]
    if missing:
        raise ConfigError(f"{where}.{missing[0]} is not set; a problem needs {', '.join(needed)}")
    methods = problem["methods"]
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{where}.methods must map method names to stage counts, e.g. {{'backprop': 4, 'greedy': 4}}")
    for method, stages in methods.items():
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r} in {where}.methods; choose from {', '.join(METHODS)}")
        for k in _as_tuple(stages, f"{where}.methods.{method}"):
            positive_int(k, f"{where}.methods.{method}", fix=IN_RECIPE)
    batches = _as_tuple(problem["batch_sizes"], f"{where}.batch_sizes")
    for b in batches:
        positive_int(b, f"{where}.batch_sizes", fix=IN_RECIPE)
    rates = _rates_per_batch(problem["learning_rates"], len(batches), f"{where}.learning_rates")
    for lr in (lr for grid in rates for lr in grid):
        positive_number(lr, f"{where}.learning_rates", fix=IN_RECIPE)
    steps = _as_tuple(problem["num_steps"], f"{where}.num_steps")
    if len(steps) not in (1, len(batches)):
        raise ConfigError(f"{where}.num_steps has {len(steps)} entries for {len(batches)} batch sizes; "
                          f"give one step count, or one per batch size")
    for s in steps:
        positive_int(s, f"{where}.num_steps", fix=IN_RECIPE)
    positive_number(problem["target_loss"], f"{where}.target_loss", fix=IN_RECIPE)
    if not isinstance(problem.get("priority", 0), int):
        raise ConfigError(f"{where}.priority must be an integer, got {problem['priority']!r}; {IN_RECIPE}")
    if problem.get("split_points") not in (None, "balanced", "balanced_memory"):
        raise ConfigError(f"{where}.split_points must be 'balanced' or 'balanced_memory' (or left out for an even "
                          f"cut), got {problem['split_points']!r}")
    for seed in _as_tuple(problem.get("seeds", 0), f"{where}.seeds"):
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"{where}.seeds must be non-negative integers, got {seed!r}; {IN_RECIPE}")
    if not isinstance(problem.get("overrides", {}), dict):
        raise ConfigError(f"{where}.overrides must be a section of config keys, e.g. {{'model': {{'width': 64}}}}")


def _as_tuple(value, key) -> tuple:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{key} is empty; give at least one value")
        return tuple(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,)
    raise ConfigError(f"{key} must be a number or a tuple of numbers, got {value!r}")


def _rates_per_batch(value, num_batches: int, key: str) -> list:
    """``learning_rates`` as one grid per batch size: a flat tuple is every batch size's grid."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        if len(value) != num_batches:
            raise ConfigError(f"{key} has {len(value)} grids for {num_batches} batch sizes; give one tuple of "
                              f"rates per batch size, or one flat tuple for all")
        return [_as_tuple(grid, key) for grid in value]
    if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
        raise ConfigError(f"{key} mixes rates and tuples of rates; give one flat tuple, or one tuple per batch size")
    return [_as_tuple(value, key)] * num_batches


def find_recipe(recipe: str, sweep_path: str | None) -> str:
    """The training recipe a sweep problem names, as a spec ``load_recipe`` takes.

    Args:
      recipe: ``PATH`` or ``PATH:ARG`` (ARG goes to ``get_config``), or a shipped recipe's name
        (``mnist_mlp``, ``cifar10_resnet:18``; lpjax.config.catalog).
      sweep_path: the sweep file, whose folder and its parents are searched for a relative PATH.

    Returns:
      ``PATH`` or ``PATH:ARG`` of an existing file: as given if it exists in the working directory,
      else found from the sweep file's folder upwards, else the shipped recipe of that name. Raises
      ConfigError when none exists.
    """
    path, colon, arg = recipe.partition(":")
    if os.path.isfile(path):
        return recipe
    if sweep_path and not os.path.isabs(path):
        folder = os.path.dirname(os.path.abspath(sweep_path))
        while True:
            candidate = os.path.join(folder, path)
            if os.path.isfile(candidate):
                return candidate + colon + arg
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    shipped = catalog.find_recipe(recipe)
    if os.path.isfile(shipped.partition(":")[0]):
        return shipped
    raise ConfigError(f"recipe {recipe!r} not found (looked in the working directory, above the sweep file and "
                      f"among the shipped recipes); give a path to an existing recipe file or a name from `lpjax recipes`")


# -- planning -------------------------------------------------------------------------------------------
def plan_runs(sweep, sweep_path: str | None = None) -> list:
    """Every run of the sweep, without training anything.

    Args:
      sweep: the sweep config (checked with ``check_sweep``).
      sweep_path: the sweep file, from whose folder relative recipe paths are found (``find_recipe``).

    Returns:
      A list of ``RunSpec`` in a fixed order (problem by priority and name, method, stages, batch
      size, rate, seed). Every recipe is loaded, so a bad one raises ConfigError before any training.
    """
    cfg = check_sweep(sweep)
    specs = []
    for problem, p in sorted(cfg["problems"].items(), key=lambda item: (item[1].get("priority", 0), item[0])):
        recipe = load_config_file(find_recipe(p["recipe"], sweep_path))
        base = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe)
        merge_into(base, p.get("overrides", {}))
        batches = _as_tuple(p["batch_sizes"], "batch_sizes")
        steps = _as_tuple(p["num_steps"], "num_steps")
        steps = steps * len(batches) if len(steps) == 1 else steps
        rates = _rates_per_batch(p["learning_rates"], len(batches), "learning_rates")
        for method, stage_counts in p["methods"].items():
            stage_counts = _as_tuple(stage_counts, "stages")
            for k in stage_counts:
                label = method if len(stage_counts) == 1 else f"{method}-{k}"
                for batch, num_steps, grid in zip(batches, steps, rates):
                    probe = num_steps if cfg["alignment"] and batch == max(batches) else 0
                    if p["measure"] == "final":
                        probe = 0
                    for lr in grid:
                        for seed in _as_tuple(p["seeds"], "seeds") if "seeds" in p else (None,):
                            config = _run_config(base, method, k, batch, lr, num_steps, probe, p.get("split_points"))
                            if seed is not None:
                                config["seed"] = seed
                            digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
                            tag = "" if seed is None else f"_s{seed}"
                            run_id = f"{problem}_{method}_k{k}_b{batch}_lr{lr:g}{tag}_{digest[:8]}"
                            specs.append(RunSpec(run_id, problem, method, k, label, seed, batch, float(lr),
                                                 num_steps, float(p["target_loss"]), config))
    return specs


def _run_config(base, method, stages, batch, lr, num_steps, probe_every, split_points=None) -> dict:
    config = json.loads(json.dumps(base))  # a deep copy; tuples become lists, which configs accept
    split_points = split_points if stages > 1 else None  # one stage has nothing to balance
    merge_into(config, {"method": {"name": method}, "stages": stages, "split_points": split_points,
                        "batch_size": batch,
                    "optimizer": {"learning_rate": lr}, "num_steps": num_steps, "num_epochs": None,
                    "log_every": 1, "eval_every": 0, "probe": {"alignment_every": probe_every}})
    if method != "overlapping":
        config["method"]["window"] = None
    return config


# -- results file ---------------------------------------------------------------------------------------
def append_jsonl(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` and fsync it: a line is whole once this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_curve(metrics_path: str) -> dict:
    """Per-step training curve of one run from its metrics.jsonl: steps, wall time, the last trained
    head's loss; and the alignment records if the training loop wrote any."""
    steps, times, losses, alignment = [], [], [], []
    for record in read_records(metrics_path):
        if record.get("split") == "train":
            trained = [v for v in record.get("loss", []) if v is not None]
            steps.append(record["step"])
            times.append(record["time"])
            losses.append(trained[-1] if trained else None)
        elif record.get("split") == "alignment":
            alignment.append({"step": record["step"], "alignment": record["alignment"]})
    compile_s = 0.0
    if len(times) > 1:  # the first step waited for compilation; count it as a typical step instead
        compile_s = max(times[0] - float(np.median(np.diff(times))), 0.0)
    return {"steps": steps, "wall_time": [t - compile_s for t in times], "compile_s": compile_s,
            "loss": losses, "alignment_curve": alignment}


# -- running --------------------------------------------------------------------------------------------
def run_sweep(sweep, workdir: str, *, sweep_path: str | None = None, verbose: bool = True) -> list:
    """Train every planned run not yet in ``workdir/results.jsonl``, appending each record as it finishes.

    Args:
      sweep: the sweep config.
      workdir: a local directory (created if missing); ConfigError for a URL.
      sweep_path: the sweep file, for relative recipe paths.
      verbose: print one line per run.

    Returns:
      Every run's record (``make_record``), in ``plan_runs`` order, the ones found already done included.
    """
    from lpjax.training.loop import train_and_evaluate  # the train loop imports the whole stack; keep this module light

    from lpjax.training.workdir import check_local

    check_local(workdir)
    cfg = check_sweep(sweep)
    specs = plan_runs(sweep, sweep_path)
    os.makedirs(workdir, exist_ok=True)
    results_path = os.path.join(workdir, RESULTS)
    done = {r["run_id"]: r for r in read_records(results_path)}
    todo = [s for s in specs if s.run_id not in done]
    say = print if verbose else (lambda *a, **k: None)
    say(f"sweep: {len(specs)} runs, {len(specs) - len(todo)} already done, results in {results_path}", flush=True)
    costs = {}
    cache = os.path.join(workdir, "jax_cache") if cfg["compilation_cache"] else None
    with compilation_cache(cache):
        for i, spec in enumerate(todo, 1):
            arch = (spec.problem, spec.method, spec.stages)
            if arch not in costs:
                costs[arch] = experiment_cost(build_experiment(spec.config), cfg["cost_batch"],
                                              compile=cfg["cost_compile"])
            run_dir = os.path.join(workdir, "runs", spec.run_id)
            started = time.perf_counter()
            results = train_and_evaluate(spec.config, run_dir, progress=False, verbose=False)
            record = make_record(spec, read_curve(os.path.join(run_dir, "metrics.jsonl")), costs[arch], results)
            record["run_s"] = round(time.perf_counter() - started, 1)  # the whole run: compiling, training, evaluating
            append_jsonl(results_path, record)
            done[spec.run_id] = record
            final = record["loss"][-1] if record["loss"] else None
            say(f"[{i}/{len(todo)}] {spec.problem} {spec.label} K={spec.stages} batch {spec.batch_size} "
                f"lr {spec.learning_rate:g}: {spec.num_steps} steps in {time.perf_counter() - started:.1f}s, "
                f"last loss {final if final is None else round(final, 4)}", flush=True)
    return [done[s.run_id] for s in specs]


@contextlib.contextmanager
def compilation_cache(path):
    """JAX's persistent compilation cache in ``path`` for the duration, unless ``path`` is None or the
    user already configured a cache; the previous settings are restored afterwards."""
    if path is None or jax.config.jax_compilation_cache_dir:
        yield
        return
    names = ("jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    cc.set_cache_dir(path)
    jax.config.update(names[0], 0.0)  # the cells of small models compile in well under a second
    jax.config.update(names[1], -1)
    cc.reset_cache()  # the cache decides once whether it is on; make it look again
    try:
        yield
    finally:
        cc.set_cache_dir(None)
        for name, value in before.items():
            jax.config.update(name, value)
        cc.reset_cache()


def make_record(spec: RunSpec, curve: dict, cost, results: dict | None = None) -> dict:
    """One results.jsonl line: the run's identity, its per-step curve and its cost figures."""
    steps = np.asarray(curve["steps"], dtype=np.float64)
    final = (results or {}).get("final", {})
    return {
        "run_id": spec.run_id, "problem": spec.problem, "method": spec.method, "label": spec.label,
        "seed": spec.seed, "split": cost_split(cost),
        "stages": spec.stages, "batch_size": spec.batch_size, "learning_rate": spec.learning_rate,
        "num_steps": spec.num_steps, "target_loss": spec.target_loss,
        "steps": curve["steps"], "loss": curve["loss"],
        "compute": cost.compute(steps, spec.batch_size).tolist(),
        "ideal_time": cost.ideal_time(steps).tolist(),
        "wall_time": curve["wall_time"], "compile_s": curve.get("compile_s"),
        "alignment_curve": curve["alignment_curve"],
        "alignment": curve["alignment_curve"][-1]["alignment"] if curve["alignment_curve"] else None,
        "test_loss": final.get("test_loss"), "test_accuracy": final.get("test_accuracy"),
        "train_loss": final.get("train_loss"), "train_accuracy": final.get("train_accuracy"),
        "cost": cost.to_dict(),
    }


def cost_split(cost) -> list:
    """Each stage's share of the per-example FLOPs of a step (what a balanced cut evens out)."""
    per_stage = [s.flops_per_example for s in cost.stages]
    total = sum(per_stage)
    return [round(f / total, 4) if total else None for f in per_stage]
