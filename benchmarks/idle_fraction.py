"""Idle fraction of streaming local vs GPipe and 1F1B backprop, from the tables and measured (issue 3).

At K = 4 stages and T = 1000 microbatches (M = 4 per optimizer step, so 250 steps), prints:

(a) the task tables: ``Streaming(M).table(K, T // M)`` (no flush between steps) and
    ``GPipe(M).table(K, T // M)`` and ``OneFOneB(M).table(K, T // M)`` (flush every step), their busy and idle slots and idle fraction,
    against the formulas (K-1)/(T+K-1) and (K-1)/(M+K-1);

(b) measured while the executors run T tiny microbatches, counting the (clock, stage) slots in which
    a task actually ran:

    - reference executor (``layout=None``; same interpreter as the per-stage MPMD executor): the
      executor's clock loop and its ``_execute`` are wrapped, each executed task is logged with the
      clock it ran in, and busy slots / (clocks x K) is computed from the log (also checking that no
      stage runs twice in a clock and that every microbatch visits stage k-1 before stage k), for
      chunked on ``Streaming(M)`` and for backprop on ``OneFOneB(M)``;
    - SPMD executor on K simulated CPU devices (``JAX_NUM_CPU_DEVICES=4``), chunked on
      ``Streaming(M)``: the device decides per clock from the validity flag whether a stage runs; a
      stage that ran returns its head's finite loss, a bubble returns NaN. The busy slots are counted
      on the device's per-(clock, stage) output, not on the host's plan.

The stream is drained at the end, so fill and drain are both counted: the measured fraction over a
whole run is the formula's. On a 2-core machine a wall-clock idle time per stage says nothing (all
stages share the cores), so slots are counted rather than seconds.

Run from the repository root (about a minute):

    python benchmarks/idle_fraction.py
    python benchmarks/idle_fraction.py --quick                  # T = 40
    python benchmarks/idle_fraction.py --stages 4 --microbatches 4 --total 1000
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=4, help="K")
    parser.add_argument("--total", type=int, default=1000, help="T: microbatches in the whole run")
    parser.add_argument("--microbatches", type=int, default=4, help="M: microbatches per optimizer step")
    parser.add_argument("--microbatch", type=int, default=8, help="examples per microbatch")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--no-spmd", action="store_true", help="skip the SPMD measurement")
    parser.add_argument("--quick", action="store_true", help="T = 40")
    args = parser.parse_args(argv)
    if args.quick:
        args.total = 40
    if args.total % args.microbatches:
        parser.error("--total must be a multiple of --microbatches")
    return args


def main(argv=None):
    args = parse_args(argv)
    K, T, M = args.stages, args.total, args.microbatches
    if not args.no_spmd:
        os.environ["JAX_NUM_CPU_DEVICES"] = str(K)  # before jax starts

    import jax
    import numpy as np
    import optax
    from flax import nnx

    import lpjax
    from lpjax.core.schedules import GPipe, OneFOneB, Streaming

    stream_formula = (K - 1) / (T + K - 1)
    gpipe_formula = (K - 1) / (M + K - 1)
    steps = T // M
    print(f"jax {jax.__version__}; K={K} stages, T={T} microbatches, M={M} per step ({steps} steps)")

    # -- (a) tables ------------------------------------------------------------------------------
    stream = Streaming(M).table(K, steps, backward=False)
    gpipe = GPipe(M).table(K, steps, backward=True)
    one_f_one_b = OneFOneB(M).table(K, steps, backward=True)
    print("(a) task tables")
    for name, table, formula, what in [("streaming local", stream, stream_formula, "(K-1)/(T+K-1)"),
                                       ("GPipe backprop  ", gpipe, gpipe_formula, "(K-1)/(M+K-1)"),
                                       ("1F1B backprop   ", one_f_one_b, gpipe_formula, "(K-1)/(M+K-1)")]:
        print(f"  {name}: {len(table.clocks):5d} clocks x {K} = {table.slots:5d} slots, {table.busy} busy, "
              f"{table.idle:4d} idle; idle fraction {table.idle_fraction:.6f}, formula {what} = {formula:.6f}"
              f" ({'exact' if abs(table.idle_fraction - formula) < 1e-12 else 'DIFFERENT'})")

    # -- (b) measured ----------------------------------------------------------------------------
    class Layer(nnx.Module):
        def __init__(self, din, dout, rngs):
            self.linear = nnx.Linear(din, dout, rngs=rngs)

        def __call__(self, x):
            return jax.nn.tanh(self.linear(x))

    def model():
        rngs = nnx.Rngs(0)
        return lpjax.cut_layers([Layer(args.width, args.width, rngs) for _ in range(K)],
                                lambda i, r: nnx.Linear(args.width, 4, rngs=r), num_stages=K, rngs=rngs)

    rng = np.random.default_rng(0)
    batch = M * args.microbatch
    batches = [(rng.normal(size=(batch, args.width)).astype(np.float32),
                rng.integers(0, 4, batch).astype(np.int32)) for _ in range(4)]

    def train(trainer):
        start = time.perf_counter()
        for i in range(steps):
            trainer.step(*batches[i % len(batches)])
        trainer.drain()
        jax.block_until_ready(jax.tree.leaves(trainer.stage_states))
        return time.perf_counter() - start

    def report(name, clocks, busy, formula, seconds, note=""):
        idle = 1 - busy / (clocks * K)
        print(f"  {name}: {clocks:5d} clocks, {busy} busy slots; measured idle fraction {idle:.6f}, "
              f"formula {formula:.6f} ({'equal' if abs(idle - formula) < 1e-12 else 'DIFFERENT'}); "
              f"{seconds:.1f} s{note}")

    print("(b) measured")
    for name, method, schedule, formula in [("reference, chunked, streaming ", lpjax.Chunked(), Streaming(M), stream_formula),
                                            ("reference, backprop, 1F1B     ", lpjax.Backprop(), OneFOneB(M), gpipe_formula)]:
        trainer = lpjax.Trainer(model(), method=method, optimizer=optax.sgd(0.01), schedule=schedule)
        log, clock = [], [0]
        executor = trainer.executor
        executor.whole_steps = False  # run task by task, so that each clock can be counted as it runs
        plan, execute = executor.schedule.plan, executor._execute

        class Clocks(list):
            def __iter__(self):  # the executor's loop: each clock it moves on to gets the next number
                for c in list.__iter__(self):
                    yield c
                    clock[0] += 1

        executor.schedule.plan = lambda *a, **kw: Clocks(plan(*a, **kw))  # this run's own schedule object
        executor._execute = lambda task: (log.append((clock[0], task)), execute(task))[1]
        seconds = train(trainer)
        slots = {(c, t.stage) for c, t in log}
        first = {}  # (stage, microbatch) -> clock of its first (forward or local) task
        visits = {}
        for c, t in log:
            first.setdefault((t.stage, t.microbatch), c)
            visits[(t.stage, t.microbatch)] = visits.get((t.stage, t.microbatch), 0) + 1
        per_microbatch = 2 if method.name == "backprop" else 1  # backprop: a forward and a backward task
        complete = all(visits.get((k, m)) == per_microbatch for k in range(K) for m in range(T))
        ordered = all(first[(k - 1, m)] < first[(k, m)] for k in range(1, K) for m in range(T))
        note = (f"; one task per stage per clock: {len(slots) == len(log)}; every microbatch visits every stage "
                f"{'(forward + backward)' if per_microbatch == 2 else 'once'}: {complete}; stage k-1 before k: {ordered}")
        report(name, clock[0], len(log), formula, seconds, note)

    if not args.no_spmd:
        if len(jax.devices()) < K:
            print(f"  SPMD: skipped, {len(jax.devices())} devices < {K}")
            return 0
        trainer = lpjax.Trainer(model(), method=lpjax.Chunked(), optimizer=optax.sgd(0.01), schedule=Streaming(M),
                                layout=lpjax.Layout(stages=K, executor="spmd"))
        executor = trainer.executor
        seen = []
        take = executor.take_metrics

        def logged_take():
            seen.extend(np.asarray(metrics["loss"]) for metrics, _ in executor._metrics)  # [clocks, stages]
            return take()

        executor.take_metrics = logged_take
        seconds = train(trainer)
        losses = np.concatenate(seen)
        busy = int(np.isfinite(losses).sum())
        per_stage = np.isfinite(losses).sum(0).tolist()
        report("SPMD, chunked, streaming      ", losses.shape[0], busy, stream_formula, seconds,
               f"; busy slots per stage {per_stage} (device-side: finite loss = the stage ran, NaN = bubble)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
