"""The pod ladder: compile recipes for TPU topologies that are not attached and print one table.

Each row is what ``lpjax train --config ... --topology T --compile-only --workdir DIR`` does
(lpjax/training/compile_only.py; libtpu from ``pip install 'lpjax[tpu]'``, no TPU needed), run in its
own process; its ``compile_only.json`` gives the columns: the largest peak per device over the
compiled programs (peak + generated code, against the chip's HBM), whether they all fit, the
collective bytes per step of the step programs per mesh axis, the generated code and the compile
time of the step programs. ``--programs`` narrows what each row compiles (a 1.2B step program takes
about 5 minutes on 2 CPU cores; the drain and evaluation programs add about as much again).

The ladder (issue 25):
- ``transformer_lm`` ~1.2B (width 2048, 24 blocks, 16 heads, seq 2048; recipes/pod_lm.py) and ~8B
  (width 4096, 32 blocks, 32 heads), fp32, Adam, batch 32 in 8 microbatches (8 x data where the
  data axis is wider than 4, so that each data slice gets a row);
- topologies v5e:4x4, v5e:16x16 and v5p:4x4x4, with K in {4, 8, 16} stages and the rest as data;
- backprop with 1F1B against chunked, greedy and overlapping (window 2) with streaming. Greedy trains
  one layer per stage, so on the LM (25 and 33 layers) its rows say why they cannot be built;
- the mnist and CIFAR ResNet recipes at their own sizes (CIFAR-10 through tfds.testing.mock_data:
  only the shapes matter, nothing is downloaded).

Run from the repository root; a 1.2B row compiles for minutes on 2 CPU cores, an 8B one for longer:

    python benchmarks/pod_compile.py --list                        # the ladder's rows and commands
    python benchmarks/pod_compile.py --models lm_1.2b --topologies v5e:4x4 --stages 4 --methods chunked
    python benchmarks/pod_compile.py --jobs 4 --json ladder.json   # all of it, 4 compiles at a time
    python benchmarks/pod_compile.py --models lm_1.2b --topologies v5e:4x4 --stages 4 --methods backprop-1f1b \
        --programs "step (first" --set remat=nothing_saved precision.compute=bfloat16   # remat, bf16 (issue 26)
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
LM = {"lm_1.2b": {"model.dim": 2048, "model.depth": 24, "model.heads": 16},
      "lm_8b": {"model.dim": 4096, "model.depth": 32, "model.heads": 32}}
TOPOLOGIES = {"v5e:4x4": 16, "v5e:16x16": 256, "v5p:4x4x4": 64}
METHODS = {  # name: (method overrides, schedule)
    "backprop-1f1b": ({"method.name": "backprop"}, "1f1b"),
    "chunked": ({"method.name": "chunked"}, "streaming"),
    "greedy": ({"method.name": "greedy"}, "streaming"),
    "overlapping": ({"method.name": "overlapping", "method.window": 2}, "streaming"),
}
# the ResNet recipes at their own sizes, 4 stages on the 4 chips of a v5e:2x2
RESNETS = {"mnist_resnet": "recipes/mnist_resnet.py", "cifar10_resnet18": "recipes/cifar10_resnet.py:18",
           "cifar10_resnet32": "recipes/cifar10_resnet.py:32"}


def ladder(models, topologies, stages, methods):
    """The rows: ``(label, recipe, topology, overrides)``."""
    rows = []
    for model in models:
        if model in LM:
            for topology in topologies:
                for k in stages:
                    data = TOPOLOGIES[topology] // k
                    for method in methods:
                        overrides, schedule = METHODS[method]
                        # the recipe's 8 microbatches of 4 rows, or one row per data slice where more
                        rows.append((f"{model} {method}", "recipes/pod_lm.py", topology, {
                            **LM[model], **overrides, "schedule.name": schedule, "stages": k,
                            "layout.data": data, "layout.executor": "spmd", "batch_size": max(32, 8 * data),
                            "eval_batch_size": max(32, k * data)}))
        else:
            rows.append((model, RESNETS[model], "v5e:2x2", {"layout.executor": "spmd", "layout.data": 1, "stages": 4}))
    return rows


def command(recipe, topology, overrides, workdir):
    """The ``lpjax`` arguments of one row."""
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    return ["train", "--config", recipe, *flags, "--topology", topology, "--compile-only", "--workdir", workdir]


def run_row(row, root, programs):
    label, recipe, topology, overrides = row
    workdir = tempfile.mkdtemp(prefix="pod_", dir=root)
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # rows compile side by side
    start = time.perf_counter()
    argv = [sys.executable, os.path.abspath(__file__), "--row", json.dumps([recipe, topology, overrides, workdir,
                                                                           programs])]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    path = os.path.join(workdir, "compile_only.json")
    report = json.load(open(path)) if os.path.exists(path) else None
    error = done.stderr.strip().splitlines()[-1] if done.returncode and done.stderr.strip() else None
    return {"label": label, "topology": topology, "overrides": overrides, "exit": done.returncode,
            "seconds": round(seconds, 1), "error": error, "report": report}


def compile_row(recipe, topology, overrides, workdir, programs) -> int:
    """One row, in this process: the recipe with its overrides compiled for ``topology``."""
    import contextlib

    from lpjax.config.recipe_file import load_recipe
    from lpjax.errors import ConfigError
    from lpjax.training.compile_only import compile_only

    config, error = load_recipe(os.path.join(REPO, recipe))
    if error:
        raise SystemExit(error)
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    data = contextlib.nullcontext()
    if recipe.startswith("recipes/cifar10"):  # the recipe's own shapes from tfds' mock data: nothing to download
        import tensorflow_datasets as tfds

        config.dataset.data_dir = workdir
        data = tfds.testing.mock_data(num_examples=2048, policy=tfds.testing.MockPolicy.USE_CODE)  # > any batch
    try:
        with data:
            report = compile_only(config, topology, workdir, programs=programs)
    except ConfigError as err:  # a row that cannot be built (greedy on a model of thick stages): its reason
        print(err, file=sys.stderr)
        return 2
    print(report.text())
    return 0 if report.fits else 1


def columns(result):
    stages, data = result["overrides"].get("stages", "?"), result["overrides"].get("layout.data", "?")
    head = f"| {result['label']} | {result['topology']} | {stages}x{data} |"
    report = result["report"]
    if report is None:
        return f"{head} - | no | - | - | - | {result['error'] or 'exit ' + str(result['exit'])} |"
    programs = report["programs"]
    needed = max(p["memory"]["needed"] for p in programs)
    steps = [p for p in programs if p["name"].startswith("step")]
    per_axis = {}
    for p in steps:
        for axis, n in p["bytes_per_step_per_axis"].items():
            per_axis[axis] = max(per_axis.get(axis, 0), n)  # the largest of the step programs
    axes = ", ".join(f"{axis} {n / 2**20:,.1f} MiB" for axis, n in sorted(per_axis.items(), key=str)) or "none"
    code = max((p["memory"]["generated_code"] for p in steps), default=0)
    compile_s = max((p["memory"]["compile_seconds"] or 0 for p in steps), default=0)
    fits = "yes" if report["fits"] else "no"
    return (f"{head} {needed / GiB:.2f} GiB | {fits} | {axes} | {code / 2**20:.0f} MiB | {compile_s:.0f} s | "
            f"{report['shortfall'] or ''} |")


def _setting(item):
    """``KEY=VALUE`` from ``--set``: the value as a Python literal where it reads as one, else a string."""
    import ast

    key, _, value = item.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*LM, *RESNETS], choices=[*LM, *RESNETS])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    parser.add_argument("--stages", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="compiles at a time (each needs several GB of RAM)")
    parser.add_argument("--list", action="store_true", help="print the rows and their commands; compile nothing")
    parser.add_argument("--json", default=None, help="write every row's result here")
    parser.add_argument("--programs", nargs="+", default=None,
                        help="compile only programs whose names start so, e.g. 'init' 'step (first' (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every row, e.g. remat=dots_saved precision.compute=bfloat16")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in this process (run_row)
    args = parser.parse_args(argv)
    if args.row:
        return compile_row(*json.loads(args.row))
    rows = ladder(args.models, args.topologies, args.stages, args.methods)
    extra = dict(_setting(item) for item in args.set)
    rows = [(label, recipe, topology, {**overrides, **extra}) for label, recipe, topology, overrides in rows]
    if args.list:
        for label, recipe, topology, overrides in rows:
            print(f"{label:<28} {topology:<10} lpjax " + " ".join(command(recipe, topology, overrides, "DIR")))
        return 0
    root = tempfile.mkdtemp(prefix="pod_ladder_")
    print("| case | topology | K x data | peak per device | fits | collective bytes per step (step programs) "
          "| generated code | compile | shortfall / error |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(lambda row: run_row(row, root, args.programs), rows):
            results.append(result)
            print(columns(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
