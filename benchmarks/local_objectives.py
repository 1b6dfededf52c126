"""Local objectives against backprop at K = 4 stages with equal steps (issue 14, item 4).

For the byte LM (recipes/text_transformer.py) and the MNIST ResNet (recipes/mnist_resnet.py), trains
each variant for the same number of steps on the same batches (reference executor, sequential
schedule) and prints the final head's test figure: nats/byte for the LM, accuracy for MNIST. Beside
it, from ``lpjax.research.costs`` (XLA's cost analysis of the lowered programs), the FLOPs per example of one
training step and of the auxiliary heads alone (every stage's head but the last: the overhead a local
method pays for its objectives).

Variants: backprop; overlapping (window 2); the private-head local method (chunked for the LM, whose
4 stages hold 5 layers; greedy for MNIST, one layer per stage: at K = number of layers the two are
the same rule); the same with deeper auxiliary heads (``head_depth``), and with AugLocal's pyramid
(``head_pyramid``); the private-head method with a shared read-only readout (SOLO:
``method.shared_readout``, refreshed every step and every ``--stale`` steps). Greedy needs one
layer per stage, which the LM's 5 layers at K = 4 do not allow, so the LM's local rows are chunked.

The last lines give the fraction of the gap between the private-head local method and backprop
that the shared readout closes on each problem (SOLO's ablation: about 57 % of the perplexity gap).

    python benchmarks/local_objectives.py                       # the whole table (CPU; see below)
    python benchmarks/local_objectives.py --problems lm --lm-steps 1000

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

from lpjax.research import costs  # noqa: E402
from lpjax.config.build import build_experiment  # noqa: E402


def recipe(name):
    path = os.path.join(os.path.dirname(__file__), "..", "recipes", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Sized for about 15 min on 2 CPU cores: the whole table took 6.6 CPU-minutes (27.5 min wall at a load
# of 16-46 on 2 shared cores), ~50 s of it compilation per variant, then ~0.17 s per LM step and
# ~0.12 s per MNIST step.
STEPS = {"lm": 200, "mnist": 150}
# The recipes' models, shrunk so that the table is CPU-feasible (printed in the header): the LM at width 64
# on 32-byte windows, test on the first 200 windows of the held-out text.
SHRINK = {"lm": {"model": {"dim": 64}, "dataset": {"seq_len": 32}, "eval_batches": 200},
          "mnist": {"eval_batches": None}}
PROBLEMS = {
    "lm": ("text_transformer", "chunked", {"head_depth": 1}, {"head_depth": 2, "head_pyramid": True}),
    "mnist": ("mnist_resnet", "greedy", {"head_depth": 2, "head_width": 32},
              {"head_depth": 3, "head_width": 32, "head_pyramid": True}),
}


def variants(problem, stale, extra):
    """The issue's five rows; with ``extra`` also a stale shared readout and AugLocal's pyramid heads."""
    _, local, deeper, pyramid = PROBLEMS[problem]
    shared = {"name": local, "shared_readout": True}
    rows = [("backprop", {"method": {"name": "backprop"}}),
            ("overlapping w=2", {"method": {"name": "overlapping", "window": 2}}),
            (PRIVATE.format(local), {"method": {"name": local}}),
            (SHARED.format(local), {"method": dict(shared, readout_refresh_steps=1)}),
            (f"{local}, deeper heads {deeper}", {"method": {"name": local}, "model": deeper})]
    if extra:
        rows += [(f"{local}, shared readout, refreshed every {stale} steps",
                  {"method": dict(shared, readout_refresh_steps=stale)}),
                 (f"{local}, pyramid heads {pyramid}", {"method": {"name": local}, "model": pyramid})]
    return rows


PRIVATE, SHARED = "{}, private heads", "{}, shared readout"


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
    for section, values in list(SHRINK[problem].items()) + list(overrides.items()):
        if isinstance(values, dict):
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
    limit = SHRINK[problem]["eval_batches"]
    test_x, test_y = data.test_x[:limit], data.test_y[:limit]
    test = trainer.evaluate(test_x, test_y)[-1]
    figure = f"{test['loss']:.4f} nats/byte" if problem == "lm" else f"{100 * test['accuracy']:.2f}% acc"
    print(f"| {problem} | {name} | {steps} | {figure} | {step_cost.flops_per_example / 1e6:.2f} | "
          f"{head_flops / 1e6:.2f} | {seconds:.0f} |", flush=True)
    return test['loss'] if problem == "lm" else test['accuracy']


def gap_closed(problem, results):
    """The fraction of the private-heads -> backprop gap that the shared readout closes."""
    local = PROBLEMS[problem][1]
    backprop, private, shared = results["backprop"], results[PRIVATE.format(local)], results[SHARED.format(local)]
    unit = "nats/byte" if problem == "lm" else "accuracy"
    if backprop == private:
        return f"{problem}: private heads and backprop are equal ({unit}); no gap to close"
    return (f"{problem}: the shared readout closes {100 * (private - shared) / (private - backprop):.0f}% of the "
            f"private-heads -> backprop gap in test {unit} (private {private:.4f}, shared {shared:.4f}, "
            f"backprop {backprop:.4f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-steps", type=int, default=STEPS["lm"])
    parser.add_argument("--mnist-steps", type=int, default=STEPS["mnist"])
    parser.add_argument("--extra", action="store_true", help="also a stale shared readout and pyramid heads")
    parser.add_argument("--stale", type=int, default=10, help="refresh interval of the stale shared-readout row")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--variants", nargs="+", default=None, help="only the variants whose name starts with these")
    parser.add_argument("--max-train", type=int, default=None, help="cap on training examples (default: recipe's)")
    args = parser.parse_args()
    steps = {"lm": args.lm_steps, "mnist": args.mnist_steps}
    print(f"K = 4 stages, equal steps per problem (lm {steps['lm']}, mnist {steps['mnist']}), reference executor, "
          f"sequential schedule; recipes changed by {SHRINK}; load: {os.getloadavg()}")
    print("| problem | variant | steps | final head, test | step MFLOPs/example | aux heads MFLOPs/example | train s |")
    print("|---|---|---|---|---|---|---|")
    gaps = []
    for problem in args.problems:
        results = {}
        for name, overrides in variants(problem, args.stale, args.extra):
            if args.variants is None or any(name.startswith(v) for v in args.variants):
                results[name] = run(problem, name, overrides, steps[problem], args.max_train)
        local = PROBLEMS[problem][1]
        if {"backprop", PRIVATE.format(local), SHARED.format(local)} <= set(results):
            gaps.append(gap_closed(problem, results))
    for line in gaps:
        print(line)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
