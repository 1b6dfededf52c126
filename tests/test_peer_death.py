"""A multi-process run whose process dies stops the others with one clear line, within the bound.

Two processes train the multi-host test's 4-stage SPMD pipeline (2 x 2 simulated CPU devices,
gloo over 127.0.0.1) with a 10 s peer timeout; see lpjax/distributed/watchdog.py for the mechanism.
"""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lpjax import ConfigError
from lpjax.distributed.join import peer_timeout

HERE = Path(__file__).parent
PEER_TIMEOUT_S = 10
BOUND_S = 60  # the survivor must be gone this soon after its peer was killed
START_TIMEOUT_S = 240  # two cold jax start-ups and compilations on a busy 2-core machine


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, steps, lingers=(0, 0), checkpoint_dir=None):
    """Start both workers; their stdout lines arrive on the returned queue as (process id, line)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE / "support"), os.environ.get("PYTHONPATH", "")]),
               LPJAX_PEER_TIMEOUT=str(PEER_TIMEOUT_S))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    lines = queue.Queue()
    procs = []
    for pid in range(2):
        with open(tmp_path / f"stderr{pid}.txt", "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "support" / "peer_death_worker.py"), str(port), "2", str(pid), str(steps),
                 str(lingers[pid]), *([str(checkpoint_dir)] if checkpoint_dir else [])], env=env, stdout=subprocess.PIPE, stderr=err, text=True))
        threading.Thread(target=lambda p=procs[-1], i=pid: [lines.put((i, s.strip())) for s in p.stdout],
                         daemon=True).start()
    return procs, lines


def wait_for(lines, word, count=2):
    seen, deadline = set(), time.monotonic() + START_TIMEOUT_S
    while len(seen) < count:
        pid, line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        if line == word:
            seen.add(pid)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_survivor_exits_with_one_clear_line_when_its_peer_is_killed(tmp_path):
    procs, lines = launch(tmp_path, steps=1_000_000, checkpoint_dir=tmp_path / "checkpoints")
    try:
        wait_for(lines, "ready")
        time.sleep(1.0)  # more steps and checkpoints, so the kill may land during a save
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            rc = procs[0].wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process 0 still runs {BOUND_S} s after process 1 was killed") from None
        took = time.monotonic() - killed
    finally:
        stop(procs)
    err = (tmp_path / "stderr0.txt").read_text()
    said = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, err[-3000:]
    assert said and said[-1].startswith("lpjax: error: process 1 of 2 stopped responding ("), err[-3000:]
    assert said[-1].endswith("; the run stopped; restart it to resume from the last checkpoint"), said[-1]
    assert sum("lpjax: error" in line for line in said) == 1, err[-3000:]
    assert "Traceback" not in err and "Check failure stack trace" not in err, err[-3000:]
    assert took < BOUND_S
    print(f"process 0 exited {took:.1f} s after process 1 was killed (peer timeout {PEER_TIMEOUT_S} s)")

    # the checkpoints are intact, and both processes restarted carry on to match an unbroken run
    saved = read_checkpoint(tmp_path / "checkpoints")
    total = saved["step"] + 4
    finish(tmp_path / "resumed", total, tmp_path / "checkpoints", expect_resumed=saved["step"])
    finish(tmp_path / "unbroken", total, tmp_path / "unbroken_checkpoints")
    resumed, unbroken = read_checkpoint(tmp_path / "checkpoints"), read_checkpoint(tmp_path / "unbroken_checkpoints")
    assert resumed["step"] == unbroken["step"] == total
    for a, b in zip(jax.tree.leaves(resumed["states"]), jax.tree.leaves(unbroken["states"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def read_checkpoint(folder):
    """The newest checkpoint of a 2-process run, read and fingerprint-checked in this one process."""
    import optax

    import lpjax
    from lpjax.training.checkpoint import Checkpointer
    from lpjax.core.schedules import Streaming
    from tiny import tiny_model

    like = lpjax.Trainer(tiny_model(4), method=lpjax.Overlapping(2), optimizer=optax.sgd(0.1, momentum=0.9),
                         schedule=Streaming(2)).stage_states
    checkpointer = Checkpointer(str(folder), 4)
    restored = checkpointer.restore_latest(like)
    checkpointer.close()
    assert restored is not None, f"no intact checkpoint in {folder}"
    assert not (folder.parent / "corrupt").exists()  # nothing had to be set aside
    states, meta = restored
    return {"step": meta["step"], "states": jax.device_get([(s.params, s.opt_state) for s in states])}


def finish(tmp_path, steps, checkpoint_dir, expect_resumed=None):
    tmp_path.mkdir()
    procs, lines = launch(tmp_path, steps=steps, checkpoint_dir=checkpoint_dir)
    try:
        codes = [p.wait(timeout=START_TIMEOUT_S) for p in procs]
    finally:
        stop(procs)
    said = []
    while not lines.empty():
        said.append(lines.get())
    assert codes == [0, 0], [(tmp_path / f"stderr{pid}.txt").read_text()[-2000:] for pid in range(2)]
    if expect_resumed is not None:
        assert {(0, f"resumed {expect_resumed}"), (1, f"resumed {expect_resumed}")} <= set(said), said


def test_processes_that_finish_apart_both_exit_cleanly(tmp_path):
    # Process 1 ends 3 s after process 0. Process 0 hosts the coordination service: leaving at
    # once would abort process 1, and the watchdog must not call a finished process dead.
    procs, lines = launch(tmp_path, steps=3, lingers=(0, 3))
    try:
        codes = [p.wait(timeout=START_TIMEOUT_S) for p in procs]
    finally:
        stop(procs)
    errs = [(tmp_path / f"stderr{pid}.txt").read_text() for pid in range(2)]
    assert codes == [0, 0], errs
    for err in errs:
        assert "lpjax: error" not in err and "Terminating process" not in err, err[-3000:]
    said = []
    while not lines.empty():
        said.append(lines.get())
    assert {(0, "done"), (1, "done")} <= set(said), said


def test_peer_timeout_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv("LPJAX_PEER_TIMEOUT", raising=False)
    assert peer_timeout() == 30
    monkeypatch.setenv("LPJAX_PEER_TIMEOUT", "12.5")
    assert peer_timeout() == 12.5
    assert peer_timeout(5) == 5
    monkeypatch.setenv("LPJAX_PEER_TIMEOUT", "0")
    assert peer_timeout() == 0  # off: JAX's own defaults
    for bad in ("soon", "-3", "0.5"):
        monkeypatch.setenv("LPJAX_PEER_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="LPJAX_PEER_TIMEOUT must be a number of seconds"):
            peer_timeout()
    with pytest.raises(ConfigError, match="peer_timeout_s must be"):
        peer_timeout("nan")
