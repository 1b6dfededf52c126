"""The command line's overhead over the Python API on 2 processes, one core each (issue 11).

Both paths train the same model on the same data in the same way: the pipeline_processes.py MLP
(2 stages x ``--layers`` dense+ReLU layers of ``--width`` units; here the first layer reads
MNIST-5k's 784 pixels instead of ``--width`` random features, since ``lpjax train`` reads a
registered dataset), chunked, streaming schedule with M = ``--microbatches`` microbatches of
``--microbatch`` examples, SPMD executor over 2 processes x 1 CPU device, each process pinned to
its own core, ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``:

- CLI: ``lpjax launch -n 2 --cpu-devices 1 --cores-per-process 1 -- train --config <recipe>``,
  logging every ``--steps`` steps; the throughput is the last stage's ``examples_per_s`` of each
  train record in metrics.jsonl after the first (which holds compilation and ``--warmup``),
  median over the ``--rounds`` records. It includes everything the loop does between steps
  (metrics, progress bar, checks, the log write), not the start-up, evaluation or checkpoint.
- API: the same 2 pinned processes joined by ``lpjax.distributed.join.initialize``, the trainer that
  ``lpjax.config.build.build_experiment`` makes from the same recipe, ``trainer.step`` on the
  experiment's own batch stream; examples per wall second over ``--steps`` steps, waiting for the
  device at the end of each round, median over ``--rounds`` rounds after ``--warmup`` steps.

It prints both, the overhead (API / CLI examples/s; goal <= 1.05x) and ``uptime``'s load beside
them: on a shared machine other jobs take the pinned cores, so read the figures with the load.

    python benchmarks/cli_overhead.py              # about 3 minutes on 2 idle cores
    python benchmarks/cli_overhead.py --quick      # tiny sizes: checks the plumbing
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_args import add_size_arguments  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA = "--xla_cpu_multi_thread_eigen=false"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: an API-path process's recipe
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.microbatch, args.steps, args.rounds = 64, 1, 16, 4, 2
    args.warmup = args.steps  # the first log record (compilation + fill) is dropped on both paths
    return args


def recipe(args) -> str:
    settings = {"dataset.name": "mnist5k", "model.name": "mlp", "model.depth": 2 * args.layers,
                "model.width": args.width, "stages": 2, "method.name": "chunked", "schedule.name": "streaming",
                "schedule.microbatches": args.microbatches, "layout.executor": "spmd", "optimizer.name": "sgd",
                "optimizer.learning_rate": args.lr, "batch_size": args.microbatches * args.microbatch,
                "num_steps": args.warmup + args.rounds * args.steps, "log_every": args.steps, "eval_every": 0,
                "checkpoint.every_steps": 0}
    lines = [f"    config.{key} = {value!r}" for key, value in settings.items()]
    return "\n".join(["from lpjax.config.build import base_config", "", "", "def get_config():",
                      "    config = base_config()", *lines, "    return config", ""])


def env():
    flags = os.environ.get("XLA_FLAGS", "")
    return dict(os.environ, XLA_FLAGS=f"{flags} {XLA}".strip(), JAX_PLATFORMS="cpu")


def cli(args, config, workdir) -> list:
    """Examples/s of each timed round through ``lpjax launch ... train``."""
    command = [sys.executable, "-m", "lpjax", "launch", "-n", "2", "--cpu-devices", "1", "--cores-per-process", "1",
               "--", "train", "--config", config, "--workdir", workdir]
    done = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the CLI run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r.get("split") == "train"]
    return [r["examples_per_s"][-1] for r in train[1:]]


def api(args, config) -> list:
    """Examples/s of each timed round through ``Trainer.step``, from process 0."""
    from lpjax.distributed.launch import free_port

    port, cores = free_port(), sorted(os.sched_getaffinity(0))
    procs = []
    for pid in range(2):
        child = dict(env(), JAX_NUM_CPU_DEVICES="1", LPJAX_COORDINATOR=f"127.0.0.1:{port}",
                     LPJAX_NUM_PROCESSES="2", LPJAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", config,
                                       *sys.argv[1:]], cwd=REPO, env=child, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      preexec_fn=lambda core=cores[pid]: os.sched_setaffinity(0, {core})))
    outputs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outputs):
        if p.returncode:
            sys.exit(f"an API-path process failed ({p.returncode}):\n{err[-3000:]}")
    line = next(line for line in outputs[0][0].splitlines() if line.startswith("@@RATES "))
    return json.loads(line.removeprefix("@@RATES "))


def worker(args):
    import lpjax.distributed.join

    lpjax.distributed.join.initialize()  # from the LPJAX_* environment
    import jax

    from lpjax.config.build import build_experiment
    from lpjax.config.recipe_file import load_recipe

    experiment = build_experiment(load_recipe(args.worker)[0])
    trainer, cfg = experiment.trainer, experiment.config
    index, count = trainer.data_shard
    shard = {} if count == 1 else {"shard_index": index, "shard_count": count, "microbatches": trainer.microbatches}
    batches = experiment.dataset.train_batches(cfg["batch_size"], seed=cfg["seed"], **shard)

    def steps(n):
        for _ in range(n):
            trainer.step(*next(batches), local=True)
        jax.block_until_ready(trainer.executor.buffers)

    steps(args.warmup)
    rates = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        steps(args.steps)
        rates.append(args.steps * cfg["batch_size"] / (time.perf_counter() - start))
    print("@@RATES " + json.dumps(rates), flush=True)


def main():
    args = parse_args()
    if args.worker:
        return worker(args)
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 usable CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "mlp_two_stages.py")
        with open(config, "w") as f:
            f.write(recipe(args))
        load_before = os.getloadavg()
        api_rates = api(args, config)
        cli_rates = cli(args, config, os.path.join(tmp, "run"))
        load_after = os.getloadavg()
    a, c = statistics.median(api_rates), statistics.median(cli_rates)
    print(f"model: 2 stages x {args.layers} layers of width {args.width}, chunked, streaming M={args.microbatches} "
          f"x {args.microbatch} examples, spmd over 2 processes x 1 core; {args.rounds} rounds of {args.steps} steps")
    print(f"API (Trainer.step)         : {a:10.1f} examples/s  (rounds: {', '.join(f'{r:.1f}' for r in api_rates)})")
    print(f"CLI (lpjax launch ... train): {c:10.1f} examples/s  (rounds: {', '.join(f'{r:.1f}' for r in cli_rates)})")
    print(f"CLI overhead: API / CLI = {a / c:.3f}x (goal <= 1.05x)")
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, after: "
          f"{' '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} cores")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
