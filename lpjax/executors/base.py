"""The executor interface, declared once (``Executor``), and the host-side bookkeeping both executors share.

An executor runs a schedule's tasks (lpjax/core/schedules.py) with the method's per-stage rules
(lpjax/core/stage_rule.py) on some placement of the stages; docs/semantics.md says what it must
compute. Two implement the interface: the dataflow executor (the reference, and per-stage MPMD;
executors/dataflow.py) and the SPMD executor (one program over the mesh; executors/spmd/). The
trainer (lpjax/training/trainer.py) uses nothing else of them.

``ShardedStates`` and ``ShardedTarget`` are what the SPMD executor hands a sharded checkpoint
(lpjax/training/checkpoint.py): checkpoints depend on executors, not the reverse.
"""

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from lpjax.core.schedules import Flow
from lpjax.errors import ConfigError


@runtime_checkable
class Executor(Protocol):
    """What the trainer asks of an executor. Stage ``k`` is the method's stage k; "states" are
    ``StageState`` pytrees (lpjax/core/stage_rule.py), one per stage."""

    placement: Any  # where each stage lives (executors/placement.py): ``num_data``, ``put_state(k, tree)``
    done: list  # per stage: how many microbatches it has run forward (1 + the last one's run-wide index)
    data_shard: tuple  # ``(shard_index, shard_count)``: the block of each microbatch's rows this process feeds

    def feed(self, microbatch_inputs, microbatch_labels) -> None:
        """Queue one step's microbatches and run every task they unlock.

        Args:
          microbatch_inputs: one input array per microbatch, this process's rows of it (``data_shard``).
          microbatch_labels: the matching label arrays.
        """

    def drain(self) -> None:
        """Finish every fed microbatch at every stage (the fill/drain bubble of a stream). What the
        drain leaves in flight (cotangents whose consumers have not run) waits for later tasks."""

    def flush(self) -> None:
        """Drain, then forget what the drain left in flight: afterwards the stage states are the
        whole training state (what a checkpoint saves and a resumed run starts from)."""

    def take_metrics(self) -> list:
        """Per-stage mean metrics over the tasks run since the last call.

        Returns:
          One entry per stage: ``{"loss", "accuracy"}`` (device or numpy scalars), or None for a stage
          that ran no forward task.
        """

    @property
    def states(self) -> list:
        """Each stage's live ``StageState`` on its own devices; None for a stage held by another process."""

    def host_states(self) -> list:
        """Every stage's state as numpy arrays, in every process.

        Returns:
          One ``StageState`` of numpy arrays per stage. Over several processes a collective: every
          process calls it, and each then holds the whole model.
        """

    def load_states(self, states) -> None:
        """Continue from restored states, placed on this executor's devices; flushes first.

        Args:
          states: one ``StageState`` per stage, or (SPMD executor only) the ``ShardedStates`` a
            sharded checkpoint restored.
        """

    def checkpoint_states(self, sharded: bool):
        """What a checkpoint saves now.

        Args:
          sharded: a sharded checkpoint (every process writes the rows it holds), which only the
            SPMD executor makes.

        Returns:
          The live stage states, or ``ShardedStates`` when ``sharded``.
        """

    def checkpoint_target(self):
        """What a checkpoint is restored onto (lpjax/training/checkpoint.py's ``restore_latest``).

        Returns:
          The live stage states (a per-stage checkpoint is read onto their shardings), or a
          ``ShardedTarget`` (SPMD: reads a sharded checkpoint, or a per-stage one through the host).
        """

    def refresh_shared(self) -> None:
        """Copy the last stage's shared readout into every other stage's state (lpjax/core/shared_readout.py).
        Called at a step boundary of a flushing schedule, where nothing is in flight."""

    def stage_scalars(self) -> tuple:
        """Per stage, the gradient norm at its last update, its count of skipped updates and whether
        its whole state is finite (``StageRule.state_finite``), read where the stage lives, never
        gathering its state.

        Returns:
          ``(grad_norms, skipped, finite)``, each indexable by stage: device scalars on the dataflow
          executor, numpy arrays ``[K]`` gathered over the mesh (a collective) on the SPMD executor.
        """

    def evaluate(self, batches, *, local: bool = False) -> tuple:
        """Score every stage's head on held-out batches with the current states (eval mode).

        Args:
          batches: an iterable of ``(x, y)`` arrays.
          local: the batches are this process's own shard of the split; otherwise every process
            passes the same batches and contributes its block of rows. Over several processes a
            collective: every process calls it.

        Returns:
          ``(totals, count)``: per stage ``[loss sum, correct]`` (``[K, 2]``, float64) and the number
          of label positions scored, summed over every process.
        """


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


class ExecutorBase:
    """The host-side bookkeeping both executors keep alike: how far each stage has got (``done``)
    and how many microbatches were fed, the metrics of tasks run since the last ``take_metrics``,
    and the one-process defaults of the interface (per-stage evaluation, health scalars and
    checkpoints read from ``states``). Subclasses run the tasks (``_run``), forget what is in
    flight (``_forget_in_flight``) and average their metrics entries (``_mean_metrics``)."""

    data_shard = (0, 1)  # every row: one process (the SPMD executor over several narrows it)

    def __init__(self, rules, schedule):
        self.rules, self.schedule = rules, schedule
        self.num_stages = len(rules)
        self.flow = Flow(tuple(tuple(rule.sources) for rule in rules))
        self.one_tree = rules[0].one_tree  # backprop: every stage steps together, on the global norm
        self.processes = jax.process_count()  # the run's processes: over several, some paths are collectives
        self.done = [0] * self.num_stages
        self.fed = 0
        self._metrics = []  # entries of the tasks run since the last take_metrics(), as _mean_metrics reads them
        self._scorers = {}
        self._finite_checks = None  # per stage, the jitted StageRule.state_finite (stage_scalars)

    # -- feeding and draining ----------------------------------------------------------------
    def _queue(self, microbatch_inputs, microbatch_labels, keep):
        """Number the fed microbatches run-wide, handing each to ``keep(m, x, y)``."""
        for x, y in zip(microbatch_inputs, microbatch_labels, strict=True):
            keep(self.fed, x, y)
            self.fed += 1

    def _clocks(self, drain):
        """The clocks the schedule can run now, given how far each stage has got."""
        return self.schedule.plan(self.flow, self.done, self.fed, drain=drain)

    def drain(self):
        self._run(drain=True)

    def flush(self):
        self.drain()
        self._forget_in_flight()
        self.done, self.fed = [0] * self.num_stages, 0

    def take_metrics(self):
        entries, self._metrics = self._metrics, []
        return self._mean_metrics(entries)

    # -- one-process defaults ----------------------------------------------------------------
    def checkpoint_states(self, sharded):
        if sharded:
            raise ConfigError("a sharded checkpoint needs the spmd executor; "
                              "build the trainer with lpjax.Layout(..., executor='spmd')")
        return self.states

    def checkpoint_target(self):
        return self.states

    def stage_scalars(self):
        self._one_process("health()")
        states = self.states
        if self._finite_checks is None:
            self._finite_checks = [jax.jit(rule.state_finite) for rule in self.rules]
        finite = [check(state) for check, state in zip(self._finite_checks, states)]
        return [s.grad_norm for s in states], [s.skipped for s in states], finite

    def evaluate(self, batches, *, local=False):
        """The per-stage evaluation: each batch through stage 0, 1, ... on each stage's devices."""
        self._one_process("evaluation")
        totals, count = np.zeros((self.num_stages, 2)), 0
        place, states = self.placement, self.states
        for xb, yb in batches:
            h = xb
            for k in range(self.num_stages):
                h, loss_sum, correct = self._scorer(k)(states[k], place.put_state(k, h), place.put_state(k, yb))
                totals[k] += (float(loss_sum), float(correct))
            count += np.size(yb)
        return totals, count

    def _scorer(self, k):
        if k not in self._scorers:
            rule = self.rules[k]

            def score(state, x, y):
                h, logits = rule.predict(state, x)
                return h, rule.loss_fn(logits, y) * y.size, (jnp.argmax(logits, -1) == y).sum()

            self._scorers[k] = jax.jit(score)
        return self._scorers[k]

    def _one_process(self, what):
        if self.processes > 1:
            raise ConfigError(f"{what} over several processes needs the spmd executor; "
                              f"build the trainer with lpjax.Layout(..., executor='spmd')")
