"""The saved part of a ``StageState`` and its fingerprint: what a checkpoint holds of a stage, and
the ``(fingerprint, finite)`` pair that proves it read back intact. Traceable, so the SPMD executor
computes it on the mesh where each stage lives (lpjax/executors/spmd/sharded.py) and a checkpoint
(lpjax/training/checkpoint.py) on the host's copy; both get the same numbers."""

import jax
import jax.numpy as jnp

SAVED_FIELDS = ("params", "rest", "opt_state", "grad_norm", "skipped")
# What must be finite to be saved or restored. grad_norm is a logged metric: under nonfinite=skip it is
# NaN right after a skipped update, and that must not block the save (the update itself never landed).
GUARDED_FIELDS = ("params", "rest", "opt_state")


def is_prng_key(leaf) -> bool:
    """Whether ``leaf`` is a typed PRNG key array (saved as its raw key data)."""
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def storable(state) -> dict:
    """The saved part of a ``StageState`` as a dict of its ``SAVED_FIELDS``, typed PRNG keys as their raw key data."""
    tree = {name: getattr(state, name) for name in SAVED_FIELDS}
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if is_prng_key(leaf) else leaf, tree)


def _bits(flat):
    """The raw bits of a flat array as uint32 (wider words folded), so a flipped bit always shows."""
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        return flat.astype(jnp.uint32)
    unsigned = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[flat.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(flat, unsigned)
    if flat.dtype.itemsize == 8:
        bits = bits ^ (bits >> 32)
    return bits.astype(jnp.uint32)


@jax.jit
def _summary(tree):
    """``(fingerprint, finite)``: a position-weighted sum of the bits of every leaf, modulo 2**32
    (any single changed word changes it), and whether every floating leaf of the guarded fields is
    finite."""
    total, finite = jnp.uint32(0), jnp.bool_(True)
    # the leaves in jax.tree.leaves(tree)'s order (dict keys sorted), each with its field's name
    leaves = [(name, leaf) for name in sorted(tree) for leaf in jax.tree.leaves(tree[name])]
    for i, (name, leaf) in enumerate(leaves):
        flat = jnp.ravel(leaf)
        if jnp.issubdtype(flat.dtype, jnp.floating) and name in GUARDED_FIELDS:
            finite &= jnp.all(jnp.isfinite(flat))
        weights = jnp.arange(flat.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(2 * i + 1)
        total += jnp.sum(_bits(flat) * weights, dtype=jnp.uint32)
    return total, finite


def stage_summary_on_device(state):
    """``(fingerprint, finite)`` of one stage's saved state as device scalars (traceable: the SPMD
    executor computes it inside its mesh program, where each stage lives).

    Args:
      state: a ``StageState`` (arrays or tracers).

    Returns:
      ``(fingerprint, finite)``: a uint32 and a bool scalar.
    """
    return _summary(storable(state))


def state_summaries(states) -> list:
    """``(fingerprint, finite)`` of each stage's saved state, as Python values, in one wait on the
    devices.

    Args:
      states: ``StageState`` pytrees, one per stage.

    Returns:
      One ``(int, bool)`` per stage.
    """
    return [(int(f), bool(ok)) for f, ok in jax.device_get([_summary(storable(s)) for s in states])]


def state_summary(state) -> tuple:
    """``(fingerprint, finite)`` of one stage's saved state, as Python values."""
    return state_summaries([state])[0]
