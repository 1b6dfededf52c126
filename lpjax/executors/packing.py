"""Pack differently-shaped per-stage pytrees into equal-length flat buffers, one per dtype.

The SPMD executor keeps every stage's state, activations and residuals in arrays with a leading
``stage`` axis; stages of a heterogeneous model (a ResNet's stages change shape) fit that mould only
after flattening and padding to the longest stage.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _is_key(dtype):
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    shape: tuple
    dtype: object  # dtype stored in the buffer
    key_impl: object  # PRNG implementation when the leaf is a typed key, else None

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))


def _group(dtype):
    return jnp.dtype(dtype).name


class TreePacker:
    """Packs trees shaped like ``example`` (arrays or ShapeDtypeStructs)."""

    def __init__(self, example):
        leaves, self.treedef = jax.tree.flatten(example)
        self.leaves = []
        for leaf in leaves:
            if _is_key(leaf.dtype):
                data = jax.eval_shape(jax.random.key_data, leaf)
                impl = jax.random.key_impl(leaf) if isinstance(leaf, jax.Array) else leaf.dtype._impl
                self.leaves.append(_Leaf(tuple(data.shape), data.dtype, impl))
            else:
                self.leaves.append(_Leaf(tuple(leaf.shape), jnp.dtype(leaf.dtype), None))
        self.sizes = {}
        for leaf in self.leaves:
            group = _group(leaf.dtype)
            self.sizes[group] = self.sizes.get(group, 0) + leaf.size

    def pack(self, tree, lengths):
        parts = {group: [] for group in lengths}
        for spec, leaf in zip(self.leaves, jax.tree.leaves(tree)):
            if spec.key_impl is not None:
                leaf = jax.random.key_data(leaf)
            parts[_group(spec.dtype)].append(jnp.ravel(leaf))
        out = {}
        for group, length in lengths.items():
            flat = jnp.concatenate(parts[group]) if parts[group] else jnp.zeros((0,), group)
            out[group] = jnp.pad(flat, (0, length - flat.shape[0]))
        return out

    def repack(self, buffers, tree, before):
        """``buffers`` with the leaves of ``tree`` written in place, skipping every leaf that is the
        very leaf of ``before`` (the tree ``unpack(buffers)`` gave): a task that leaves the
        parameters and optimizer state alone then writes only what it changed, instead of
        concatenating the whole state anew every clock."""
        buffers, offsets = dict(buffers), {group: 0 for group in buffers}
        for spec, leaf, old in zip(self.leaves, jax.tree.leaves(tree), jax.tree.leaves(before)):
            group = _group(spec.dtype)
            start = offsets[group]
            offsets[group] = start + spec.size
            if leaf is old:
                continue
            if spec.key_impl is not None:
                leaf = jax.random.key_data(leaf)
            buffers[group] = jax.lax.dynamic_update_slice_in_dim(buffers[group], jnp.ravel(leaf), start, 0)
        return buffers

    def unpack(self, buffers):
        offsets = {group: 0 for group in buffers}
        leaves = []
        for spec in self.leaves:
            group = _group(spec.dtype)
            start = offsets[group]
            leaf = jax.lax.slice_in_dim(buffers[group], start, start + spec.size).reshape(spec.shape)
            offsets[group] = start + spec.size
            if spec.key_impl is not None:
                leaf = jax.random.wrap_key_data(leaf, impl=spec.key_impl)
            leaves.append(leaf)
        return jax.tree.unflatten(self.treedef, leaves)


def common_lengths(packers):
    """Buffer length per dtype that fits every packer."""
    lengths = {}
    for packer in packers:
        for group, size in packer.sizes.items():
            lengths[group] = max(lengths.get(group, 0), size)
    return lengths


def zeros(lengths, lead=()):
    return {group: jnp.zeros((*lead, length), group) for group, length in lengths.items()}
