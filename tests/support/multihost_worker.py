"""One process of the multi-host test: 2 simulated CPU devices, joined over 127.0.0.1 with gloo.

Usage: python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT.npz [STAGES DATA]

Trains (4 stages x data 1 unless given), saves the parameters of the stages it holds to OUT.npz,
then evaluates and reads the per-stage health with every way of gathering stage states made to
fail (``host_states`` raises; ``process_allgather`` refuses device arrays), and writes the figures
to OUT.npz.json.
"""

import json
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"

import lpjax.distributed.join  # noqa: E402

port, count, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stages, data = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (4, 1)
lpjax.distributed.join.initialize(f"127.0.0.1:{port}", count, pid)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from multihost_run import EVAL_BATCH, eval_split, local_eval_batches, train_four_stages  # noqa: E402

trainer = train_four_stages(lpjax.Layout(stages=stages, data=data, executor="spmd"), stages=stages)
local = {}
for k, state in enumerate(trainer.stage_states):
    if state is not None:
        for i, leaf in enumerate(jax.tree.leaves(state.params)):
            local[f"stage{k}_{i}"] = np.asarray(leaf.addressable_data(0))
np.savez(out, **local)
print(f"process {jax.process_index()} of {jax.process_count()} saved stages", sorted({key.split('_')[0] for key in local}))


def gathered_states(*args, **kwargs):
    raise AssertionError("evaluation or health gathered the stage states (host_states)")


allgather = multihost_utils.process_allgather


def host_data_only(tree, *args, **kwargs):
    assert not any(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree)), "process_allgather of device arrays"
    return allgather(tree, *args, **kwargs)


trainer.host_states = trainer.executor.host_states = gathered_states
multihost_utils.process_allgather = host_data_only
x, y = eval_split()
figures = {"same_batches": trainer.evaluate(x, y, batch_size=EVAL_BATCH),
           "own_shards": trainer.evaluate_batches(local_eval_batches(pid, count), local=True),
           "health": [[float(h["grad_norm"]), int(h["skipped"])] for h in trainer.health()],
           "data_shard": list(trainer.data_shard)}
try:
    trainer.predict(x)
except lpjax.ConfigError as err:  # a process holds some stages only
    figures["predict"] = str(err)
with open(out + ".json", "w") as f:
    json.dump(figures, f)
print(f"process {jax.process_index()} evaluated", figures["own_shards"][-1])
