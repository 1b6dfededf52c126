"""A 4-stage SPMD pipeline over 2 processes x 2 CPU devices equals the single-process run, in
parameters, in evaluation (run on the mesh, each stage on its own devices, with every way of
gathering stage states to a host made to fail in the workers) and in the per-stage health."""

import json
import os
import socket
from pathlib import Path

import jax
import numpy as np
import pytest

import lpjax

import workers
from multihost_run import EVAL_BATCH, eval_split, train_four_stages

HERE = Path(__file__).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path, *layout):
    """Start the 2 worker processes (tests/support/multihost_worker.py); their outputs."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE / "support"), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return workers.run_workers(HERE / "support" / "multihost_worker.py",
                               lambda pid: [port, 2, pid, tmp_path / f"p{pid}.npz", *layout], 2, env, timeout=300)


def assert_same_evaluation_and_health(tmp_path, reference):
    x, y = eval_split()
    expected = reference.evaluate(x, y, batch_size=EVAL_BATCH)
    health = [[float(h["grad_norm"]), int(h["skipped"])] for h in reference.health()]
    for pid in range(2):
        figures = json.loads((tmp_path / f"p{pid}.npz.json").read_text())
        for name in ("same_batches", "own_shards"):  # both cover all 23 rows once
            for mine, theirs in zip(figures[name], expected, strict=True):
                for key in ("loss", "accuracy"):
                    assert abs(mine[key] - theirs[key]) <= 1e-6, (pid, name, key, mine, theirs)
        for (norm, skipped), (ref_norm, ref_skipped) in zip(figures["health"], health, strict=True):
            assert abs(norm - ref_norm) <= 1e-6 * max(1.0, ref_norm) and skipped == ref_skipped, (figures["health"], health)
    return figures


@pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1", reason="a pair of processes (about 40 s); LPJAX_SLOW_TESTS=1 runs it, as CI does")
def test_two_processes_match_one(tmp_path):
    outputs = run_workers(tmp_path)
    reference = train_four_stages(lpjax.Layout(stages=4, executor="spmd"))
    seen = set()
    for pid in range(2):
        saved = np.load(tmp_path / f"p{pid}.npz")
        for key in saved.files:
            k, i = key.removeprefix("stage").split("_")
            expected = jax.tree.leaves(jax.device_get(reference.stage_states[int(k)].params))[int(i)]
            np.testing.assert_allclose(saved[key], expected, atol=1e-6, err_msg=key)
            seen.add(int(k))
    assert seen == {0, 1, 2, 3}, outputs
    figures = assert_same_evaluation_and_health(tmp_path, reference)
    assert figures["predict"].startswith("predict() runs in one process")
    assert figures["data_shard"] == [0, 1]  # each process holds whole stages: the eval rows are gathered


@pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1", reason="a second pair of processes; LPJAX_SLOW_TESTS=1 runs it")
def test_two_processes_split_along_data_evaluate_their_own_rows_like_one(tmp_path):
    """Stages 2 x data 2: each process holds one data column of both stages and places only its
    own eval rows on its devices (make_array_from_process_local_data)."""
    run_workers(tmp_path, 2, 2)
    reference = train_four_stages(lpjax.Layout(stages=2, data=2, executor="spmd"), stages=2)
    figures = assert_same_evaluation_and_health(tmp_path, reference)
    assert figures["data_shard"] == [1, 2]  # process 1's block of the data columns
