"""Checkpoints with orbax's CheckpointManager: one item per stage, plus a JSON ``meta`` item.

A save holds each stage's parameters, non-trainable state (batch statistics, RNG counters) and
optimizer state, straight from that stage's own devices, and ``meta``: the step, the data iterator's
position, the config and a fingerprint of every stage's state. Saves are asynchronous and the last
``keep`` are kept; orbax writes each one to a temporary directory and renames it when complete, so a
run killed mid-save leaves no half checkpoint behind.

Restoring reads each stage onto the current trainer's shardings (the target tree), so a run can come
back on a different ``data``-axis size. The fingerprint is recomputed after reading: a checkpoint
whose files were damaged (or that fails to read at all) is moved aside to ``corrupt/`` with a
warning, and the one before it is tried, so nothing silently loads garbage and nothing is deleted.

``lpjax train`` over several processes saves **sharded** checkpoints (``sharded=True``): one
item, ``state``, holding the SPMD executor's stacked state buffers as they live on the mesh (row k
on stage k's devices). Every process takes part; orbax (OCDBT) writes each shard from the process
that holds it, into that process's own ``ocdbt.process_<i>/`` files, so no host gathers the model.
The fingerprints are computed on the mesh too (``SpmdExecutor.summaries``), per stage, from the
same unpacked ``StageState`` as a per-stage checkpoint's. Restoring reads each process's rows onto
the current mesh, so a sharded checkpoint resumes on another process count or ``data`` size (with
the spmd executor); a per-stage checkpoint resumes under spmd through the host. Every process
decides alike whether a checkpoint is intact. All hosts must see one filesystem.

The Python API's multi-process path (``Checkpointer(dir, K)`` with ``Trainer.host_states()``, all
stages gathered to every host) is kept: process 0 alone writes, synchronously, and every process
reads them back.

The gradient accumulator is not saved in per-stage checkpoints (a sharded one holds it, in the
buffers): a checkpoint is taken after ``Trainer.flush()``, and the next step's first microbatch
overwrites the accumulator anyway.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

# state_summary: a checkpoint's check of one stage, imported from here by callers (tests/test_nonfinite.py)
from lpjax.core.state_summary import SAVED_FIELDS, is_prng_key, state_summaries, state_summary, storable  # noqa: F401
from lpjax.errors import ConfigError, NonFiniteError
from lpjax.executors.base import ShardedStates, ShardedTarget
from lpjax.training import workdir as files
from lpjax.training.workdir import CORRUPT as CORRUPT_DIR

META_FINGERPRINT = "meta_fingerprint"
SHARDED_ITEM = "state"  # a sharded checkpoint's one item: the SPMD executor's stacked state buffers


class CheckpointError(Exception):
    """A checkpoint could not be read back as it was written."""


def _abstract(state) -> dict:
    """The restore target: shapes, dtypes and shardings of the current state's saved part."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), storable(state))


def _host_target(state) -> dict:
    """A restore target of numpy arrays: read back onto the host, placed later by the executor."""
    return jax.tree.map(lambda a: np.zeros(np.shape(a), a.dtype), storable(state))


def _rebuild(like, restored: dict):
    """A ``StageState`` like ``like`` with its saved fields taken from ``restored``."""
    current = {name: getattr(like, name) for name in SAVED_FIELDS}
    fields = jax.tree.map(lambda old, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
                          if is_prng_key(old) else new, current, restored)
    return dataclasses.replace(like, **fields)


def meta_fingerprint(meta: dict) -> str:
    """A SHA-256 of ``meta``'s canonical JSON, without its own fingerprint: the step, the data position
    and the state fingerprints are what resume trusts, so an edited meta must not load."""
    body = {key: value for key, value in meta.items() if key != META_FINGERPRINT}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _json_view(meta: dict) -> dict:
    """``meta`` as it reads back from JSON (tuples as lists), so saved and restored fingerprints agree."""
    return json.loads(json.dumps(meta, default=str, allow_nan=False))


def _warn(message: str) -> None:
    print(f"lpjax: warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Saves and restores a trainer's stage states under ``directory`` (one subdirectory per step).

    ``sharded=True`` (``lpjax train`` over several processes): every process takes part in each
    save and restore, and saves ``ShardedStates``: orbax writes each array's shards from the process
    that holds them, so no host gathers the model. Otherwise, over several processes, process 0
    alone writes the ``host_states()`` every process passes (the Python API's path)."""

    def __init__(self, directory: str, num_stages: int, *, keep: int = 3, asynchronous: bool = True,
                 sharded: bool = False):
        self.directory = os.path.abspath(directory)
        self.names = tuple(f"stage{k}" for k in range(num_stages))
        self.multiprocess = jax.process_count() > 1
        self.sharded = sharded
        self.writer = jax.process_index() == 0
        self._pending = None  # (step, bytes) of an asynchronous save that may still fail
        if not self.multiprocess or sharded:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                                   cleanup_tmp_directories=True, create=True)
            self.manager = ocp.CheckpointManager(self.directory, item_names=self.names + (SHARDED_ITEM, "meta"),
                                                 options=options)
            return
        # each process's manager works alone (no barriers with the others, which may be dead); only
        # process 0's ever writes. orbax's background directory creation races with itself for a
        # subset of processes (orbax 0.12.8), hence synchronous saves
        pid = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(primary_host=pid, active_processes={pid},
                                                   barrier_sync_key_prefix=f"lpjax_process{pid}")
        handlers = {name: ocp.StandardCheckpointHandler(multiprocessing_options=alone) for name in self.names}
        handlers["meta"] = ocp.JsonCheckpointHandler(multiprocessing_options=alone)
        if self.writer:
            with self._writing("the checkpoint directory"):
                os.makedirs(self.directory, exist_ok=True)  # orbax will not create it for a subset of processes
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=False,
                                               cleanup_tmp_directories=self.writer, read_only=not self.writer,
                                               multiprocessing_options=alone)
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    def steps(self) -> list:
        if self.multiprocess:
            self.manager.reload()  # another process may have written since
        return sorted(self.manager.all_steps())

    def save(self, step: int, states, meta: dict) -> None:
        """Start saving ``states`` (one ``StageState`` per stage, ``Trainer.host_states()`` in a
        multi-process run, or ``ShardedStates``) and ``meta`` as checkpoint ``step``. Raises
        ``NonFiniteError``, saving nothing, if any stage's state is not finite."""
        if isinstance(states, ShardedStates):
            summaries, trees = states.summaries, {SHARDED_ITEM: states.tree}
        else:
            summaries, trees = state_summaries(states), {name: storable(s) for name, s in zip(self.names, states)}
        bad = [k for k, (_, finite) in enumerate(summaries) if not finite]
        if bad:
            raise NonFiniteError(f"stage(s) {', '.join(map(str, bad))} hold non-finite values at step {step}; "
                                 f"nothing was checkpointed")
        meta = _json_view(dict(meta, step=step, fingerprints=[f for f, _ in summaries]))
        meta[META_FINGERPRINT] = meta_fingerprint(meta)
        if self.multiprocess and not self.sharded and not self.writer:
            return
        self._finish_pending()  # orbax's save waits for the previous one anyway; this names its failure
        size = sum(int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(trees))
        items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        with self._writing(f"the checkpoint at step {step}", size):
            self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))
        self._pending = (step, size)

    def _writing(self, what, size=None):
        return files.writing(what, self.directory, os.path.dirname(self.directory), size)

    def _finish_pending(self) -> None:
        """Wait for the save in flight; a failure (a full disk) becomes one ``WriteError`` naming its step."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with self._writing(f"the checkpoint at step {pending[0]}", pending[1]):
                self.manager.wait_until_finished()

    def restore_latest(self, like):
        """``(states, meta)`` from the newest checkpoint that reads back intact, placed like
        ``like`` (a list of ``StageState``, or a ``ShardedTarget``, which gets ``ShardedStates``
        from a sharded checkpoint); ``None`` if there is none. Damaged ones are moved aside with a
        warning."""
        for step in reversed(self.steps()):
            try:
                found, failure = self._restore(step, like), None
            except CheckpointError as err:
                found, failure = None, err
            if self.multiprocess and self.sharded:  # every process must fall back alike
                failure = _agree(failure)
            if failure is None:
                return found
            if not self.writer:  # process 0 alone moves files; the others only skip it
                _warn(f"checkpoint at step {step} is damaged ({failure}); falling back to the one before")
                continue
            where = self._quarantine(step)
            _warn(f"checkpoint at step {step} is damaged ({failure}); moved it to {where} and "
                  f"falling back to the one before")
        return None

    def _restore(self, step, like):
        packed = os.path.isdir(os.path.join(self.directory, str(step), SHARDED_ITEM))
        if packed and not isinstance(like, ShardedTarget):
            raise ConfigError(f"the checkpoint at step {step} in {self.directory} is sharded (written by the spmd "
                              f"executor over several processes); resume it with --config.layout.executor=spmd")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict) or META_FINGERPRINT not in meta:
                raise CheckpointError("its meta item is missing or has no fingerprint")
            if meta[META_FINGERPRINT] != meta_fingerprint(meta):
                raise CheckpointError("its meta item does not match the fingerprint saved with it")
            if meta.get("step") != step or len(meta.get("fingerprints", ())) != len(self.names):
                raise CheckpointError("its meta item is incomplete")
            if packed:
                tree = self.manager.restore(step, args=ocp.args.Composite(
                    **{SHARDED_ITEM: ocp.args.StandardRestore(like.abstract)}))[SHARDED_ITEM]
                states = ShardedStates(dict(tree), like.summarize(tree))
                summaries = states.summaries
            else:
                host = isinstance(like, ShardedTarget) or self.multiprocess
                like_states = like.host_like() if isinstance(like, ShardedTarget) else like
                targets = [_host_target(s) if host else _abstract(s) for s in like_states]
                items = {name: ocp.args.StandardRestore(t) for name, t in zip(self.names, targets)}
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                states = [_rebuild(s, restored[name]) for s, name in zip(like_states, self.names)]
                summaries = state_summaries(states)
        except CheckpointError:
            raise
        except Exception as err:  # orbax and tensorstore raise many kinds for unreadable files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(f"{type(err).__name__}: {reason[:200]}") from None
        for k, (fingerprint, finite) in enumerate(summaries):
            if fingerprint != meta["fingerprints"][k] or not finite:
                raise CheckpointError(f"stage {k}'s contents do not match the fingerprint saved with them")
        return states, meta

    def _quarantine(self, step) -> str:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR, str(step))
        with self._writing(f"the damaged checkpoint at step {step}, moved aside to {target},"):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(source, target)
        self.manager.reload()  # forget the step it had listed
        return target

    def close(self) -> None:
        """Wait for the save in flight (raising ``WriteError`` if it failed) and release orbax's threads."""
        try:
            self._finish_pending()
        finally:
            try:
                self.manager.close()
            except Exception as err:
                if files.os_error_in(err) is None:  # an OSError here is the one _finish_pending reported
                    raise


def _agree(failure):
    """Over several processes: a restore that failed anywhere failed everywhere (one process may
    read a damaged shard that the others never touch); returns this process's view of it."""
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.array([failure is not None], np.int32)))
    if failure is None and flags.any():
        bad = ", ".join(str(p) for p in np.flatnonzero(flags.ravel()))
        return CheckpointError(f"process(es) {bad} could not read their part of it")
    return failure
