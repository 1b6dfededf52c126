"""Mixed precision for any network built from Flax layers: compute in bfloat16, keep parameters (and
so optimizer state) in float32, or store the parameters in bfloat16 too.

Flax's layers (``nnx.Linear``, ``Conv``, ``Embed``, ``LayerNorm``, ``BatchNorm``, ...) read their
``dtype`` attribute at call time, so setting it after construction changes what they compute in, not
what they store. Normalisation layers compute their statistics in at least float32 whatever
``dtype`` says (Flax promotes them), and lpjax's losses cast logits to float32
(lpjax/core/losses.py), so reductions stay in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .base import Network

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def set_precision(module: nnx.Module, compute: str = "float32", params: str = "float32") -> nnx.Module:
    """Make every layer of ``module`` compute in ``compute`` and store its parameters as ``params``.

    Args:
      module: any Flax NNX module; changed in place.
      compute: ``"float32"`` or ``"bfloat16"``: the dtype each layer's outputs are computed in.
      params: ``"float32"`` (the usual mixed precision) or ``"bfloat16"`` (half the parameter and
        optimizer-state bytes, and less exact updates).

    Returns:
      ``module``.
    """
    compute_dtype, param_dtype = _dtype(compute, "compute"), _dtype(params, "params")
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module) and hasattr(node, "dtype"):
            node.dtype = compute_dtype
        if isinstance(node, nnx.Module) and hasattr(node, "param_dtype"):
            node.param_dtype = param_dtype
    params = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda a: a.astype(param_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                    params))
    return module


def with_precision(network: Network, compute: str = "float32", params: str = "float32") -> Network:
    """``network`` with ``set_precision`` applied to every layer and to every head it makes.

    Returns:
      A ``Network`` sharing the (converted) layers, whose ``make_head`` converts each new head.
    """
    for layer in network.layers:
        set_precision(layer, compute, params)
    make_head = network.make_head

    def precise_head(i, rngs):
        return set_precision(make_head(i, rngs), compute, params)

    return dataclasses.replace(network, make_head=precise_head)


def _dtype(name, what):
    if name not in DTYPES:
        raise ValueError(f"precision {what} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
