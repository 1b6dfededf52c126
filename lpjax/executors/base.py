"""What the SPMD executor hands a sharded checkpoint (lpjax/training/checkpoint.py): checkpoints
depend on executors, not the reverse."""

import dataclasses
from typing import Callable


@dataclasses.dataclass
class ShardedStates:
    """The SPMD executor's stacked state buffers, ``{dtype name: [stages, length]}`` global arrays
    whose rows live on each stage's devices, and each stage's ``(fingerprint, finite)``: what a
    sharded checkpoint saves (``SpmdExecutor.sharded_states``)."""

    tree: dict
    summaries: list


@dataclasses.dataclass
class ShardedTarget:
    """What a sharded checkpoint is restored onto (``SpmdExecutor.sharded_target``): the buffers'
    shapes and shardings on the current mesh, the function that fingerprints such buffers, and a
    function giving every stage's current ``StageState`` in this process (to read a per-stage
    checkpoint instead, through the host)."""

    abstract: dict
    summarize: Callable
    host_like: Callable
