"""Sharded checkpoints of the SPMD executor: the state buffers saved and restored where they live
(row k on stage k's devices), in a format that does not depend on the executor's split of the
state (one flat buffer per dtype and stage), with each stage's fingerprint computed on the mesh
(lpjax/core/state_summary.py). lpjax/training/checkpoint.py writes and reads them."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding

from lpjax.core.state_summary import stage_summary_on_device
from lpjax.executors.base import ShardedStates, ShardedTarget
from lpjax.executors.spmd.state import local_state, stage_rows

P = jax.P


class ShardedCheckpoints:
    """``SpmdExecutor``'s sharded-checkpoint methods (it mixes this in): they use its ``mesh``,
    ``programs`` (``mesh.MeshPrograms``), ``format`` (``state.StateFormat``) and state buffers."""

    def sharded_states(self):
        """What a sharded checkpoint saves, without gathering anything to a host.

        Returns:
          ``ShardedStates``: the state as flat per-dtype buffers ``[K, length]`` on the mesh
          (each device holds its stage's row), and each stage's ``(fingerprint, finite)``.
        """
        flat = self._flat_state()
        return ShardedStates(dict(flat), self.summaries(flat))

    def sharded_target(self):
        """What a sharded checkpoint restores onto.

        Returns:
          ``ShardedTarget``: the flat buffers' shapes and shardings on this mesh (any process
          count or ``data`` size), how to fingerprint them, and how to get every stage's state on
          the host (for reading a per-stage checkpoint instead).
        """
        sharding = NamedSharding(self.mesh, P("stage"))
        abstract = {g: jax.ShapeDtypeStruct((self.num_stages, n), jnp.dtype(g), sharding=sharding)
                    for g, n in self.format.lengths.items()}
        # every stage's live state, in every process (a collective over several): only read when a
        # per-stage checkpoint is restored
        like = (lambda: self.states) if self.processes == 1 else self.host_states
        return ShardedTarget(abstract, self.summaries, like)

    def summaries(self, flat):
        """Per stage ``(fingerprint, finite)`` of its saved state (the summary of the unpacked
        ``StageState``, so equal to a per-stage checkpoint's), as Python values; a collective over
        the mesh.

        Args:
          flat: flat per-dtype state buffers (``sharded_states``' format), on the mesh.
        """
        fmt = self.format

        def build():
            branches = [functools.partial(lambda k, buf: stage_summary_on_device(fmt.packers[k].unpack(buf)), k)
                        for k in range(self.num_stages)]

            def local(buffers):
                fingerprint, finite = lax.switch(lax.axis_index("stage"), branches,
                                                 {g: b[0] for g, b in buffers.items()})
                return lax.all_gather(fingerprint, "stage"), lax.all_gather(finite, "stage")

            return local, ({g: P("stage") for g in fmt.lengths},), (P(), P())

        fingerprints, finite = jax.device_get(self.programs.mapped(("summaries",), build)(flat))
        return [(int(f), bool(ok)) for f, ok in zip(fingerprints, finite)]

    def _flat_state(self):
        """The state as one flat buffer per dtype and stage (``TreePacker``, padded to the longest stage)."""
        fmt = self.format

        def build():
            branches = [functools.partial(fmt.join, s) for s in range(self.num_stages)]

            def join(state):
                flat = lax.switch(lax.axis_index("stage"), branches, *local_state(state))
                return {g: b[None] for g, b in flat.items()}

            return join, (self.state_spec(),), {g: P("stage") for g in fmt.lengths}

        return self.programs.mapped(("flat",), build)(self.state_buffers())

    def _load_flat(self, flat):
        """Replace the state with flat per-dtype buffers (``_flat_state``'s format) on this mesh."""
        fmt = self.format

        def build():
            branches = [functools.partial(fmt.split, s) for s in range(self.num_stages)]

            def split(buffers):
                return stage_rows(*lax.switch(lax.axis_index("stage"), branches, {g: b[0] for g, b in buffers.items()}))

            return split, ({g: P("stage") for g in fmt.lengths},), self.state_spec()

        self._replace_state(self.programs.mapped(("split",), build)(dict(flat)))
