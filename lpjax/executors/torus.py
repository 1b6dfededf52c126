"""A ``(stage, data)`` device grid that follows the chips' torus, and hop counts between chips.

Stage k sends its activation to stage k+1 at every clock, and each stage's data group all-reduces
over its row: so stage neighbours belong on neighbouring chips, and data groups in compact boxes.
Devices with coordinates (TPU devices, live or from ``topology.describe``) are placed so; devices
without (CPU, GPU) keep their order.

Two candidates, the shorter stage hops winning, then the cheaper data ring, then mesh_utils:
``mesh_utils.create_device_mesh`` (``create_hybrid_device_mesh`` over slices), which gives each mesh
axis whole physical axes but refuses layouts such as 8x8 on a 4x4x4 slice or 8x2 on 4x4; and a
snake: stage k sits at position k of a reflected Gray-code path through a box of the slice, so
consecutive stages are always one hop apart, and its data group is that position in every box.

Topology device ids are numbered by host block (0, 1, 4, 5, 2, 3, ...), so a plain reshape of the
device list puts stage neighbours 4 hops apart on v5e:4x4 and 10 on v5e:16x16.
"""

import dataclasses
import itertools
import math

import numpy as np

from lpjax.errors import ConfigError
from lpjax.executors.topology import chip_of, wraparound

NO_WRAP = (False, False, False)


# -- coordinates and hops ----------------------------------------------------------------------
def _coords(device):
    coords = getattr(device, "coords", None)
    if coords is None:
        return None
    padded = tuple(coords) + (0,) * (3 - len(coords))
    return (getattr(device, "slice_index", 0) or 0, *padded, getattr(device, "core_on_chip", 0) or 0)


def has_coordinates(devices) -> bool:
    return bool(devices) and all(_coords(d) is not None for d in devices)


def physical_grid(devices):
    """The devices as boxes, one per slice.

    Returns:
      ``(grids, dims)``: per slice an object array indexed ``[x, y, z, core]``, and the per-slice
      dims ``(X, Y, Z, cores)``; ``(None, None)`` for devices without coordinates or that do not
      fill whole boxes.
    """
    keys = [_coords(d) for d in devices]
    if not keys or any(k is None for k in keys):
        return None, None
    dims = tuple(max(k[i] for k in keys) + 1 for i in range(1, 5))
    grids = []
    for s in sorted({k[0] for k in keys}):
        grid = np.empty(dims, dtype=object)
        for device, key in zip(devices, keys):
            if key[0] == s:
                grid[key[1:]] = device
        if any(g is None for g in grid.flat):
            return None, None
        grids.append(grid)
    return grids, dims


def wrap_of(devices) -> tuple:
    """The wraparound links of the slice ``devices`` fill, from their chip kind and the box's shape."""
    grids, dims = physical_grid(list(devices))
    chip = chip_of(devices[0]) if devices else None
    if grids is None or chip is None:
        return NO_WRAP
    return wraparound(chip, dims[:chip.ndim])


def hop(a, b, wrap=NO_WRAP, dims=None) -> int | None:
    """ICI hops between two devices: Manhattan over x, y, z, the short way round where ``wrap``;
    0 for two cores of one chip; None across slices (DCN) or without coordinates."""
    ka, kb = _coords(a), _coords(b)
    if ka is None or kb is None or ka[0] != kb[0]:
        return None
    total = 0
    for axis in range(3):
        d = abs(ka[1 + axis] - kb[1 + axis])
        if wrap[axis] and dims is not None:
            d = min(d, dims[axis] - d)
        total += d
    return total


def stage_hops(grid, wrap=NO_WRAP) -> list:
    """Hops of every stage-neighbour pair ``(grid[s, d], grid[s+1, d])``; None across slices."""
    grid = np.asarray(grid, dtype=object)
    dims = physical_grid(list(grid.flat))[1]
    return [hop(grid[s, d], grid[s + 1, d], wrap, dims) for s in range(grid.shape[0] - 1) for d in range(grid.shape[1])]


def hop_summary(hops) -> dict:
    ici = [h for h in hops if h is not None]
    return {"pairs": len(hops), "dcn_pairs": len(hops) - len(ici), "max_hops": max(ici, default=None),
            "mean_hops": round(sum(ici) / len(ici), 3) if ici else None,
            "non_neighbour_pairs": sum(h > 1 for h in ici)}


def _ring_cost(members, wrap, dims):
    """Hops round a ring through ``members`` in order (a ring all-reduce's path)."""
    if len(members) < 2:
        return 0
    return sum(hop(members[i], members[(i + 1) % len(members)], wrap, dims) or 0 for i in range(len(members)))


# -- the snake ---------------------------------------------------------------------------------
def snake(shape) -> list:
    """Every position of a box once, consecutive ones one step apart along exactly one axis: a
    reflected mixed-radix Gray code (a boustrophedon in any number of dimensions)."""
    if not shape:
        return [()]
    inner = snake(shape[1:])
    out = []
    for i in range(shape[0]):
        out += [(i, *rest) for rest in (inner if i % 2 == 0 else inner[::-1])]
    return out


def _divisor_boxes(dims, count):
    options = [[d for d in range(1, n + 1) if n % d == 0] for n in dims]
    return [box for box in itertools.product(*options) if math.prod(box) == count]


def _snake_grid(grid, dims, stages, data, wrap):
    """The best snake placement of ``stages x data`` on one slice's ``grid`` [x, y, z, core]: least
    stage hops, then data-ring hops, then fewest split axes; None if no box of ``stages`` fits."""
    best = None
    for box in _divisor_boxes(dims, stages):
        tiles = tuple(n // b for n, b in zip(dims, box))
        if math.prod(tiles) != data:
            continue
        out = np.empty((stages, data), dtype=object)
        for s, position in enumerate(snake(box)):
            for d, tile in enumerate(snake(tiles)):
                out[s, d] = grid[tuple(t * b + p for t, b, p in zip(tile, box, position))]
        ring = max(_ring_cost(list(out[s]), wrap, dims) for s in range(stages))
        split = sum(1 < b < n for b, n in zip(box, dims))
        key = (max([h for h in stage_hops(out, wrap) if h is not None], default=0), ring, split)
        if best is None or key < best[0]:
            best = (key, out)
    return None if best is None else best[1]


# -- layouts -----------------------------------------------------------------------------------
def fitting_layouts(num_devices, dims=None, num_slices=1, slices_on="stage") -> list:
    """``(stages, data)`` pairs that use every device and that ``place`` can lay out with stage
    neighbours on neighbouring chips."""
    out = []
    per_slice = num_devices // num_slices
    for stages in range(1, num_devices + 1):
        if num_devices % stages:
            continue
        data = num_devices // stages
        if num_slices > 1 and (stages if slices_on == "stage" else data) % num_slices:
            continue
        in_slice = stages // num_slices if num_slices > 1 and slices_on == "stage" else stages
        if dims is None or (per_slice % in_slice == 0 and _divisor_boxes(dims, in_slice)):
            out.append((stages, data))
    return out


def format_layouts(layouts) -> str:
    shown = [f"{s}x{d}" for s, d in layouts]
    return (", ".join(shown[:12]) + (" ..." if len(shown) > 12 else "")) if shown else "none"


def choose_slice_axis(bytes_per_axis: dict | None = None) -> str:
    """The mesh axis to lay across slices (over DCN): the one that moves fewer bytes per step.

    Args:
      bytes_per_axis: measured ``{"stage": bytes, "data": bytes}`` per step of a one-slice compile
        (``lpjax.distributed.hlo_collectives.bytes_per_axis``), or None.

    Returns:
      ``"stage"`` without a measurement: it moves one activation and one cotangent per clock and
      only the stage pair at a slice boundary crosses DCN, while ``data`` all-reduces gradients,
      as large as the stage's parameters. With a measurement, the axis with fewer bytes.
    """
    if not bytes_per_axis:
        return "stage"
    return min(("stage", "data"), key=lambda axis: (bytes_per_axis.get(axis, 0), axis != "stage"))


@dataclasses.dataclass
class Placement:
    devices: np.ndarray  # [stages, data]
    method: str  # "mesh_utils", "snake" or "order" (devices without coordinates)
    stage_hops: dict  # hop_summary of the stage-neighbour pairs
    naive_stage_hops: dict  # the same for a plain reshape of the device list
    slices_on: str | None = None


def place(devices, stages: int, data: int, *, wrap=None, slices_on: str | None = None) -> Placement:
    """Arrange every one of ``devices`` as a ``[stages, data]`` grid that follows the torus.

    Args:
      devices: all the devices to use; with coordinates they must fill whole slices.
      stages, data: the layout; ``stages * data`` must be ``len(devices)``.
      wrap: the wraparound links per physical axis (``Topology.wrap``); None reads them off the devices.
      slices_on: the axis laid across slices, ``"stage"`` or ``"data"`` (``choose_slice_axis()`` if None).

    Returns:
      The ``Placement``; ``ConfigError`` naming the layouts that fit when this one cannot be placed.
    """
    from jax.experimental import mesh_utils

    devices = list(devices)
    n = len(devices)
    grids, dims = physical_grid(devices)
    num_slices = len(grids) if grids else 1
    slices_on = slices_on or choose_slice_axis()
    if slices_on not in ("stage", "data"):
        raise ConfigError(f"slices_on must be 'stage' or 'data', got {slices_on!r}")
    fits = format_layouts(fitting_layouts(n, dims, num_slices, slices_on))
    if stages * data != n:
        raise ConfigError(f"layout stages={stages} x data={data} uses {stages * data} devices but the topology has "
                          f"{n}; layouts that fit: {fits}")
    naive = np.array(devices, dtype=object).reshape(stages, data)
    wrap = wrap_of(devices) if wrap is None else tuple(wrap)
    if grids is None:
        summary = hop_summary(stage_hops(naive))
        return Placement(naive, "order", summary, summary)
    in_stage, in_data = stages, data
    if num_slices > 1:
        if (stages if slices_on == "stage" else data) % num_slices:
            raise ConfigError(f"{num_slices} slices over the {slices_on} axis need {slices_on} divisible by "
                              f"{num_slices}; layouts that fit: {fits}")
        in_stage, in_data = (stages // num_slices, data) if slices_on == "stage" else (stages, data // num_slices)
    candidates = []
    try:
        if num_slices == 1:
            grid = mesh_utils.create_device_mesh((stages, data), devices)
        else:
            across = (num_slices, 1) if slices_on == "stage" else (1, num_slices)
            grid = mesh_utils.create_hybrid_device_mesh((in_stage, in_data), across, devices)
        candidates.append(("mesh_utils", np.asarray(grid, dtype=object)))
    except (ValueError, NotImplementedError, AssertionError):
        pass  # it refuses layouts that split a physical axis; the snake may still place them
    snakes = [_snake_grid(g, dims, in_stage, in_data, wrap) for g in grids]
    if all(s is not None for s in snakes):
        candidates.append(("snake", np.concatenate(snakes, axis=0 if slices_on == "stage" else 1)))
    if not candidates:
        raise ConfigError(f"layout stages={stages} x data={data} cannot keep stage neighbours on neighbouring chips "
                          f"of a {'x'.join(map(str, dims[:3]))} slice; layouts that fit: {fits}")

    def cost(grid):
        hops = [h for h in stage_hops(grid, wrap) if h is not None]
        ring = max(_ring_cost(list(grid[s]), wrap, dims) for s in range(grid.shape[0]))
        return max(hops, default=0), sum(hops), ring

    method, grid = min(candidates, key=lambda c: cost(c[1]))  # min is stable: mesh_utils wins ties
    return Placement(grid, method, hop_summary(stage_hops(grid, wrap)), hop_summary(stage_hops(naive, wrap)),
                     slices_on if num_slices > 1 else None)
