"""The SPMD executor's mesh: one builder, and one cache, for every program it runs there, and host
arrays placed on it."""

import jax
import numpy as np


class MeshPrograms:
    """Every compiled program of one executor over its ``(stage, data)`` mesh, built one way
    (``jax.jit`` of a ``jax.shard_map`` manual over every mesh axis) and kept by key: the pipeline
    (``program.py``), the state's format changes and reads (``state.py``, ``sharded.py``,
    ``host_states.py``) and the mesh evaluation (``eval.py``)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._cache = {}

    def mapped(self, key, build, *, donate=False):
        """The program under ``key``, built on its first use.

        Args:
          key: a tuple whose first element names the kind of program, the rest what its trace
            depends on (``built`` lists programs by kind).
          build: ``() -> (fn, in_specs, out_specs)``: the per-device function and the partition
            specs of its arguments and results; called only when the program is not built yet.
          donate: the program replaces its first argument (state buffers), whose memory XLA may
            then reuse for its results.

        Returns:
          The jitted program.
        """
        if key not in self._cache:
            fn, in_specs, out_specs = build()
            mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                                   axis_names=set(self.mesh.axis_names), check_vma=False)
            self._cache[key] = jax.jit(mapped, donate_argnums=(0,) if donate else ())
        return self._cache[key]

    def jitted(self, key, build, **options):
        """``jax.jit(build(), **options)`` under ``key``: a program on one stage's devices, which
        its ``out_shardings`` name (no ``shard_map``)."""
        if key not in self._cache:
            self._cache[key] = jax.jit(build(), **options)
        return self._cache[key]

    def built(self, kind):
        """The programs of ``kind`` (a key's first element) built so far."""
        return [program for key, program in self._cache.items() if key[0] == kind]


def global_array(tree, sharding):
    """Host arrays (identical in every process) as global arrays with ``sharding``; works across processes.

    Args:
      tree: a pytree of numpy (or host-readable) arrays, the same in every process.
      sharding: where the global arrays live.

    Returns:
      The tree of ``jax.Array``s, each process having placed only its own shards.
    """
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda i: np.asarray(a)[i]), tree)
