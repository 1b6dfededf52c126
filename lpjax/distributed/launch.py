"""``lpjax launch -n N [--cpu-devices D] -- train ...``: N local processes joined into one JAX run.

For trying a pod run on one machine (and for the multi-process tests). Each child is ``python -m
lpjax <command...>`` with ``LPJAX_COORDINATOR=127.0.0.1:<free port>``, ``LPJAX_NUM_PROCESSES=N`` and
``LPJAX_PROCESS_ID=i`` set, which ``lpjax.distributed.join`` reads; ``--cpu-devices D`` also sets
``JAX_PLATFORMS=cpu`` and ``JAX_NUM_CPU_DEVICES=D`` (simulated devices; CPU collectives use gloo,
see ``lpjax.distributed.join.initialize``). Without it the children see the machine's accelerators; on
one host with several GPUs give each child its own with ``--gpus-per-process``. ``--cores-per-process
C`` pins child i to CPU cores ``[i*C, (i+1)*C)`` of the launcher's own (before it starts, so XLA
sizes its thread pools to them): one simulated host per core, as the benchmarks use.

Every line a child prints comes out tagged ``[pI] `` on the launcher's stdout or stderr (where the
child printed it). SIGINT and SIGTERM go to every child. The launcher exits with the code of the
first child that failed (a child killed by signal S counts as 128 + S), after stopping the others;
0 when all succeed. Unless the launcher itself was signalled, it then says who failed, how, and at
about which step (the last ``N/TOTAL`` progress or ``step N`` it printed, or the newest checkpoint
in ``--workdir``), in one line: ``lpjax launch: process 1 was killed by SIGKILL at about step 150;
stopped the others; run the same command to resume``.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

PROG = "lpjax launch"
USAGE = (f"usage: {PROG} -n N [--cpu-devices D] [--gpus-per-process G] [--cores-per-process C] [--port P] "
         f"-- COMMAND [ARGS...]")
STOP_GRACE_S = 10  # after the first failure, how long the others get to exit on SIGTERM before SIGKILL
# where a child's output says how far it got: tqdm's "150/300 [" and lines such as "resumed ... at step 150"
_STEP_PATTERNS = (re.compile(r"(\d+)/\d+ \["), re.compile(r"\bstep (\d+)\b"))


class LaunchUsageError(Exception):
    """A mistake on the launch command line; reported as one line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage and exit; we say it in one line
        raise LaunchUsageError(f"{message}; {USAGE}")


def parse(args):
    """``(options, command)`` from ``-n N ... -- COMMAND ...``, or LaunchUsageError."""
    if "--" not in args:
        raise LaunchUsageError(f"put the lpjax command after '--', e.g. {PROG} -n 2 -- train --config ...; {USAGE}")
    split = args.index("--")
    ours, command = args[:split], args[split + 1:]
    parser = _Parser(prog=PROG, add_help=False, exit_on_error=False)
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--gpus-per-process", type=int, default=None)
    parser.add_argument("--cores-per-process", type=int, default=None)
    parser.add_argument("--port", type=int, default=None)
    try:
        options, unknown = parser.parse_known_args(ours)
    except argparse.ArgumentError as err:
        raise LaunchUsageError(f"{err}; {USAGE}") from None
    if unknown:
        raise LaunchUsageError(f"unknown launch option {' '.join(unknown)}; {USAGE}")
    if not 1 <= options.num_processes <= 256:
        raise LaunchUsageError(f"-n must be from 1 to 256, got {options.num_processes}")
    for name in ("cpu_devices", "gpus_per_process", "cores_per_process"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise LaunchUsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if options.cores_per_process is not None:
        have = len(os.sched_getaffinity(0))
        if options.num_processes * options.cores_per_process > have:
            raise LaunchUsageError(f"--cores-per-process {options.cores_per_process} x -n {options.num_processes} needs "
                                   f"{options.num_processes * options.cores_per_process} CPU cores but this process may "
                                   f"use {have}; lower either")
    if not command:
        raise LaunchUsageError(f"no command after '--'; {USAGE}")
    if command[0] == "launch":
        raise LaunchUsageError("launch cannot start launch; give the command to run, e.g. -- train ...")
    return options, command


def child_env(options, process_id: int, port: int, base=None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(LPJAX_COORDINATOR=f"127.0.0.1:{port}", LPJAX_NUM_PROCESSES=str(options.num_processes),
               LPJAX_PROCESS_ID=str(process_id))
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines arrive as they are printed, not at exit
    if options.cpu_devices is not None:
        env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(options.cpu_devices))
    if options.gpus_per_process is not None:
        first = process_id * options.gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(options.gpus_per_process))
    return env


def child_cores(options, process_id: int):
    """The CPU cores child ``process_id`` is pinned to, or None (not pinned)."""
    if getattr(options, "cores_per_process", None) is None:
        return None
    mine = sorted(os.sched_getaffinity(0))
    first = process_id * options.cores_per_process
    return set(mine[first:first + options.cores_per_process])


def _pump(stream, tag, out, lock, progress=None):
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"{tag}{line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()
        if progress is not None:
            progress.read(line)
    stream.close()


class Progress:
    """The last step a child's output mentioned (None until one does)."""

    def __init__(self):
        self.step = None

    def read(self, line: str) -> None:
        for part in line.split("\r"):  # tqdm redraws its bar in place
            for pattern in _STEP_PATTERNS:
                found = pattern.findall(part)
                if found:
                    self.step = int(found[-1])


def failure_line(process_id: int, returncode: int, step=None) -> str:
    """What the launcher says when child ``process_id`` ended with ``returncode`` (negative: a signal)."""
    at = f" at about step {step}" if step is not None else ""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{PROG}: process {process_id} was killed by {name}{at}; stopped the others; run the same command to resume"
    return f"{PROG}: process {process_id} exited with status {returncode}{at}; stopped the others; its error is above"


def _workdir_step(command):
    """The newest complete checkpoint's step in the command's ``--workdir``, or None."""
    from lpjax.training.workdir import checkpoint_steps

    for i, arg in enumerate(command):
        workdir = arg.split("=", 1)[1] if arg.startswith("--workdir=") else (
            command[i + 1] if arg == "--workdir" and i + 1 < len(command) else None)
        if workdir:
            steps = checkpoint_steps(workdir)
            return steps[-1] if steps else None
    return None


def _code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal S: 128 + S, like a shell


def run(options, command, program=None) -> int:
    """Start the children (``program + command``; ``program`` defaults to ``python -m lpjax``),
    relay their output and signals; return the launcher's exit code."""
    program = list(program or [sys.executable, "-m", "lpjax"])
    port = options.port or free_port()
    lock = threading.Lock()
    procs, pumps, early, starting, signalled = [], [], [], [True], []
    progress = [Progress() for _ in range(options.num_processes)]

    def forward(signum, _frame):
        signalled.append(signum)
        if starting[0]:
            early.append((signum, len(procs)))  # the children started after it need it too
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    # installed before the first child starts: a signal that arrives while the others are still being
    # started would otherwise kill the launcher and leave its children running
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(options.num_processes):
            cores = child_cores(options, i)
            pin = None if cores is None else (lambda cores=cores: os.sched_setaffinity(0, cores))
            proc = subprocess.Popen([*program, *command], env=child_env(options, i, port),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                    start_new_session=True,  # a terminal's Ctrl-C reaches the children through us only
                                    preexec_fn=pin)
            procs.append(proc)
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                pumps.append(threading.Thread(target=_pump, args=(stream, f"[p{i}] ", out, lock, progress[i]),
                                              daemon=True))
                pumps[-1].start()

        starting[0] = False
        for signum, started in early:
            for proc in procs[started:]:
                proc.send_signal(signum)
        first_failure, failed = None, None
        while [p.poll() for p in procs].count(None):  # poll every child (any() would stop at the first)
            if first_failure is None:
                failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)
                if failed is not None:
                    first_failure = _code(procs[failed].returncode)
                    _stop(procs)
            time.sleep(0.05)
        if first_failure is None:
            failed = next((i for i, p in enumerate(procs) if p.returncode), None)
            first_failure = 0 if failed is None else _code(procs[failed].returncode)
    except BaseException:  # e.g. a child that cannot be started: leave none of the others behind
        _stop(procs)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for thread in pumps:
        thread.join(timeout=5)
    if failed is not None and not signalled:  # a signal the launcher forwarded is no child's failure
        steps = [step for step in (progress[failed].step, _workdir_step(command)) if step is not None]
        with lock:
            print(failure_line(failed, procs[failed].returncode, max(steps) if steps else None), file=sys.stderr,
                  flush=True)
    return first_failure


def _stop(procs):
    """Ask the children still running to stop; kill those that do not within STOP_GRACE_S."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(args) -> int:
    try:
        options, command = parse(list(args))
    except LaunchUsageError as err:
        print(f"lpjax: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return run(options, command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
