"""Interprets a schedule's task table, stage by stage, with the method's per-stage rules.

The same interpreter is the reference executor (every stage on one device, tasks in table order)
and the per-stage MPMD executor (stage k jitted on its own devices, activations and cotangents moved
with ``jax.device_put``). Nothing here waits on the host, so stages on different devices overlap
through JAX's asynchronous dispatch.

It re-derives nothing: each task names the cotangent messages ``(loss j, microbatch m')`` it
consumes, whether it starts its step and whether it updates (``lpjax/core/schedules.py``). Messages,
stored activations and residuals wait in dictionaries until the task that consumes them, across
``feed``, ``drain`` and evaluation alike. The one thing the table leaves to executors is *how* a
one-tree optimizer (backprop) updates: every stage's update task of the step marks it due, and
once all are due the stages step together with the global gradient norm (``StageRule.update``);
a flushed step runs nothing on a stage after its update task, so this is the same step.

With every stage on one device and a flushing schedule whose steps are one microbatch, the
reference executor runs each step as ONE compiled program: this interpreter, traced once per step
table through the same cells, which jit inlines (``_run_whole_step``). A flushed step leaves nothing
in flight, so the program's inputs are the step's batches and the stage states, its outputs the
states and the metrics, and it computes exactly what the cells one by one do
(``tests/test_methods.py`` compares them bit for bit). One dispatch instead of one per task, and XLA
may overlap stage k's update with stage k+1's forward (about 1.10x -> 1.07x a hand-written step on
``benchmarks/greedy_overhead.py``). The per-stage (MPMD) executor runs task by task so that stages
on different devices overlap; so does a streaming schedule, whose tasks carry over between calls,
and by default a step of several microbatches (up to 7% slower as one program on one core);
``whole_steps=True`` asks for it anyway. docs/performance.md has the measurements.

Each stage's state is kept as its flat list of arrays, and the compiled cells take and return that
list: flattening and unflattening a ``StageState``'s Flax ``Variable`` nodes at every cell call was
most of a step's host time (main thread 2.7 -> 1.6 ms a step). ``states`` rebuilds the
``StageState`` pytrees when asked.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

from lpjax.core.schedules import BACKWARD
from lpjax.errors import ConfigError
from lpjax.executors.base import ExecutorBase, ShardedStates
from lpjax.executors.placement import SingleDevice


class DataflowExecutor(ExecutorBase):
    """The reference and per-stage MPMD executor (the interface: executors/base.py)."""

    def __init__(self, rules, schedule, placement, *, whole_steps=None):
        super().__init__(rules, schedule)
        self.placement = placement
        # One compiled program per step (see _run_whole_step): every stage on one device and a
        # flushing schedule, whose steps leave nothing in flight. None: when that holds and a step
        # is one microbatch (several were slower as one program: docs/performance.md).
        self.whole_steps = (isinstance(placement, SingleDevice) and schedule.synchronous and schedule.microbatches == 1
                            if whole_steps is None else whole_steps)
        self._tracing = False  # inside _traced_step: values are tracers of one program
        self.states = [placement.put_state(k, rule.init_state()) for k, rule in enumerate(rules)]
        self._due = set()  # one-tree stages whose update task of this step has run
        self.inputs, self.labels, self.residuals, self.messages = {}, {}, {}, {}
        # self._metrics (ExecutorBase): (stage, microbatch, metrics) of the tasks run since the last take_metrics()
        self._cells = {}
        # A VJP residual is a pytree whose static part holds a jaxpr from the trace that made it;
        # passed into jit as is, every new trace would miss the cache of the cells that consume it.
        # So cells exchange residual leaves, and each stage has one canonical tree structure.
        self._residual_trees = {}

    # -- the stage states, kept flat ---------------------------------------------------------
    @property
    def states(self):
        """Each stage's ``StageState``, rebuilt from its flat arrays (a new list on every access)."""
        return [self._state(k) for k in range(self.num_stages)]

    @states.setter
    def states(self, states):
        flat = [jax.tree.flatten(state) for state in states]
        treedefs = [treedef for _, treedef in flat]
        if treedefs != getattr(self, "_treedefs", None):
            self._cells = {}  # compiled for the old structure
        self._leaves, self._treedefs = [leaves for leaves, _ in flat], treedefs

    def _state(self, k):
        return jax.tree.unflatten(self._treedefs[k], self._leaves[k])

    def _flat(self, k, fn, **jit_options):
        """``fn(state, *args) -> state | (state, *rest)`` compiled on stage k's flat state leaves."""
        treedef = self._treedefs[k]

        def flat(leaves, *args):
            out = fn(jax.tree.unflatten(treedef, leaves), *args)
            state, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            leaves, out_def = jax.tree.flatten(state)
            if out_def != treedef:
                raise AssertionError(f"stage {k}'s state changed structure in a cell: {treedef} -> {out_def}")
            return leaves if rest is None else (leaves, *rest)

        return jax.jit(flat, **jit_options)

    # -- public ------------------------------------------------------------------------------
    def feed(self, microbatch_inputs, microbatch_labels):
        """Queue one step's microbatches (sequences of arrays) and run every clock they unlock."""
        self._queue(microbatch_inputs, microbatch_labels, self._place)
        self._run(drain=False)

    def _place(self, m, x, y):
        self.inputs[(0, m)] = self.placement.put_batch(0, x)
        placed = {}  # one copy of the labels per distinct placement, not per stage
        for k, rule in enumerate(self.rules):
            if rule.trains_head:
                where = self.placement.batch_sharding(k)
                if where not in placed:
                    placed[where] = self.placement.put_batch(k, y)
                self.labels[(k, m)] = placed[where]

    def _forget_in_flight(self):
        """``flush``: the cotangents about microbatches whose consumers will not run, and the rest."""
        self.inputs, self.labels, self.residuals, self.messages = {}, {}, {}, {}
        self._due = set()

    def refresh_shared(self):
        """Refresh every reader's copy of the shared readout from the last stage (lpjax/core/shared_readout.py):
        the readout leaves the last stage's devices by ``device_put`` to each reader's. Called by the
        trainer at a step boundary of a flushing schedule, where no task is in flight."""
        self.drain()  # a flushing schedule has nothing left to run here; this only makes it certain
        owner = self.num_stages - 1
        readout = self._shared_cell("readout", owner)(self._state(owner))
        for k in range(owner):
            self._leaves[k] = self._shared_cell("write", k)(self._leaves[k], self.placement.put_state(k, readout))

    def _shared_cell(self, kind, k):
        if (kind, k) not in self._cells:
            rule = self.rules[k]
            self._cells[(kind, k)] = (jax.jit(rule.readout) if kind == "readout" else
                                      self._flat(k, rule.with_readout, donate_argnums=(0,)))
        return self._cells[(kind, k)]

    def host_states(self):
        """Every stage's state as numpy arrays (this executor is single-process)."""
        return jax.device_get(self.states)

    def load_states(self, states):
        """Replace every stage's state (a restored checkpoint), placed on this layout's devices."""
        if isinstance(states, ShardedStates):
            raise ConfigError("a sharded checkpoint resumes with the spmd executor; "
                              "set --config.layout.executor=spmd")
        self.flush()
        self.states = [self.placement.put_state(k, state) for k, state in enumerate(states)]

    def _mean_metrics(self, log):
        """Per stage, the mean over its logged tasks (device arrays)."""
        return summarize(log, self.num_stages)

    # -- scheduling --------------------------------------------------------------------------
    def _run(self, drain):
        clocks = self._clocks(drain)
        if self.whole_steps and clocks:
            self._run_whole_step([task for clock in clocks for task in clock if task is not None])
            return
        for clock in clocks:
            for task in clock:
                if task is not None:
                    self._execute(task)
                    if task.runs_forward:
                        self.done[task.stage] = task.microbatch + 1

    def _execute(self, task):
        k, m = task.stage, task.microbatch
        rule = self.rules[k]
        missing = [(j, about) for j, about in task.consumes if (k, j, about) not in self.messages]
        if missing:
            raise AssertionError(f"{task.label()} at stage {k} consumes {missing} before they were sent")
        present = tuple(j for j, _ in task.consumes)
        cotangents = {j: self.messages.pop((k, j, about)) for j, about in task.consumes}
        residuals = {j: self._residual(k, j, about) for j, about in task.consumes}
        if task.runs_forward and rule.sources and k not in self._residual_trees:
            self._residual_trees[k] = self._residual_tree(k, m)
        update_here = task.update and not self.one_tree
        cell = self._cell(k, task.phase, present, update_here, task.first)
        state = self._leaves[k]
        if task.phase == BACKWARD:
            state, passed = cell(state, residuals, cotangents)
        else:
            x = self.inputs.pop((k, m))
            y = self.labels.pop((k, m), None)
            state, h, own_dx, residual, passed, metrics = cell(state, x, y, residuals, cotangents)
            if k + 1 < self.num_stages:
                self.inputs[(k + 1, m)] = self._put_batch(k + 1, h)
            if own_dx is not None:
                self.messages[(k - 1, k, m)] = self._put_batch(k - 1, own_dx)
            if residual is not None:
                self.residuals[(k, m)] = [residual, len(rule.sources)]
            self._metrics.append((k, m, metrics))
        about = dict(task.consumes)
        for j, dx in passed.items():
            self.messages[(k - 1, j, about[j])] = self._put_batch(k - 1, dx)
        self._leaves[k] = state
        if task.update and self.one_tree:
            self._due.add(k)
            if len(self._due) == self.num_stages:
                self._update_together()

    def _update_together(self):
        """One optax step of the whole model: each stage's update sees the global gradient norm."""
        self._due.clear()
        squares = [self._sq_norm_cell(k)(self._leaves[k]) for k in range(self.num_stages)]
        for k in range(self.num_stages):
            total = functools.reduce(jnp.add, [sq if self._tracing else self.placement.put_state(k, sq)
                                                for sq in squares])
            self._leaves[k] = self._update_cell(k)(self._leaves[k], total)

    def _put_batch(self, k, array):
        # within one traced program every value already lives where the program runs
        return array if self._tracing else self.placement.put_batch(k, array)

    # -- whole steps as one program ----------------------------------------------------------
    def _run_whole_step(self, tasks):
        """Run a flushed step's tasks as ONE compiled program: the same interpreter (``_execute``)
        traced through the same cells, which jit inlines into one program of the step. The step's
        inputs go in, the stage states and the metrics of its forward tasks come out, and nothing
        else is in flight before or after, so this computes what running the cells one by one
        does. It saves the per-cell dispatch and lets XLA overlap stage k's update with stage
        k+1's forward (``benchmarks/greedy_overhead.py``). Compiled once per step table, with
        microbatches counted from the step's first: every step of a flushing schedule reuses it."""
        base = min(task.microbatch for task in tasks)
        # The step's table relative to its first microbatch: every step of a flushing schedule has
        # the same one, so its signature (plain tuples, cheaper to build than shifted Tasks: this is
        # host time of every step) finds the compiled program.
        signature = tuple((t.stage, t.microbatch - base, t.phase, t.update, t.first,
                           tuple((j, m - base) for j, m in t.consumes)) for t in tasks)
        step = {task.microbatch for task in tasks}
        step_inputs = {(k, m - base): self.inputs.pop((k, m)) for k, m in list(self.inputs) if m in step}
        # one program input per distinct label array (feed places one copy per placement, not per stage)
        labels, index_of, label_of = [], {}, {}
        for k, m in list(self.labels):
            if m in step:
                array = self.labels.pop((k, m))
                if id(array) not in index_of:  # ``labels`` keeps the array alive, so its id is stable
                    index_of[id(array)] = len(labels)
                    labels.append(array)
                label_of[(k, m - base)] = index_of[id(array)]
        key = ("step", signature, tuple(sorted(step_inputs)), tuple(sorted(label_of.items())))
        if key not in self._cells:
            relative = tuple(dataclasses.replace(task, microbatch=task.microbatch - base,
                                                 consumes=tuple((j, m - base) for j, m in task.consumes))
                             for task in tasks)
            # keep_unused: else the gradient sums a step's first forward overwrites drop out of the
            # inputs and the donated inputs pair with outputs one stage off (twelve 4 MB copies a step)
            program = jax.jit(functools.partial(self._traced_step, relative, dict(label_of)), donate_argnums=(0,),
                              keep_unused=True)
            self._cells[key] = (program, [(t.stage, t.microbatch) for t in relative if t.runs_forward])
        program, forwards = self._cells[key]
        self._leaves, metrics = program(self._leaves, step_inputs, labels)
        self._metrics += [(k, m + base, entry) for (k, m), entry in zip(forwards, metrics)]
        for k, m in forwards:
            self.done[k] = m + base + 1

    def _traced_step(self, tasks, label_of, leaves, inputs, labels):
        with self._step_in_trace(leaves, inputs, {where: labels[i] for where, i in label_of.items()}):
            for task in tasks:
                self._execute(task)
            left = [name for name, box in [("inputs", self.inputs), ("labels", self.labels),
                                           ("messages", self.messages), ("residuals", self.residuals),
                                           ("updates due", self._due)] if box]
            if left:
                raise AssertionError(f"a whole step left {left} in flight; it must run task by task")
            return self._leaves, [metrics for _, _, metrics in self._metrics]

    @contextlib.contextmanager
    def _step_in_trace(self, leaves, inputs, labels):
        """The interpreter's state, for the duration of one trace, holding that trace's values."""
        names = ("_leaves", "inputs", "labels", "messages", "residuals", "_metrics", "_due")
        saved = {name: getattr(self, name) for name in names}
        self._leaves, self.inputs, self.labels = list(leaves), dict(inputs), dict(labels)
        self.messages, self.residuals, self._metrics, self._due = {}, {}, [], set()
        self._tracing = True
        try:
            yield
        finally:
            self._tracing = False
            for name, value in saved.items():
                setattr(self, name, value)

    def _sq_norm_cell(self, k):
        if ("sq", k) not in self._cells:
            rule, treedef = self.rules[k], self._treedefs[k]
            self._cells[("sq", k)] = jax.jit(lambda leaves: rule.grad_sq_norm(jax.tree.unflatten(treedef, leaves)))
        return self._cells[("sq", k)]

    def _update_cell(self, k):
        if ("update", k) not in self._cells:
            self._cells[("update", k)] = self._flat(k, self.rules[k].update, donate_argnums=(0,))
        return self._cells[("update", k)]

    def _residual_tree(self, k, m):
        x, y = self.inputs[(k, m)], self.labels.get((k, m))
        residual = jax.eval_shape(self.rules[k].forward, self._state(k), x, y)[3]
        return jax.tree.structure(residual)

    def _residual(self, k, j, m):
        entry = self.residuals[(k, m)]
        entry[1] -= 1
        if entry[1] == 0:
            del self.residuals[(k, m)]
        return entry[0]

    # -- compiled cells ----------------------------------------------------------------------
    def _cell(self, k, phase, present, update, fresh):
        key = (k, phase, present, update, fresh)
        if key not in self._cells:
            rule = self.rules[k]
            tree = self._residual_trees.get(k)
            if phase == BACKWARD:
                fn = functools.partial(_backward_cell, rule, update, tree)
            else:
                fn = functools.partial(_forward_cell, rule, update, fresh, tree)
            # the stage state is replaced by the cell's output, so XLA may reuse its buffers
            self._cells[key] = self._flat(k, fn, donate_argnums=(0,))
        return self._cells[key]


def _forward_cell(rule, update, fresh, tree, state, x, y, residuals, cotangents):
    state, h, own_dx, residual, metrics = rule.forward(state, x, y, fresh)
    state, passed = rule.backward(state, _rebuild(tree, residuals), cotangents)
    if update:
        state = rule.update(state)
    return state, h, own_dx, None if residual is None else jax.tree.leaves(residual), passed, metrics


def _backward_cell(rule, update, tree, state, residuals, cotangents):
    state, passed = rule.backward(state, _rebuild(tree, residuals), cotangents)
    if update:
        state = rule.update(state)
    return state, passed


def _rebuild(tree, residual_leaves):
    return {j: jax.tree.unflatten(tree, leaves) for j, leaves in residual_leaves.items()}


def summarize(log, num_stages):
    """Mean of each metric per stage over ``(stage, microbatch, metrics)`` entries; ``None`` for a
    stage that ran no task."""
    per_stage = [[] for _ in range(num_stages)]
    for k, _, metrics in log:
        per_stage[k].append(metrics)
    return [None if not entries else entries[0] if len(entries) == 1 else
            {name: jnp.mean(jnp.stack([e[name] for e in entries])) for name in entries[0]}
            for entries in per_stage]
