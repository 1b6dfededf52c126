"""The SPMD executor's stage states seen from the host: each stage's ``StageState`` assembled on its
own devices (``states``), every stage's on every host (``host_states``, a gather), and the two
health numbers per stage read where the stage lives (``stage_scalars``), which gathers no state."""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lpjax.executors.spmd.state import STATE_PARTS, local_state

P = jax.P


class HostStates:
    """``SpmdExecutor``'s reads of its states (it mixes this in): they use its ``placement``,
    ``programs`` (``mesh.MeshPrograms``), ``format`` (``state.StateFormat``) and state buffers."""

    @property
    def states(self):
        """Each stage's ``StageState``, assembled on that stage's devices from its buffer row; None
        for a stage that lives in another process."""
        out = []
        leaves, treedef = jax.tree.flatten(self.state_buffers())
        for k in range(self.num_stages):
            sharding = self.placement.state_sharding(k)
            row = []
            for buf in leaves:
                # indices(): along a size-1 stage axis a shard's index is slice(None), not slice(0, 1)
                shards = [s.data.reshape(buf.shape[1:]) for s in buf.addressable_shards
                          if s.index[0].indices(buf.shape[0])[0] == k]
                if not shards:
                    break
                row.append(jax.make_array_from_single_device_arrays(buf.shape[1:], sharding, shards))
            if len(row) < len(leaves):  # the stage lives in another process
                out.append(None)
                continue
            parts = jax.tree.unflatten(treedef, row)
            out.append(self._unpacker(k)(*(parts[name] for name in STATE_PARTS)))
        return out

    def _unpacker(self, k):
        return self.programs.jitted(("unpack", k), lambda: functools.partial(self.format.stage_state, k),
                                    out_shardings=self.placement.state_sharding(k))

    def host_states(self):
        """Every stage's state as numpy arrays, in every process. The stacked state buffers are
        gathered across processes first, so every process must call this at the same point, and
        each host then holds the whole model: what ``Trainer.export()`` and the Python API's
        per-stage checkpoints ask for. Evaluation (``eval.py``) and ``stage_scalars`` do not use it."""
        from jax.experimental import multihost_utils

        stacked = multihost_utils.process_allgather(self.state_buffers(), tiled=True)
        rows = lambda k, name: jax.tree.map(lambda a: jnp.asarray(a[k]), stacked[name])  # noqa: E731
        return [jax.device_get(self.format.stage_state(k, *(rows(k, name) for name in STATE_PARTS)))
                for k in range(self.num_stages)]

    def stage_scalars(self):
        """Per stage, its gradient norm at the last update, its count of skipped updates and whether
        its state is finite, read where the stage lives and all-gathered over ``stage`` (three
        numbers per stage, not the states), as numpy arrays ``[K]``; a collective over the mesh."""
        fmt, rules = self.format, self.rules

        def build():
            def read(k, written, fixed):
                state = fmt.stage_state(k, written, fixed)
                return (state.grad_norm.astype(jnp.float32), state.skipped.astype(jnp.int32),
                        rules[k].state_finite(state))

            branches = [functools.partial(read, k) for k in range(self.num_stages)]

            def local(state):
                norm, skipped, finite = lax.switch(lax.axis_index("stage"), branches, *local_state(state))
                # a data replica holds its own copy of the stage: the stage is finite where every copy is
                finite = lax.pmin(finite.astype(jnp.int32), "data").astype(bool)
                return tuple(lax.all_gather(v, "stage") for v in (norm, skipped, finite))

            return local, (self.state_spec(),), (P(), P(), P())

        return jax.device_get(self.programs.mapped(("scalars",), build)(self.state_buffers()))
