"""Throughput and model-FLOPs utilisation of a greedy stage step against the backprop step (issue 4).

For a byte-level Transformer LM and a ResNet-18, in bf16, on one device, timed side by side in the
same process (alternating rounds):

- backprop: ONE jitted step of the whole network (forward, the output head's loss, backward, adam
  update): the step every device runs under data-parallel backprop.
- greedy stage k: ONE jitted step of stage k alone (forward of its layer, its head's loss, backward
  into that layer only, adam update): the step device k runs in a greedy pipeline. The slowest stage
  sets the pace of the pipeline.

Both are lpjax's own per-stage rules (``StageRule.forward`` + ``update``), the backprop one
built on the network cut into a single stage. The models have no dtype option, so the benchmark casts
the stage states' parameters, batch statistics and gradient buffers and the image inputs to bfloat16
(adam's moments stay float32, as in the usual mixed-precision setup); matmuls and convolutions then
run in bf16 (token ids stay int32).

FLOPs per step come from XLA's cost analysis of the very executable that is timed. MFU = achieved
FLOP/s / the device's peak dense bf16 FLOP/s (H100/H200 SXM: 989 TFLOP/s; A100: 312; ``--peak-tflops``
to give another); on CPU it is printed as n/a unless ``--peak-tflops`` is given. The printed ratio
``backprop ms / slowest stage ms`` is the per-step speed-up of a K-device greedy pipeline over one
device of data-parallel backprop at the same per-device batch (if the stages overlapped perfectly);
``ideal`` beside it is the same ratio from FLOPs alone.

Run from the repository root:

    python benchmarks/gpu_step.py            # one GPU, about 3 minutes (most of it compiling)
    python benchmarks/gpu_step.py --tiny     # CPU, tiny models, about a minute on 2 cores
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# a plain checkout run as `python benchmarks/gpu_step.py` imports this repository's lpjax
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lpjax  # noqa: E402
from lpjax.research.costs import cost_dict  # noqa: E402
from lpjax.core.stage_rule import StageRule  # noqa: E402
from lpjax.core.losses import softmax_cross_entropy  # noqa: E402

try:
    from lpjax.models import resnet18, transformer_lm  # noqa: E402
except ImportError:  # a checkout that is not pip-installed: setup.py maps lpjax.models to models/
    from models import resnet18, transformer_lm  # noqa: E402

# The embedding's gradient is a float32 scatter into bf16 (jax warns that this will become an error);
# it is the cast this benchmark chose, not a bug in the model.
warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}  # dense, SXM


@dataclasses.dataclass
class Case:
    name: str
    network: object
    x: np.ndarray
    y: np.ndarray


def cases(args):
    rng = np.random.default_rng(0)
    rngs = nnx.Rngs(0)
    if args.tiny:
        lm = dict(seq_len=16, dim=32, depth=2, heads=2, batch=8)
        cnn = dict(width=8, size=16, batch=8)
    else:
        lm = dict(seq_len=1024, dim=1024, depth=8, heads=16, batch=16)
        cnn = dict(width=64, size=32, batch=512)
    tokens = rng.integers(0, 256, (lm["batch"], lm["seq_len"] + 1)).astype(np.int32)
    out = [Case(f"transformer {lm['depth']}x{lm['dim']}, seq {lm['seq_len']}",
                transformer_lm(vocab_size=256, seq_len=lm["seq_len"], dim=lm["dim"], depth=lm["depth"],
                               heads=lm["heads"], rngs=rngs),
                tokens[:, :-1], tokens[:, 1:])]
    images = rng.normal(size=(cnn["batch"], cnn["size"], cnn["size"], 3)).astype(np.float32)
    out.append(Case(f"resnet18 width {cnn['width']}, {cnn['size']}x{cnn['size']}",
                    resnet18(num_classes=10, width=cnn["width"], rngs=rngs),
                    images, rng.integers(0, 10, cnn["batch"]).astype(np.int32)))
    return out


def to_bf16(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def bf16_state(state):
    """Parameters, batch statistics and the gradient buffer in bf16; adam's moments stay float32
    (the usual mixed-precision setup, and the kernel's mean gradient is float32)."""
    return dataclasses.replace(state, params=to_bf16(state.params), rest=to_bf16(state.rest),
                               grad_sum=to_bf16(state.grad_sum))


class Step:
    """One stage's jitted training step (forward, own loss, backward, update) on fixed inputs."""

    def __init__(self, label, rule, x, y):
        self.label = label
        state = bf16_state(rule.init_state())
        x = to_bf16(jnp.asarray(x))

        def step(state, x, y):
            state, _, _, _, metrics = rule.forward(state, x, y, True)
            return rule.update(state), metrics["loss"]

        compiled = jax.jit(step, donate_argnums=0).lower(state, x, y).compile()
        self.flops = float(cost_dict(compiled.cost_analysis()).get("flops", 0.0))
        self.fn, self.state, self.x, self.y, self.loss = compiled, state, x, jnp.asarray(y), None
        self.batch = x.shape[0]
        self.times = []

    def run(self, steps):
        jax.block_until_ready(self.state)
        start = time.perf_counter()
        for _ in range(steps):
            self.state, self.loss = self.fn(self.state, self.x, self.y)
        jax.block_until_ready((self.state, self.loss))
        return (time.perf_counter() - start) / steps


def build_steps(case, stage_ids):
    """The backprop step (network as one stage) and the greedy steps of ``stage_ids`` (one layer each)."""
    tx = optax.adam(1e-4)
    whole = lpjax.stage_network(case.network, num_stages=1, rngs=nnx.Rngs(1))
    steps = [Step("backprop (whole network)", StageRule(whole[0], 0, 1, lpjax.Backprop(), tx,
                                                           softmax_cross_entropy), case.x, case.y)]
    layers = len(case.network.layers)
    staged = lpjax.stage_network(case.network, num_stages=layers, rngs=nnx.Rngs(2))
    rules = [StageRule(stage, k, layers, lpjax.Greedy(), tx, softmax_cross_entropy)
               for k, stage in enumerate(staged)]
    h = to_bf16(jnp.asarray(case.x))
    for k, rule in enumerate(rules):
        if k in stage_ids:
            steps.append(Step(f"greedy stage {k} ({type(case.network.layers[k]).__name__})", rule, h, case.y))
        if k + 1 < layers and max(stage_ids) > k:
            h, _ = jax.jit(rule.predict)(bf16_state(rule.init_state()), h)  # the next stage's input
    return steps, layers


def peak_flops(args):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in kind and jax.devices()[0].platform == "gpu":
            return tflops * 1e12
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, for a CPU smoke run")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s")
    parser.add_argument("--all-stages", action="store_true",
                        help="time every greedy stage (default: the first, a middle and the last one)")
    args = parser.parse_args(argv)
    steps_per_round = args.steps or (3 if args.tiny else 10)
    peak = peak_flops(args)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); bf16 params/inputs; "
          f"peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}; {args.rounds} rounds x "
          f"{steps_per_round} steps, median", flush=True)
    header = f"{'step':<34} {'ms/step':>9} {'examples/s':>11} {'GFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6}"
    for case in cases(args):
        started = time.perf_counter()
        layers = len(case.network.layers)
        ids = set(range(layers)) if args.all_stages else {0, layers // 2, layers - 1}
        steps, layers = build_steps(case, ids)
        for step in steps:
            step.run(2)  # warm up
        for r in range(args.rounds):
            for step in (steps if r % 2 == 0 else steps[::-1]):  # alternate who goes first
                step.times.append(step.run(steps_per_round))
        print(f"\n{case.name}: batch {steps[0].batch}, {layers} layers (greedy: one stage per layer); "
              f"compile + timing {time.perf_counter() - started:.0f}s")
        print(header)
        for step in steps:
            t = statistics.median(step.times)
            rate = step.flops / t
            mfu = "n/a" if peak is None else f"{100 * rate / peak:.1f}%"
            print(f"{step.label:<34} {1e3 * t:9.2f} {step.batch / t:11.0f} {step.flops / 1e9:11.3g} "
                  f"{rate / 1e12:8.3g} {mfu:>6}")
        backprop, stages = steps[0], steps[1:]
        slowest = max(stages, key=lambda s: statistics.median(s.times))
        heaviest = max(s.flops for s in stages)
        print(f"ratio backprop / slowest greedy stage ({slowest.label}): "
              f"{statistics.median(backprop.times) / statistics.median(slowest.times):.2f}x measured, "
              f"{backprop.flops / heaviest:.2f}x ideal from FLOPs"
              + ("" if args.all_stages else " (of the stages timed; --all-stages for every one)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
