"""All stages in one jitted program over the mesh's ``stage`` axis (SPMD; the rules it keeps are in
docs/semantics.md). This is its host API (the executor interface, executors/base.py); the work is
split by concern:

- ``program.py``: the device program, one ``lax.scan`` over a host call's lowered clocks
  (``lowering.py``), with its pseudocode;
- ``state.py``: the state at rest, two buffers stacked over ``stage``;
- ``shapes.py``: the shapes learnt by tracing each stage once, and the mailboxes grown to fit;
- ``streams.py``: what each host call sends the program (input stream, labels, control arrays);
- ``sharded.py``: sharded checkpoints; ``host_states.py``: the states read from the host;
- ``mesh.py``: the one builder and cache of every program over the mesh; ``eval.py``: evaluation
  on the mesh over several processes.
"""

import functools
import time

import jax
import numpy as np
from jax.sharding import NamedSharding

from lpjax.errors import ConfigError

from lpjax.executors.base import ExecutorBase, ShardedStates
from lpjax.executors.placement import PerStageMeshes, data_shard
from lpjax.executors.spmd.lowering import RUNS_FORWARD, Lowering, count_capacities
from lpjax.executors.spmd.host_states import HostStates
from lpjax.executors.spmd.mesh import MeshPrograms
from lpjax.executors.spmd.program import PipelineProgram
from lpjax.executors.spmd.shapes import MAILBOXES, mailbox_grower, trace_shapes
from lpjax.executors.spmd.sharded import ShardedCheckpoints
from lpjax.executors.spmd.state import STATE_PARTS, StateFormat, readout_refresh
from lpjax.executors.spmd.streams import Streams

P = jax.P


class SpmdExecutor(ShardedCheckpoints, HostStates, ExecutorBase):
    """Every stage in one jitted program over ``mesh`` (the interface: executors/base.py).

    ``bubble_fill``: what idle stages send before they have sent a real message (zeros; NaN in the
    tests that prove bubbles never reach parameters)."""

    def __init__(self, rules, schedule, mesh, *, bubble_fill=0.0):
        super().__init__(rules, schedule)
        self.mesh = mesh
        self.placement = PerStageMeshes(mesh)
        self.num_data = self.placement.num_data
        # the rows of each microbatch this process feeds: a block of the data axis when it holds
        # those columns of every stage (several processes), else all of them
        self.data_shard = data_shard(mesh)
        self.local_slices = self.num_data // self.data_shard[1]  # data slices this process feeds
        self.bubble_fill = bubble_fill
        self.lowering = Lowering(self.flow, [rule.sends_own_gradient for rule in rules],
                                 [rule.passes_on for rule in rules])
        # the cotangent messages (lowering.py: 0 a stage's own, 1 + i its source i's passed on) that
        # some stage sends; only those take room in the messages every clock moves
        self.messages = [o for o in range(1 + self.lowering.S) if any(
            rule.sends_own_gradient if o == 0 else o <= len(rule.sources) and rule.passes_on[rule.sources[o - 1]]
            for rule in rules)]
        # only the shapes now: the state itself is created at its first use (``buffers``)
        self.format = StateFormat([rule.state_shapes() for rule in rules])
        self._buffers = None
        self.inputs, self.labels = {}, {}  # host copies of fed microbatches until their last use
        self.programs = MeshPrograms(mesh)
        self.streams = Streams(mesh, self.data_shard, self.local_slices)
        self.shapes = self.pipeline = None  # known at the first feed (_prepare)
        self.capacity = (0, 0, 0)  # mailbox slots per stage: activations, cotangents, residuals
        self._evaluator = None  # several processes' evaluation (eval.py)

    @property
    def buffers(self):
        """The state buffers (``{"written", "fixed"}``, stacked over ``stage``) and, from the first
        feed, the mailboxes, on the mesh. The state is created at its first use: by a jitted
        initialiser in which each device builds only its own stage's rows (``StateFormat.initialiser``),
        so each process creates only its own shards; or, for a model built on the host
        (``StageRule`` without ``make_stage``), from its arrays."""
        if self._buffers is None:
            if any(rule.make_stage is None for rule in self.rules):
                self._buffers = self.format.stacked([rule.init_state() for rule in self.rules], self.mesh)
            else:
                self._buffers = self._initialiser()()
        return self._buffers

    @buffers.setter
    def buffers(self, value):
        self._buffers = value

    def _initialiser(self):
        return self.programs.mapped(("init",), lambda: (self.format.initialiser(self.rules), (), self.format.row_spec()))

    def _replace_state(self, parts):
        """Put restored state buffers in place, without creating the initial ones first."""
        if self._buffers is None:
            self._buffers = dict(parts)
        else:
            self._buffers.update(parts)

    def _prepare(self, x, y, slices=None):
        """Learn the shapes from one microbatch's rows (arrays or ``ShapeDtypeStruct``s) that this
        process feeds, in ``slices`` data slices (``local_slices`` when None); returns the mailbox
        slots a steady run needs."""
        D = self.local_slices if slices is None else slices
        x, y = (jax.ShapeDtypeStruct((a.shape[0] // D, *a.shape[1:]), a.dtype) for a in (x, y))
        self.shapes = trace_shapes(self.rules, self.format, x, y, self.schedule.synchronous)
        self.pipeline = PipelineProgram(self.rules, self.format, self.shapes, self.messages, self.num_data,
                                       synchronous=self.schedule.synchronous, bubble_fill=self.bubble_fill)
        return count_capacities(self.schedule, self.flow, self.lowering.sends_own_gradient, self.lowering.passes_on)

    def _grow(self, wanted):
        """Mailboxes with room for ``wanted`` slots per stage of each kind, made on the devices that
        hold them, keeping what the current ones hold."""
        wanted = tuple(max(1, w, c) for w, c in zip(wanted, self.capacity))
        if wanted != self.capacity:
            current = {name: self.buffers[name] for name in MAILBOXES} if any(self.capacity) else None
            self.buffers.update(self._mailbox_program(wanted)(current))
            self.capacity = wanted

    def _mailbox_program(self, wanted):
        def build():
            return mailbox_grower(self.shapes, self.num_stages, self.num_data, self.capacity, wanted)

        return self.programs.jitted(("mailboxes", self.capacity, wanted), build,
                                    out_shardings=NamedSharding(self.mesh, P("stage", "data")),
                                    donate_argnums=(0,) if any(self.capacity) else ())

    # -- feeding and draining ----------------------------------------------------------------
    def feed(self, microbatch_inputs, microbatch_labels):
        """``microbatch_inputs/labels``: this process's rows of each microbatch (``data_shard``)."""
        if self.shapes is None:
            self._grow(self._prepare(np.asarray(microbatch_inputs[0]), np.asarray(microbatch_labels[0])))
        fed = tuple(self.streams.fed_shape(spec[0]) for spec in (self.shapes.x_spec, self.shapes.y_spec))
        other = {(np.shape(x), np.shape(y)) for x, y in zip(microbatch_inputs, microbatch_labels)} - {fed}
        if other:  # its programs and buffers are built for one shape
            raise ConfigError(f"the spmd executor runs microbatches of the shape its first step fed (inputs "
                              f"{fed[0]}, labels {fed[1]}), not {other.pop()}; feed every step the same batch size")
        first = self.fed
        self._queue(microbatch_inputs, microbatch_labels, self._keep)
        self._run(drain=False)  # copies what it runs into the call's input stream
        # what a later call runs is copied now: the caller may reuse the batch's memory
        for m in range(first, self.fed):
            for kept in (self.inputs, self.labels):
                if m in kept:
                    kept[m] = np.array(kept[m])

    def _keep(self, m, x, y):
        self.inputs[m], self.labels[m] = x, y

    def _forget_in_flight(self):
        self.lowering.reset()
        self.inputs, self.labels = {}, {}

    def _run(self, drain):
        """One host call: the clocks the schedule can run now, lowered and run as one program."""
        clocks = self._clocks(drain) if self.shapes is not None else []
        if not clocks:
            return
        control = self.lowering.lower(clocks)
        self._grow(self.lowering.capacities())
        together = self._advance(clocks)
        if self.one_tree:
            control["update"][:] = 0  # every stage steps together after the scan instead
        counts = np.isin(control["op"], RUNS_FORWARD).sum(0)  # tasks with metrics, per stage
        streams = self.streams.for_call(clocks, control, self.inputs, self.labels, self.rules, self.shapes)
        self.buffers, metrics = self._program(together)(self.buffers, *streams)
        self._metrics.append((metrics, counts))

    def _advance(self, clocks):
        """Count the stages' forwards in ``clocks`` (``done``); whether a one-tree optimizer's step
        ends with them (every stage then updates together after the scan)."""
        together = False
        for clock in clocks:
            for task in clock:
                if task is None:
                    continue
                together |= task.update and self.one_tree
                if task.runs_forward:
                    self.done[task.stage] = task.microbatch + 1
        if together and not any(task is not None and task.update for task in clocks[-1]):
            raise AssertionError("a one-tree optimizer step must end its host call (a flushed step)")
        return together

    def _program(self, together, buffers=None):
        """The pipeline program (``program.py``) over the current buffers (or ones shaped like
        ``buffers``); donates them."""
        def build():
            return (functools.partial(self.pipeline, together),
                    *PipelineProgram.specs(self.buffers if buffers is None else buffers))

        return self.programs.mapped(("pipeline", together), build, donate=True)

    def lowered_programs(self, x, y, *, eval_batch=None):
        """Every program a run uses, lowered for this executor's mesh from shapes alone: nothing runs,
        no buffer is created and no data is needed (``lpjax train --compile-only``).

        Args:
          x, y: one whole microbatch's inputs and labels (every data slice), as ``ShapeDtypeStruct``s.
          eval_batch: an evaluation batch ``(x, y)`` as ``ShapeDtypeStruct``s, for the evaluation
            program a run over several processes (hosts) uses (``eval.py``); None leaves it out.

        Yields:
          ``(name, lowered, seconds)``: the state initialiser, the mailboxes', the pipeline program of
          each distinct host call (the first, the steady one, the drain that ends a run and precedes
          every flush), the shared-readout refresh (a method with one), the evaluation, and the seconds
          tracing and lowering took. The bookkeeping is left as after those calls: train a fresh executor.
        """
        def timed(name, lower):
            start = time.perf_counter()
            lowered = lower()
            return name, lowered, time.perf_counter() - start

        buffers = dict(self.format.abstract(self.mesh))
        yield timed("init state", lambda: self._initialiser().lower())
        mailboxes = NamedSharding(self.mesh, P("stage", "data"))

        def grow(wanted):
            wanted = tuple(max(1, w, c) for w, c in zip(wanted, self.capacity))
            if wanted == self.capacity:
                return None
            current = {name: buffers[name] for name in MAILBOXES} if any(self.capacity) else None
            program = self._mailbox_program(wanted)
            made = jax.eval_shape(program, current)
            buffers.update(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=mailboxes), made))
            name = f"mailboxes ({'grow to ' if current else ''}{'/'.join(map(str, wanted))} slots)"
            self.capacity = wanted
            return timed(name, lambda: program.lower(current))

        seen = set()
        for call in ("first", "steady", "steady", "drain"):
            if self.shapes is None:
                made = grow(self._prepare(x, y, slices=self.num_data))
                yield from [made] if made else []
            self.fed += 0 if call == "drain" else self.schedule.microbatches
            clocks = self._clocks(drain=call == "drain")
            if not clocks:
                continue
            control = self.lowering.lower(clocks)
            made = grow(self.lowering.capacities())
            yield from [made] if made else []
            together = self._advance(clocks)
            if self.one_tree:
                control["update"][:] = 0
            streams = self.streams.specs(clocks, control, self.shapes)
            key = (together, str(jax.tree.map(lambda a: (a.shape, a.dtype), (buffers, streams))))
            if key not in seen:
                seen.add(key)
                yield timed(f"step ({call}, {len(clocks)} clocks)",
                            lambda: self._program(together, buffers).lower(buffers, *streams))
        state = {name: buffers[name] for name in STATE_PARTS}
        if any(rule.readout_path is not None for rule in self.rules):
            yield timed("refresh shared readout", lambda: self._refresh_program().lower(state))
        if eval_batch is not None:
            from lpjax.executors.spmd.eval import MeshEvaluator

            evaluator = MeshEvaluator(self, self.rules[-1].loss_fn)
            yield timed("evaluate on the mesh", lambda: evaluator.lowered(*eval_batch, state))

    def _mean_metrics(self, entries):
        """Per stage, the mean over the host calls' per-stage means, weighted by their task counts."""
        if not entries:
            return [None] * self.num_stages
        counts = sum(count for _, count in entries)
        if len(entries) == 1:
            means = entries[0][0]
        else:
            means = _weighted_means([means for means, _ in entries], tuple(tuple(map(int, c)) for _, c in entries))
        return [means[k] if counts[k] else None for k in range(self.num_stages)]

    # -- the state ---------------------------------------------------------------------------
    def state_buffers(self):
        """``{"written", "fixed"}``: the state buffers on the mesh, each a tree of arrays with a
        leading ``stage`` axis (``stage_state`` reads one stage's ``StageState`` from its rows)."""
        return {name: self.buffers[name] for name in STATE_PARTS}

    def state_spec(self):
        """The partition specs of ``state_buffers()``: stacked over ``stage``."""
        return self.format.row_spec()

    def stage_state(self, k, written, fixed):
        """Stage k's ``StageState`` from its rows of the two state buffers (``state.StateFormat``)."""
        return self.format.stage_state(k, written, fixed)

    def load_states(self, states):
        """Replace every stage's state (a restored checkpoint): ``ShardedStates`` are already on
        this mesh; per-stage states make a host round trip (the same values in every process)."""
        self.flush()
        if isinstance(states, ShardedStates):
            self._load_flat(states.tree)
        else:
            self._replace_state(self.format.stacked(states, self.mesh))

    def checkpoint_states(self, sharded):
        return self.sharded_states() if sharded else self.states

    def checkpoint_target(self):
        return self.sharded_target()

    def refresh_shared(self):
        """Refresh every reader's copy of the shared readout with one collective (``state.readout_refresh``)."""
        self.drain()
        self.buffers.update(self._refresh_program()(self.state_buffers()))

    def _refresh_program(self):
        def build():
            return readout_refresh(self.rules, self.format), (self.format.row_spec(),), self.format.row_spec()

        return self.programs.mapped(("refresh",), build, donate=True)

    def evaluate(self, batches, *, local=False):
        """In one process the per-stage evaluation (``ExecutorBase.evaluate``); over several, one
        forward pipeline on the mesh (``eval.py``), each process contributing its rows."""
        if self.processes == 1:
            return super().evaluate(batches)
        from lpjax.executors.spmd.eval import MeshEvaluator

        if self._evaluator is None:
            self._evaluator = MeshEvaluator(self, self.rules[-1].loss_fn)
        if not local:  # the same batches everywhere: each process contributes its block of rows
            me, count = jax.process_index(), self.processes
            batches = ((x[len(x) * me // count:len(x) * (me + 1) // count],
                        y[len(y) * me // count:len(y) * (me + 1) // count]) for x, y in batches)
        return self._evaluator.totals(batches)


@functools.partial(jax.jit, static_argnums=1)
def _weighted_means(means, counts):
    """Per stage, the mean over several host calls' ``means`` (each a list of per-stage
    ``{name: mean}``, replicated) weighted by their task ``counts`` (``[calls][stages]``)."""
    out = []
    for k in range(len(means[0])):
        total = max(sum(c[k] for c in counts), 1)
        out.append({name: sum(m[k][name] * (c[k] / total) for m, c in zip(means, counts)) for name in means[0][k]})
    return out
