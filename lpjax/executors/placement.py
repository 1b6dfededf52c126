"""Where each stage's state and activations live. Executors ask; methods and schedules never do."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from lpjax.errors import ConfigError
from lpjax.executors import torus


class SingleDevice:
    """Everything on one device: the reference executor's placement."""

    num_data = 1

    def __init__(self, device=None):
        self.device = device or jax.devices()[0]
        self._sharding = jax.sharding.SingleDeviceSharding(self.device)  # one object: asked every step

    def state_sharding(self, k):
        return self._sharding

    batch_sharding = state_sharding

    def put_state(self, k, tree):
        return jax.device_put(tree, self.device)

    def put_batch(self, k, array):
        if isinstance(array, jax.Array) and array.committed and array.devices() == {self.device}:
            return array  # an activation already where the next stage runs
        if isinstance(array, np.ndarray):
            # A host batch stays a (private) host copy: the compiled cell that takes it moves it to
            # this device within its own dispatch, next to the state it is committed to, which
            # costs less host time than a separate device_put per array (benchmarks/greedy_overhead.py).
            return np.array(array)
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


def make_stage_mesh(stages: int, data: int = 1, devices=None, *, slices_on: str | None = None) -> Mesh:
    """The ``(stage, data)`` mesh a layout runs on.

    Args:
      stages, data: the layout.
      devices: the devices to use (``jax.devices()`` when None); a compile-only run passes a
        topology's (``lpjax.executors.topology.describe``).
      slices_on: over several slices, the axis laid across them (``torus.choose_slice_axis``).

    Returns:
      The mesh. Devices with coordinates (TPU) are placed along the torus (``torus.place``): stage
      neighbours on neighbouring chips, data groups compact. Others keep their order, except that
      over several processes each process takes whole data columns (``_columns_per_process``).
      ``ConfigError`` for a layout that needs more devices than there are, or that cannot be placed.
    """
    devices = list(jax.devices() if devices is None else devices)
    needed = stages * data
    if needed > len(devices):
        raise ConfigError(
            f"layout stages={stages} x data={data} needs {needed} devices but {len(devices)} are visible; "
            f"shrink the layout or expose more devices (on CPU: JAX_NUM_CPU_DEVICES={needed})"
        )
    # Auto axes: the stage axis is manual inside shard_map anyway, and the data axis is left to the
    # compiler's sharding propagation, which handles reshapes and reductions of a split batch.
    axis_types = (AxisType.Auto, AxisType.Auto)
    if torus.has_coordinates(devices):
        return Mesh(_torus_grid(devices, stages, data, slices_on), ("stage", "data"), axis_types=axis_types)
    grid = _columns_per_process(devices[:needed], stages, data)
    if grid is not None:
        return Mesh(grid, ("stage", "data"), axis_types=axis_types)
    return jax.make_mesh((stages, data), ("stage", "data"), axis_types=axis_types, devices=devices[:needed])


def _torus_grid(devices, stages: int, data: int, slices_on):
    """``torus.place``'s grid over all ``devices``, or over the first ``stages * data`` when they fill
    a box; a part of a slice that is no box goes to ``jax.make_mesh``, whose refusal becomes a
    ``ConfigError`` naming the layouts that fit."""
    needed = stages * data
    if needed == len(devices) or torus.physical_grid(devices[:needed])[0] is not None:
        return torus.place(devices[:needed], stages, data, slices_on=slices_on).devices
    try:
        mesh = jax.make_mesh((stages, data), ("stage", "data"), devices=devices[:needed])
    except (NotImplementedError, ValueError, AssertionError):
        grids, dims = torus.physical_grid(devices)
        fits = torus.format_layouts(torus.fitting_layouts(len(devices), dims, len(grids or [0])))
        raise ConfigError(f"layout stages={stages} x data={data} cannot be placed on the first {needed} of "
                          f"{len(devices)} devices; layouts that use them all: {fits}") from None
    return mesh.devices


def _columns_per_process(devices, stages: int, data: int):
    """Over several processes whose count divides the ``data`` axis: a grid where process p holds
    data columns ``[p*D/P, (p+1)*D/P)`` of every stage, so that each process needs only its own rows
    of each microbatch (``data_shard``) and stages pass activations within a process; the data
    axis's gradient averages cross processes. None where that does not apply (one process, or a
    pipeline that spans processes: then each process holds whole stages and all of their rows)."""
    processes = sorted({d.process_index for d in devices})
    count = len(processes)
    if count == 1 or data % count:
        return None
    own = {p: [d for d in devices if d.process_index == p] for p in processes}
    per = data // count  # columns per process
    if any(len(own[p]) != stages * per for p in processes):
        return None
    grid = np.empty((stages, data), dtype=object)
    for i, p in enumerate(processes):
        grid[:, i * per:(i + 1) * per] = np.array(own[p], dtype=object).reshape(stages, per)
    return grid


def data_shard(mesh: Mesh) -> tuple:
    """``(shard_index, shard_count)``: the part of each microbatch's rows that this process's devices
    take, as a block of the ``data`` axis; ``(0, 1)`` (every row) in one process, or when the
    process holds whole stages (their every row)."""
    grid = np.asarray(mesh.devices).reshape(mesh.shape["stage"], -1)
    me = jax.process_index()
    columns = sorted({d for s in range(grid.shape[0]) for d in range(grid.shape[1])
                      if grid[s, d].process_index == me})
    width, data = len(columns), grid.shape[1]
    if not columns or width == data or data % width or columns[0] % width or columns != list(
            range(columns[0], columns[0] + width)):
        return 0, 1
    # only a block of columns that is every stage's (the process feeds its rows to all its stages)
    if any(grid[s, d].process_index != me for s in range(grid.shape[0]) for d in columns):
        return 0, 1
    return columns[0] // width, data // width
