"""Schedules as data: task tables ``clock x stage -> task | idle`` (DESIGN.md §4).

A schedule knows nothing about devices or methods. Executors ask it for the next clocks given how
far each stage has got, and run what it says; tests check the tables without running anything.

Two families:

- *synchronous* (``Sequential``, ``GPipe``): every step is flushed. All of a step's microbatches run
  forward and backward with the same parameter version, then every stage updates. This is the
  paper-exact semantics, and the only one backprop allows.
- *streaming* (``Streaming``): stage k runs microbatch ``c - k`` at clock c and never waits for a
  flush; it updates after its last microbatch of each step. For window w >= 2 the later losses'
  gradients arrive late; see ``docs/semantics.md``.
"""

import dataclasses

from .errors import ConfigError

LOCAL, FORWARD, BACKWARD = "local", "forward", "backward"
_LETTER = {LOCAL: "L", FORWARD: "F", BACKWARD: "B"}


@dataclasses.dataclass(frozen=True)
class Task:
    stage: int
    microbatch: int  # index in the whole run, not in the step
    phase: str  # LOCAL (forward + delayed backward) | FORWARD | BACKWARD
    update: bool = False  # apply the stage's optimizer step after this task

    def label(self) -> str:
        return f"{_LETTER[self.phase]}{self.microbatch}{'*' if self.update else ''}"


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

    def plan(self, num_stages, done, fed, *, drain, backward):
        """Clocks that advance stages from ``done[k]`` microbatches towards ``fed``."""
        raise NotImplementedError

    def table(self, num_stages: int, num_steps: int = 1, *, backward: bool = True) -> TaskTable:
        """The table of a whole run from a cold pipeline, drained at the end."""
        clocks, done = [], [0] * num_stages
        for step in range(num_steps):
            fed = (step + 1) * self.microbatches
            clocks += self.plan(num_stages, done, fed, drain=step == num_steps - 1, backward=backward)
            done = _progress(clocks, num_stages)
        return TaskTable(tuple(clocks), num_stages)

    def __repr__(self):
        return f"{type(self).__name__}(microbatches={self.microbatches})"


def _progress(clocks, num_stages):
    done = [0] * num_stages
    for clock in clocks:
        for task in clock:
            if task is not None and task.phase != BACKWARD:
                done[task.stage] = task.microbatch + 1
    return done


class _Synchronous(Schedule):
    synchronous = True

    def plan(self, num_stages, done, fed, *, drain, backward):
        start = done[0]
        if any(d != start for d in done):
            raise AssertionError("a synchronous schedule always leaves the pipeline flushed")
        if fed == start:
            return []
        if fed - start != self.microbatches:
            raise ConfigError(f"{type(self).__name__} runs whole steps of {self.microbatches} microbatches")
        return self._step(num_stages, range(start, fed), backward)


class Sequential(_Synchronous):
    """The reference order: one task at a time, microbatch by microbatch."""

    def _step(self, num_stages, microbatches, backward):
        last = microbatches[-1]
        clocks = []
        for m in microbatches:
            for k in range(num_stages):
                clocks.append(_only(num_stages, Task(k, m, FORWARD, update=not backward and m == last)))
            if backward:
                for k in reversed(range(num_stages)):
                    clocks.append(_only(num_stages, Task(k, m, BACKWARD, update=m == last)))
        return clocks


class GPipe(_Synchronous):
    """All forwards, then all backwards in reverse stage order, then a flush (Huang et al. 2019).

    Idle fraction ``(K-1)/(M+K-1)``: the pipelined-backprop baseline."""

    def _step(self, num_stages, microbatches, backward):
        m0, count, last = microbatches[0], len(microbatches), microbatches[-1]
        span = count + num_stages - 1
        clocks = []
        for c in range(span):
            clocks.append(tuple(
                Task(k, m0 + c - k, FORWARD, update=not backward and m0 + c - k == last)
                if 0 <= c - k < count else None
                for k in range(num_stages)))
        if backward:
            for c in range(span):
                clocks.append(tuple(
                    Task(k, m0 + c - (num_stages - 1 - k), BACKWARD, update=m0 + c - (num_stages - 1 - k) == last)
                    if 0 <= c - (num_stages - 1 - k) < count else None
                    for k in range(num_stages)))
        return clocks


class Streaming(Schedule):
    """Stage k runs microbatch ``c - k`` at clock c with no flush between steps: idle fraction
    ``(K-1)/(T+K-1)`` over T microbatches. Each stage updates after its last microbatch of a step."""

    synchronous = False

    def plan(self, num_stages, done, fed, *, drain, backward):
        done, clocks = list(done), []
        while done[0] < fed or (drain and done[-1] < fed):
            clock = []
            for k in range(num_stages):
                ready = done[k] < (fed if k == 0 else done[k - 1])  # input produced at an earlier clock
                m = done[k]
                clock.append(Task(k, m, LOCAL, update=(m + 1) % self.microbatches == 0) if ready else None)
            for task in clock:
                if task is not None:
                    done[task.stage] += 1
            clocks.append(tuple(clock))
        return clocks


def _only(num_stages, task):
    return tuple(task if k == task.stage else None for k in range(num_stages))


SCHEDULES = {"sequential": Sequential, "gpipe": GPipe, "streaming": Streaming}


def make_schedule(name: str, microbatches: int = 1) -> Schedule:
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](microbatches)
