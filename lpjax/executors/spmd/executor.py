"""All stages in one jitted program over the mesh's ``stage`` axis (SPMD; the rules it keeps are in docs/semantics.md).

The host lowers the schedule's clocks to static per-clock arrays (``lowering.py``: opcode, mailbox
slots, flags), and one ``lax.scan`` interprets them; nothing about any schedule is on the device::

    for t in clocks:                                    # lax.scan over the lowered arrays
      k, op = axis_index("stage"), op[t,k]              # one 0-or-1-trip loop per (stage, opcode):
      h, own_dx, dx = outboxes                          # only stage k's op runs; idle runs none
      if op != IDLE:                                    # stage k's forward | backward | local
        x = stream_x[input[t,0]] if k == 0 else acts[k][input[t,k]]
        r, c = res[k][consume_res[t,k,:]], cots[k][consume_cot[t,k,:]]   # read before res is written
        if op in (FORWARD, LOCAL): state, h, own_dx, res[k][store[t,k]] = forward(state, x, y[t,k], first[t,k])
        if op in (BACKWARD, LOCAL):
          for i, j in enumerate(sources[k]):           # cotangents this task consumes
            if consume_cot[t,k,i] >= 0: state, dx[i] = backward(state, r[i], c[i])
      state = pmean(state, "data"); if update[t,k]: state = optimizer_step(state)
      outboxes = h, own_dx, dx                          # an idle stage sends them again: ignored
      h, (own_dx, dx) = ppermute(h, +1), ppermute((own_dx, dx), -1)
      acts[k][receive_act[t,k]] = h; cots[k][receive_cot[t,k,o]] = message o   # slots >= 0 only
    metrics = per stage, mean over its forwards        # all_gather over stage: replicated

The mailboxes (activations, cotangents, residuals; one set per
stage, one copy per device of its row, holding a slice of each microbatch) persist between host
calls, so whatever a ``drain`` or an evaluation leaves in flight waits for the task that consumes
it, as in the dataflow executor. Stages of different shapes share the state buffers after
flattening and padding (``packing.py``). The state lives on the mesh as two buffers, what tasks
write (gradient sum, statistics) and what only the optimizer step writes (parameters, optimizer
state), stacked over ``stage`` and kept as per-leaf arrays when the stages' leaves have the same
shapes (``packing.shared_format``), so a host call neither splits nor joins it; only a sharded
checkpoint sees the flat per-dtype format (``_flat_state``). Residual slots leave out weights and
constants (``residuals.py``). A host call's input stream is sharded over ``stage`` too: only stage
0 reads it, so the other stages' devices keep a zeros shard from call to call (``_input_stream``).
Why loops and not a ``lax.switch``: XLA copies what a conditional passes through or updates (see
``_scan``).

A one-tree optimizer (backprop) updates every stage together after the step's last clock, with the
global gradient norm from a ``psum`` over ``stage`` (``StageRule.update``). With a ``data`` axis
the floating state is averaged over the row after every clock, outside the per-stage branches so
every device runs the same collectives; gradients then equal the whole-microbatch gradient, while
BatchNorm statistics are per-slice averages. Every stage sends a message every clock (a
collective); an idle stage sends its outbox again, filled with bubbles (zeros, or NaN with
``bubble_fill=nan``, which tests use to prove they never reach parameters) at the start of each
host call and holding its last real message after that: receivers only write slots the host
allocated for real messages.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding

from lpjax.errors import ConfigError
from lpjax.core.stage_rule import StageState
from lpjax.core.schedules import Flow
from lpjax.executors.spmd.lowering import FORWARD_OP, IDLE, LOCAL_OP, RUNS_FORWARD, Lowering, count_capacities
from lpjax.executors.spmd.buffers import TreePacker, common_lengths, shared_format, zeros
from lpjax.executors.spmd.residuals import plan_residual
from lpjax.executors.placement import PerStageMeshes, data_shard

P = jax.P


def _where(flag, new, old):
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _fill(lengths, lead, value):
    return {g: jnp.full((*lead, n), value if jnp.issubdtype(g, jnp.floating) else 0, g) for g, n in lengths.items()}


def _row(box, slot):
    index = jnp.maximum(slot, 0)
    return jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, index, 0, keepdims=False), box)


def _once(run, body, carry, operands):
    """``body(carry, operands)`` if ``run`` else ``carry``, as a while loop of 0 or 1 trips: unlike
    a conditional (see ``SpmdExecutor._scan``), it neither copies what it passes through nor what it
    updates in place. The barrier ties the (loop-invariant) operands to the trip counter, or XLA
    would hoist everything the body computes from them out of the loop and run it every time."""
    def step(c):
        trip, ops, carried = lax.optimization_barrier((c[0], operands, c[1]))
        return trip + 1, body(carried, ops)

    return lax.while_loop(lambda c: c[0] < run.astype(jnp.int32), step, (jnp.int32(0), carry))[1]


def _receive(box, slot, value):
    """``box`` with ``value`` written into row ``slot`` if ``slot >= 0``, else unchanged (no copy)."""
    return _once(slot >= 0, lambda b, v: _put(b, slot, v), box, value)


def _put(box, slot, value):
    """Write ``value`` into ``box[slot]``; ``slot < 0`` (nothing to keep) writes it into the box's
    last row, a scratch slot no task reads. Writing unconditionally is an in-place row write;
    keeping the old row instead (a select) read and rewrote the row at every clock."""
    return jax.tree.map(lambda b, v: lax.dynamic_update_index_in_dim(b, v, jnp.where(slot >= 0, slot, b.shape[0] - 1), 0),
                        box, value)


class SpmdExecutor:
    PER_SLICE = ("acts", "cots", "res")  # mailboxes: one copy per device of the row

    def __init__(self, rules, schedule, mesh, *, bubble_fill=0.0):
        self.rules, self.schedule, self.mesh = rules, schedule, mesh
        self.num_stages = K = len(rules)
        self.placement = PerStageMeshes(mesh)
        self.num_data = self.placement.num_data
        # the rows of each microbatch this process feeds: a block of the data axis when it holds
        # those columns of every stage (several processes), else all of them
        self.data_shard = data_shard(mesh)
        self.local_slices = self.num_data // self.data_shard[1]  # data slices this process feeds
        self.bubble_fill = bubble_fill
        self.flow = Flow(tuple(tuple(rule.sources) for rule in rules))
        self.one_tree = rules[0].one_tree
        self.lowering = Lowering(self.flow, [rule.sends_own_gradient for rule in rules],
                                 [rule.passes_on for rule in rules])
        self.S = self.lowering.S
        # the cotangent messages (lowering.py: 0 a stage's own, 1 + i its source i's passed on) that
        # some stage sends; only those take room in the messages every clock moves
        self.messages = [o for o in range(1 + self.S) if any(
            rule.sends_own_gradient if o == 0 else o <= len(rule.sources) and rule.passes_on[rule.sources[o - 1]]
            for rule in rules)]
        initial = [rule.init_state() for rule in rules]
        self.state_packers = [TreePacker(s) for s in initial]
        self.state_lengths = common_lengths(self.state_packers)
        # inside a host call's scan the state lives as two buffers (see _scan): what tasks write
        # and what only the optimizer step writes
        # (per-leaf arrays when the stages' leaves have the same shapes: packing.shared_format)
        self.task_format = shared_format([_part(s, TASK_FIELDS) for s in initial])
        self.fixed_format = shared_format([_part(s, FIXED_FIELDS) for s in initial])
        self.buffers = self._stacked_state(initial)
        self.done = [0] * K
        self.fed = 0
        self.inputs, self.labels = {}, {}  # host copies of fed microbatches until their last use
        self._metrics = []
        self._programs, self._controls = {}, {}
        # whether this process holds a stage-0 device (feeds the input stream), and the zeros input
        # shards of its other devices (_input_stream)
        self.feeds_inputs = any(d.process_index == jax.process_index()
                                for d in np.asarray(mesh.devices).reshape(self.num_stages, -1)[0])
        self._idle_inputs = {}
        self._ready = False

    # -- shapes ------------------------------------------------------------------------------
    def _prepare(self, x, y):
        """Trace each stage once to learn its activation and residual shapes (per data slice);
        ``x, y``: one microbatch's rows that this process feeds."""
        D = self.local_slices
        x, y = x[: len(x) // D], y[: len(y) // D]
        h = jax.ShapeDtypeStruct(x.shape, x.dtype)
        y_abs = jax.ShapeDtypeStruct(y.shape, y.dtype)
        self.act_packers, self.res_plans = [], []
        for k, (rule, packer) in enumerate(zip(self.rules, self.state_packers)):
            state = jax.eval_shape(lambda: packer.unpack(zeros(self.state_lengths)))
            h, plan = plan_residual(rule, state, h, y_abs if rule.trains_head else None, self.schedule.synchronous)
            self.act_packers.append(TreePacker(h))
            self.res_plans.append(plan)
        self.act_lengths = common_lengths(self.act_packers[:-1])
        # what each stage stores of its residual (residuals.py), in per-leaf arrays when the stages'
        # leaves have the same shapes (packing.shared_format)
        self.res_format = shared_format([[] if plan is None else plan.stored for plan in self.res_plans])
        for group in self.act_lengths:
            if not jnp.issubdtype(group, jnp.floating):
                raise ConfigError(f"the spmd executor moves floating activations only, got {group}; use executor 'mpmd'")
        self.x_spec, self.y_spec = (x.shape, x.dtype), (y.shape, y.dtype)
        self.capacity = (0, 0, 0)
        self._grow(count_capacities(self.schedule, self.flow, self.lowering.sends_own_gradient,
                                    self.lowering.passes_on))
        self._ready = True

    def _grow(self, wanted):
        """Mailboxes with at least ``wanted`` (activation, cotangent, residual) slots per stage,
        keeping what is in the existing slots."""
        wanted = tuple(max(1, w, c) for w, c in zip(wanted, self.capacity))
        if wanted == self.capacity:
            return
        K, D = self.num_stages, self.num_data
        # one more row than slots: the scratch row that messages nobody keeps are written to (_put)
        fresh = {"acts": zeros(self.act_lengths, (K, D, wanted[0] + 1)),
                 "cots": zeros(self.act_lengths, (K, D, wanted[1] + 1)),
                 "res": self.res_format.zeros((K, D, wanted[2] + 1))}
        fresh = jax.tree.map(np.array, jax.device_get(fresh))
        if self.capacity != (0, 0, 0):
            for name, old in zip(self.PER_SLICE, self.capacity):
                for new, buf in zip(jax.tree.leaves(fresh[name]), jax.tree.leaves(jax.device_get(self.buffers[name]))):
                    new[:, :, :old] = buf[:, :, :old]
        self.buffers.update(_global(fresh, NamedSharding(self.mesh, P("stage", "data"))))
        self.capacity = wanted

    # -- public ------------------------------------------------------------------------------
    def feed(self, microbatch_inputs, microbatch_labels):
        """``microbatch_inputs/labels``: this process's rows of each microbatch (``data_shard``)."""
        if not self._ready:
            self._prepare(np.asarray(microbatch_inputs[0]), np.asarray(microbatch_labels[0]))
        fed = (self._fed(self.x_spec[0]), self._fed(self.y_spec[0]))  # x_spec: one data slice's rows
        other = {(np.shape(x), np.shape(y)) for x, y in zip(microbatch_inputs, microbatch_labels)} - {fed}
        if other:  # its programs and buffers are built for one shape
            raise ConfigError(f"the spmd executor runs microbatches of the shape its first step fed (inputs "
                              f"{fed[0]}, labels {fed[1]}), not {other.pop()}; feed every step the same batch size")
        first = self.fed
        for x, y in zip(microbatch_inputs, microbatch_labels, strict=True):
            self.inputs[self.fed], self.labels[self.fed] = x, y
            self.fed += 1
        self._run(drain=False)  # copies what it runs into the call's input stream
        # what a later call runs is copied now: the caller may reuse the batch's memory
        for m in range(first, self.fed):
            for kept in (self.inputs, self.labels):
                if m in kept:
                    kept[m] = np.array(kept[m])

    def drain(self):
        if self._ready:
            self._run(drain=True)

    def flush(self):
        """Drain, then forget what the drain left in flight; see ``DataflowExecutor.flush``."""
        self.drain()
        self.lowering.reset()
        self.inputs, self.labels = {}, {}
        self.done, self.fed = [0] * self.num_stages, 0

    def refresh_shared(self):
        """Refresh every reader's copy of the shared readout (lpjax/core/shared_readout.py) with one
        collective: the last stage packs its readout, a ``psum`` over ``stage`` (every other stage
        adds zeros, which is exact) broadcasts it, and stages 0..K-2 write it into their state.
        Called by the trainer at a step boundary of a flushing schedule, where nothing is in flight."""
        self.drain()
        if "refresh" not in self._programs:
            K = self.num_stages
            owner = self.rules[K - 1]
            initial = self.state_packers[K - 1].unpack(zeros(self.state_lengths))
            readout = TreePacker(jax.eval_shape(lambda: owner.readout(initial)))
            lengths = readout.sizes

            def extract(k, written, fixed):
                if k != K - 1:
                    return zeros(lengths)
                return readout.pack(owner.readout(self.stage_state(k, written, fixed)), lengths)

            def write(k, written, fixed, flat):
                if k == K - 1:
                    return written, fixed
                after = self.rules[k].with_readout(self.stage_state(k, written, fixed), readout.unpack(flat))
                return self._parts(k, after)

            def refresh(state):
                written, fixed = local_state(state)
                k = lax.axis_index("stage")
                flat = lax.switch(k, [functools.partial(extract, s) for s in range(K)], written, fixed)
                flat = lax.psum(flat, "stage")
                written, fixed = lax.switch(k, [functools.partial(write, s) for s in range(K)], written, fixed, flat)
                return _stage_rows(written, fixed)

            spec = self.state_spec()
            self._programs["refresh"] = jax.jit(jax.shard_map(refresh, mesh=self.mesh, in_specs=(spec,),
                                                              out_specs=spec, axis_names={"stage", "data"},
                                                              check_vma=False), donate_argnums=(0,))
        self.buffers.update(self._programs["refresh"](self.state_buffers()))

    def load_states(self, states):
        """Replace every stage's state (a restored checkpoint); host round trip, so single-process."""
        self.flush()
        self.buffers.update(self._stacked_state(states))

    # -- the state at rest: two buffers, stacked over ``stage`` ------------------------------------
    def _stacked_state(self, states):
        """``{"written", "fixed"}``: the stages' states (host or device values, the same in every
        process) split in the two parts tasks and the optimizer step write, stacked over the
        ``stage`` axis and placed on the mesh. The state stays split between host calls, so a call
        neither splits nor joins it (each a copy of the whole state)."""
        rows = jax.device_get([self._parts(k, state) for k, state in enumerate(states)])
        stacked = {name: jax.tree.map(lambda *r: np.stack(r), *[row[i] for row in rows])
                   for i, name in enumerate(STATE_PARTS)}
        return _global(stacked, NamedSharding(self.mesh, P("stage")))

    def state_buffers(self):
        """``{"written", "fixed"}``: the state buffers on the mesh, each a tree of arrays with a
        leading ``stage`` axis (``stage_state`` reads one stage's ``StageState`` from its rows)."""
        return {name: self.buffers[name] for name in STATE_PARTS}

    def state_spec(self):
        return {name: jax.tree.map(lambda _: P("stage"), self.buffers[name]) for name in STATE_PARTS}

    def _flat_state(self):
        """The state as one flat buffer per dtype and stage (``TreePacker``, padded to the longest
        stage): what a sharded checkpoint saves, so its format does not depend on the split."""
        if "flat" not in self._programs:
            branches = [functools.partial(self._join, s) for s in range(self.num_stages)]

            def join(state):
                flat = lax.switch(lax.axis_index("stage"), branches, *local_state(state))
                return {g: b[None] for g, b in flat.items()}

            self._programs["flat"] = jax.jit(jax.shard_map(
                join, mesh=self.mesh, in_specs=(self.state_spec(),), out_specs={g: P("stage") for g in self.state_lengths},
                axis_names={"stage", "data"}, check_vma=False))
        return self._programs["flat"](self.state_buffers())

    def _load_flat(self, flat):
        """Replace the state with flat per-dtype buffers (``_flat_state``'s format) on this mesh."""
        if "split" not in self._programs:
            branches = [functools.partial(self._split, s) for s in range(self.num_stages)]

            def split(buffers):
                return _stage_rows(*lax.switch(lax.axis_index("stage"), branches, {g: b[0] for g, b in buffers.items()}))

            self._programs["split"] = jax.jit(jax.shard_map(
                split, mesh=self.mesh, in_specs=({g: P("stage") for g in self.state_lengths},),
                out_specs=self.state_spec(), axis_names={"stage", "data"}, check_vma=False))
        self.buffers.update(self._programs["split"](dict(flat)))

    # -- sharded checkpoints -----------------------------------------------------------------
    def sharded_states(self):
        """The stacked state buffers as they live on the mesh (each device holds its stage's row),
        with each stage's ``(fingerprint, finite)``, computed where the stage lives: what a sharded
        checkpoint saves, without gathering anything to a host."""
        from lpjax.training.checkpoint import ShardedStates

        flat = self._flat_state()
        return ShardedStates(dict(flat), self.summaries(flat))

    def sharded_target(self):
        """What a sharded checkpoint restores onto: the buffers' shapes and shardings on this mesh
        (any process count or ``data`` size), how to fingerprint them, and host copies of the stage
        states for reading a per-stage checkpoint instead."""
        from lpjax.training.checkpoint import ShardedTarget

        sharding = NamedSharding(self.mesh, P("stage"))
        abstract = {g: jax.ShapeDtypeStruct((self.num_stages, n), jnp.dtype(g), sharding=sharding)
                    for g, n in self.state_lengths.items()}
        # every stage's live state, in every process (a collective over several): only read when a
        # per-stage checkpoint is restored
        like = (lambda: self.states) if jax.process_count() == 1 else self.host_states
        return ShardedTarget(abstract, self.summaries, like)

    def load_sharded(self, tree):
        """Continue from restored state buffers (a sharded checkpoint), already on this mesh."""
        self.flush()
        self._load_flat(tree)

    def summaries(self, state_buffers):
        """Per stage ``(fingerprint, finite)`` of its saved state (lpjax.training.checkpoint's summary of the
        unpacked ``StageState``, so equal to a per-stage checkpoint's), as Python values; a
        collective over the mesh."""
        if "summaries" not in self._programs:
            from lpjax.training.checkpoint import stage_summary_on_device

            K = self.num_stages
            branches = [functools.partial(lambda k, buf: stage_summary_on_device(self.state_packers[k].unpack(buf)), k)
                        for k in range(K)]

            def local(buffers):
                fingerprint, finite = lax.switch(lax.axis_index("stage"), branches,
                                                 {g: b[0] for g, b in buffers.items()})
                return lax.all_gather(fingerprint, "stage"), lax.all_gather(finite, "stage")

            spec = {g: P("stage") for g in self.state_lengths}
            self._programs["summaries"] = jax.jit(jax.shard_map(local, mesh=self.mesh, in_specs=(spec,),
                                                                out_specs=(P(), P()), check_vma=False))
        fingerprints, finite = jax.device_get(self._programs["summaries"](state_buffers))
        return [(int(f), bool(ok)) for f, ok in zip(fingerprints, finite)]

    def stage_scalars(self):
        """Per stage, its gradient norm at the last update and its count of skipped updates, read
        where the stage lives and all-gathered over ``stage`` (two numbers per stage, not the
        states), as numpy arrays ``[K]``; a collective over the mesh."""
        if "scalars" not in self._programs:
            def read(k, written, fixed):
                state = self.stage_state(k, written, fixed)
                return state.grad_norm.astype(jnp.float32), state.skipped.astype(jnp.int32)

            branches = [functools.partial(read, k) for k in range(self.num_stages)]

            def local(state):
                norm, skipped = lax.switch(lax.axis_index("stage"), branches, *local_state(state))
                return lax.all_gather(norm, "stage"), lax.all_gather(skipped, "stage")

            self._programs["scalars"] = jax.jit(jax.shard_map(local, mesh=self.mesh, in_specs=(self.state_spec(),),
                                                              out_specs=(P(), P()), check_vma=False))
        return jax.device_get(self._programs["scalars"](self.state_buffers()))

    def _full(self, slice_shape):
        return (slice_shape[0] * self.num_data, *slice_shape[1:])

    def _fed(self, slice_shape):
        """The rows of one microbatch this process feeds."""
        return (slice_shape[0] * self.local_slices, *slice_shape[1:])

    def take_metrics(self):
        """Per-stage mean metrics over the tasks run since the last call."""
        entries, self._metrics = self._metrics, []
        if not entries:
            return [None] * self.num_stages
        counts = sum(count for _, count in entries)
        if len(entries) == 1:
            means = entries[0][0]
        else:
            means = _weighted_means([means for means, _ in entries], tuple(tuple(map(int, c)) for _, c in entries))
        return [means[k] if counts[k] else None for k in range(self.num_stages)]

    def host_states(self):
        """Every stage's state as numpy arrays, in every process. The stacked state buffers are
        gathered across processes first, so every process must call this at the same point, and
        each host then holds the whole model: what ``Trainer.export()`` and the Python API's
        per-stage checkpoints ask for. Evaluation (``mesh_eval.py``) and ``stage_scalars`` do not
        use it."""
        from jax.experimental import multihost_utils

        stacked = multihost_utils.process_allgather(self.state_buffers(), tiled=True)
        return [jax.device_get(self.stage_state(k, *(jax.tree.map(lambda rows: jnp.asarray(rows[k]), stacked[name])
                                                for name in STATE_PARTS)))
                for k in range(self.num_stages)]

    @property
    def states(self):
        """Each stage's ``StageState``, assembled on that stage's devices from its buffer row."""
        out = []
        leaves, treedef = jax.tree.flatten(self.state_buffers())
        for k in range(self.num_stages):
            sharding = self.placement.state_sharding(k)
            row = []
            for buf in leaves:
                shards = [s.data.reshape(buf.shape[1:]) for s in buf.addressable_shards if s.index[0].start == k]
                if not shards:
                    break
                row.append(jax.make_array_from_single_device_arrays(buf.shape[1:], sharding, shards))
            if len(row) < len(leaves):  # the stage lives in another process
                out.append(None)
                continue
            parts = jax.tree.unflatten(treedef, row)
            out.append(self._unpacker(k)(*(parts[name] for name in STATE_PARTS)))
        return out

    def _unpacker(self, k):
        if ("unpack", k) not in self._programs:
            self._programs[("unpack", k)] = jax.jit(functools.partial(self.stage_state, k),
                                                    out_shardings=self.placement.state_sharding(k))
        return self._programs[("unpack", k)]

    # -- running -----------------------------------------------------------------------------
    def _run(self, drain):
        clocks = self.schedule.plan(self.flow, self.done, self.fed, drain=drain)
        if not clocks:
            return
        K = self.num_stages
        control = self.lowering.lower(clocks)
        self._grow(self.lowering.capacities())
        # stage 0's inputs, one row per forward it runs in this call (``input[t, 0]``), at least one
        rows = max(1, sum(task is not None and task.stage == 0 and task.runs_forward for clock in clocks for task in clock))
        # only a process that holds a stage-0 device fills the stream (see _input_stream)
        stream_x = np.zeros((rows, *self._fed(self.x_spec[0])), self.x_spec[1]) if self.feeds_inputs else None
        stream_y = np.zeros((len(clocks), K, *self._fed(self.y_spec[0])), self.y_spec[1])
        together = False
        for t, clock in enumerate(clocks):
            for task in clock:
                if task is None:
                    continue
                k, m = task.stage, task.microbatch
                together |= task.update and self.one_tree
                if not task.runs_forward:
                    continue
                self.done[k] = m + 1
                if k == 0:
                    x = self.inputs.pop(m)
                    if stream_x is not None:
                        stream_x[control["input"][t, 0]] = x
                if self.rules[k].trains_head:
                    stream_y[t, k] = self.labels[m]
                if k == K - 1:
                    self.labels.pop(m)
        if together and not any(task is not None and task.update for task in clocks[-1]):
            raise AssertionError("a one-tree optimizer step must end its host call (a flushed step)")
        if self.one_tree:
            control["update"][:] = 0  # every stage steps together after the scan instead
        counts = np.isin(control["op"], RUNS_FORWARD).sum(0)  # tasks with metrics, per stage
        streams = (self._input_stream(stream_x, rows),
                   self._rows(stream_y, P(None, "stage", "data"), (len(clocks), K, *self._full(self.y_spec[0]))),
                   self._control_on_device(control))
        self.buffers, metrics = self._program(together)(self.buffers, *streams)
        self._metrics.append((metrics, counts))

    def _input_stream(self, stream_x, rows):
        """Stage 0's input stream as a global array ``[K, rows, microbatch rows, ...]`` sharded over
        ``stage`` and ``data``. Only stage 0 reads it, so each stage-0 device gets its rows of
        ``stream_x`` and every other device a zeros shard kept on it from call to call: a process
        without stage 0 neither fills a stream nor copies one to its devices at each call."""
        shape = (self.num_stages, rows, *self._full(self.x_spec[0]))
        sharding = NamedSharding(self.mesh, P("stage", None, "data"))
        offset = self.data_shard[0] * self._fed(self.x_spec[0])[0]  # the first row this process feeds
        shards = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            if index[0].indices(shape[0])[0] == 0:
                start, stop, _ = index[2].indices(shape[2])
                shards.append(jax.device_put(stream_x[None, :, start - offset: stop - offset], device))
                continue
            key = (device, rows)
            if key not in self._idle_inputs:
                if len(self._idle_inputs) >= 4 * len(self.mesh.local_devices):
                    self._idle_inputs.pop(next(iter(self._idle_inputs)))
                self._idle_inputs[key] = jax.device_put(np.zeros(sharding.shard_shape(shape), self.x_spec[1]), device)
            shards.append(self._idle_inputs[key])
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    def _rows(self, local, spec, global_shape):
        """The global stream array from this process's rows: every row (one process, or whole
        stages per process), or its block of the data axis, placed with
        ``jax.make_array_from_process_local_data``."""
        sharding = NamedSharding(self.mesh, spec)
        if self.data_shard[1] == 1:
            return _global(local, sharding)
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    def _control_on_device(self, control):
        """The lowered arrays as device arrays; a steady pipeline lowers every step to the same
        arrays, so the last few are kept rather than sent again."""
        key = b"".join(control[name].tobytes() for name in sorted(control)) + repr(
            [control[name].shape for name in sorted(control)]).encode()
        if key not in self._controls:
            if len(self._controls) >= 8:
                self._controls.pop(next(iter(self._controls)))
            self._controls[key] = _global(control, NamedSharding(self.mesh, P(None, "stage")))
        return self._controls[key]

    def _program(self, together):
        if together not in self._programs:
            spec = {name: jax.tree.map(lambda _: P("stage", "data") if name in self.PER_SLICE else P("stage"), tree)
                    for name, tree in self.buffers.items()}
            control_spec = P(None, "stage")
            mapped = jax.shard_map(functools.partial(self._scan, together), mesh=self.mesh,
                                   in_specs=(spec, P("stage", None, "data"), P(None, "stage", "data"), control_spec),
                                   out_specs=(spec, P()), axis_names={"stage", "data"},
                                   check_vma=False)
            self._programs[together] = jax.jit(mapped, donate_argnums=(0,))
        return self._programs[together]

    def _scan(self, together, buffers, xs, ys, control):
        # drop this device's stage axis (and data axis, for mailboxes), both of size 1
        local = {name: jax.tree.map(lambda a: a[0, 0] if name in self.PER_SLICE else a[0], tree)
                 for name, tree in buffers.items()}
        xs, ys = xs[0], ys[:, 0]
        control = {name: a[:, 0] for name, a in control.items()}
        k = lax.axis_index("stage")
        K = self.num_stages
        # XLA (jaxlib < 0.11.1, openxla/xla#46314) copies a buffer that a conditional passes
        # through or updates (outside branch 0, and into the loop's buffer after it), so a
        # lax.switch here copied the state the clock's task writes, and the parameters, at every
        # clock. A while loop updates its carry in place and passes it through for free: each task
        # branch is a loop that runs once on the device whose stage and opcode it is and zero times
        # elsewhere (``_once``), starting from what an idle clock returns; the optimizer step
        # likewise. A forward writes its residual into its mailbox slot in place; the other
        # mailboxes ride through the loops' carry read-only (as loop operands XLA copied them at
        # every clock before the receives wrote them), and a receive is a loop too, writing only
        # when a slot takes the message. The part of the state only the optimizer step writes
        # (parameters, optimizer state) is read-only to tasks.
        branches, offsets = [], []
        for s in range(K):
            offsets.append(len(branches))
            branches += self._task_branches(s)
        offsets = jnp.asarray(offsets, jnp.int32)

        def tick(carry, inputs):
            y, ctrl = inputs
            carry = dict(carry)
            mail = {"acts": carry["acts"], "cots": carry["cots"]}
            branch = jnp.where(ctrl["op"] == IDLE, 0, offsets[k] + ctrl["op"])
            out = (carry["written"], carry["act_out"], carry["cot_out"], carry["res"], self._nan_metrics(), mail)
            for i, task in enumerate(branches, 1):
                out = _once(branch == i, lambda o, ops, task=task: task(*o, *ops), out, (carry["fixed"], xs, y, ctrl))
            carry["written"], carry["act_out"], carry["cot_out"], carry["res"], metrics, mail = out
            carry.update(mail)
            act_out, cot_out = carry["act_out"], carry["cot_out"]
            if self.num_data > 1:  # collectives stay outside the branches: every device runs them
                carry["written"] = jax.tree.map(lambda b: lax.pmean(b, "data") if jnp.issubdtype(b.dtype, jnp.floating)
                                                else b, carry["written"])
                metrics = lax.pmean(metrics, "data")
            if not self.one_tree:
                for s in range(K):
                    carry["fixed"] = _once((ctrl["update"] != 0) & (k == s), functools.partial(self._update_fixed, s),
                                           carry["fixed"], carry["written"])
            if K > 1:
                act_in = lax.ppermute(act_out, "stage", [(i, i + 1) for i in range(K - 1)])
                carry["acts"] = _receive(carry["acts"], ctrl["receive_act"], act_in)
                if self.messages:
                    cot_in = lax.ppermute(cot_out, "stage", [(i, i - 1) for i in range(1, K)])
                    for row, o in enumerate(self.messages):
                        carry["cots"] = _receive(carry["cots"], ctrl["receive_cot"][o], {g: b[row] for g, b in cot_in.items()})
            return carry, metrics

        # the messages a stage sends, carried from clock to clock: an idle stage sends again what
        # its outbox holds (bubbles, or a message already received), which no receiver keeps
        local["act_out"], local["cot_out"] = self._bubbles()
        local, metrics = lax.scan(tick, local, (ys, control))
        del local["act_out"], local["cot_out"]
        if together:  # loops, not lax.switch, for the reason above
            sq = jnp.zeros((), jnp.float32)
            for s in range(K):
                sq = _once(k == s, lambda _, ops, s=s: self._sq_norm(s, *ops), sq, (local["written"], local["fixed"]))
            total = lax.psum(sq, "stage")
            # the whole model steps or none of it does: a stage whose step would write a non-finite value stops all
            bad = jnp.zeros((), jnp.int32)
            for s in range(K):
                bad = _once(k == s, lambda _, ops, s=s: (~self._stays_finite(s, *ops)).astype(jnp.int32), bad,
                            (local["written"], local["fixed"], total))
            agreed = lax.psum(bad, "stage") == 0
            for s in range(K):
                local["fixed"] = _once(k == s, lambda fixed, ops, s=s: self._update_fixed(s, fixed, *ops), local["fixed"],
                                       (local["written"], total, agreed))
        local = {name: jax.tree.map(lambda a: a[None, None] if name in self.PER_SLICE else a[None], tree)
                 for name, tree in local.items()}
        # per stage, the mean over the clocks where it ran a forward, gathered so that every process
        # holds every stage's figures, one scalar each (reading a figure out of a global array on
        # the host is one more dispatch, about 1 ms each over two processes)
        ran = (control["op"] == FORWARD_OP) | (control["op"] == LOCAL_OP)
        count = jnp.maximum(ran.sum(), 1).astype(jnp.float32)
        means = {name: lax.all_gather(jnp.where(ran, value, 0.0).sum() / count, "stage") for name, value in metrics.items()}
        return local, [{name: value[s] for name, value in means.items()} for s in range(K)]

    # -- the state split in two: what tasks write and what only the optimizer step writes ---------
    def _parts(self, k, state):
        return self.task_format.pack(k, _part(state, TASK_FIELDS)), self.fixed_format.pack(k, _part(state, FIXED_FIELDS))

    def _split(self, k, state_buffer):
        return self._parts(k, self.state_packers[k].unpack(state_buffer))

    def _join(self, k, written, fixed):
        return self.state_packers[k].pack(self.stage_state(k, written, fixed), self.state_lengths)

    def stage_state(self, k, written, fixed):
        """Stage k's ``StageState`` from its rows of the two state buffers (no copy for per-leaf layouts)."""
        return StageState(**self.task_format.unpack(k, written), **self.fixed_format.unpack(k, fixed))

    def _update_fixed(self, k, fixed, written, total_sq=None, stays_finite=None):
        """The optimizer step on the split state (``total_sq``: the whole model's squared gradient
        norm, and ``stays_finite``: whether every stage's step stays finite, for a one-tree
        optimizer); returns the new read-only part."""
        state = self.stage_state(k, written, fixed)
        after = self.rules[k].update(state, total_sq, stays_finite)
        _check_unchanged(state, after, TASK_FIELDS, "an optimizer step")
        return self.fixed_format.pack(k, _part(after, FIXED_FIELDS))

    def _stays_finite(self, k, written, fixed, total_sq):
        return self.rules[k].update_stays_finite(self.stage_state(k, written, fixed), total_sq)

    def _sq_norm(self, k, written, fixed):
        return self.rules[k].grad_sq_norm(self.stage_state(k, written, fixed)).astype(jnp.float32)

    # -- one stage, one clock ----------------------------------------------------------------
    def _task_branches(self, k):
        """Stage k's branches for opcodes 1, 2 (and 3): forward only, backward, forward then
        consume (lowering.py). A stage without sources never gets LOCAL_OP (it has nothing to
        consume), so its forward is not traced a third time."""
        branches = [functools.partial(self._task, k, True, False), functools.partial(self._task, k, False, True)]
        if self.rules[k].sources:
            branches.append(functools.partial(self._task, k, True, True))
        return branches

    def _bubbles(self):
        return _fill(self.act_lengths, (), self.bubble_fill), _fill(self.act_lengths, (len(self.messages),), self.bubble_fill)

    def _task(self, k, forward, consume, written, act_out, cot_out, res_box, metrics, mail, fixed, xs, y, ctrl):
        """One task of stage k: returns the state part tasks write, its outboxes with the messages
        it sends written in, its residual mailbox with the residual it stores written to slot
        ``store``, its metrics, and the incoming mailboxes (read only; passed through the loop's
        carry so that the receives after it update them in place without a copy)."""
        rule = self.rules[k]
        state = unpacked = self.stage_state(k, written, fixed)
        consumed = []
        for i, j in enumerate(rule.sources if consume else ()):
            res = self.res_plans[k].rebuild(self.res_format.unpack(k, _row(res_box, ctrl["consume_res"][i])), state)
            cot = self.act_packers[k].unpack(_row(mail["cots"], ctrl["consume_cot"][i]))
            consumed.append((i, j, res, cot, ctrl["consume_cot"][i] >= 0))
        if forward:
            x = _row(xs, ctrl["input"]) if k == 0 else self.act_packers[k - 1].unpack(_row(mail["acts"], ctrl["input"]))
            state, h, own_dx, residual, metrics = rule.forward(state, x, y if rule.trains_head else None,
                                                               ctrl["first"] != 0)
            metrics = {name: value.astype(jnp.float32) for name, value in metrics.items()}
            if residual is not None:
                stored = self.res_format.pack(k, self.res_plans[k].to_store(unpacked, residual, self.schedule.synchronous))
                res_box = _put(res_box, ctrl["store"], stored)  # after this task's reads of it
            if k + 1 < self.num_stages:
                act_out = self.act_packers[k].pack(h, self.act_lengths)
            if own_dx is not None:
                cot_out = self._message(cot_out, 0, self.act_packers[k - 1].pack(own_dx, self.act_lengths), True)
        for i, j, res, cot, present in consumed:
            new_state, passed = rule.backward(state, {j: res}, {j: cot})
            # backward only adds to the gradient sum: select that, not the whole state
            state = dataclasses.replace(state, grad_sum=_where(present, new_state.grad_sum, state.grad_sum))
            if j in passed:
                cot_out = self._message(cot_out, 1 + i, self.act_packers[k - 1].pack(passed[j], self.act_lengths), present)
        _check_unchanged(unpacked, state, FIXED_FIELDS, "a task")
        return self.task_format.pack(k, _part(state, TASK_FIELDS)), act_out, cot_out, res_box, metrics, mail

    def _message(self, out, o, packed, valid):
        row = self.messages.index(o)
        return {g: b.at[row].set(jnp.where(valid, packed[g], b[row])) for g, b in out.items()}

    def _nan_metrics(self):
        nan = jnp.full((), jnp.nan, jnp.float32)
        return {"loss": nan, "accuracy": nan, "bad_labels": nan}


# What forward and backward tasks write (StageRule.forward/backward); the other fields only
# change in the optimizer step. _check_unchanged enforces this at trace time.
TASK_FIELDS = ("rest", "grad_sum", "grad_count")
FIXED_FIELDS = tuple(f.name for f in dataclasses.fields(StageState) if f.name not in TASK_FIELDS)
STATE_PARTS = ("written", "fixed")  # the executor's state buffers: TASK_FIELDS, FIXED_FIELDS


def local_state(state):
    """This device's ``(written, fixed)`` from the stacked state buffers inside ``shard_map``."""
    return tuple(jax.tree.map(lambda b: b[0], state[name]) for name in STATE_PARTS)


def _stage_rows(written, fixed):
    return {name: jax.tree.map(lambda b: b[None], part) for name, part in zip(STATE_PARTS, (written, fixed))}


def _part(state, fields):
    return {name: getattr(state, name) for name in fields}


def _check_unchanged(before, after, fields, what):
    """Fail at trace time if ``what`` changed a field it is assumed not to write: the split
    state would silently drop that change."""
    for name in fields:
        if any(a is not b for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name)))):
            raise AssertionError(f"{what} changed StageState.{name}, which the SPMD executor keeps read-only there")


def _global(tree, sharding):
    """Host arrays (identical in every process) as global arrays; works across processes."""
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda i: np.asarray(a)[i]), tree)


@functools.partial(jax.jit, static_argnums=1)
def _weighted_means(means, counts):
    """Per stage, the mean over several host calls' ``means`` (each a list of per-stage
    ``{name: mean}``, replicated) weighted by their task ``counts`` (``[calls][stages]``)."""
    out = []
    for k in range(len(means[0])):
        total = max(sum(c[k] for c in counts), 1)
        out.append({name: sum(m[k][name] * (c[k] / total) for m, c in zip(means, counts)) for name in means[0][k]})
    return out
