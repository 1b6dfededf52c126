"""Where each stage's state and activations live. Executors ask; methods and schedules never do."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from ..errors import ConfigError


class SingleDevice:
    """Everything on one device: the reference executor's placement."""

    num_data = 1

    def __init__(self, device=None):
        self.device = device or jax.devices()[0]

    def state_sharding(self, k):
        return jax.sharding.SingleDeviceSharding(self.device)

    batch_sharding = state_sharding

    def put_state(self, k, tree):
        return jax.device_put(tree, self.device)

    def put_batch(self, k, array):
        if isinstance(array, jax.Array) and array.committed and array.devices() == {self.device}:
            return array  # an activation already where the next stage runs
        return jax.device_put(array, self.device)


class PerStageMeshes:
    """Stage k owns row k of a ``(stage, data)`` device mesh: its state is replicated over that row
    and its microbatches are split over the row's ``data`` axis, so XLA averages the gradients."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.num_data = mesh.shape.get("data", 1)
        rows = np.asarray(mesh.devices).reshape(mesh.shape["stage"], self.num_data)
        self.meshes = [Mesh(row, ("data",), axis_types=(AxisType.Auto,)) for row in rows]

    def state_sharding(self, k):
        return NamedSharding(self.meshes[k], jax.P())

    def batch_sharding(self, k):
        return NamedSharding(self.meshes[k], jax.P("data"))

    def put_state(self, k, tree):
        return jax.device_put(tree, self.state_sharding(k))

    def put_batch(self, k, array):
        return jax.device_put(array, self.batch_sharding(k))


def make_stage_mesh(stages: int, data: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    needed = stages * data
    if needed > len(devices):
        raise ConfigError(
            f"layout stages={stages} x data={data} needs {needed} devices but {len(devices)} are visible; "
            f"shrink the layout or expose more devices (on CPU: JAX_NUM_CPU_DEVICES={needed})"
        )
    # Auto axes: the stage axis is manual inside shard_map anyway, and the data axis is left to the
    # compiler's sharding propagation, which handles reshapes and reductions of a split batch.
    return jax.make_mesh((stages, data), ("stage", "data"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:needed])
