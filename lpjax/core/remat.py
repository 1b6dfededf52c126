"""Rematerialisation policies: what a stage's forward keeps for its backward pass.

A stage's VJP residual (what its own backward and, with a window, later losses' cotangents need)
holds every intermediate of the body and head unless a policy says otherwise. With a policy the
forward runs under ``jax.checkpoint``: the residual keeps only what the policy saves, and the
backward recomputes the rest. The parameters are the same either way (tests/test_remat.py); the
trade is memory for one more forward pass, the way MaxText and praxis fit large models.
"""

import jax

from lpjax.errors import ConfigError

REMAT_POLICIES = {
    "none": None,  # keep every intermediate: no recomputation
    "nothing_saved": jax.checkpoint_policies.nothing_saveable,  # keep only the stage's input
    "dots_saved": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch_saved": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str) -> str:
    """``name`` if it names a policy in ``REMAT_POLICIES``, else a ``ConfigError`` listing them."""
    if name not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return name


def rematerialised(fn, name: str):
    """``fn`` under ``jax.checkpoint`` with the named policy; ``fn`` itself for ``"none"``."""
    if check_remat(name) == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[name])
