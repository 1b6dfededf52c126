"""`lpjax launch`: environment, tagged output, signal forwarding and exit codes, with real child
processes. The children here are small Python scripts (no JAX) so the tests take seconds; the
training runs through the launcher are in tests/test_multihost_train.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from lpjax.distributed import launch

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    pid = int(os.environ["LPJAX_PROCESS_ID"])
    print(f"id={pid} of={os.environ['LPJAX_NUM_PROCESSES']} at={os.environ['LPJAX_COORDINATOR']} "
          f"devices={os.environ.get('JAX_NUM_CPU_DEVICES')} platforms={os.environ.get('JAX_PLATFORMS')}", flush=True)
    print(f"to stderr {pid}", file=sys.stderr, flush=True)
    print(f"cores {pid} {sorted(os.sched_getaffinity(0))}", flush=True)
    mode = sys.argv[1]
    if mode == "fail" and pid == 1:
        time.sleep(0.5)
        sys.exit(3)
    if mode == "signal":
        signal.signal(signal.SIGTERM, lambda s, f: (print(f"got {s}", flush=True), sys.exit(0)))
        print("ready", flush=True)
    if mode in ("fail", "signal"):
        time.sleep(120)
""")


def options(n, cpu_devices=None):
    return SimpleNamespace(num_processes=n, cpu_devices=cpu_devices, gpus_per_process=None, port=None)


def test_children_get_the_environment_and_tagged_lines(capfd):
    rc = launch.run(options(2, cpu_devices=2), ["ok"], program=[sys.executable, "-c", SCRIPT])
    out, err = capfd.readouterr()
    assert rc == 0
    for pid in range(2):
        line = next(line for line in out.splitlines() if line.startswith(f"[p{pid}] id="))
        assert f"id={pid} of=2 at=127.0.0.1:" in line and "devices=2 platforms=cpu" in line
        assert f"[p{pid}] to stderr {pid}" in err.splitlines()
    ports = {line.split("at=")[1].split()[0] for line in out.splitlines() if "at=" in line}
    assert len(ports) == 1  # one coordinator address for all


def test_cores_per_process_pins_each_child_to_its_own_cores(capfd):
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        pytest.skip("needs 2 usable CPU cores")
    pinned = SimpleNamespace(num_processes=2, cpu_devices=None, gpus_per_process=None, port=None, cores_per_process=1)
    assert launch.run(pinned, ["ok"], program=[sys.executable, "-c", SCRIPT]) == 0
    out = capfd.readouterr().out
    for pid in range(2):
        assert f"[p{pid}] cores {pid} [{mine[pid]}]" in out.splitlines(), out


def test_first_failure_sets_the_exit_code_and_stops_the_others(capfd):
    started = time.monotonic()
    rc = launch.run(options(2), ["fail"], program=[sys.executable, "-c", SCRIPT])
    assert rc == 3
    assert time.monotonic() - started < launch.STOP_GRACE_S + 30  # process 0 (sleeping 120 s) was stopped


def test_sigterm_reaches_every_child(tmp_path):
    driver = ("import sys; from types import SimpleNamespace; from lpjax.distributed import launch; "
              f"sys.exit(launch.run(SimpleNamespace(num_processes=2, cpu_devices=None, gpus_per_process=None, "
              f"port=None), ['signal'], program=[sys.executable, '-c', {SCRIPT!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    ready = set()
    deadline = time.monotonic() + 120
    lines = []
    while len(ready) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.strip().endswith("ready"):
            ready.add(line[:4])
    assert len(ready) == 2, lines
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "[p0] got 15" in out and "[p1] got 15" in out


def test_a_signal_while_children_are_still_starting_reaches_every_child():
    """SIGTERM that reaches the launcher between starting one child and the next (here: sent by the
    launcher to itself just before the second starts) still stops both, and the launcher lives to
    report it instead of dying and leaving its children running."""
    driver = ("import os, signal, sys; from types import SimpleNamespace; from lpjax.distributed import launch; "
              "env = launch.child_env; "
              "launch.child_env = lambda options, i, port: "
              "(i == 1 and os.kill(os.getpid(), signal.SIGTERM), env(options, i, port))[1]; "
              f"sys.exit(launch.run(SimpleNamespace(num_processes=2, cpu_devices=None, gpus_per_process=None, "
              f"port=None), ['signal'], program=[sys.executable, '-c', {SCRIPT!r}]))")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=110)
    # a child stopped before its handler was installed counts as killed by SIGTERM: 128 + 15
    assert result.returncode in (0, 143), (result.returncode, result.stderr)
    assert time.monotonic() - started < 100  # neither child slept out its 120 s
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("args, words", [
    (["-n", "2", "train"], "after '--'"),
    (["-n", "0", "--", "train"], "-n must be"),
    (["--", "train"], "-n"),
    (["-n", "2", "--cpu-devices", "0", "--", "train"], "--cpu-devices"),
    (["-n", "2", "--bogus", "--", "train"], "unknown launch option"),
    (["-n", "2", "--cores-per-process", "4096", "--", "train"], "CPU cores"),
])
def test_bad_launch_lines_exit_2_with_one_line(capsys, args, words):
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lpjax: error: ") and words in err, err
