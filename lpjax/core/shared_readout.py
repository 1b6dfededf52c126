"""SOLO's shared read-only readout: the auxiliary heads end in a copy of the last stage's readout.

The *readout* of a head is its final Dense: the classifier, or the LM's unembedding. With a
``SharedReadout`` method (``lpjax.core.methods``) the trainer replaces the readout of every auxiliary
head (stages 0..K-2) by a ``ReadOnlyReadout`` holding a copy of the last stage's. The copy's arrays
are ``ReadoutCopy`` variables, not ``nnx.Param``: no optimizer sees them, no gradient is taken with
respect to them (and the head applies them under ``stop_gradient`` as well), and they sit in the
stage's non-trainable state, so checkpoints save and restore them with the stage. An auxiliary loss
therefore trains its stage's body and any private head layers before the readout (a norm, deeper
layers, a learned temperature), never the readout itself; only the last stage's loss trains that.

The executors refresh the copy from the last stage at the step boundaries the method's refresh rule
names (``docs/semantics.md``, "Shared readout"): a ``device_put`` from the last stage's devices in
the dataflow executors, a collective over the ``stage`` axis in the SPMD executor.

A readout is recognised as a head that is itself one ``nnx.Linear``, or an ``nnx.Linear`` attribute
named ``readout``, ``linear`` or ``out`` (what the zoo's heads use); anything else is a
``ConfigError`` naming the fix.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lpjax.errors import ConfigError

READOUT_NAMES = ("readout", "linear", "out")  # attribute names recognised as a head's final Dense


class ReadoutCopy(nnx.Variable):
    """A read-only copy of the last stage's readout: state, not a trainable parameter."""


class ReadOnlyReadout(nnx.Module):
    """``x @ stop_gradient(kernel) + stop_gradient(bias)``, the same contraction as ``nnx.Linear``.

    Args:
      kernel: ``[in, out]``, copied into a ``ReadoutCopy`` variable.
      bias: ``[out]`` or None, likewise.
    """

    def __init__(self, kernel, bias=None):
        self.kernel = ReadoutCopy(jnp.array(kernel))
        self.bias = None if bias is None else ReadoutCopy(jnp.array(bias))

    def __call__(self, x):
        kernel = jax.lax.stop_gradient(self.kernel[...])
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + jax.lax.stop_gradient(self.bias[...])
        return y


def readout_path(head) -> tuple | None:
    """Where a head's readout is.

    Returns:
      ``()`` when ``head`` is the readout itself (an ``nnx.Linear`` or a ``ReadOnlyReadout``),
      ``(name,)`` for such an attribute named in ``READOUT_NAMES``, None when it has none.
    """
    if isinstance(head, (nnx.Linear, ReadOnlyReadout)):
        return ()
    for name in READOUT_NAMES:
        if isinstance(getattr(head, name, None), (nnx.Linear, ReadOnlyReadout)):
            return (name,)
    return None


def _no_readout(k, head):
    return ConfigError(
        f"stage {k}'s head ({type(head).__name__}) has no readout lpjax recognises for method.shared_readout "
        f"(one nnx.Linear, or an nnx.Linear attribute named {', '.join(READOUT_NAMES)}); "
        f"name the head's final Dense `readout`, or drop method.shared_readout")


def share_readout(model) -> tuple:
    """Give stages 0..K-2 of ``model`` (in place) a ``ReadOnlyReadout`` copy of the last stage's readout.

    Args:
      model: a ``StagedModel`` whose last head's readout is an ``nnx.Linear`` and whose other heads
        have a readout of the same shape.

    Returns:
      The readout's path in every stage's head, K tuples (``readout_path``). Raises ConfigError,
      leaving the model unchanged, when a head has no readout or one of another shape. Idempotent: a
      model that already holds copies gets them refreshed from the last readout.
    """
    K = len(model)
    last_head = model[K - 1].head
    path = readout_path(last_head)
    owner = None if path is None else _at(last_head, path)
    if not isinstance(owner, nnx.Linear):
        raise _no_readout(K - 1, last_head)
    kernel = owner.kernel[...]
    bias = None if owner.bias is None else owner.bias[...]
    paths = []
    for k in range(K - 1):  # check every head before changing any: a refused model stays as it was
        head = model[k].head
        own_path = readout_path(head)
        if own_path is None:
            raise _no_readout(k, head)
        own = _at(head, own_path)
        own_bias = own.bias is not None
        if tuple(own.kernel.shape) != tuple(kernel.shape) or own_bias != (bias is not None):
            raise ConfigError(
                f"stage {k}'s readout is {tuple(own.kernel.shape)} but the last stage's is {tuple(kernel.shape)}, so "
                f"it cannot share it; give the auxiliary heads a private layer of width {kernel.shape[0]} before "
                f"the readout (e.g. model.head_depth=1, model.head_width={kernel.shape[0]}) or drop "
                f"method.shared_readout")
        paths.append(own_path)
    for k, own_path in enumerate(paths):
        copy = ReadOnlyReadout(kernel, bias)
        if own_path:
            setattr(model[k].head, own_path[0], copy)
        else:
            model[k].head = copy
    return tuple(paths) + (path,)


def holds_no_copies(model) -> tuple:
    """``(None,) * K`` for a method without a shared readout; a model whose heads already hold
    read-only copies (a shared-readout trainer was built on it) would silently leave those heads
    without a trainable readout, so it is refused."""
    for k, stage in enumerate(model):
        if any(isinstance(node, ReadOnlyReadout) for _, node in nnx.iter_graph(stage.head)):
            raise ConfigError(f"stage {k}'s head holds a read-only copy of the last readout (a shared-readout "
                              f"trainer was built on this model); build a fresh model, or set method.shared_readout=True")
    return (None,) * len(model)


def _at(module, path):
    for name in path:
        module = getattr(module, name)
    return module


def _names(key_path):
    return tuple(getattr(key, "key", getattr(key, "name", None)) for key in key_path)


def get_readout(head_tree, path) -> dict:
    """The readout's arrays in a head's state tree.

    Args:
      head_tree: a head's state (``nnx.state`` or its pure-dict form).
      path: the readout's path in the head (``readout_path``).

    Returns:
      ``{"kernel": ..., "bias": ...}``, bias only when there is one; {} when nothing is at ``path``.
    """
    found = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(head_tree)[0]:
        names = _names(key_path)
        if names[:len(path)] == path and len(names) > len(path) and names[len(path)] in ("kernel", "bias"):
            found[names[len(path)]] = leaf
    return found


def set_readout(head_tree, path, readout: dict):
    """``head_tree`` with the arrays at ``path`` replaced by ``readout``'s (cast to the dtypes they
    replace); a new tree, the given one is not changed. The inverse of ``get_readout``."""
    def replace(key_path, leaf):
        names = _names(key_path)
        if names[:len(path)] == path and len(names) > len(path) and names[len(path)] in readout:
            return readout[names[len(path)]].astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(replace, head_tree)
