"""Per-host data: over 2 processes x 2 CPU devices with a (stage=2, data=2) layout, each process
holds one data column of both stages, decodes only its own rows of each microbatch and its own
shard of the test split, and training ends bit-equal to one process on 4 devices.

The reads are logged by the user's own transforms (tests/support/shard_reads.py), not by lpjax."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lpjax
from shard_reads import BATCH, MICROBATCHES, NUM_TEST, fit

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1",
                                reason="multi-process training runs; LPJAX_SLOW_TESTS=1 runs them")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_process_decodes_only_its_rows_and_training_equals_one_process(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE / "support"), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    procs = [subprocess.Popen([sys.executable, str(HERE / "support" / "shard_reads_worker.py"), str(port), str(pid), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=900)[0])  # cold start-ups on a busy 2-core machine
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]

    trainer, logged, results = fit(lpjax.Layout(stages=2, data=2, executor="spmd"), tmp_path / "one")
    reads = [json.loads((tmp_path / f"reads{p}.json").read_text()) for p in range(2)]
    shards = [json.loads((tmp_path / f"shard{p}.json").read_text()) for p in range(2)]
    assert [s["data_shard"] for s in shards] == [[0, 2], [1, 2]]

    # training: process p decoded exactly its half of every microbatch, in order, and nothing else
    rows = BATCH // MICROBATCHES
    microbatches = [logged.train_reads[i:i + rows] for i in range(0, len(logged.train_reads), rows)]
    for p in range(2):
        mine = [i for mb in microbatches for i in mb[p * rows // 2:(p + 1) * rows // 2]]
        assert reads[p]["train"] == mine, p
    assert not set(reads[0]["train"]) & set(reads[1]["train"])

    # evaluation: each process decoded its own half of the test split, once
    for p in range(2):
        test = [i for split, i in reads[p]["eval"] if split == "test"]
        assert sorted(test) == list(range(p * NUM_TEST // 2, (p + 1) * NUM_TEST // 2)), (p, test)

    saved = np.load(tmp_path / "params.npz")
    for k, state in enumerate(trainer.stage_states):
        for i, leaf in enumerate(jax.tree.leaves(jax.device_get(state.params))):
            np.testing.assert_allclose(saved[f"{k}_{i}"], leaf, atol=1e-6, rtol=0, err_msg=f"stage {k} leaf {i}")
    for key in ("test_loss", "test_accuracy", "train_loss", "train_accuracy"):
        assert abs(shards[0]["results"][key] - results["final"][key]) <= 1e-6, key
