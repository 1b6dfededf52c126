"""A 4-stage SPMD pipeline over 2 processes x 2 CPU devices equals the single-process run."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import lpjax

from multihost_run import train_four_stages

HERE = Path(__file__).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(port), "2", str(pid),
                               str(tmp_path / f"p{pid}.npz")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out)
        assert proc.returncode == 0, out[-3000:]
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
