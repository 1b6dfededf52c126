"""Shapes the SPMD executor learns by tracing each stage once, and its mailboxes, grown to what the
schedule needs.

Each stage owns three mailboxes on its devices (lowering.py allocates their slots): incoming
activations and cotangents (one message size for every stage: the largest activation, packed per
dtype) and its stored VJP residuals (only what ``residuals.py`` cannot rebuild). Every device of a
stage's row holds its own copy, with that device's slice of each microbatch.
"""

import dataclasses

import jax
import jax.numpy as jnp

from lpjax.errors import ConfigError
from lpjax.executors.spmd.buffers import TreePacker, common_lengths, shared_format, zeros
from lpjax.executors.spmd.residuals import plan_residual

MAILBOXES = ("acts", "cots", "res")  # one copy per device of the stage's row (per data slice)


@dataclasses.dataclass
class Shapes:
    """Per data slice of one microbatch: each stage's activation (``act_packers``; messages are
    ``act_lengths`` long per dtype) and residual plan (``res_plans``, stored in ``res_format``),
    and the fed rows' ``(shape, dtype)`` of inputs and labels."""

    act_packers: list
    res_plans: list
    act_lengths: dict
    res_format: object
    x_spec: tuple
    y_spec: tuple


def trace_shapes(rules, fmt, x, y, synchronous) -> Shapes:
    """Trace each stage once (``jax.eval_shape``: nothing runs).

    Args:
      rules: the stages' ``StageRule``s.
      fmt: the executor's ``StateFormat``.
      x, y: one data slice of a microbatch's inputs and labels (arrays).
      synchronous: the schedule flushes every step (residuals may then share the weights).

    Returns:
      The ``Shapes``. Raises ``ConfigError`` if a stage's output is not floating (messages are).
    """
    h = jax.ShapeDtypeStruct(x.shape, x.dtype)
    y_abs = jax.ShapeDtypeStruct(y.shape, y.dtype)
    act_packers, res_plans = [], []
    for k, rule in enumerate(rules):
        state = jax.eval_shape(lambda: fmt.zeros_state(k))
        h, plan = plan_residual(rule, state, h, y_abs if rule.trains_head else None, synchronous)
        act_packers.append(TreePacker(h))
        res_plans.append(plan)
    act_lengths = common_lengths(act_packers[:-1])
    for group in act_lengths:
        if not jnp.issubdtype(group, jnp.floating):
            raise ConfigError(f"the spmd executor moves floating activations only, got {group}; use executor 'mpmd'")
    # what each stage stores of its residual, in per-leaf arrays when the stages' leaves have the
    # same shapes (buffers.shared_format)
    res_format = shared_format([[] if plan is None else plan.stored for plan in res_plans])
    return Shapes(act_packers, res_plans, act_lengths, res_format, (x.shape, x.dtype), (y.shape, y.dtype))


def mailbox_grower(shapes, num_stages, num_data, capacity, wanted):
    """The function that makes mailboxes with ``wanted`` slots per stage of each kind from the current
    ones, keeping what their slots hold; jit it with ``out_shardings`` over ``(stage, data)`` so that
    each device creates only its own rows.

    Args:
      shapes: the executor's ``Shapes``.
      num_stages, num_data: the mesh's axis sizes.
      capacity: the current ``(activation, cotangent, residual)`` slots per stage (zeros: none yet).
      wanted: the slots per stage to make room for (each at least ``capacity``'s).

    Returns:
      ``grow(current)``: ``current`` is the mailboxes ``{"acts", "cots", "res"}`` (None when there are
      none yet); it returns the new ones, ``[K, D, slots + 1, ...]`` (one more row than slots: the
      scratch row that messages nobody keeps are written to, program._put).
    """
    K, D = num_stages, num_data

    def grow(current):
        fresh = {"acts": zeros(shapes.act_lengths, (K, D, wanted[0] + 1)),
                 "cots": zeros(shapes.act_lengths, (K, D, wanted[1] + 1)),
                 "res": shapes.res_format.zeros((K, D, wanted[2] + 1))}
        if current is None:
            return fresh
        return {name: jax.tree.map(lambda new, old, kept=kept: new.at[:, :, :kept].set(old[:, :, :kept]),
                                   fresh[name], current[name])
                for name, kept in zip(MAILBOXES, capacity)}

    return grow
