"""What the SPMD executor stores of a stage's VJP residual per microbatch, and how it rebuilds the rest.

A body's VJP residual (``StageRule.forward``) holds its weights and, for ReLU and the like,
constant arrays (the zeros a ``select`` picks against in the backward pass). Neither is worth a
residual slot per microbatch, written at every forward and read at every backward:

- weights: flushed schedules never update a stage between a microbatch's forward and its backward,
  so weight leaves are taken from the stage's state when the backward runs (a full copy of the
  weights per forward otherwise; GPipe would hold M of them). Streaming may update in between and
  needs the version that ran the forward, so it stores them;
- constants: a leaf the forward builds by broadcasting a literal (found in the forward's jaxpr,
  traced once per stage) is built again when the backward runs; it does not depend on the input.

Only the other leaves go to the residual mailbox.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core


class ResidualPlan:
    """Stage k's residual: per leaf, the index of the body parameter leaf it is (``shared``), or the
    constant it is (``constants``: ``(value, shape, dtype)``), else it is stored."""

    def __init__(self, treedef, shared, constants, stored):
        self.treedef, self.shared, self.constants = treedef, shared, constants
        self.stored = stored  # ShapeDtypeStructs of the stored leaves, in order

    def to_store(self, state, residual, weights_shared):
        """The leaves of ``residual`` to write to the mailbox; fails at trace time if the residual is
        not shaped as when it was planned (the plan would rebuild the wrong leaves)."""
        leaves = jax.tree.leaves(residual)
        # (the tree structures of two traces differ: a VJP residual's static part holds its jaxpr)
        if len(leaves) != len(self.shared) or _shared_leaves(state, residual, weights_shared) != self.shared:
            raise AssertionError("a stage's residual is not shaped as when its forward was planned")
        kept = [leaf for leaf, p, c in zip(leaves, self.shared, self.constants) if p is None and c is None]
        if [(x.shape, x.dtype) for x in kept] != [(x.shape, x.dtype) for x in self.stored]:
            raise AssertionError("a stage's stored residual leaves changed shape since its forward was planned")
        return kept

    def rebuild(self, kept, state):
        params = jax.tree.leaves(state.params["body"])
        kept = iter(kept)
        leaves = []
        for p, c in zip(self.shared, self.constants):
            if c is not None:
                value, shape, dtype = c
                leaves.append(jnp.full(shape, value, dtype))
            else:
                leaves.append(next(kept) if p is None else params[p])
        return jax.tree.unflatten(self.treedef, leaves)


def plan_residual(rule, state, x, y, weights_shared):
    """Trace stage ``rule``'s forward once on abstract ``state, x, y``; returns its activation's
    shapes and its ``ResidualPlan`` (None when the stage keeps no residual)."""
    found = {}

    def probe(state, x, y):
        _, h, _, residual, _ = rule.forward(state, x, y)
        if residual is None:
            return h, []
        found["treedef"] = jax.tree.structure(residual)
        found["shared"] = _shared_leaves(state, residual, weights_shared)
        return h, jax.tree.leaves(residual)

    jaxpr, (h, leaves) = jax.make_jaxpr(probe, return_shape=True)(state, x, y)
    if "treedef" not in found:
        return h, None
    outvars = jaxpr.jaxpr.outvars[len(jax.tree.leaves(h)):]
    constants = [None if p is not None else _constant(var, jaxpr.jaxpr) for var, p in zip(outvars, found["shared"])]
    stored = [leaf for leaf, p, c in zip(leaves, found["shared"], constants) if p is None and c is None]
    return h, ResidualPlan(found["treedef"], found["shared"], constants, stored)


def _shared_leaves(state, residual, weights_shared):
    """Per residual leaf, the index of the body parameter leaf it is, else None."""
    if not weights_shared:
        return [None] * len(jax.tree.leaves(residual))
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(state.params["body"]))}
    return [ids.get(id(leaf)) for leaf in jax.tree.leaves(residual)]


def _constant(var, jaxpr):
    """``(value, shape, dtype)`` when ``var`` is a literal broadcast to an array, else None."""
    if isinstance(var, core.Literal):
        return _scalar(var.val, (), var.aval.dtype)
    for eqn in jaxpr.eqns:
        if var in eqn.outvars:
            if eqn.primitive.name == "broadcast_in_dim" and isinstance(eqn.invars[0], core.Literal):
                return _scalar(eqn.invars[0].val, tuple(eqn.params["shape"]), var.aval.dtype)
            return None
    return None


def _scalar(value, shape, dtype):
    value = np.asarray(value)
    return (value.item(), shape, dtype) if value.shape == () else None
