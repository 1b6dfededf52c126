"""The SPMD executor builds its state on device: over 2 processes x 2 CPU devices each process creates,
and restores, only the stages it holds, so its peak memory stays well under that of one process
holding all 4 devices' state, and the parameters are those the host-built model has.

Slow (three runs of a ~1.9 GB model state): LPJAX_SLOW_TESTS=1, as tests/test_multihost.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1",
                                reason="three multi-GB runs; LPJAX_SLOW_TESTS=1 runs them")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, name, processes, devices, mode):
    """The workers (tests/support/state_rss_worker.py) of one run; each one's figures."""
    port, checkpoints = free_port(), tmp_path / f"{name}_checkpoints"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE / "support"), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    procs = [subprocess.Popen([sys.executable, str(HERE / "support" / "state_rss_worker.py"), str(port),
                               str(processes), str(pid), str(devices), str(checkpoints),
                               str(tmp_path / f"{name}_{mode}_p{pid}.json"), mode],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(processes)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    return [json.loads((tmp_path / f"{name}_{mode}_p{pid}.json").read_text()) for pid in range(processes)]


def host_built_parameters():
    """Every stage's parameters as the model built on the host has them (the reference executor's path)."""
    from lpjax.config.build import build_experiment

    from state_rss_config import CONFIG

    model = build_experiment(dict(CONFIG, layout={"executor": "reference"}), abstract=False).model
    return [[np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(stage, nnx.Param))] for stage in model]


def test_each_process_builds_and_restores_only_its_own_stages(tmp_path):
    one_init = run(tmp_path, "one", 1, 4, "init")[0]
    one_restore = run(tmp_path, "one", 1, 4, "restore")[0]
    two_init = run(tmp_path, "two", 2, 2, "init")
    two_restore = run(tmp_path, "two", 2, 2, "restore")
    # each process holds 2 of the 4 stages: about half of the state's 1.9 GB, on top of what jax
    # itself takes (the "built" figure, before any state exists)
    for mine, whole in ((two_init, one_init), (two_restore, one_restore)):
        for process in mine:
            assert process["peak_mib"] < 0.75 * whole["peak_mib"], (process, whole)
            own = process["peak_mib"] - process["built_mib"]
            assert own < 0.65 * (whole["peak_mib"] - whole["built_mib"]), (process, whole)
    reference = host_built_parameters()
    held = {}
    for pid in range(2):
        with np.load(tmp_path / f"two_init_p{pid}.json.npz") as saved:
            held.update({key: saved[key] for key in saved.files})
    assert sorted({key.split("_")[0] for key in held}) == ["stage0", "stage1", "stage2", "stage3"]
    for key, value in held.items():
        k, i = key[len("stage"):].split("_")
        np.testing.assert_allclose(value, reference[int(k)][int(i)], atol=1e-6, rtol=0, err_msg=key)
