"""Schedules as data: task tables ``clock x stage -> task | idle`` (docs/semantics.md).

The table *is* the semantics. Every task says everything an executor needs: its stage and
microbatch, its phase, which cotangent messages ``(loss j, microbatch m')`` it consumes, whether it
starts its step (its forward overwrites the stage's gradient sum) and whether the stage's optimizer
step follows it. Executors interpret tasks and re-derive nothing (``docs/semantics.md``).

A schedule knows nothing about devices and only one thing about the method: its ``Flow``, the
later losses whose gradients reach each stage. Executors ask it for the next clocks given how far
each stage has got; tests check the tables without running anything.

Two families:

- *synchronous* (``Sequential``, ``GPipe``, ``OneFOneB``): every step is flushed. All of a step's
  microbatches run forward and backward with the same parameter version, then every stage updates.
  This is the paper-exact semantics, and the only one backprop allows.
- *streaming* (``Streaming``): stage k runs microbatch ``c - k`` at clock c and never waits for a
  flush; it updates after its last microbatch of each step. For window w >= 2 the later losses'
  gradients arrive late: the task for m consumes loss ``k + d``'s cotangent about ``m - 2d``.
"""

import dataclasses
import enum

from lpjax.errors import ConfigError


class Phase(enum.StrEnum):
    """What a task runs. Strings, so that a phase prints and compares as its name."""

    LOCAL = "local"  # a forward, then the delayed cotangents it consumes (streaming)
    FORWARD = "forward"
    BACKWARD = "backward"  # the cotangents it consumes, for a forward run earlier


LOCAL, FORWARD, BACKWARD = Phase.LOCAL, Phase.FORWARD, Phase.BACKWARD
_LETTER = {LOCAL: "L", FORWARD: "F", BACKWARD: "B"}
DELAY_PER_HOP = 2  # streaming: clocks between stage k+1 running m and stage k applying its cotangent


@dataclasses.dataclass(frozen=True)
class Task:
    stage: int
    microbatch: int  # index in the whole run, not in the step
    phase: Phase
    update: bool = False  # apply the stage's optimizer step after this task
    consumes: tuple = ()  # ((loss j, microbatch m'), ...): cotangents from stage k+1 applied here
    first: bool = False  # first task of the stage's step: its gradient replaces the sum

    @property
    def runs_forward(self) -> bool:
        return self.phase != BACKWARD

    def label(self) -> str:
        return f"{_LETTER[self.phase]}{self.microbatch}{'*' if self.update else ''}"


@dataclasses.dataclass(frozen=True)
class Flow:
    """The one fact about a method that a schedule needs: per stage, the later losses ``j > k``
    whose gradients reach stage k's body (``Method.sources``). Each arrives from stage k+1 as a
    cotangent message about one microbatch."""

    sources: tuple  # one tuple of loss indices per stage

    @property
    def num_stages(self) -> int:
        return len(self.sources)

    @property
    def backward(self) -> bool:
        return any(self.sources)

    @classmethod
    def of(cls, method, num_stages: int) -> "Flow":
        return cls(tuple(tuple(method.sources(k, num_stages)) for k in range(num_stages)))

    @classmethod
    def default(cls, num_stages: int, backward: bool) -> "Flow":
        """Backprop's flow when ``backward``, else no cotangents at all (window 1)."""
        if not backward:
            return cls(((),) * num_stages)
        return cls(tuple((num_stages - 1,) if k < num_stages - 1 else () for k in range(num_stages)))


@dataclasses.dataclass(frozen=True)
class TaskTable:
    clocks: tuple  # tuple of clocks; each a tuple with one Task or None per stage
    num_stages: int

    @property
    def busy(self) -> int:
        return sum(task is not None for clock in self.clocks for task in clock)

    @property
    def slots(self) -> int:
        return len(self.clocks) * self.num_stages

    @property
    def idle(self) -> int:
        return self.slots - self.busy

    @property
    def idle_fraction(self) -> float:
        return self.idle / self.slots if self.slots else 0.0

    def tasks(self):
        return [task for clock in self.clocks for task in clock if task is not None]

    def diagram(self, max_clocks: int = 40) -> str:
        shown = self.clocks[:max_clocks]
        width = max([len(t.label()) for clock in shown for t in clock if t] + [1]) + 1
        lines = []
        for k in range(self.num_stages):
            cells = [(clock[k].label() if clock[k] else ".").rjust(width) for clock in shown]
            lines.append(f"stage {k}:" + "".join(cells) + (" ..." if len(self.clocks) > max_clocks else ""))
        lines.append(f"{len(self.clocks)} clocks, {self.busy} busy slots, {self.idle} idle, "
                     f"idle fraction {self.idle_fraction:.4f}")
        return "\n".join(lines)

    def __str__(self):
        return self.diagram()


class Schedule:
    synchronous: bool
    microbatches: int

    def __init__(self, microbatches: int = 1):
        if not isinstance(microbatches, int) or microbatches < 1:
            raise ConfigError(f"microbatches must be a positive integer, got {microbatches!r}")
        self.microbatches = microbatches

    def plan(self, flow: Flow, done, fed, *, drain):
        """Clocks that advance stages from ``done[k]`` microbatches towards ``fed``."""
        raise NotImplementedError

    def table(self, num_stages: int, num_steps: int = 1, *, backward: bool = True, flow: Flow | None = None,
              drain_every_step: bool = False) -> TaskTable:
        """The table of a whole run from a cold pipeline, drained at the end (and after every step
        with ``drain_every_step``, as ``Trainer.evaluate`` does)."""
        flow = flow or Flow.default(num_stages, backward)
        if flow.num_stages != num_stages:
            raise ConfigError(f"flow describes {flow.num_stages} stages, the table {num_stages}")
        clocks, done = [], [0] * num_stages
        for step in range(num_steps):
            fed = (step + 1) * self.microbatches
            clocks += self.plan(flow, done, fed, drain=drain_every_step or step == num_steps - 1)
            done = _progress(clocks, num_stages)
        return TaskTable(tuple(clocks), num_stages)

    def __repr__(self):
        return f"{type(self).__name__}(microbatches={self.microbatches})"


def _progress(clocks, num_stages):
    done = [0] * num_stages
    for clock in clocks:
        for task in clock:
            if task is not None and task.runs_forward:
                done[task.stage] = task.microbatch + 1
    return done


class _Synchronous(Schedule):
    """A flushed step: stage k's backward task for m consumes ``(j, m)`` for each of its sources;
    each stage's first forward of the step starts a fresh gradient sum and its last task updates."""

    synchronous = True

    def plan(self, flow, done, fed, *, drain):
        start = done[0]
        if any(d != start for d in done):
            raise AssertionError("a synchronous schedule always leaves the pipeline flushed")
        if fed == start:
            return []
        if fed - start != self.microbatches:
            raise ConfigError(f"{type(self).__name__} runs whole steps of {self.microbatches} microbatches")
        K, first = flow.num_stages, start
        order = self._order(K, start, fed, flow.backward)  # per clock: {stage: (phase, microbatch)}
        final = {}  # the clock of each stage's last task: it carries the update
        for c, slots in enumerate(order):
            for k in slots:
                final[k] = c
        clocks = []
        for c, slots in enumerate(order):
            clock = [None] * K
            for k, (phase, m) in slots.items():
                consumes = tuple((j, m) for j in flow.sources[k]) if phase == BACKWARD else ()
                clock[k] = Task(k, m, phase, update=final[k] == c, consumes=consumes,
                                first=phase == FORWARD and m == first)
            clocks.append(tuple(clock))
        return clocks

    def _order(self, K, start, end, backward):
        raise NotImplementedError


class Sequential(_Synchronous):
    """The reference order: one task at a time, microbatch by microbatch."""

    def _order(self, K, start, end, backward):
        order = []
        for m in range(start, end):
            order += [{k: (FORWARD, m)} for k in range(K)]
            if backward:
                order += [{k: (BACKWARD, m)} for k in reversed(range(K))]
        return order


class GPipe(_Synchronous):
    """All forwards, then all backwards in reverse stage order, then a flush (Huang et al. 2019).

    Idle fraction ``(K-1)/(M+K-1)``."""

    def _order(self, K, start, end, backward):
        count, span = end - start, end - start + K - 1
        order = [{k: (FORWARD, start + c - k) for k in range(K) if 0 <= c - k < count} for c in range(span)]
        if backward:
            order += [{k: (BACKWARD, start + c - (K - 1 - k)) for k in range(K) if 0 <= c - (K - 1 - k) < count}
                      for c in range(span)]
        return order


class OneFOneB(_Synchronous):
    """One-forward-one-backward with a flush per step (PipeDream-flush, Megatron-LM): stage k runs
    ``K-1-k`` warm-up forwards, then alternates a forward with a backward, then the remaining
    backwards; every stage updates after its last backward. Same bubble as GPipe,
    ``(K-1)/(M+K-1)``, but a stage holds at most ``K-k`` microbatches' residuals instead of M: the
    pipelined-backprop baseline. Without a backward phase it is GPipe's forward pass."""

    def _order(self, K, start, end, backward):
        count = end - start
        if not backward:
            return GPipe._order(self, K, start, end, backward)
        ops = []  # per stage, its ordered (phase, microbatch) list
        for k in range(K):
            warm = min(K - 1 - k, count)
            mine = [(FORWARD, start + i) for i in range(warm)]
            for i in range(count - warm):
                mine += [(FORWARD, start + warm + i), (BACKWARD, start + i)]
            mine += [(BACKWARD, start + i) for i in range(count - warm, count)]
            ops.append(mine)
        finished, position, order = {}, [0] * K, []
        while any(position[k] < len(ops[k]) for k in range(K)):
            clock = {}
            for k in range(K):
                if position[k] == len(ops[k]):
                    continue
                phase, m = ops[k][position[k]]
                needs = ((k - 1, FORWARD, m) if k > 0 else None) if phase == FORWARD else \
                    ((k + 1, BACKWARD, m) if k < K - 1 else (k, FORWARD, m))
                if needs is None or finished.get(needs, len(order)) < len(order):
                    clock[k] = (phase, m)
            for k, (phase, m) in clock.items():
                finished[(k, phase, m)] = len(order)
                position[k] += 1
            if not clock:
                raise AssertionError("1F1B deadlocked")
            order.append(clock)
        return order


class Streaming(Schedule):
    """Stage k runs microbatch ``c - k`` at clock c with no flush between steps: idle fraction
    ``(K-1)/(T+K-1)`` over T microbatches. Each stage updates after its last microbatch of a step.

    The delay rule lives here: the task for m consumes loss ``j = k + d``'s cotangent about
    ``m - 2d`` (stage k+1 ran ``m - 2d + 2(d-1)`` one clock earlier and passed it on), so the message
    always exists before its consumer runs, whatever pauses the host makes."""

    synchronous = False

    def plan(self, flow, done, fed, *, drain):
        K, M = flow.num_stages, self.microbatches
        done, clocks = list(done), []
        while done[0] < fed or (drain and done[-1] < fed):
            clock = []
            for k in range(K):
                ready = done[k] < (fed if k == 0 else done[k - 1])  # input produced at an earlier clock
                m = done[k]
                consumes = tuple((j, m - DELAY_PER_HOP * (j - k)) for j in flow.sources[k]
                                 if m - DELAY_PER_HOP * (j - k) >= 0)
                clock.append(Task(k, m, LOCAL, update=(m + 1) % M == 0, consumes=consumes, first=m % M == 0)
                             if ready else None)
            for task in clock:
                if task is not None:
                    done[task.stage] += 1
            clocks.append(tuple(clock))
        return clocks


SCHEDULES = {"sequential": Sequential, "gpipe": GPipe, "1f1b": OneFOneB, "streaming": Streaming}


def make_schedule(name: str, microbatches: int = 1) -> Schedule:
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](microbatches)
