"""All stages in one jitted program over the mesh's ``stage`` axis (DESIGN.md §4, SPMD).

``jax.shard_map`` gives each ``stage`` row of the mesh its own slice of every buffer, a ``lax.scan``
runs the clocks, ``lax.switch`` on the stage index picks that stage's kernel (so stages may differ in
shape), and ``lax.ppermute`` shifts activations forward and cotangents back by one stage per clock.
With a ``data`` axis, each device of a stage's row holds a slice of the microbatch. After every
clock the stage's floating state (gradient sum, batch statistics; parameters are identical already)
is averaged over the row with ``lax.pmean``, outside the per-stage branches so every device runs
the same collectives, and only then is the optimizer step applied. Gradients then equal the
whole-microbatch gradient; BatchNorm statistics are per-slice averages, not whole-batch ones.

A validity flag travels with every activation and cotangent. A stage whose input is not valid
(pipeline fill and drain) runs nothing: ``lax.cond`` returns its state untouched and sends a
bubble (zeros, or NaN when ``bubble_fill=nan``, which tests use to prove bubbles never reach
parameters).

Semantics are the dataflow executor's, clock for clock: the host plans clocks with the same
schedule, and the device keeps the same per-stage microbatch counters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding

from ..errors import ConfigError
from ..schedules import BACKWARD, FORWARD, LOCAL
from .dataflow import DELAY_PER_HOP
from .packing import TreePacker, common_lengths, zeros
from .placement import PerStageMeshes

P = jax.P


def _where(flag, new, old):
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _fill(lengths, lead, value):
    return {g: jnp.full((*lead, n), value if jnp.issubdtype(g, jnp.floating) else 0, g) for g, n in lengths.items()}


class SpmdExecutor:
    def __init__(self, kernels, schedule, mesh, *, bubble_fill=0.0):
        self.kernels, self.schedule, self.mesh = kernels, schedule, mesh
        self.num_stages = K = len(kernels)
        self.microbatches = schedule.microbatches
        self.placement = PerStageMeshes(mesh)
        self.num_data = self.placement.num_data
        self.bubble_fill = bubble_fill
        self.backward = any(kern.sources for kern in kernels)
        self.slots = max([j - k for k, kern in enumerate(kernels) for j in kern.sources] + [0])
        self.ring = (DELAY_PER_HOP * self.slots if not schedule.synchronous else self.microbatches) or 1
        initial = [kern.init_state() for kern in kernels]
        self.state_packers = [TreePacker(s) for s in initial]
        self.state_lengths = common_lengths(self.state_packers)
        packed = [jax.device_get(p.pack(s, self.state_lengths)) for p, s in zip(self.state_packers, initial)]
        stacked = {g: np.stack([row[g] for row in packed]) for g in self.state_lengths}
        self.buffers = {"state": _global(stacked, NamedSharding(mesh, P("stage")))}
        self.done = [0] * K
        self.fed = 0
        self._metrics = []
        self._programs = {}
        self._ready = False

    # -- shapes ------------------------------------------------------------------------------
    def _prepare(self, x, y):
        """Trace each stage once to learn its activation and residual shapes (per data slice)."""
        D = self.num_data
        x, y = x[: len(x) // D], y[: len(y) // D]
        h = jax.ShapeDtypeStruct(x.shape, x.dtype)
        y_abs = jax.ShapeDtypeStruct(y.shape, y.dtype)
        self.act_packers, self.res_packers = [], []
        for kern, packer in zip(self.kernels, self.state_packers):
            state = jax.eval_shape(lambda: packer.unpack(zeros(self.state_lengths)))
            _, h, _, residual, _ = jax.eval_shape(kern.forward, state, h, y_abs if kern.trains_head else None)
            self.act_packers.append(TreePacker(h))
            self.res_packers.append(TreePacker(residual) if residual is not None else None)
        self.act_lengths = common_lengths(self.act_packers[:-1])
        self.res_lengths = common_lengths([p for p in self.res_packers if p is not None])
        for group in self.act_lengths:
            if not jnp.issubdtype(group, jnp.floating):
                raise ConfigError(f"the spmd executor moves floating activations only, got {group}; use executor 'mpmd'")
        self.x_spec, self.y_spec = (x.shape, x.dtype), (y.shape, y.dtype)
        self._reset_in_flight()
        self._ready = True

    def _reset_in_flight(self):
        """Empty activation, message and residual buffers: nothing in flight."""
        K, S, R, D = self.num_stages, self.slots, self.ring, self.num_data
        y_shape, y_dtype = self.y_spec
        per_stage = {
            "act_valid": jnp.zeros((K,), bool),
            "inbox_valid": jnp.zeros((K, max(S, 1)), bool),
            "done": jnp.zeros((K,), jnp.int32),
        }
        per_slice = {  # one copy per device of the row: these hold slices of the microbatch
            "act": zeros(self.act_lengths, (K, D)),
            "act_y": jnp.zeros((K, D, *y_shape), y_dtype),
            "inbox": zeros(self.act_lengths, (K, D, max(S, 1))),
            "ring": zeros(self.res_lengths, (K, D, R)),
            "outbox": zeros(self.act_lengths, (K, D, self.microbatches if self.schedule.synchronous else 1)),
        }
        self.buffers.update(_global(jax.device_get(per_stage), NamedSharding(self.mesh, P("stage"))))
        self.buffers.update(_global(jax.device_get(per_slice), NamedSharding(self.mesh, P("stage", "data"))))

    # -- public ------------------------------------------------------------------------------
    PER_SLICE = ("act", "act_y", "inbox", "ring", "outbox")

    def feed(self, microbatch_inputs, microbatch_labels):
        xs, ys = np.stack(microbatch_inputs), np.stack(microbatch_labels)
        if not self._ready:
            self._prepare(xs[0], ys[0])
        self.fed += len(xs)
        self._run(xs, ys, drain=False)

    def drain(self):
        if self._ready:
            self._run(np.zeros((0, *self._full(self.x_spec[0])), self.x_spec[1]),
                      np.zeros((0, *self._full(self.y_spec[0])), self.y_spec[1]), drain=True)

    def flush(self):
        """Drain, then forget what the drain left in flight; see ``DataflowExecutor.flush``."""
        self.drain()
        if self._ready:
            self._reset_in_flight()
        self.done, self.fed = [0] * self.num_stages, 0

    def load_states(self, states):
        """Replace every stage's state (a restored checkpoint); host round trip, so single-process."""
        self.flush()
        packed = [jax.device_get(p.pack(s, self.state_lengths)) for p, s in zip(self.state_packers, states)]
        stacked = {g: np.stack([row[g] for row in packed]) for g in self.state_lengths}
        self.buffers["state"] = _global(stacked, NamedSharding(self.mesh, P("stage")))

    def _full(self, local_shape):
        return (local_shape[0] * self.num_data, *local_shape[1:])

    def take_metrics(self):
        """Per-stage mean metrics over the tasks run since the last call."""
        entries, self._metrics = self._metrics, []
        if not entries:
            return [None] * self.num_stages
        mask = np.concatenate([mask for _, mask in entries])
        means = _masked_means([metrics for metrics, _ in entries], mask, NamedSharding(self.mesh, P()))
        return [{name: value[k] for name, value in means.items()} if mask[:, k].any() else None
                for k in range(self.num_stages)]

    def host_states(self):
        """Every stage's state as numpy arrays, in every process. The stacked state buffers are
        gathered across processes first, so every process must call this at the same point."""
        from jax.experimental import multihost_utils

        stacked = multihost_utils.process_allgather(self.buffers["state"], tiled=True)
        return [jax.device_get(packer.unpack({g: jnp.asarray(rows[k]) for g, rows in stacked.items()}))
                for k, packer in enumerate(self.state_packers)]

    @property
    def states(self):
        """Each stage's ``StageState``, assembled on that stage's devices from its buffer row."""
        out = []
        for k, packer in enumerate(self.state_packers):
            sharding = self.placement.state_sharding(k)
            row = {}
            for group, buf in self.buffers["state"].items():
                shards = [s.data.reshape(buf.shape[1:]) for s in buf.addressable_shards if s.index[0].start == k]
                if not shards:
                    break
                row[group] = jax.make_array_from_single_device_arrays(buf.shape[1:], sharding, shards)
            out.append(jax.jit(packer.unpack, out_shardings=sharding)(row) if len(row) == len(self.state_lengths) else None)
        return out

    # -- running -----------------------------------------------------------------------------
    def _run(self, xs, ys, drain):
        clocks = self.schedule.plan(self.num_stages, self.done, self.fed, drain=drain, backward=self.backward)
        if not clocks:
            return
        phases = self._phases(clocks)
        stream_x = np.zeros((len(clocks), *self._full(self.x_spec[0])), self.x_spec[1])
        stream_y = np.zeros((len(clocks), *self._full(self.y_spec[0])), self.y_spec[1])
        stream_valid = np.zeros((len(clocks),), bool)
        fed_before = self.fed - len(xs)
        mask = np.zeros((len(clocks), self.num_stages), bool)
        for t, clock in enumerate(clocks):
            for task in clock:
                if task is None or task.phase == BACKWARD:
                    continue
                mask[t, task.stage] = True
                self.done[task.stage] = task.microbatch + 1
                if task.stage == 0:
                    stream_x[t], stream_y[t] = xs[task.microbatch - fed_before], ys[task.microbatch - fed_before]
                    stream_valid[t] = True
        split = NamedSharding(self.mesh, P(None, "data"))
        stream = _global((stream_x, stream_y), split) + _global((stream_valid,), NamedSharding(self.mesh, P()))
        offset = 0
        for phase, count in phases:
            program = self._program(phase, count)
            part = jax.tree.map(lambda a: a[offset:offset + count], stream)
            self.buffers, metrics = program(self.buffers, *part)
            if phase != BACKWARD:
                self._metrics.append((metrics, mask[offset:offset + count]))
            offset += count

    def _phases(self, clocks):
        """Runs of clocks with one phase each: (LOCAL, n) for streaming, (FORWARD, n), (BACKWARD, n)."""
        phases = []
        for clock in clocks:
            phase = next(task.phase for task in clock if task is not None)
            if phases and phases[-1][0] == phase:
                phases[-1] = (phase, phases[-1][1] + 1)
            else:
                phases.append((phase, 1))
        return phases

    def _program(self, phase, count):
        key = (phase, count)
        if key not in self._programs:
            spec = {name: jax.tree.map(lambda _: P("stage", "data") if name in self.PER_SLICE else P("stage"), tree)
                    for name, tree in self.buffers.items()}
            body = functools.partial(self._scan, phase)
            mapped = jax.shard_map(body, mesh=self.mesh, in_specs=(spec, P(None, "data"), P(None, "data"), P()),
                                   out_specs=(spec, P(None, "stage")), axis_names={"stage", "data"},
                                   check_vma=False)
            self._programs[key] = jax.jit(mapped, donate_argnums=(0,))
        return self._programs[key]

    def _scan(self, phase, buffers, xs, ys, valid):
        # drop this device's stage axis (and data axis, for per-slice buffers), both of size 1
        local = {name: jax.tree.map(lambda a: a[0, 0] if name in self.PER_SLICE else a[0], tree)
                 for name, tree in buffers.items()}
        k = lax.axis_index("stage")
        clock = jnp.arange(xs.shape[0])
        tasks = [functools.partial(self._stage_clock, phase, s) for s in range(self.num_stages)]
        updates = [functools.partial(self._maybe_update, s) for s in range(self.num_stages)]

        def tick(carry, inputs):
            carry, metrics, due = lax.switch(k, tasks, carry, *inputs)
            if self.num_data > 1:  # collectives stay outside the branches: every device runs them
                carry["state"] = {g: lax.pmean(b, "data") if jnp.issubdtype(g, jnp.floating) else b
                                  for g, b in carry["state"].items()}
                metrics = lax.pmean(metrics, "data")
            carry["state"] = lax.switch(k, updates, carry["state"], due)
            return self._shift(phase, carry), metrics

        local, metrics = lax.scan(tick, local, (xs, ys, valid, clock))
        local = {name: jax.tree.map(lambda a: a[None, None] if name in self.PER_SLICE else a[None], tree)
                 for name, tree in local.items()}
        return local, jax.tree.map(lambda a: a[:, None], metrics)

    def _maybe_update(self, k, state_buffer, due):
        def update(buffer):
            state = self.kernels[k].update(self.state_packers[k].unpack(buffer))
            return self.state_packers[k].pack(state, self.state_lengths)

        return lax.cond(due, update, lambda buffer: buffer, state_buffer)

    def _shift(self, phase, carry):
        K = self.num_stages
        forward = [(i, i + 1) for i in range(K - 1)]
        backward = [(i, i - 1) for i in range(1, K)]
        carry = dict(carry)
        if phase != BACKWARD:
            carry["act"] = lax.ppermute(carry["act"], "stage", forward)
            carry["act_y"] = lax.ppermute(carry["act_y"], "stage", forward)
            carry["act_valid"] = lax.ppermute(carry["act_valid"], "stage", forward)
        if phase != FORWARD and self.slots:  # window 1 sends nothing back
            carry["inbox"] = lax.ppermute(carry["inbox"], "stage", backward)
            carry["inbox_valid"] = lax.ppermute(carry["inbox_valid"], "stage", backward)
        return carry

    # -- one stage, one clock ----------------------------------------------------------------
    def _stage_clock(self, phase, k, carry, x0, y0, v0, clock):
        kern = self.kernels[k]
        if phase == BACKWARD:
            m = clock - (self.num_stages - 1 - k)
            valid = (m >= 0) & (m < self.microbatches)
        else:
            valid = v0 if k == 0 else carry["act_valid"]
            m = carry["done"]
        run = functools.partial(self._backward_task if phase == BACKWARD else self._forward_task, phase, k, kern)
        skip = functools.partial(self._bubble, phase, k, kern)
        return lax.cond(valid, run, skip, carry, x0, y0, m)

    def _inputs(self, k, carry, x0, y0):
        x = x0 if k == 0 else self.act_packers[k - 1].unpack(carry["act"])
        return x, (y0 if k == 0 else carry["act_y"])

    def _forward_task(self, phase, k, kern, carry, x0, y0, m):
        state = self.state_packers[k].unpack(carry["state"])
        x, y = self._inputs(k, carry, x0, y0)
        fresh = m % self.microbatches == 0
        state, h, own_dx, residual, metrics = kern.forward(state, x, y if kern.trains_head else None, fresh)
        carry = dict(carry)
        send = self._empty_message()
        if phase == LOCAL:
            for j in kern.sources:
                d = j - k
                slot = (m - DELAY_PER_HOP * d) % self.ring
                res = self.res_packers[k].unpack({g: b[slot] for g, b in carry["ring"].items()})
                cot = self.act_packers[k].unpack({g: b[d - 1] for g, b in carry["inbox"].items()})
                present = carry["inbox_valid"][d - 1]
                new_state, passed = kern.backward(state, {j: res}, {j: cot})
                state = _where(present, new_state, state)
                if j in passed:
                    send = self._put_message(send, k, j, passed[j], present)
            if own_dx is not None:
                send = self._put_message(send, k, k, own_dx, True)
            due = (m + 1) % self.microbatches == 0
        else:
            if own_dx is not None:
                packed = self.act_packers[k - 1].pack(own_dx, self.act_lengths)
                carry["outbox"] = {g: b.at[m % self.microbatches].set(packed[g]) for g, b in carry["outbox"].items()}
            due = (not self.backward) & ((m + 1) % self.microbatches == 0)
        if residual is not None:
            packed = self.res_packers[k].pack(residual, self.res_lengths)
            carry["ring"] = {g: b.at[m % self.ring].set(packed[g]) for g, b in carry["ring"].items()}
        if phase == LOCAL and self.slots:
            carry["inbox"], carry["inbox_valid"] = send
        carry["state"] = self.state_packers[k].pack(state, self.state_lengths)
        if k + 1 < self.num_stages:
            carry["act"] = self.act_packers[k].pack(h, self.act_lengths)
        carry["act_y"], carry["act_valid"] = y, jnp.array(True)
        carry["done"] = m + 1
        return carry, {name: value.astype(jnp.float32) for name, value in metrics.items()}, jnp.asarray(due)

    def _backward_task(self, phase, k, kern, carry, x0, y0, m):
        state = self.state_packers[k].unpack(carry["state"])
        carry = dict(carry)
        send = self._empty_message()
        slot = m % self.microbatches
        for j in kern.sources:
            d = j - k
            res = self.res_packers[k].unpack({g: b[slot] for g, b in carry["ring"].items()})
            cot = self.act_packers[k].unpack({g: b[d - 1] for g, b in carry["inbox"].items()})
            state, passed = kern.backward(state, {j: res}, {j: cot})
            if j in passed:
                send = self._put_message(send, k, j, passed[j], True)
        if kern.sends_own_gradient:
            own = self.act_packers[k - 1].unpack({g: b[slot] for g, b in carry["outbox"].items()})
            send = self._put_message(send, k, k, own, True)
        carry["state"] = self.state_packers[k].pack(state, self.state_lengths)
        carry["inbox"], carry["inbox_valid"] = send
        return carry, self._nan_metrics(), m == self.microbatches - 1

    def _bubble(self, phase, k, kern, carry, x0, y0, m):
        carry = dict(carry)
        lead = (max(self.slots, 1),)
        if phase != BACKWARD:
            carry["act"] = _fill(self.act_lengths, (), self.bubble_fill)
            carry["act_valid"] = jnp.array(False)
        if phase != FORWARD and self.slots:
            carry["inbox"] = _fill(self.act_lengths, lead, self.bubble_fill)
            carry["inbox_valid"] = jnp.zeros(lead, bool)
        return carry, self._nan_metrics(), jnp.array(False)

    def _empty_message(self):
        lead = (max(self.slots, 1),)
        return _fill(self.act_lengths, lead, self.bubble_fill), jnp.zeros(lead, bool)

    def _put_message(self, message, k, j, cotangent, valid):
        """Cotangent of loss j for stage k-1, in the receiver's slot ``j - (k-1) - 1``."""
        buffers, flags = message
        slot = j - k
        packed = self.act_packers[k - 1].pack(cotangent, self.act_lengths)
        buffers = {g: b.at[slot].set(jnp.where(valid, packed[g], b[slot])) for g, b in buffers.items()}
        return buffers, flags.at[slot].set(valid)

    def _nan_metrics(self):
        nan = jnp.full((), jnp.nan, jnp.float32)
        return {"loss": nan, "accuracy": nan}


def _global(tree, sharding):
    """Host arrays (identical in every process) as global arrays; works across processes."""
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda i: np.asarray(a)[i]), tree)


@functools.partial(jax.jit, static_argnums=2)
def _masked_means(metrics, mask, replicated):
    """Per-stage mean over the clocks where the stage ran a task; metrics are ``[clocks, stages]``.
    The result is replicated so every process can read every stage's figure."""
    stacked = {name: jnp.concatenate([m[name] for m in metrics]) for name in metrics[0]}
    count = jnp.maximum(mask.sum(0), 1)
    means = {name: jnp.where(mask, value, 0.0).sum(0) / count for name, value in stacked.items()}
    return jax.lax.with_sharding_constraint(means, replicated)
