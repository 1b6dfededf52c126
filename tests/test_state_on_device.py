"""The SPMD executor builds its state on device from a model that is only traced: training gives the
parameters the host-built model gives; over 2 processes x 2 CPU devices each process creates, and
restores, only the stages it holds, so its peak memory stays well under that of one process holding
all 4 devices' state (slow: four runs of a ~1.9 GB model state; LPJAX_SLOW_TESTS=1, as
tests/test_multihost.py)."""

import json
import os
import socket
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lpjax.config.build import build_experiment
import workers

HERE = Path(__file__).parent
slow = pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1", reason="multi-GB runs; LPJAX_SLOW_TESTS=1 runs them")

SMALL = {"dataset": {"name": "digits"}, "model": {"name": "mlp", "depth": 4, "width": 32}, "stages": 2,
         "method": {"name": "chunked"}, "schedule": {"name": "gpipe", "microbatches": 2},
         "layout": {"executor": "spmd", "data": 2}, "batch_size": 16, "num_steps": 3}


def trained(config, abstract):
    experiment = build_experiment(config, abstract=abstract)
    x, y = experiment.dataset.example_batch(16)
    for i in range(3):
        experiment.trainer.step(np.roll(x, i, axis=0), np.roll(y, i, axis=0))
    return experiment.trainer


@pytest.mark.parametrize("method", [{"name": "chunked"}, {"name": "chunked", "shared_readout": True},
                                    {"name": "overlapping", "window": 2}, {"name": "backprop"}])
def test_a_traced_model_trains_to_the_parameters_of_the_host_built_one(method):
    on_device = trained(dict(SMALL, method=method), abstract=True)
    # the trainer's model is shapes only: nothing of it was built on the host
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(on_device.model)))
    host_built = trained(dict(SMALL, method=method), abstract=False)
    for mine, theirs in zip(on_device.stage_states, host_built.stage_states, strict=True):
        for a, b in zip(jax.tree.leaves(mine.params), jax.tree.leaves(theirs.params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, name, processes, devices, mode):
    """The workers (tests/support/state_rss_worker.py) of one run; each one's figures."""
    port, checkpoints = free_port(), tmp_path / f"{name}_checkpoints"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE / "support"), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    workers.run_workers(HERE / "support" / "state_rss_worker.py",
                        lambda pid: [port, processes, pid, devices, checkpoints, tmp_path / f"{name}_{mode}_p{pid}.json",
                                     mode], processes, env, timeout=600)
    return [json.loads((tmp_path / f"{name}_{mode}_p{pid}.json").read_text()) for pid in range(processes)]


def host_built_parameters():
    """Every stage's parameters as the model built on the host has them (the reference executor's path)."""
    from state_rss_config import CONFIG

    model = build_experiment(dict(CONFIG, layout={"executor": "reference"}), abstract=False).model
    return [[np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(stage, nnx.Param))] for stage in model]


@slow
def test_each_process_builds_and_restores_only_its_own_stages(tmp_path):
    one_init = run(tmp_path, "one", 1, 4, "init")[0]
    one_restore = run(tmp_path, "one", 1, 4, "restore")[0]
    two_init = run(tmp_path, "two", 2, 2, "init")
    two_restore = run(tmp_path, "two", 2, 2, "restore")
    print("peak RSS MiB (before any state, peak): one process", [(f["built_mib"], f["peak_mib"]) for f in
          (one_init, one_restore)], "two processes init", [(f["built_mib"], f["peak_mib"]) for f in two_init],
          "restore", [(f["built_mib"], f["peak_mib"]) for f in two_restore])
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
