"""Evaluation on the SPMD executor's mesh: every stage's head scored on held-out batches by one
forward-only pipelined program, so no host ever holds another stage's parameters.

What a multi-process run evaluates with (``Trainer.evaluate_batches``); one process keeps its own
per-stage path. Each eval batch is split into ``M = K`` microbatches and its rows over the ``data``
axis; one ``lax.scan`` runs the fill-and-drain forward pipeline, in the style of ``program.py``::

    for c in range(M + K - 1):                        # clocks
      k = axis_index("stage"); m = c - k              # stage k scores microbatch m, if 0 <= m < M
      x = rows[m] if k == 0 else received             # this device's data slice of microbatch m
      h, logits = predict_k(state_k, x)               # eval mode, stage k's own buffer row only
      sums[c] = loss sum and correct count over the slice's real (unmasked) rows
      received = ppermute(h, stage k -> k + 1)
    gather sums over data and stage                   # [K, D, clocks]: a few numbers per device

Rows: with processes split along ``data`` (``data_shard``) each process places only its own rows
(``jax.make_array_from_process_local_data``, as training does); when processes hold whole stages
every stage needs every row, so the eval rows (data, not parameters) are all-gathered. Batches whose
size does not divide by ``data x M`` are padded with masked copies of their last row, and the
processes agree before every batch on how many rows each holds (their shards may differ in length
and in batch count: a process that has run out feeds masked rows only).

The program is built and kept by the executor's one program builder (``mesh.MeshPrograms``). It
is its own loop, not the training program's: a training clock runs a task's forward with its
gradients, writes mailboxes and steps optimizers, while an evaluation clock runs the stage in
eval mode on a masked batch and only sums.

Precision: each (stage, data slice, microbatch) loss sum is formed in float32 on its device (the
per-stage path sums a whole batch in float32), and the host adds them in float64; correct counts
are integers throughout.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding

from lpjax.errors import ConfigError
from lpjax.executors.spmd.buffers import TreePacker, common_lengths, zeros
from lpjax.executors.spmd.mesh import global_array
from lpjax.executors.spmd.program import to_next_stage
from lpjax.executors.spmd.state import local_state

P = jax.P


class MeshEvaluator:
    """Per-stage loss and correct-count totals of an ``SpmdExecutor``'s current states."""

    def __init__(self, executor, loss_fn):
        self.executor, self.loss_fn = executor, loss_fn
        # M = K microbatches: a stage idles only while the pipeline fills and drains (K - 1 of
        # 2K - 1 clocks), against K - 1 of K with the whole batch as one microbatch
        self.microbatches = executor.num_stages
        self.capacity = 0  # rows per process of the programs run so far; only grows, so a ragged
        # last batch reuses the full batches' program
        self.spec = None  # (x row shape, x dtype, y row shape, y dtype) of this process's batches

    # -- host side ---------------------------------------------------------------------------
    def totals(self, batches):
        """``(totals, count)``: per stage ``[loss sum, correct]`` (float64, ``[K, 2]``) over every
        process's batches, and their label positions. ``batches``: this process's own ``(x, y)``
        rows; a collective, so every process calls it, each with its own batches."""
        K, outputs, count = self.executor.num_stages, [], 0
        batches = iter(batches)
        while True:
            batch = next(batches, None)
            if batch is not None:
                x, y = (np.asarray(a, jax.dtypes.canonicalize_dtype(np.asarray(a).dtype)) for a in batch)
                self.spec = (x.shape[1:], x.dtype, y.shape[1:], y.dtype)
            agreed = self._agree(-1 if batch is None else len(x), batch is not None and len(x) != len(y))
            # every process sees the same agreement, so all of them stop, or raise, together
            if (agreed[:, 0] < 0).all():
                break
            uneven = [p for p, bad in enumerate(agreed[:, 2]) if bad]
            if uneven:
                raise ConfigError(f"process(es) {', '.join(map(str, uneven))} gave an evaluation batch whose "
                                  f"inputs and labels differ in number; pass (x, y) with one label row per input")
            lacking = [p for p, known in enumerate(agreed[:, 1]) if not known]
            if lacking:
                raise ConfigError(f"process(es) {', '.join(map(str, lacking))} have no evaluation rows and "
                                  f"no earlier batch to take their shape from; give every process a non-empty "
                                  f"shard of the evaluation split")
            rows = np.maximum(agreed[:, 0], 0)
            unit = self.executor.local_slices * self.microbatches
            self.capacity = max(self.capacity, -(-max(int(rows.max()), 1) // unit) * unit)
            padded = self._padded(*((x, y) if batch is not None else (None, None)))
            count += int(rows.sum()) * int(np.prod(self.spec[2], dtype=np.int64))
            outputs.append(self._program()(self.executor.state_buffers(), *self._placed(padded)))
        totals = np.zeros((K, 2))
        for loss, correct in jax.device_get(outputs):
            totals[:, 0] += np.asarray(loss, np.float64).reshape(K, -1).sum(1)
            totals[:, 1] += np.asarray(correct, np.int64).reshape(K, -1).sum(1)
        return totals, count

    def _agree(self, rows, uneven):
        """Every process's ``[rows (-1: no batch left), knows the batch shape, inputs and labels
        differ in number]``, ``[processes, 3]``."""
        from jax.experimental import multihost_utils

        mine = np.array([[rows, self.spec is not None, uneven]], np.int32)
        if self.executor.processes == 1:
            return mine
        return np.asarray(multihost_utils.process_allgather(mine, tiled=True)).reshape(-1, 3)

    def _padded(self, x, y):
        """This process's rows padded to ``capacity`` with copies of its last row (zeros when it has
        none left), and the mask of its real rows."""
        x_row, x_dtype, y_row, y_dtype = self.spec
        n = 0 if x is None else len(x)
        if n == 0:
            x, y = np.zeros((self.capacity, *x_row), x_dtype), np.zeros((self.capacity, *y_row), y_dtype)
        elif n < self.capacity:
            x, y = (np.concatenate([a, np.repeat(a[-1:], self.capacity - n, 0)]) for a in (x, y))
        return x, y, (np.arange(self.capacity) < n).astype(np.int32)

    def _placed(self, arrays):
        """The padded rows as global arrays split over the mesh's ``data`` axis."""
        executor, processes = self.executor, self.executor.processes
        sharding = NamedSharding(executor.mesh, P("data"))
        if processes == 1:
            return global_array(arrays, sharding)
        if executor.data_shard[1] == processes:  # each process feeds its block of data columns
            return [jax.make_array_from_process_local_data(sharding, a, (processes * len(a), *a.shape[1:]))
                    for a in arrays]
        # processes hold whole stages, whose devices each need every process's rows
        from jax.experimental import multihost_utils

        return global_array(multihost_utils.process_allgather(tuple(arrays), tiled=True), sharding)

    def lowered(self, x, y, state):
        """The evaluation program for batches shaped like ``x``, ``y`` (whole batches, as
        ``ShapeDtypeStruct``s), lowered over ``state`` (the state buffers' shapes): what compile-only
        compiles; nothing runs."""
        canonical = jax.dtypes.canonicalize_dtype
        self.spec = (tuple(x.shape[1:]), canonical(x.dtype), tuple(y.shape[1:]), canonical(y.dtype))
        unit = self.executor.num_data * self.microbatches
        self.capacity = -(-max(x.shape[0], 1) // unit) * unit
        sharding = NamedSharding(self.executor.mesh, P("data"))
        rows = [jax.ShapeDtypeStruct((self.capacity, *shape), dtype, sharding=sharding)
                for shape, dtype in ((self.spec[0], self.spec[1]), (self.spec[2], self.spec[3]), ((), np.int32))]
        return self._program().lower(state, *rows)

    # -- the program -------------------------------------------------------------------------
    def _program(self):
        """The program for this capacity and batch spec (``programs()`` lists those built)."""
        return self.executor.programs.mapped(("eval", self.capacity, self.spec), self._build)

    def programs(self):
        """The evaluation programs built so far (one per capacity and batch spec)."""
        return self.executor.programs.built("eval")

    def _build(self):
        """``(fn, in_specs, out_specs)`` of the evaluation program (``mesh.MeshPrograms.mapped``)."""
        ex, loss_fn = self.executor, self.loss_fn
        K, D, M = ex.num_stages, ex.num_data, self.microbatches
        x_row, x_dtype, y_row, _ = self.spec
        processes = ex.processes
        rows = self.capacity * processes // D // M  # per device and microbatch
        positions = int(np.prod(y_row, dtype=np.int64))  # label positions per row

        # each stage's output shape at this row count, to size the activation message
        h = jax.ShapeDtypeStruct((rows, *x_row), x_dtype)
        packers = []
        for k, rule in enumerate(ex.rules):
            state = jax.eval_shape(lambda k=k: ex.format.zeros_state(k))
            h, _ = jax.eval_shape(rule.predict, state, h)
            packers.append(TreePacker(h))
        lengths = common_lengths(packers[:-1])

        def score(k, written, fixed, received, x, y, mask):
            state = ex.format.stage_state(k, written, fixed)  # this device's own stage only
            h, logits = ex.rules[k].predict(state, x if k == 0 else packers[k - 1].unpack(received))
            # per row, so padded rows can be left out; loss_fn is a mean over label positions
            per_row = jax.vmap(lambda logit, label: loss_fn(logit[None], label[None]))(logits, y) * positions
            loss = jnp.where(mask > 0, per_row, 0.0).sum().astype(jnp.float32)
            hits = (jnp.argmax(logits, -1) == y).reshape(len(y), -1).sum(1)
            correct = jnp.where(mask > 0, hits, 0).sum().astype(jnp.int32)
            out = packers[k].pack(h, lengths) if k + 1 < K else zeros(lengths)
            return out, loss, correct

        def idle(received, x, y, mask):
            return zeros(lengths), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)

        def program(state, xs, ys, masks):
            written, fixed = local_state(state)
            k = lax.axis_index("stage")
            xs, ys, masks = (a.reshape(M, rows, *a.shape[1:]) for a in (xs, ys, masks))
            stages = [functools.partial(score, s, written, fixed) for s in range(K)]

            def clock(received, c):
                m = c - k
                i = jnp.clip(m, 0, M - 1)
                operands = (received, xs[i], ys[i], masks[i])
                out, loss, correct = lax.cond((m >= 0) & (m < M), lambda *a: lax.switch(k, stages, *a), idle,
                                              *operands)
                if K > 1:
                    received = to_next_stage(out, K)
                return received, (loss, correct)

            _, (losses, correct) = lax.scan(clock, zeros(lengths), jnp.arange(M + K - 1))
            gather = lambda a: lax.all_gather(lax.all_gather(a, "data"), "stage")  # noqa: E731
            return gather(losses), gather(correct)

        return program, (ex.state_spec(), P("data"), P("data"), P("data")), (P(), P())
