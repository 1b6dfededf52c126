"""Rematerialisation policies: what a stage's forward keeps for its backward pass.

A stage's VJP residual (what its own backward and, with a window, later losses' cotangents need)
holds every intermediate of the body and head unless a policy says otherwise. With a policy the
forward runs under ``jax.checkpoint``: the residual keeps only what the policy saves, and the
backward recomputes the rest. The parameters are the same either way (tests/test_remat.py); the
trade is memory for one more forward pass, the way MaxText and praxis fit large models.

Two scopes:

- the stage (``nothing_saved``, ``dots_saved``, ``dots_no_batch_saved``): the body and the head each
  run as one checkpoint. This shrinks the residual a stage keeps for *later* losses (a window of 2 or
  more), but not the peak of a stage's own step: its backward follows its forward at once and
  recomputes the whole body before differentiating it, so every intermediate is held again
  (ResNet-32, batch 128, K = 4: the largest stage's peak is unchanged or slightly larger,
  lpjax.research.memory).
- each layer (``layers_nothing_saved``): every layer of an ``nnx.Sequential`` body (a ResNet's
  block, a Transformer's block) is its own checkpoint. The forward keeps each layer's input; the
  backward recomputes one layer at a time, so the peak holds one layer's intermediates, not the
  stage's. The head is not checkpointed. A body that is not an ``nnx.Sequential`` runs as one
  checkpoint with the same policy.
"""

import jax
import numpy as np
from flax import nnx

from lpjax.errors import ConfigError

REMAT_POLICIES = {
    "none": None,  # keep every intermediate: no recomputation
    "nothing_saved": jax.checkpoint_policies.nothing_saveable,  # keep only the stage's input
    "dots_saved": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch_saved": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "layers_nothing_saved": None,  # keep each layer's input, recompute one layer at a time (apply_layers)
}
PER_LAYER = ("layers_nothing_saved",)


def check_remat(name: str) -> str:
    """``name`` if it names a policy in ``REMAT_POLICIES``, else a ``ConfigError`` listing them."""
    if name not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return name


def rematerialised(fn, name: str):
    """``fn`` under ``jax.checkpoint`` with the named stage-scope policy; ``fn`` itself for ``"none"``
    and for a per-layer policy (``apply_layers`` checkpoints inside the body instead)."""
    if check_remat(name) == "none" or name in PER_LAYER:
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[name])


def apply_layers(body, x, name: str):
    """``body(x)``; under a per-layer policy each layer of an ``nnx.Sequential`` body (the body itself
    otherwise) runs through ``_checkpointed``."""
    if name not in PER_LAYER:
        return body(x)
    for layer in (body.layers if isinstance(body, nnx.Sequential) else [body]):
        x = _checkpointed(layer, x)
    return x


def _checkpointed(layer, x):
    """``layer(x)`` keeping only its parameters, state and input for the backward pass, which recomputes
    the layer once the layer's output cotangent exists. Neither ``jax.checkpoint`` nor an optimisation
    barrier orders that on XLA's CPU backend (it drops barriers before scheduling, then recomputes every
    layer as soon as its input exists and holds them all: ResNet-32's whole step grew from 464 to 532
    MiB), so the recomputation's input is made to depend on the cotangent: ``input + 0 * cotangent[0]``,
    equal to the input wherever the cotangent is finite (a non-finite one skips the update anyway)."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def run(p, inp, r):
        module = nnx.merge(graphdef, p, jax.tree.map(lambda leaf: leaf, r))  # Variables of this trace
        out = module(inp)
        return out, nnx.state(module, nnx.Not(nnx.Param))

    @jax.custom_vjp
    def call(p, inp, r):
        return run(p, inp, r)

    def forward(p, inp, r):
        return run(p, inp, r), (p, inp, r)

    def backward(saved, cotangents):
        p, inp, r = saved
        d_out = cotangents[0]
        first = jax.tree.leaves(d_out)[0]
        after = 0.0 * first.reshape(-1)[0]  # a scalar that exists only once the cotangent does
        p, inp = _depend(p, inp, after)
        _, vjp = jax.vjp(lambda q, i: run(q, i, r)[0], p, inp)
        return (*vjp(d_out), jax.tree.map(_zero_cotangent, r))

    call.defvjp(forward, backward)
    out, new_rest = call(params, x, rest)
    nnx.update(layer, new_rest)
    return out


def _inexact(leaf) -> bool:
    return jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)


def _depend(params, inp, after):
    """``(params, inp)`` with ``after`` added to the floating leaves of ``inp`` (of ``params`` where the
    input has none: token ids), so that what reads them waits for ``after``."""
    def add(tree):
        return jax.tree.map(lambda leaf: leaf + after.astype(leaf.dtype) if _inexact(leaf) else leaf, tree)
    if any(_inexact(leaf) for leaf in jax.tree.leaves(inp)):
        return params, add(inp)
    return add(params), inp


def _zero_cotangent(leaf):
    if _inexact(leaf):
        return jax.numpy.zeros_like(leaf)
    return np.zeros(np.shape(leaf), jax.dtypes.float0)
