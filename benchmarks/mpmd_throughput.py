"""In-process throughput of the per-stage (MPMD) executor on 2 simulated CPU devices (issue 3).

One process with ``JAX_NUM_CPU_DEVICES=2`` (set before JAX starts), the same 2-stage MLP, method
(chunked) and schedule (``Streaming(M)``) three ways, timed side by side in interleaved rounds:

- ``mpmd``: ``lpjax.Layout(stages=2)`` -- stage k jitted on CPU device k, activations moved with
  ``jax.device_put``, no host synchronisation inside the loop;
- ``reference``: ``layout=None`` -- every stage on device 0, tasks in table order;
- ``spmd`` (info): ``lpjax.Layout(stages=2, executor="spmd")`` -- one program over both devices.

Printed as examples/s (median over rounds) and the ratio mpmd / reference, whatever it is. Both CPU
devices of one process share the same 2 cores, and XLA's CPU backend already spreads one device's
matmuls over both cores, so there is little or no stage parallelism to win in-process: expect about
1x or below (the emulation in ``pipeline_processes.py`` measures stage parallelism). The process CPU
time per step is printed beside the wall clock, and the parameters of all runs are compared at the
end (they ran the same steps on the same data; chunked is exact on every executor).

Run from the repository root (about a minute and a half):

    python benchmarks/mpmd_throughput.py
    python benchmarks/mpmd_throughput.py --quick
    python benchmarks/mpmd_throughput.py --width 1024 --layers 2 --microbatch 512 --steps 8 --rounds 5
"""

import argparse
import os
import statistics
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "2"  # before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lpjax  # noqa: E402
from bench_args import add_size_arguments  # noqa: E402
from mlp_bench import mlp_stages, random_batches, run_steps, wait_for  # noqa: E402
from lpjax.core.schedules import Streaming  # noqa: E402

STAGES = 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser)
    parser.add_argument("--no-spmd", action="store_true", help="skip the spmd line")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.microbatch, args.steps, args.rounds, args.warmup = 64, 1, 16, 4, 2, 2

    def model():
        return mlp_stages(width=args.width, layers_per_stage=args.layers, classes=args.classes,
                          num_stages=STAGES, seed=0)

    M = args.microbatches
    layouts = {"mpmd": lpjax.Layout(stages=STAGES), "reference": None}
    if not args.no_spmd:
        layouts["spmd"] = lpjax.Layout(stages=STAGES, executor="spmd")
    trainers = {name: lpjax.Trainer(model(), method=lpjax.Chunked(), optimizer=optax.sgd(0.01),
                                    schedule=Streaming(M), layout=layout) for name, layout in layouts.items()}
    batch = M * args.microbatch
    batches = random_batches(0, batch, args.width, args.classes)
    counters = {name: 0 for name in trainers}

    def run(name, steps):
        trainer = trainers[name]
        wait_for(trainer, None)
        wall, cpu = time.perf_counter(), time.process_time()
        run_steps(trainer, batches, counters[name], steps)
        counters[name] += steps
        return time.perf_counter() - wall, time.process_time() - cpu

    started = time.time()
    for name in trainers:
        run(name, args.warmup)
    wall, cpu = {name: [] for name in trainers}, {name: [] for name in trainers}
    for r in range(args.rounds):
        for name in (list(trainers) if r % 2 == 0 else list(trainers)[::-1]):
            w, c = run(name, args.steps)
            wall[name].append(w)
            cpu[name].append(c)

    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, {len(jax.devices())} CPU devices in this process; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"MLP {STAGES} stages x {args.layers} layers x width {args.width}, chunked, Streaming({M}), sgd; "
          f"microbatch {args.microbatch}; {args.rounds} interleaved rounds x {args.steps} steps after "
          f"{args.warmup} warm-up steps; medians")
    rate = {}
    for name in trainers:
        rate[name] = batch * args.steps / statistics.median(wall[name])
        per_round = ", ".join(f"{batch * args.steps / w:.0f}" for w in wall[name])
        print(f"  {name:>10}: {rate[name]:7.0f} examples/s; per step {statistics.median(wall[name]) / args.steps * 1e3:7.1f} "
              f"ms wall, {statistics.median(cpu[name]) / args.steps * 1e3:7.1f} ms CPU  (examples/s per round: {per_round})")
    paired = sorted(wall["reference"][i] / wall["mpmd"][i] for i in range(args.rounds))
    print(f"  mpmd / reference throughput: {rate['mpmd'] / rate['reference']:.2f}x "
          f"(per round {paired[0]:.2f}..{paired[-1]:.2f})")
    if "spmd" in rate:
        print(f"  (info) spmd / reference throughput: {rate['spmd'] / rate['reference']:.2f}x")

    for name, trainer in trainers.items():
        trainer.drain()
    want = jax.device_get([s.params for s in trainers["reference"].stage_states])
    for name, trainer in trainers.items():
        if name != "reference":
            got = jax.device_get([s.params for s in trainer.stage_states])
            worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
            print(f"  {name} vs reference parameters after the run (drained): largest difference {worst:.2e}")
    print(f"  total time {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
