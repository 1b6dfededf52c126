"""The SPMD executor's state at rest: every stage's ``StageState`` as two buffers stacked over the
mesh's ``stage`` axis (row k on stage k's devices).

What tasks write (gradient sum, statistics: ``TASK_FIELDS``) and what only the optimizer step
writes (parameters, optimizer state: ``FIXED_FIELDS``) are kept apart, as ``written`` and
``fixed``, between host calls as well as inside them, so that a call neither splits nor joins the
state (each a copy of all of it). Each part is per-leaf arrays when the stages' leaves have the
same shapes (stages of a repeated block), else flat per-dtype buffers padded to the longest stage
(``buffers.shared_format``). Only a sharded checkpoint sees a whole stage state as one flat buffer
per dtype (``StateFormat.join`` / ``split``), so its format does not depend on the split.
"""

import dataclasses
import functools

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding

from lpjax.core.stage_rule import StageState
from lpjax.executors.spmd.buffers import TreePacker, common_lengths, shared_format, zeros
from lpjax.executors.spmd.mesh import global_array

P = jax.P

# What forward and backward tasks write (StageRule.forward/backward); the other fields only
# change in the optimizer step. check_unchanged enforces this at trace time.
TASK_FIELDS = ("rest", "grad_sum", "grad_count")
FIXED_FIELDS = tuple(f.name for f in dataclasses.fields(StageState) if f.name not in TASK_FIELDS)
STATE_PARTS = ("written", "fixed")  # the executor's state buffers: TASK_FIELDS, FIXED_FIELDS


class StateFormat:
    """How each stage's ``StageState`` is stored: its two parts' formats (``task_format``,
    ``fixed_format``) and, for the flat format, one ``TreePacker`` per stage (``packers``) over
    per-dtype ``lengths``."""

    def __init__(self, initial):
        """``initial``: every stage's ``StageState``, or its shapes (``StageRule.state_shapes``): only
        their shapes and dtypes count."""
        self.packers = [TreePacker(s) for s in initial]
        self.lengths = common_lengths(self.packers)
        self.task_format = shared_format([part(s, TASK_FIELDS) for s in initial])
        self.fixed_format = shared_format([part(s, FIXED_FIELDS) for s in initial])
        # one stage's rows of the stacked buffers, as shapes (the same for every stage)
        self.row_shapes = jax.eval_shape(lambda state: stage_rows(*self.parts(0, state)), initial[0])

    def parts(self, k, state):
        """Stage k's ``(written, fixed)`` rows of ``state``."""
        return self.task_format.pack(k, part(state, TASK_FIELDS)), self.fixed_format.pack(k, part(state, FIXED_FIELDS))

    def stage_state(self, k, written, fixed):
        """Stage k's ``StageState`` from its rows of the two state buffers (no copy for per-leaf formats)."""
        return StageState(**self.task_format.unpack(k, written), **self.fixed_format.unpack(k, fixed))

    def split(self, k, flat):
        """Stage k's ``(written, fixed)`` from its flat per-dtype buffers."""
        return self.parts(k, self.packers[k].unpack(flat))

    def join(self, k, written, fixed):
        """Stage k's flat per-dtype buffers from its ``(written, fixed)``."""
        return self.packers[k].pack(self.stage_state(k, written, fixed), self.lengths)

    def zeros_state(self, k):
        """A ``StageState`` of stage k's shapes, all zeros (for tracing shapes)."""
        return self.packers[k].unpack(zeros(self.lengths))

    def stacked(self, states, mesh):
        """``{"written", "fixed"}``: ``states`` (host or device values, the same in every process)
        split in their two parts, stacked over the ``stage`` axis and placed on ``mesh``."""
        rows = jax.device_get([self.parts(k, state) for k, state in enumerate(states)])
        stacked = {name: jax.tree.map(lambda *r: np.stack(r), *[row[i] for row in rows])
                   for i, name in enumerate(STATE_PARTS)}
        return global_array(stacked, NamedSharding(mesh, P("stage")))


    def initialiser(self, rules):
        """The per-device function that creates the stacked state buffers where they live: each device
        builds only its own stage's rows (a ``lax.switch`` on its stage index over each stage's
        ``StageRule.init_state``, which builds the stage in the trace), so no array of the model is
        ever on a host. For ``MeshPrograms.mapped`` with no arguments; ``row_spec()`` is its out_specs."""
        branches = [functools.partial(lambda k, rule: stage_rows(*self.parts(k, rule.init_state())), k, rule)
                    for k, rule in enumerate(rules)]

        def init():
            return lax.switch(lax.axis_index("stage"), branches)

        return init

    def row_spec(self):
        """The partition specs of the stacked state buffers: every leaf over ``stage``."""
        return jax.tree.map(lambda _: P("stage"), self.row_shapes)

    def abstract(self, mesh):
        """The stacked state buffers as ``ShapeDtypeStruct``s placed on ``mesh`` (what compile-only lowers with)."""
        K, sharding = mesh.shape["stage"], NamedSharding(mesh, P("stage"))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((K, *a.shape[1:]), a.dtype, sharding=sharding),
                            self.row_shapes)


def state_spec(buffers):
    """The partition specs of the state buffers in ``buffers``: stacked over ``stage``."""
    return {name: jax.tree.map(lambda _: P("stage"), buffers[name]) for name in STATE_PARTS}


def local_state(state):
    """This device's ``(written, fixed)`` from the stacked state buffers inside ``shard_map``."""
    return tuple(jax.tree.map(lambda b: b[0], state[name]) for name in STATE_PARTS)


def stage_rows(written, fixed):
    """This device's ``(written, fixed)`` as its rows of the stacked buffers (``local_state``'s inverse)."""
    return {name: jax.tree.map(lambda b: b[None], part) for name, part in zip(STATE_PARTS, (written, fixed))}


def part(state, fields):
    return {name: getattr(state, name) for name in fields}


def check_unchanged(before, after, fields, what):
    """Fail at trace time if ``what`` changed a field it is assumed not to write: the split
    state would silently drop that change."""
    for name in fields:
        if any(a is not b for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name)))):
            raise AssertionError(f"{what} changed StageState.{name}, which the SPMD executor keeps read-only there")


def readout_refresh(rules, fmt):
    """The per-device function of a shared-readout refresh (lpjax/core/shared_readout.py): the
    last stage packs its readout, a ``psum`` over ``stage`` (every other stage adds zeros, which
    is exact) broadcasts it, and stages 0..K-2 write it into their state. Takes and returns the
    stacked state buffers."""
    K = len(rules)
    owner = rules[K - 1]
    readout = TreePacker(jax.eval_shape(lambda: owner.readout(fmt.zeros_state(K - 1))))
    lengths = readout.sizes

    def extract(k, written, fixed):
        if k != K - 1:
            return zeros(lengths)
        return readout.pack(owner.readout(fmt.stage_state(k, written, fixed)), lengths)

    def write(k, written, fixed, flat):
        if k == K - 1:
            return written, fixed
        return fmt.parts(k, rules[k].with_readout(fmt.stage_state(k, written, fixed), readout.unpack(flat)))

    def refresh(state):
        written, fixed = local_state(state)
        k = lax.axis_index("stage")
        flat = lax.switch(k, [functools.partial(extract, s) for s in range(K)], written, fixed)
        flat = lax.psum(flat, "stage")
        written, fixed = lax.switch(k, [functools.partial(write, s) for s in range(K)], written, fixed, flat)
        return stage_rows(written, fixed)

    return refresh
