"""One of two processes (2 CPU devices each) of the per-host data test.

Usage: python shard_reads_worker.py PORT PROCESS_ID OUT_DIR
"""

import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"

import lpjax.distributed.join  # noqa: E402

port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lpjax.distributed.join.initialize(f"127.0.0.1:{port}", 2, pid)

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import lpjax  # noqa: E402
from shard_reads import fit  # noqa: E402

trainer, logged, results = fit(lpjax.Layout(stages=2, data=2, executor="spmd"), os.path.join(out, "workdir"))
logged.save(os.path.join(out, f"reads{pid}.json"))
with open(os.path.join(out, f"shard{pid}.json"), "w") as f:
    json.dump({"data_shard": list(trainer.data_shard), "results": results["final"]}, f)
states = trainer.host_states()  # a collective: every process gathers every stage
if pid == 0:
    np.savez(os.path.join(out, "params.npz"),
             **{f"{k}_{i}": leaf for k, s in enumerate(states) for i, leaf in enumerate(jax.tree.leaves(s.params))})
print(f"process {pid} done")
