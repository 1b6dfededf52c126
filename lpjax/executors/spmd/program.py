"""The SPMD executor's device program: one host call's clocks, every stage at once, over the mesh.

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

``PipelineProgram.__call__`` is that loop, ``_task`` one stage's task in it. The mailboxes
(activations, cotangents, residuals; ``shapes.py``) persist between host calls, so whatever a
``drain`` or an evaluation leaves in flight waits for the task that consumes it, as in the
dataflow executor. Residual slots leave out weights and constants (``residuals.py``).

A one-tree optimizer (backprop) updates every stage together after the step's last clock, with the
global gradient norm from a ``psum`` over ``stage`` (``StageRule.update``). With a ``data`` axis
the floating state is averaged over the row after every clock, outside the per-stage branches so
every device runs the same collectives; gradients then equal the whole-microbatch gradient, while
BatchNorm statistics are per-slice averages. Every stage sends a message every clock (a
collective); an idle stage sends its outbox again, filled with bubbles (zeros, or NaN with
``bubble_fill=nan``, which tests use to prove they never reach parameters) at the start of each
host call and holding its last real message after that: receivers only write slots the host
allocated for real messages.

Why loops and not a ``lax.switch``: XLA (jaxlib < 0.11.1, openxla/xla#46314) copies a buffer that a
conditional passes through or updates (outside branch 0, and into the loop's buffer after it), so
a ``lax.switch`` over the tasks copied the state the clock's task writes, and the parameters, at
every clock. A while loop updates its carry in place and passes it through for free: each task
branch is a loop that runs once on the device whose stage and opcode it is and zero times
elsewhere (``_once``), starting from what an idle clock returns; the optimizer step likewise. A
forward writes its residual into its mailbox slot in place; the other mailboxes ride through the
loops' carry read-only (as loop operands XLA copied them at every clock before the receives wrote
them), and a receive is a loop too, writing only when a slot takes the message. The part of the
state only the optimizer step writes (parameters, optimizer state) is read-only to tasks.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lpjax.core.stage_rule import no_metrics
from lpjax.executors.spmd.lowering import Op
from lpjax.executors.spmd.shapes import MAILBOXES
from lpjax.executors.spmd.state import FIXED_FIELDS, TASK_FIELDS, check_unchanged, part

P = jax.P


class PipelineProgram:
    """The per-device function of the pipeline program over an executor's buffers (``__call__``)."""

    def __init__(self, rules, fmt, shapes, messages, num_data, *, synchronous, bubble_fill):
        """``fmt``: the ``StateFormat``; ``shapes``: the ``Shapes``; ``messages``: the cotangent
        messages some stage sends (lowering.py's numbering); ``synchronous``: the schedule flushes
        every step."""
        self.rules, self.fmt, self.shapes, self.messages = rules, fmt, shapes, messages
        self.num_stages, self.num_data = len(rules), num_data
        self.one_tree = rules[0].one_tree
        self.synchronous, self.bubble_fill = synchronous, bubble_fill

    @staticmethod
    def specs(buffers):
        """``(in_specs, out_specs)`` of the program over ``buffers`` (state parts and mailboxes)."""
        spec = {name: jax.tree.map(lambda _: P("stage", "data") if name in MAILBOXES else P("stage"), tree)
                for name, tree in buffers.items()}
        return (spec, P("stage", None, "data"), P(None, "stage", "data"), P(None, "stage")), (spec, P())

    def __call__(self, together, buffers, xs, ys, control):
        """One host call's clocks.

        Args:
          together: a one-tree optimizer's step ends this call (every stage updates after the scan).
          buffers: this device's rows of the state buffers and mailboxes.
          xs, ys, control: its shards of the call's streams (streams.py).

        Returns:
          ``(buffers, metrics)``: the new rows, and per stage ``{name: mean over its forwards}``
          (replicated).
        """
        # drop this device's stage axis (and data axis, for mailboxes), both of size 1
        local = {name: jax.tree.map(lambda a: a[0, 0] if name in MAILBOXES else a[0], tree)
                 for name, tree in buffers.items()}
        xs, ys = xs[0], ys[:, 0]
        control = {name: a[:, 0] for name, a in control.items()}
        k = lax.axis_index("stage")
        K = self.num_stages
        branches, offsets = [], []
        for s in range(K):
            offsets.append(len(branches))
            branches += self._task_branches(s)
        offsets = jnp.asarray(offsets, jnp.int32)

        def tick(carry, inputs):
            y, ctrl = inputs
            carry = dict(carry)
            mail = {"acts": carry["acts"], "cots": carry["cots"]}
            branch = jnp.where(ctrl["op"] == Op.IDLE, 0, offsets[k] + ctrl["op"])
            out = (carry["written"], carry["act_out"], carry["cot_out"], carry["res"], no_metrics(), mail)
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
                carry["acts"] = _receive(carry["acts"], ctrl["receive_act"], to_next_stage(act_out, K))
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
        if together:  # loops, not lax.switch, for the reason in the module docstring
            sq = jnp.zeros((), jnp.float32)
            for s in range(K):
                sq = _once(k == s, lambda _, ops, s=s: self._sq_norm(s, *ops), sq, (local["written"], local["fixed"]))
            total = lax.psum(sq, "stage")
            for s in range(K):
                local["fixed"] = _once(k == s, lambda fixed, ops, s=s: self._update_fixed(s, fixed, *ops), local["fixed"],
                                       (local["written"], total))
        local = {name: jax.tree.map(lambda a: a[None, None] if name in MAILBOXES else a[None], tree)
                 for name, tree in local.items()}
        # per stage, the mean over the clocks where it ran a forward, gathered so that every process
        # holds every stage's figures, one scalar each (reading a figure out of a global array on
        # the host is one more dispatch, about 1 ms each over two processes)
        ran = (control["op"] == Op.FORWARD) | (control["op"] == Op.LOCAL)
        count = jnp.maximum(ran.sum(), 1).astype(jnp.float32)
        means = {name: lax.all_gather(jnp.where(ran, value, 0.0).sum() / count, "stage") for name, value in metrics.items()}
        return local, [{name: value[s] for name, value in means.items()} for s in range(K)]

    # -- the optimizer step on the split state -----------------------------------------------
    def _update_fixed(self, k, fixed, written, total_sq=None):
        """The optimizer step on the split state (``total_sq``: the whole model's squared gradient
        norm, for a one-tree optimizer); returns the new read-only part."""
        state = self.fmt.stage_state(k, written, fixed)
        after = self.rules[k].update(state, total_sq)
        check_unchanged(state, after, TASK_FIELDS, "an optimizer step")
        return self.fmt.fixed_format.pack(k, part(after, FIXED_FIELDS))

    def _sq_norm(self, k, written, fixed):
        return self.rules[k].grad_sq_norm(self.fmt.stage_state(k, written, fixed)).astype(jnp.float32)

    # -- one stage, one clock ----------------------------------------------------------------
    def _task_branches(self, k):
        """Stage k's branches for ``Op.FORWARD``, ``Op.BACKWARD`` (and ``Op.LOCAL``), in that order
        (lowering.py). A stage without sources never gets ``Op.LOCAL`` (it has nothing to
        consume), so its forward is not traced a third time."""
        branches = [functools.partial(self._task, k, True, False), functools.partial(self._task, k, False, True)]
        if self.rules[k].sources:
            branches.append(functools.partial(self._task, k, True, True))
        return branches

    def _bubbles(self):
        lengths = self.shapes.act_lengths
        return _fill(lengths, (), self.bubble_fill), _fill(lengths, (len(self.messages),), self.bubble_fill)

    def _task(self, k, forward, consume, written, act_out, cot_out, res_box, metrics, mail, fixed, xs, y, ctrl):
        """One task of stage k: returns the state part tasks write, its outboxes with the messages
        it sends written in, its residual mailbox with the residual it stores written to slot
        ``store``, its metrics, and the incoming mailboxes (read only; passed through the loop's
        carry so that the receives after it update them in place without a copy)."""
        rule, shapes, fmt = self.rules[k], self.shapes, self.fmt
        state = unpacked = fmt.stage_state(k, written, fixed)
        consumed = []
        for i, j in enumerate(rule.sources if consume else ()):
            res = shapes.res_plans[k].rebuild(shapes.res_format.unpack(k, _row(res_box, ctrl["consume_res"][i])), state)
            cot = shapes.act_packers[k].unpack(_row(mail["cots"], ctrl["consume_cot"][i]))
            consumed.append((i, j, res, cot, ctrl["consume_cot"][i] >= 0))
        if forward:
            x = _row(xs, ctrl["input"]) if k == 0 else shapes.act_packers[k - 1].unpack(_row(mail["acts"], ctrl["input"]))
            state, h, own_dx, residual, metrics = rule.forward(state, x, y if rule.trains_head else None,
                                                               ctrl["first"] != 0)
            metrics = {name: value.astype(jnp.float32) for name, value in metrics.items()}
            if residual is not None:
                stored = shapes.res_format.pack(k, shapes.res_plans[k].to_store(unpacked, residual, self.synchronous))
                res_box = _put(res_box, ctrl["store"], stored)  # after this task's reads of it
            if k + 1 < self.num_stages:
                act_out = shapes.act_packers[k].pack(h, shapes.act_lengths)
            if own_dx is not None:
                cot_out = self._message(cot_out, 0, shapes.act_packers[k - 1].pack(own_dx, shapes.act_lengths), True)
        for i, j, res, cot, present in consumed:
            new_state, passed = rule.backward(state, {j: res}, {j: cot})
            # backward only adds to the gradient sum: select that, not the whole state
            state = dataclasses.replace(state, grad_sum=_where(present, new_state.grad_sum, state.grad_sum))
            if j in passed:
                cot_out = self._message(cot_out, 1 + i, shapes.act_packers[k - 1].pack(passed[j], shapes.act_lengths),
                                        present)
        check_unchanged(unpacked, state, FIXED_FIELDS, "a task")
        return fmt.task_format.pack(k, part(state, TASK_FIELDS)), act_out, cot_out, res_box, metrics, mail

    def _message(self, out, o, packed, valid):
        row = self.messages.index(o)
        return {g: b.at[row].set(jnp.where(valid, packed[g], b[row])) for g, b in out.items()}


def to_next_stage(value, num_stages):
    """``value`` sent from every stage k to stage k+1 (stage 0 receives zeros): the pipeline's shift."""
    return lax.ppermute(value, "stage", [(i, i + 1) for i in range(num_stages - 1)])


def _where(flag, new, old):
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _fill(lengths, lead, value):
    return {g: jnp.full((*lead, n), value if jnp.issubdtype(g, jnp.floating) else 0, g) for g, n in lengths.items()}


def _row(box, slot):
    index = jnp.maximum(slot, 0)
    return jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, index, 0, keepdims=False), box)


def _once(run, body, carry, operands):
    """``body(carry, operands)`` if ``run`` else ``carry``, as a while loop of 0 or 1 trips: unlike
    a conditional (see the module docstring), it neither copies what it passes through nor what it
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
