"""Pack differently-shaped per-stage pytrees into equal-length flat buffers, one per dtype.

The SPMD executor keeps every stage's state, activations and residuals in arrays with a leading
``stage`` axis; stages of a heterogeneous model (a ResNet's stages change shape) fit that mould only
after flattening and padding to the longest stage. Packing is a concatenation (a full copy) and
unpacking a slice per leaf (a copy of each leaf XLA cannot fuse into its consumer), so what a task
reads and writes at every clock uses ``SlotFormat`` instead (``shared_format`` picks it): when the
stages' leaves have the same shapes (stages of a repeated block), each leaf keeps its own array, and
nothing is copied.
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


class SlotFormat:
    """Stages' trees in shared per-leaf arrays ("slots"): leaf i of stage k lives in slot
    ``slots[k][i]``, an array of the leaf's own shape and dtype, so packing and unpacking copy
    nothing. Stages whose leaves have the same shapes share every slot; a leaf no earlier stage has
    a free slot for gets a new one, which the other stages fill with zeros."""

    def __init__(self, examples):
        self.specs, self.slots, self.treedefs, self.keys = [], [], [], []
        for tree in examples:
            leaves, treedef = jax.tree.flatten(tree)
            used, mine, keys = set(), [], []
            for leaf in leaves:
                key_impl = None
                if _is_key(leaf.dtype):
                    key_impl = jax.random.key_impl(leaf) if isinstance(leaf, jax.Array) else leaf.dtype._impl
                    leaf = jax.eval_shape(jax.random.key_data, leaf)
                spec = (tuple(leaf.shape), jnp.dtype(leaf.dtype))
                slot = next((i for i, s in enumerate(self.specs) if s == spec and i not in used), None)
                if slot is None:
                    slot = len(self.specs)
                    self.specs.append(spec)
                used.add(slot)
                mine.append(slot)
                keys.append(key_impl)
            self.slots.append(mine)
            self.treedefs.append(treedef)
            self.keys.append(keys)

    @property
    def bytes(self):
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in self.specs)

    def pack(self, k, tree):
        out = [None] * len(self.specs)
        for slot, key_impl, leaf in zip(self.slots[k], self.keys[k], jax.tree.leaves(tree)):
            out[slot] = jax.random.key_data(leaf) if key_impl is not None else leaf
        return tuple(jnp.zeros(shape, dtype) if leaf is None else leaf
                     for leaf, (shape, dtype) in zip(out, self.specs))

    @property
    def empty(self):
        return not self.specs

    def zeros(self, lead=()):
        return tuple(jnp.zeros((*lead, *shape), dtype) for shape, dtype in self.specs)

    def unpack(self, k, buffers):
        leaves = [buffers[slot] if key_impl is None else jax.random.wrap_key_data(buffers[slot], impl=key_impl)
                  for slot, key_impl in zip(self.slots[k], self.keys[k])]
        return jax.tree.unflatten(self.treedefs[k], leaves)


class FlatFormat:
    """Stages' trees packed into one flat buffer per dtype (``TreePacker``), padded to the longest."""

    def __init__(self, examples):
        self.packers = [TreePacker(tree) for tree in examples]
        self.lengths = common_lengths(self.packers)

    @property
    def bytes(self):
        return sum(n * jnp.dtype(g).itemsize for g, n in self.lengths.items())

    @property
    def empty(self):
        return not self.lengths

    def zeros(self, lead=()):
        return zeros(self.lengths, lead)

    def pack(self, k, tree):
        return self.packers[k].pack(tree, self.lengths)

    def unpack(self, k, buffers):
        return self.packers[k].unpack(buffers)


def shared_format(examples, slack=1.25):
    """``SlotFormat`` for the stages' trees (``examples``, one per stage) unless its slots take more
    than ``slack`` times the memory of flat packing (stages of different shapes), then ``FlatFormat``."""
    slots, flat = SlotFormat(examples), FlatFormat(examples)
    return slots if slots.bytes <= slack * flat.bytes else flat
