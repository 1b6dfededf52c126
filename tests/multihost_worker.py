"""One process of the multi-host test: 2 simulated CPU devices, joined over 127.0.0.1 with gloo.

Usage: python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT.npz
"""

import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"

import lpjax.distributed  # noqa: E402

port, count, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lpjax.distributed.initialize(f"127.0.0.1:{port}", count, pid)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from multihost_run import train_four_stages  # noqa: E402

trainer = train_four_stages(lpjax.Layout(stages=4, executor="spmd"))
local = {}
for k, state in enumerate(trainer.stage_states):
    if state is not None:
        for i, leaf in enumerate(jax.tree.leaves(state.params)):
            local[f"stage{k}_{i}"] = np.asarray(leaf.addressable_data(0))
np.savez(out, **local)
print(f"process {jax.process_index()} of {jax.process_count()} saved stages", sorted({key.split('_')[0] for key in local}))
