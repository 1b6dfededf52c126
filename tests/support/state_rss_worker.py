"""One process of the on-device state test: builds a 4-stage SPMD trainer from a config (the model
abstract, each stage's state created by a jitted initialiser on the devices that hold it) and
reports its peak resident memory.

Usage: python state_rss_worker.py PORT PROCESSES PROCESS_ID DEVICES CHECKPOINTS OUT.json MODE

MODE ``init``: build, create the state (``stage_scalars`` reads it on the mesh), record the peak
RSS, save this process's stages' parameters to OUT.npz and a sharded checkpoint to CHECKPOINTS.
MODE ``restore``: build, restore that checkpoint, read the state, record the peak RSS.
"""

import json
import os
import resource
import sys

port, processes, pid, devices, checkpoints, out, mode = sys.argv[1:8]
os.environ["JAX_NUM_CPU_DEVICES"] = devices
os.environ["JAX_PLATFORMS"] = "cpu"

import lpjax.distributed.join  # noqa: E402

if int(processes) > 1:
    lpjax.distributed.join.initialize(f"127.0.0.1:{port}", int(processes), int(pid))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lpjax.config.build import build_experiment  # noqa: E402
from lpjax.training.checkpoint import Checkpointer  # noqa: E402

from state_rss_config import CONFIG  # noqa: E402


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


trainer = build_experiment(CONFIG).trainer
before = peak_mib()
checkpointer = Checkpointer(checkpoints, trainer.num_stages, asynchronous=False, sharded=True)
if mode == "restore":
    states, meta = checkpointer.restore_latest(trainer.checkpoint_target())
    trainer.load_states(states)
norms, _, _ = trainer.executor.stage_scalars()  # the state, read where it lives (a collective)
figures = {"built_mib": before, "peak_mib": peak_mib(), "norms": [float(n) for n in norms]}
if mode == "init":
    checkpointer.save(0, trainer.checkpoint_states(sharded=True), {"step": 0})
    local = {}
    for k, state in enumerate(trainer.stage_states):
        if state is not None:  # a stage this process holds
            for i, leaf in enumerate(jax.tree.leaves(state.params)):
                local[f"stage{k}_{i}"] = np.asarray(leaf.addressable_data(0))
    np.savez(out + ".npz", **local)
checkpointer.close()
with open(out, "w") as f:
    json.dump(figures, f)
print(f"process {jax.process_index()} of {jax.process_count()}: {mode} peak {figures['peak_mib']:.0f} MiB")
