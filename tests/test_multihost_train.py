"""`lpjax train` over several processes, driven through `lpjax launch` as a user would, on CPU:
2 processes x 2 simulated devices, joined over 127.0.0.1 (gloo collectives).

The 2-process run must equal the 1-process run on 4 devices, in the metrics it logs and in the
parameters it checkpoints; bad multi-process setups must end with exit 2 and one line."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tiny import digits_recipe

REPO = Path(__file__).resolve().parents[1]

# several minutes of multi-process training on 2 cores: run by .ci/run after make test
pytestmark = pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1",
                                reason="multi-process training runs; LPJAX_SLOW_TESTS=1 runs them")

# 4 stages of a small MLP on digits, overlapping method, streaming schedule, spmd executor.
CONFIG = digits_recipe(model__depth=4, stages=4, method__name="overlapping", schedule__name="streaming",
                       schedule__microbatches=2, layout__executor="spmd", num_steps=6, log_every=2, eval_every=3,
                       checkpoint__every_steps=3)
TIMEOUT_S = int(os.environ.get("LPJAX_MULTIHOST_TIMEOUT_S", 900))  # cold JAX start-ups and compilations on a busy 2-core machine


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "four_stages.py"
    path.write_text(CONFIG)
    return path


def lpjax(*args, devices=None, env=None):
    full = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    full.pop("JAX_NUM_CPU_DEVICES", None)
    if devices:
        full["JAX_NUM_CPU_DEVICES"] = str(devices)
    return subprocess.run([sys.executable, "-m", "lpjax", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def both(*calls):
    """Run the (function, args, kwargs) calls at the same time; their results in order."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(fn, *args, **kwargs) for fn, args, kwargs in calls]]


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def restored_params(config, workdir, step):
    """Every stage's parameters in the workdir's newest checkpoint (which must be ``step``), restored
    by lpjax in this one process onto 4 of its devices, whichever process count wrote it."""
    from lpjax.training.checkpoint import Checkpointer
    from lpjax.config.build import build_experiment
    from lpjax.config.recipe_file import load_recipe

    trainer = build_experiment(load_recipe(str(config))[0]).trainer
    states, meta = Checkpointer(str(workdir / "checkpoints"), trainer.num_stages).restore_latest(
        trainer.executor.sharded_target())
    assert meta["step"] == step
    trainer.load_states(states)
    return [jax.tree.leaves(jax.device_get(s.params)) for s in trainer.stage_states]


def test_two_processes_equal_one_process_on_four_devices(config, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single, launched = both(
        (lpjax, ["train", "--config", str(config), "--workdir", str(one)], {"devices": 4}),
        (lpjax, ["launch", "-n", "2", "--cpu-devices", "2", "--", "train", "--config", str(config),
                 "--workdir", str(two)], {}))
    assert single.returncode == 0, single.stderr[-3000:]
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "[p0] final head" in launched.stdout and "[p1] final head" not in launched.stdout  # process 0 prints
    assert_same_metrics(one, two)
    assert (one / "checkpoints" / "6" / "stage0").is_dir()  # one process: per-stage items
    assert (two / "checkpoints" / "6" / "state").is_dir()  # several: one sharded item
    for mine, theirs in zip(restored_params(config, one, 6), restored_params(config, two, 6), strict=True):
        for x, y in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    results = json.loads((two / "results.json").read_text())
    expected = json.loads((one / "results.json").read_text())
    for s, t in zip(results["stages"], expected["stages"]):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert abs(s[key] - t[key]) <= 1e-6, (key, s, t)
    assert_each_process_wrote_its_own_stages(two / "checkpoints" / "6" / "state")

    # the 2-process checkpoint resumes in 1 process on 4 devices exactly as the 1-process one does
    more = ["--config.num_steps=9"]
    continued, unbroken = both(
        (lpjax, ["train", "--config", str(config), "--workdir", str(two), *more], {"devices": 4}),
        (lpjax, ["train", "--config", str(config), "--workdir", str(one), *more], {"devices": 4}))
    for result in (continued, unbroken):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from the checkpoint at step 6" in result.stdout
    for mine, theirs in zip(restored_params(config, two, 9), restored_params(config, one, 9), strict=True):
        for x, y in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(x, y)


def assert_same_metrics(one, two):
    a, b = records(one), records(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "accuracy", "grad_norm", "skipped"):
            if key in ra:
                np.testing.assert_allclose(np.array(ra[key], dtype=float), np.array(rb[key], dtype=float),
                                           atol=1e-6, rtol=0, err_msg=f"{key} at {ra['step']} {ra['split']}")


def assert_each_process_wrote_its_own_stages(item):
    """Orbax (OCDBT) writes each process's chunks into its own ``ocdbt.process_<i>`` database; the
    state buffers are chunked per stage row (``<dtype>/<row>.0``). Process 0 holds stages 0 and 1
    on its two devices, process 1 stages 2 and 3: each database must hold exactly its rows."""
    import tensorstore as ts

    for pid, rows in ((0, {0, 1}), (1, {2, 3})):
        store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/ocdbt.process_{pid}/"}).result()
        chunks = [key.decode() for key in store.list().result() if not key.endswith(b".zarray")]
        assert chunks, pid
        assert {int(key.split("/")[1].split(".")[0]) for key in chunks} == rows, (pid, chunks)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_exit_2(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if "lpjax: error:" in line]
    assert errors, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]


def test_bad_multiprocess_setups_exit_2_with_one_line(config, tmp_path):
    port = free_port()
    train = ["train", "--config", str(config)]

    def process(pid, *extra):  # one of two processes started by hand, with LPJAX_* settings
        env = {"LPJAX_COORDINATOR": f"127.0.0.1:{port}", "LPJAX_NUM_PROCESSES": "2", "LPJAX_PROCESS_ID": str(pid)}
        return lpjax(*train, "--workdir", str(tmp_path / "mismatch"), *extra, devices=2, env=env)

    def apart(pid):  # two processes whose workdirs are different directories: no shared filesystem
        env = {"LPJAX_COORDINATOR": f"127.0.0.1:{apart_port}", "LPJAX_NUM_PROCESSES": "2",
               "LPJAX_PROCESS_ID": str(pid)}
        return lpjax(*train, "--workdir", str(tmp_path / f"apart{pid}"), devices=2, env=env)

    apart_port = free_port()
    launch = ["launch", "-n", "2", "--cpu-devices", "2", "--"]
    mismatch0, mismatch1, mpmd, layout, unreachable, apart0, apart1 = both(
        (process, [0], {}),
        (process, [1, "--config.seed=1"], {}),
        (lpjax, [*launch, *train, "--workdir", str(tmp_path / "mpmd"), "--config.layout.executor=mpmd"], {}),
        (lpjax, [*launch, *train, "--workdir", str(tmp_path / "layout"), "--config.stages=2"], {}),
        (lpjax, [*train, "--workdir", str(tmp_path / "alone"), "--config.distributed.init_timeout_s=5",
                 f"--config.distributed.coordinator=127.0.0.1:{free_port()}", "--config.distributed.num_processes=2",
                 "--config.distributed.process_id=1"], {"devices": 2}),
        (apart, [0], {}),
        (apart, [1], {}))
    one_line_exit_2(mismatch0, "process(es) 1 hold a different config")
    one_line_exit_2(mismatch1, "process(es) 1 hold a different config")
    one_line_exit_2(mpmd, "needs the spmd executor")
    one_line_exit_2(layout, "uses 2 devices", "4")
    one_line_exit_2(unreachable, "could not join the coordinator", "init_timeout_s")
    one_line_exit_2(apart0, "process(es) 1 do not see the files", "one filesystem")
    one_line_exit_2(apart1, "process(es) 1 do not see the files", "one filesystem")
    for name in ("mismatch", "mpmd", "layout", "alone"):
        assert not (tmp_path / name).exists(), name  # nothing written


def test_sigterm_to_the_launcher_stops_both_processes_at_one_step_with_a_checkpoint(config, tmp_path):
    import signal
    import time

    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "lpjax", "launch", "-n", "2", "--cpu-devices", "2", "--", "train",
                             "--config", str(config), "--workdir", str(workdir), "--config.num_steps=2000",
                             "--config.eval_every=0", "--config.checkpoint.every_steps=0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # both are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-2000:]
    line = next(line for line in out.splitlines() if "preempted at step" in line)
    step = int(line.split()[4].rstrip(";"))
    assert line == f"[p0] preempted at step {step}; run the same command to resume"
    assert 4 <= step < 2000 and (workdir / "checkpoints" / str(step)).is_dir()


def test_sigkill_of_one_process_stops_the_other_and_the_rerun_ends_bit_identical(config, tmp_path):
    import signal
    import time

    killed, unbroken = tmp_path / "killed", tmp_path / "unbroken"
    more = ["--config.num_steps=40", "--config.checkpoint.every_steps=10", "--config.log_every=5",
            "--config.eval_every=0"]
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", LPJAX_PEER_TIMEOUT="10",
               LPJAX_COORDINATOR=f"127.0.0.1:{port}", LPJAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-m", "lpjax", "train", "--config", str(config), "--workdir",
                               str(killed), *more], cwd=REPO, env=dict(env, LPJAX_PROCESS_ID=str(pid)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    reference = concurrent.futures.ThreadPoolExecutor(1).submit(
        lpjax, "launch", "-n", "2", "--cpu-devices", "2", "--", "train", "--config", str(config), "--workdir",
        str(unbroken), *more)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (killed / "checkpoints" / "10").is_dir():  # a first checkpoint is committed
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, procs[0].stderr.read()[-2000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = procs[0].communicate(timeout=TIMEOUT_S)
        took = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, err[-2000:]
    assert took < 10 + 60, took  # the peer timeout, plus room for a busy machine
    # (the progress bar's last redraw may share the line: it ends in a carriage return, not a newline)
    errors = [line for line in err.splitlines() if "lpjax: error:" in line]
    assert len(errors) == 1 and "process 1 of 2 stopped responding" in errors[0], err[-2000:]
    assert "Traceback" not in err, err[-2000:]

    rerun = lpjax("launch", "-n", "2", "--cpu-devices", "2", "--", "train", "--config", str(config), "--workdir",
                  str(killed), *more)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[p0] resumed from the checkpoint at step" in rerun.stdout
    finished = reference.result()
    assert finished.returncode == 0, finished.stderr[-3000:]
    for mine, theirs in zip(restored_params(config, killed, 40), restored_params(config, unbroken, 40), strict=True):
        for x, y in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(x, y)
