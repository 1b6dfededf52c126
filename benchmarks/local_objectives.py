"""Local objectives against backprop at K = 4 stages with equal steps (issue 14, item 4).

For the byte LM (recipes/text_transformer.py) and the MNIST ResNet (recipes/mnist_resnet.py), trains
each variant for the same number of steps on the same batches (reference executor, sequential
schedule) and prints the final head's test figure: nats/byte for the LM, accuracy for MNIST. Beside
it, from ``lpjax.costs`` (XLA's cost analysis of the lowered programs), the FLOPs per example of one
training step and of the auxiliary heads alone (every stage's head but the last: the overhead a local
method pays for its objectives).

Variants: backprop; overlapping (window 2); the private-head local method (chunked for the LM, whose
4 stages hold 5 layers; greedy for MNIST, one layer per stage: at K = number of layers the two are
the same rule); the same with deeper auxiliary heads (``head_depth``), and with AugLocal's pyramid
(``head_pyramid``). The shared read-only readout (SOLO) is not implemented yet, so it has no row.

    python benchmarks/local_objectives.py --steps 300            # both problems
    python benchmarks/local_objectives.py --problems lm --steps 1000

Prints what it measured, whatever it is; exit status 0.
"""

import argparse
import importlib.util
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from lpjax import costs  # noqa: E402
from lpjax.config import build_experiment  # noqa: E402


def recipe(name):
    path = os.path.join(os.path.dirname(__file__), "..", "recipes", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROBLEMS = {
    "lm": ("text_transformer", "chunked", {"head_depth": 1}, {"head_depth": 2, "head_pyramid": True}),
    "mnist": ("mnist_resnet", "greedy", {"head_depth": 2, "head_width": 32},
              {"head_depth": 3, "head_width": 32, "head_pyramid": True}),
}


def variants(problem):
    _, local, deeper, pyramid = PROBLEMS[problem]
    return [("backprop", {"method": {"name": "backprop"}}),
            ("overlapping w=2", {"method": {"name": "overlapping", "window": 2}}),
            (f"{local}, private heads", {"method": {"name": local}}),
            (f"{local}, deeper heads {deeper}", {"method": {"name": local}, "model": deeper}),
            (f"{local}, pyramid heads {pyramid}", {"method": {"name": local}, "model": pyramid})]


def config_for(problem, overrides, steps, max_train):
    cfg = recipe(PROBLEMS[problem][0]).get_config()
    cfg.stages = 4
    cfg.num_steps = steps
    cfg.schedule.name, cfg.schedule.microbatches = "sequential", 1
    cfg.layout.executor = "reference"
    cfg.method.window = None
    cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, steps // 10)
    if max_train:
        cfg.dataset.max_train = max_train
    cfg = cfg.to_dict()
    for section, values in overrides.items():
        cfg[section].update(values)
    return cfg


def run(problem, name, overrides, steps, max_train):
    experiment = build_experiment(config_for(problem, overrides, steps, max_train))
    trainer, data = experiment.trainer, experiment.dataset
    batches = experiment.batches()
    x, y = next(batches)
    step_cost = costs.step_cost(trainer, x, y, compile=False)
    head_flops = sum(s.head.flops for s in step_cost.stages[:-1]) / step_cost.batch
    started = time.perf_counter()
    trainer.step(x, y)
    for _ in range(steps - 1):
        trainer.step(*next(batches))
    trainer.flush()
    jax.block_until_ready(trainer.stage_states)
    seconds = time.perf_counter() - started
    test = trainer.evaluate_batches(data.eval_batches("test", experiment.config["eval_batch_size"]))[-1]
    figure = f"{test['loss']:.4f} nats/byte" if problem == "lm" else f"{100 * test['accuracy']:.2f}% acc"
    print(f"| {problem} | {name} | {figure} | {step_cost.flops_per_example / 1e6:.2f} | "
          f"{head_flops / 1e6:.2f} | {seconds:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--max-train", type=int, default=None, help="cap on training examples (default: recipe's)")
    args = parser.parse_args()
    print(f"K = 4 stages, {args.steps} steps each; load: {os.getloadavg()}")
    print("| problem | variant | final head, test | step MFLOPs/example | aux heads MFLOPs/example | train s |")
    print("|---|---|---|---|---|---|")
    for problem in args.problems:
        for name, overrides in variants(problem):
            run(problem, name, overrides, args.steps, args.max_train)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
