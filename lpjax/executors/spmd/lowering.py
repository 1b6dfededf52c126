"""Lowers task-table clocks to the static per-clock arrays the SPMD executor's scan interprets.

Each stage owns three persistent mailboxes on its devices: incoming activations, incoming
cotangents and its stored VJP residuals, each a fixed number of slots. This host-side allocator
decides which slot every message and residual occupies; its state persists across host calls
exactly as the mailboxes' contents do, so a message sent before a ``drain`` or an evaluation waits
in its slot until the task that consumes it. A task's reads happen before its writes and arrivals
are written after every task of the clock, so a slot freed by a read may be reused at once.

Arrays, ``[clocks, stages, ...]`` int32 (``-1`` = nothing):

- ``op`` (``Op``): idle, forward only (a task that consumes nothing), backward (the consumed
  cotangents only), local: forward then the consumed cotangents (``Phase.LOCAL`` with messages to apply);
  ``first``, ``update``: the task's flags (a backward task that consumes nothing is lowered to
  idle: only its ``update`` flag acts). Forward-only and forward-then-consume are distinct
  opcodes because the scan runs one static branch per opcode: a forward branch that also
  traced the backward would compute (then discard) a VJP at every 1F1B/GPipe forward;
- ``input``: the activation slot a forward reads (stages > 0); at stage 0, the row of the host
  call's input stream, which holds the inputs of the call's stage-0 forwards in clock order;
- ``store``: the residual slot a forward writes (stages with sources);
- ``consume_cot``, ``consume_res`` ``[.., S]``: per source ``i`` of the stage (``Method.sources``
  order) the cotangent and residual slots it applies, ``-1`` when the task consumes nothing of it;
- ``receive_act``: where the activation arriving from stage k-1 at the end of the clock goes;
- ``receive_cot`` ``[.., 1 + S]``: where the messages arriving from stage k+1 go; message 0 is its
  own loss's cotangent, message ``1 + i`` the cotangent of its source ``i`` passed on.
"""

import enum

import numpy as np


class Op(enum.IntEnum):
    """A task's opcode at one clock: ints, so that they fill the ``op`` array and index the
    program's branches (``offsets[k] + op``)."""

    IDLE = 0
    FORWARD = 1  # forward only: the task consumes no cotangent
    BACKWARD = 2  # the consumed cotangents only
    LOCAL = 3  # forward, then the consumed cotangents


RUNS_FORWARD = (Op.FORWARD, Op.LOCAL)


class SlotPool:
    """Per-stage slot numbers of one kind of mailbox; ``capacity`` grows when a stage needs more."""

    def __init__(self, num_stages):
        self.used = [set() for _ in range(num_stages)]
        self.capacity = 0

    def take(self, k):
        slot = next(i for i in range(len(self.used[k]) + 1) if i not in self.used[k])
        self.used[k].add(slot)
        self.capacity = max(self.capacity, slot + 1)
        return slot

    def give(self, k, slot):
        self.used[k].remove(slot)


class Lowering:
    def __init__(self, flow, sends_own_gradient, passes_on):
        self.flow = flow
        self.K = K = flow.num_stages
        self.S = max([len(s) for s in flow.sources] + [1])
        self.sends_own_gradient = sends_own_gradient  # per stage
        self.passes_on = passes_on  # per stage: {source j: bool}
        self.acts, self.cots, self.residuals = SlotPool(K), SlotPool(K), SlotPool(K)
        self.act_at, self.cot_at, self.res_at = {}, {}, {}  # (k, m) / (k, j, m) -> slot; res: [slot, uses left]

    def reset(self):
        """Forget everything in flight (``flush``); capacities stay."""
        capacities = self.capacities()
        self.__init__(self.flow, self.sends_own_gradient, self.passes_on)
        self.acts.capacity, self.cots.capacity, self.residuals.capacity = capacities

    def capacities(self):
        return self.acts.capacity, self.cots.capacity, self.residuals.capacity

    def lower(self, clocks):
        T, K, S = len(clocks), self.K, self.S
        out = {name: np.full((T, K), -1, np.int32) for name in ("input", "store", "receive_act")}
        out.update({name: np.zeros((T, K), np.int32) for name in ("op", "first", "update")})
        out.update({name: np.full((T, K, S), -1, np.int32) for name in ("consume_cot", "consume_res")})
        out["receive_cot"] = np.full((T, K, 1 + S), -1, np.int32)
        fed = 0  # stage-0 forwards so far in this call: rows of its input stream
        for t, clock in enumerate(clocks):
            tasks = [task for task in clock if task is not None]
            for task in tasks:  # reads: free what this clock consumes
                k, m = task.stage, task.microbatch
                # a backward that consumes nothing (1F1B's last stage: its forward applied its own
                # loss) runs nothing; its update flag still acts, outside the opcode's branch
                out["op"][t, k] = (Op.LOCAL if task.consumes else Op.FORWARD) if task.runs_forward else \
                    Op.BACKWARD if task.consumes else Op.IDLE
                out["first"][t, k], out["update"][t, k] = task.first, task.update
                if task.runs_forward and k > 0:
                    out["input"][t, k] = slot = self.act_at.pop((k, m))
                    self.acts.give(k, slot)
                elif task.runs_forward:
                    out["input"][t, k], fed = fed, fed + 1
                for j, about in task.consumes:
                    i = self.flow.sources[k].index(j)
                    if (k, j, about) not in self.cot_at:
                        raise AssertionError(f"{task.label()} at stage {k} consumes ({j}, {about}) before it was sent")
                    out["consume_cot"][t, k, i] = slot = self.cot_at.pop((k, j, about))
                    self.cots.give(k, slot)
                    entry = self.res_at[(k, about)]
                    out["consume_res"][t, k, i] = entry[0]
                    entry[1] -= 1
                    if entry[1] == 0:
                        self.residuals.give(k, entry[0])
                        del self.res_at[(k, about)]
            for task in tasks:  # writes: the residual stored, then the messages sent
                k, m = task.stage, task.microbatch
                if task.runs_forward and self.flow.sources[k]:
                    out["store"][t, k] = slot = self.residuals.take(k)
                    self.res_at[(k, m)] = [slot, len(self.flow.sources[k])]
                if task.runs_forward and k + 1 < K:
                    out["receive_act"][t, k + 1] = self.act_at[(k + 1, m)] = self.acts.take(k + 1)
                if task.runs_forward and self.sends_own_gradient[k]:
                    out["receive_cot"][t, k - 1, 0] = self.cot_at[(k - 1, k, m)] = self.cots.take(k - 1)
                for j, about in task.consumes:
                    if self.passes_on[k][j]:
                        i = self.flow.sources[k].index(j)
                        out["receive_cot"][t, k - 1, 1 + i] = self.cot_at[(k - 1, j, about)] = self.cots.take(k - 1)
        return out


def count_capacities(schedule, flow, sends_own_gradient, passes_on, steps=3):
    """Mailbox sizes a run of ``steps`` steps needs, with and without a drain after every step."""
    sizes = []
    for drain_every_step in (False, True):
        lowering = Lowering(flow, sends_own_gradient, passes_on)
        lowering.lower(schedule.table(flow.num_stages, steps, flow=flow, drain_every_step=drain_every_step).clocks)
        sizes.append(lowering.capacities())
    return tuple(max(column) for column in zip(*sizes))

