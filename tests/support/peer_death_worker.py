"""One process of the peer-death test: trains the 4-stage SPMD pipeline of the multi-host test over
2 processes x 2 simulated CPU devices until it has run STEPS steps (or is killed).

Usage: python peer_death_worker.py PORT NUM_PROCESSES PROCESS_ID STEPS [LINGER_S [CHECKPOINT_DIR]]

Prints ``ready`` once two steps have finished on the devices, ``done`` after the last step, then
lingers LINGER_S seconds (to make the processes finish at different times) and exits. With
CHECKPOINT_DIR the run checkpoints every second step (process 0 writes what all processes gather).
The peer timeout comes from LPJAX_PEER_TIMEOUT.
"""

import os
import sys
import time

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"

import lpjax.distributed.join  # noqa: E402

port, count, pid, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
linger = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
checkpoint_dir = sys.argv[6] if len(sys.argv) > 6 else None
lpjax.distributed.join.initialize(f"127.0.0.1:{port}", count, pid)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lpjax  # noqa: E402
from lpjax.core.schedules import Streaming  # noqa: E402
from tiny import tiny_batch, tiny_model  # noqa: E402

x, y = tiny_batch(8)
trainer = lpjax.Trainer(tiny_model(4), method=lpjax.Overlapping(2), optimizer=optax.sgd(0.1, momentum=0.9),
                        schedule=Streaming(2), layout=lpjax.Layout(stages=4, executor="spmd"))
checkpointer = None
if checkpoint_dir:
    from lpjax.training.checkpoint import Checkpointer  # noqa: E402

    checkpointer = Checkpointer(checkpoint_dir, trainer.num_stages)
    restored = checkpointer.restore_latest(trainer.host_states())  # every process reads the same files
    if restored is not None:
        trainer.load_states(restored[0])
        first = restored[1]["step"]
        print(f"resumed {first}", flush=True)
first = locals().get("first", 0)
for i in range(first, steps):
    jax.block_until_ready(trainer.step(np.roll(x, i, axis=0), np.roll(y, i, axis=0)))
    if checkpointer is not None and i % 2 == 1:
        trainer.flush()
        checkpointer.save(i + 1, trainer.host_states(), {})
    if i == first + 1:
        print("ready", flush=True)
jax.block_until_ready(trainer.drain())
if checkpointer is not None:
    checkpointer.close()
print("done", flush=True)
time.sleep(linger)
