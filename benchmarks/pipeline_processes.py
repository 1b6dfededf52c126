"""Stage parallelism and streaming-local vs pipelined backprop, one emulated device per process (issue 3).

Why processes. On a 2-core machine XLA's CPU backend spreads one device's work over both cores, so
two CPU devices inside one process do not map onto two cores. Here every device is its own process,
pinned to one core with ``os.sched_setaffinity`` (XLA sizes its thread pools from the affinity mask)
and run with ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``; the processes are joined with
``lpjax.distributed.join.initialize`` (gloo CPU collectives), which is the multi-host path. The SPMD
executor (``lpjax.Layout(stages=2, executor="spmd")``) then runs stage k in process k on core k.

The model is a homogeneous MLP: 2 stages x ``--layers`` dense+relu layers of ``--width`` units (the
input has ``--width`` features too, so both stages cost the same), with a small linear head per stage.
Every configuration trains the same model from the same weights on the same batches with
``optax.sgd``, through ``lpjax.Trainer.step``; a step is M = ``--microbatches`` microbatches of
``--microbatch`` examples. "2x1" is 2 processes x 1 core, "1x1" is 1 process on 1 core:

- ``local 2x1``: chunked (window 1) on the streaming schedule, SPMD executor, one stage per process;
- ``local 1x1``: the same method and schedule on the reference executor (``layout=None``): the same
  math on one single-core device;
- ``local spmd@1``: (diagnostic) the very same SPMD program as ``local 2x1``, but both of its devices
  in ONE process pinned to ONE core (``JAX_NUM_CPU_DEVICES=2``). ``local 2x1 / local spmd@1`` is the
  parallel efficiency of the pipeline alone; ``local spmd@1 / local 1x1`` the SPMD executor's own cost;
- ``backprop 2x1``: ``lpjax.Backprop()`` with ``OneFOneB(M)`` (1F1B, flush per step), SPMD, same 2
  processes: the pipelined-backprop baseline;
- ``backprop 1x1``: backprop with 1F1B on the reference executor, 1 process, 1 core;
- ``backprop spmd@1``: (diagnostic) the 1F1B backprop SPMD program with both devices on one core;
- ``messages 2x1``: (diagnostic) no training: local 2x1's messages alone, one activation-sized
  ``lax.ppermute`` per clock from stage 0 to stage 1, M clocks a step, in the same two processes
  (``MessagesOnly``): the transport's share of local 2x1's step;
- ``data 2x1`` and ``data 1x1``: the whole MLP as ONE stage, chunked on the streaming schedule, with
  each microbatch split over 2 devices (``Layout(stages=1, data=2, executor="spmd")``, the same 2
  processes) against the same on 1 core: data parallelism inside a stage, whose gradients are
  all-reduced once per update (not per clock);
- ``local 1x1 pair``: (diagnostic) two independent copies of ``local 1x1`` at once, one per core. Each
  copy does exactly the lone 1x1's work, so 2 x (1x1 time / pair time) is the most two cores of this
  machine give for this work when both are busy: the hardware ceiling for stage parallelism. On the
  2-vCPU KVM machine here the same XLA rules run slower while the other core is busy (shared cache
  and memory bandwidth, or host cores the hypervisor shares), so the ceiling is below 2.0x.

All worker processes start first and stay up (idle ones block on a pipe); the parent then runs one
configuration at a time, in alternating order over ``--rounds`` rounds of ``--steps`` steps. The
``--warmup`` steps before (compilation and the streaming pipeline's fill) are not timed, and the
stream is never drained inside a timed round, so fill/drain does not enter the throughput. A 2x1 round
lasts until both processes have finished and blocked on their results; throughput is examples / wall
second, median over rounds, and a ratio's goal is judged on the ratio of those medians. Beside it,
"per round" gives the range and median of the ratios of rounds run side by side, which drift in the
host's speed over a run moves less. It prints:

- stage parallelism: local 2x1 / local 1x1 (goal >= 1.8x, limit 2.0x);
- against pipelined backprop: local 2x1 / backprop 2x1 with M = 4, beside 0.95 x the bubble bound
  (M+K-1)/M (goal: at least that, 1.19x at K=2, M=4);
- the SPMD executor's own cost on one core: local spmd@1 time / local 1x1 time (goal <= 1.03x), and
  the same for 1F1B backprop: backprop spmd@1 / backprop 1x1 (goal <= 1.1x);
- (diagnostic) where local 2x1's step goes: the busier process's CPU against half of local 1x1's,
  the time it waited for the other stage (wall - CPU), and what the messages alone take;
- the idle fraction of each schedule's task table, and whether every local run ends with the same
  parameters as local 1x1 (they ran the same steps on the same data; chunked is exact).

On a shared machine other jobs take the cores we use, and a lock-step pipeline that needs two cores
suffers more from that than a run that needs one (the other jobs move to the free core). So each line
also shows the busier process's CPU time (and each process's, for a run of several), how long its
XLA thread was runnable but kept from its core (/proc schedstat), and how much of the workers' cores
other jobs used during its rounds (/proc/stat);
"ceiling" is the stage-parallelism ratio the CPU times alone would allow if nothing ever waited; the
"hardware ceiling" is the one the ``local 1x1 pair`` run allows.

Run from the repository root (about 2.5 minutes at the defaults on 2 cores):

    python benchmarks/pipeline_processes.py
    python benchmarks/pipeline_processes.py --quick          # tiny sizes, under a minute; checks the plumbing
    python benchmarks/pipeline_processes.py --microbatch 1024 --layers 4 --steps 4 --rounds 5
    python benchmarks/pipeline_processes.py --nice -10      # (root) favour the workers over other jobs (it did
                                                            # not help on the shared 2-core machine here)
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

STAGES = 2
GOAL_STAGE = 1.8
RESULT = "@@RESULT "
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_args import add_size_arguments  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip 'local spmd@1' and 'backprop 1x1' (saves about 40%% of the time)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing")
    parser.add_argument("--nice", type=int, default=0,
                        help="scheduling niceness of the workers; a negative value (root only) makes other jobs on a "
                             "shared machine disturb the measurement less, at their expense")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for one worker reply")
    # internal: a worker process
    parser.add_argument("--worker", choices=["pipe", "single", "spmd1"], help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.microbatch, args.steps, args.rounds, args.warmup = 64, 1, 16, 4, 2, 2
    return args


# ================================================================================================
# worker side
# ================================================================================================

def worker(args):
    os.sched_setaffinity(0, {args.core})  # before JAX starts: its thread pools follow the mask
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # threads started later inherit it
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_NUM_CPU_DEVICES"] = str(STAGES if args.worker == "spmd1" else 1)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()

    import lpjax.distributed.join

    if args.worker == "pipe":
        lpjax.distributed.join.initialize(f"127.0.0.1:{args.port}", STAGES, args.process_id)

    import jax
    import numpy as np
    import optax

    import lpjax
    from lpjax.core.schedules import OneFOneB, Streaming
    from mlp_bench import mlp_stages, random_batches, run_steps, wait_for

    def model():
        return mlp_stages(width=args.width, layers_per_stage=args.layers, classes=args.classes,
                          num_stages=STAGES, seed=args.seed)

    M = args.microbatches
    layout = None if args.worker == "single" else lpjax.Layout(stages=STAGES, executor="spmd")
    tx = optax.sgd(args.lr)
    trainers = {"local": lpjax.Trainer(model(), method=lpjax.Chunked(), optimizer=tx,
                                       schedule=Streaming(M), layout=layout)}
    trainers["backprop"] = lpjax.Trainer(model(), method=lpjax.Backprop(), optimizer=tx,
                                         schedule=OneFOneB(M), layout=layout)
    if args.worker != "spmd1":  # the whole MLP as one stage, its microbatches split over 2 devices
        whole = mlp_stages(width=args.width, layers_per_stage=STAGES * args.layers, classes=args.classes,
                           num_stages=1, seed=args.seed)
        trainers["data"] = lpjax.Trainer(whole, method=lpjax.Chunked(), optimizer=tx, schedule=Streaming(M),
                                         layout=None if layout is None else
                                         lpjax.Layout(stages=1, data=STAGES, executor="spmd"))
    batch = M * args.microbatch  # same seed in every process: SPMD needs identical inputs
    batches = random_batches(args.seed, batch, args.width, args.classes)
    if args.worker == "pipe" and not args.no_diagnostics:
        trainers["messages"] = MessagesOnly(args)
    counters = {name: 0 for name in trainers}

    def run(name, steps):
        trainer = trainers[name]
        if name != "messages":  # MessagesOnly.run waits for its own end
            wait_for(trainer, None)
        threads = thread_times()
        wall, cpu = time.perf_counter(), time.process_time()
        if name == "messages":
            trainer.run(steps)
        else:
            run_steps(trainer, batches, counters[name], steps)
        counters[name] += steps
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = thread_times()
        # the busiest thread executes the XLA program: its time runnable but not running is time lost
        _, delay = max((after[t][0] - threads.get(t, (0, 0))[0], after[t][1] - threads.get(t, (0, 0))[1]) for t in after)
        return {"wall": wall, "cpu": cpu, "delay": delay}

    def finish(name):
        trainer = trainers[name]
        trainer.drain()
        saved = {}
        for k, state in enumerate(trainer.stage_states):
            if state is not None:
                for i, leaf in enumerate(jax.tree.leaves(state.params)):
                    saved[f"stage{k}_{i}"] = np.asarray(leaf.addressable_data(0))
        path = os.path.join(args.out, f"{args.worker}_{name}_{args.process_id}.npz")
        np.savez(path, **saved)
        return {"saved": path}

    reply({"ready": True, "affinity": sorted(os.sched_getaffinity(0)), "devices": len(jax.devices()),
           "nice": os.getpriority(os.PRIO_PROCESS, 0),
           "jax": jax.__version__, "xla_flags": os.environ["XLA_FLAGS"]})
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "quit":
            break
        if command[0] == "run":
            reply(run(command[1], int(command[2])))
        elif command[0] == "finish":
            reply(finish(command[1]))
    if args.worker == "pipe":
        jax.distributed.shutdown()


class MessagesOnly:
    """What local 2x1's messages cost alone: one jitted SPMD program per step that sends, at each of
    the step's M clocks, one activation-sized message ([microbatch, width] float32) from stage 0 to
    stage 1 with ``lax.ppermute``, the collective the SPMD executor's clocks use, and computes
    nothing else. Its time is the transport's share of local 2x1's step (gloo over loopback TCP
    here; NCCL or ICI on accelerators)."""

    def __init__(self, args):
        import jax
        import numpy as np
        from jax import lax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.array(jax.devices()), ("stage",))

        def clocks(h):
            def clock(h, _):  # what arrives becomes what is sent next, so no clock is dead code
                return lax.ppermute(h, "stage", [(i, i + 1) for i in range(STAGES - 1)]), None
            return lax.scan(clock, h, None, length=args.microbatches)[0]

        spec = PartitionSpec("stage")
        self.program = jax.jit(jax.shard_map(clocks, mesh=mesh, in_specs=spec, out_specs=spec), donate_argnums=0)
        self.h = jax.make_array_from_callback((STAGES * args.microbatch, args.width), NamedSharding(mesh, spec),
                                              lambda index: np.ones((args.microbatch, args.width), np.float32))

    def run(self, steps):
        for _ in range(steps):
            self.h = self.program(self.h)
        self.h.block_until_ready()


def thread_times():
    """{thread id: (seconds running, seconds runnable but waiting for the core)} from /proc schedstat."""
    out = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                run, delay, _ = f.read().split()
            out[task] = (int(run) / 1e9, int(delay) / 1e9)
        except (OSError, ValueError):
            pass
    return out


def reply(obj):
    sys.stdout.write(RESULT + json.dumps(obj) + "\n")
    sys.stdout.flush()


# ================================================================================================
# parent side
# ================================================================================================

class Group:
    """Worker processes that take the same commands and answer with one line each."""

    def __init__(self, name, commands, cores, timeout):
        self.name, self.cores, self.timeout = name, cores, timeout
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
                      for cmd in commands]

    def send(self, line):
        for proc in self.procs:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        return self.collect()

    def collect(self):
        answers = []
        for proc in self.procs:
            start = time.time()
            while True:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker {self.name} (pid {proc.pid}) exited with {proc.wait()}")
                if line.startswith(RESULT):
                    answers.append(json.loads(line[len(RESULT):]))
                    break
                if not line.startswith("[Gloo]"):
                    sys.stdout.write(f"[{self.name}] {line}")
                if time.time() - start > self.timeout:
                    raise TimeoutError(f"worker {self.name} did not answer")
        return answers

    def close(self):
        for proc in self.procs:
            try:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def core_busy():
    """Busy seconds per core since boot, from /proc/stat (user+nice+system+irq+softirq+steal)."""
    hz = os.sysconf("SC_CLK_TCK")
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in fields]
                busy[int(name[3:])] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz
    return busy


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table_idle(args):
    from lpjax.core.schedules import OneFOneB, Streaming

    M, T = args.microbatches, args.microbatches * (args.warmup + args.rounds * args.steps)
    stream = Streaming(M).table(STAGES, T // M, backward=False)
    gpipe = OneFOneB(M).table(STAGES, 1, backward=True)
    return (f"  idle fraction of the tables (K={STAGES}): streaming local, whole run of T={T} microbatches "
            f"{stream.idle_fraction:.4f} (formula (K-1)/(T+K-1) = {(STAGES - 1) / (T + STAGES - 1):.4f}; the timed "
            f"rounds are inside the stream, idle 0); 1F1B backprop, per step of M={M}: {gpipe.idle_fraction:.4f} "
            f"(formula (K-1)/(M+K-1) = {(STAGES - 1) / (M + STAGES - 1):.4f})")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < STAGES:
        print(f"needs {STAGES} cores, this process may use {len(cores)}")
        return 1
    out = tempfile.mkdtemp(prefix="lpjax_pipeline_")
    base = [sys.executable, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv) + ["--out", out]
    port = free_port()
    started = time.time()
    load_before = os.getloadavg()[0]
    groups = {"2x1": Group("2x1", [base + ["--worker", "pipe", "--process-id", str(i), "--port", str(port),
                                           "--core", str(cores[i])] for i in range(STAGES)], cores[:STAGES], args.timeout),
              "1x1": Group("1x1", [base + ["--worker", "single", "--core", str(cores[0])]], cores[:1], args.timeout)}
    configs = [("local", "2x1"), ("local", "1x1"), ("backprop", "2x1"), ("data", "2x1"), ("data", "1x1")]
    if not args.no_diagnostics:
        configs.append(("messages", "2x1"))
        groups["spmd@1"] = Group("spmd@1", [base + ["--worker", "spmd1", "--core", str(cores[0])]], cores[:1], args.timeout)
        # process ids 10, 11: distinct from the 1x1 worker's, so no file of theirs could collide
        groups["1x1 pair"] = Group("1x1 pair", [base + ["--worker", "single", "--core", str(cores[i]),
                                                        "--process-id", str(10 + i)] for i in range(STAGES)],
                                   cores[:STAGES], args.timeout)
        configs += [("local", "spmd@1"), ("backprop", "1x1"), ("backprop", "spmd@1"), ("local", "1x1 pair")]
    label = lambda name, where: f"{name} {where}"
    wall, cpu, others, delay, each_cpu = ({label(*c): [] for c in configs} for _ in range(5))
    try:
        info = {name: group.collect() for name, group in groups.items()}
        for name, where in configs:  # compile and fill the pipeline, one configuration at a time
            groups[where].send(f"run {name} {args.warmup}")
        for r in range(args.rounds):
            for name, where in (configs if r % 2 == 0 else configs[::-1]):
                group = groups[where]
                before = core_busy()
                answers = group.send(f"run {name} {args.steps}")
                after = core_busy()
                key = label(name, where)
                wall[key].append(max(a["wall"] for a in answers))
                cpu[key].append(max(a["cpu"] for a in answers))
                each_cpu[key].append([a["cpu"] for a in answers])  # in process-id order (stage order for 2x1)
                delay[key].append(max(a["delay"] for a in answers))
                busy = sum(after[c] - before[c] for c in group.cores)
                others[key].append(max(0.0, busy - sum(a["cpu"] for a in answers)) / (wall[key][-1] * len(group.cores)))
        saved = {where: group.send("finish local") for where, group in groups.items() if where != "1x1 pair"}
        saved_data = {where: groups[where].send("finish data") for where in ("2x1", "1x1")}
    finally:
        for group in groups.values():
            group.close()

    import numpy as np

    batch = args.microbatches * args.microbatch
    first = info["2x1"][0]
    print(f"jax {first['jax']}, {os.cpu_count()} CPUs, load average {load_before:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; workers' nice {first['nice']}; XLA_FLAGS={first['xla_flags']!r}; worker cores "
          + ", ".join(f"{where} {[i['affinity'] for i in group]}" for where, group in info.items())
          + "; devices seen: " + ", ".join(f"{where} {group[0]['devices']}" for where, group in info.items()))
    print(f"MLP {STAGES} stages x {args.layers} layers x width {args.width}, sgd; step = M={args.microbatches} "
          f"microbatches x {args.microbatch} examples; {args.rounds} interleaved rounds x {args.steps} steps "
          f"({args.steps * args.microbatches} microbatches a round) after {args.warmup} warm-up steps; medians")
    rate = {}
    ms = lambda values: statistics.median(values) / args.steps * 1e3
    for key in wall:
        if key == "messages 2x1":  # no training: its own line below
            continue
        rate[key] = batch * args.steps / statistics.median(wall[key])
        per_round = ", ".join(f"{batch * args.steps / w:.0f}" for w in wall[key])
        processes = len(each_cpu[key][0])
        each = "" if processes == 1 else " (each process: " + " / ".join(
            f"{ms([c[i] for c in each_cpu[key]]):.1f}" for i in range(processes)) + ")"
        print(f"  {key:>14}: {rate[key]:7.0f} examples/s; per step {ms(wall[key]):6.1f} ms wall, {ms(cpu[key]):6.1f} ms CPU"
              f"{each}, XLA thread kept from its core {ms(delay[key]):5.1f} ms; other jobs "
              f"{100 * statistics.median(others[key]):3.0f}% of its cores  (examples/s per round: {per_round})")
    print("  (CPU: all threads of the busier process, which all share its one core, and of each process "
          "(2x1: stage 0 / stage 1); kept from its core: the busiest thread's time runnable but not running; "
          "other jobs: busy time of the workers' cores in /proc/stat less the workers' own CPU time)")

    def ratio(a, b):
        paired = sorted(wall[b][i] / wall[a][i] for i in range(args.rounds))  # rounds run side by side
        return rate[a] / rate[b], f"per round {paired[0]:.2f}..{paired[-1]:.2f}, median {statistics.median(paired):.2f}"

    stage, stage_rounds = ratio("local 2x1", "local 1x1")
    bp, bp_rounds = ratio("local 2x1", "backprop 2x1")
    print(f"  stage parallelism, local 2x1 / local 1x1: {stage:.2f}x ({stage_rounds}; goal >= {GOAL_STAGE}x, "
          f"limit 2.0x: {'met' if stage >= GOAL_STAGE else 'NOT met'})")
    M = args.microbatches
    bound = (M + STAGES - 1) / M
    data, data_rounds = ratio("data 2x1", "data 1x1")
    print(f"  data parallelism, the whole MLP as 1 stage x 2 data / the same on 1x1: {data:.2f}x ({data_rounds}; one "
          f"all-reduce of the gradient per update, none per clock)")
    print(f"  against pipelined backprop, local 2x1 / 1F1B backprop 2x1 (M={M}): {bp:.2f}x ({bp_rounds}); bubble "
          f"bound (M+K-1)/M = {bound:.2f}x, goal >= 0.95 x bound = {0.95 * bound:.2f}x: "
          f"{'met' if bp >= 0.95 * bound else 'NOT met'}")
    if not args.no_diagnostics:
        for a, b, what, goal in [("local 1x1", "local spmd@1", "SPMD executor's own cost on 1 core, local", 1.03),
                                 ("backprop 1x1", "backprop spmd@1", "SPMD executor's own cost on 1 core, 1F1B backprop",
                                  1.1)]:
            value, rounds = ratio(a, b)  # time of b / time of a
            # both run on one core, so CPU time is the same work less the time other jobs took the core
            by_cpu = statistics.median(cpu[b]) / statistics.median(cpu[a])
            print(f"  {what}: time {b} / time {a} = {value:.2f}x ({rounds}; CPU time {by_cpu:.2f}x; goal <= {goal}x: "
                  f"{'met' if value <= goal else 'NOT met'})")
        for a, b, what in [("local 2x1", "local spmd@1", "pipeline efficiency, same SPMD program on 2 cores vs 1"),
                           ("backprop 2x1", "backprop 1x1", "1F1B backprop, SPMD 2x1 vs reference 1x1")]:
            value, rounds = ratio(a, b)
            print(f"  (diagnostic) {what}: {a} / {b} = {value:.2f}x ({rounds})")
    ceiling = statistics.median(cpu["local 1x1"]) / statistics.median(cpu["local 2x1"])
    print(f"  (diagnostic) stage-parallelism ceiling if no process ever waited (CPU time alone): local 1x1 CPU / "
          f"local 2x1 CPU = {ceiling:.2f}x")
    if not args.no_diagnostics:
        step_wall, busier, half = ms(wall["local 2x1"]), ms(cpu["local 2x1"]), ms(cpu["local 1x1"]) / 2
        print(f"  (diagnostic) where local 2x1's step goes: {step_wall:.1f} ms wall; the busier process's CPU "
              f"{busier:.1f} ms against half of local 1x1's, {half:.1f} ms; not running (waiting for the other "
              f"stage, wall - CPU) {step_wall - busier:.1f} ms. The step's {args.microbatches} messages alone, sent "
              f"the same way with no compute: {ms(wall['messages 2x1']):.1f} ms wall, {ms(cpu['messages 2x1']):.1f} ms "
              f"CPU in the busier process")
        alone, pair = wall["local 1x1"], wall["local 1x1 pair"]  # pair: the slower copy of each round
        slower = statistics.median(pair) / statistics.median(alone)
        slower_cpu = statistics.median(cpu["local 1x1 pair"]) / statistics.median(cpu["local 1x1"])
        paired = sorted(2 * alone[i] / pair[i] for i in range(args.rounds))
        print(f"  (diagnostic) hardware ceiling, two copies of local 1x1 at once, one per core: each takes {slower:.2f}x "
              f"the lone copy's wall time and {slower_cpu:.2f}x its CPU time, so two busy cores give at most "
              f"{2 / slower:.2f}x here (per round {paired[0]:.2f}..{paired[-1]:.2f})")
    print(table_idle(args))

    for label_, runs in (("local", saved), ("data", saved_data)):
        compare_parameters(label_, runs)
    shutil.rmtree(out, ignore_errors=True)
    print(f"  total time {time.time() - started:.0f} s")
    return 0


def compare_parameters(name, saved):
    """Each layout's parameters after the run (drained) against 1x1's, which ran the same steps."""
    import numpy as np

    want = dict(np.load(saved["1x1"][0]["saved"]))
    for where in saved:
        if where == "1x1":
            continue
        got = {}
        for answer in saved[where]:
            got.update(np.load(answer["saved"]))
        worst = max(float(np.max(np.abs(got[key] - want[key]))) if key in got else float("inf") for key in want)
        print(f"  {name} {where} vs {name} 1x1 parameters after the run (drained): largest difference {worst:.2e} "
              f"({'bit-for-bit' if worst == 0 else 'close' if worst <= 1e-5 else 'DIFFERENT'})")


if __name__ == "__main__":
    sys.exit(main())
