"""Which devices a collective of an SPMD program joins, and which mesh axis that is.

Device ids in an SPMD program are logical: id ``i`` is ``mesh.devices.flat[i]`` (checked with a
mesh over permuted devices: the ids stay 0..N-1 in mesh order). XLA writes the groups three ways:
``{{0,1},{2,3}}`` (jaxlib 0.10.2), the iota form ``[2,2]<=[4]`` / ``[2,2]<=[2,2]T(1,0)``, and the
named-mesh form ``mesh['stage'=2,'data'=2] {'data'}`` (jaxlib 0.12; sub-axes ``'data':(1)2``, and a
non-iota mesh adds ``, device_ids=(...)``). A collective-permute lists ``source_target_pairs``.
"""

import math
import re

import numpy as np

from lpjax.executors.torus import NO_WRAP, hop, physical_grid


def _iota_groups(spec: str) -> list:
    """``[G,S]<=[dims]T(perm)`` as explicit groups."""
    match = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    count, size = int(match.group(1)), int(match.group(2))
    dims = [int(x) for x in match.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if match.group(4):
        ids = ids.transpose([int(x) for x in match.group(4).split(",")])
    return ids.reshape(count, size).tolist()


def _mesh_groups(text: str) -> list:
    """XLA's named-mesh groups (``mesh['a'=2,'b'=4] {'b'}``) as explicit groups: the mesh axes are
    cut at their sub-axes' boundaries, the grouped factors moved last, and the ids cut into groups."""
    match = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*)\))?\s*\{([^}]*)\}", text)
    axes = [(name.strip("'\""), int(size)) for name, size in re.findall(r"([^,=\s]+)=(\d+)", match.group(1))]
    names, sizes = [a for a, _ in axes], [s for _, s in axes]
    n = math.prod(sizes)
    listed = match.group(2)
    if listed and "<=" in listed:
        flat = np.array(_iota_groups(f"[1,{n}]" + listed[listed.index("<="):])).ravel()
    elif listed:
        flat = np.array([int(x) for x in re.findall(r"\d+", listed)])
    else:
        flat = np.arange(n)
    refs = []  # (axis index, sub-axis start counted from the major side or None, sub-axis size)
    for ref in filter(None, (r.strip() for r in match.group(3).split(","))):
        sub = re.match(r"['\"]?([^'\":]+)['\"]?(?::\((\d+)\)(\d+))?$", ref)
        refs.append((names.index(sub.group(1)), int(sub.group(2)) if sub.group(2) else None,
                     int(sub.group(3)) if sub.group(3) else None))
    factors, owner = [], {}
    for i, size in enumerate(sizes):
        bounds = {1, size} | {b for idx, pre, sub in refs if idx == i and pre is not None for b in (pre, pre * sub)}
        bounds = sorted(bounds)
        for lo, hi in zip(bounds, bounds[1:]):
            owner[(i, lo)] = len(factors)
            factors.append(hi // lo)
        if size == 1:
            owner[(i, 1)] = len(factors)
            factors.append(1)
    grouped = []
    for idx, pre, _ in refs:
        grouped += [owner[key] for key in sorted(owner) if key[0] == idx] if pre is None else [owner[(idx, pre)]]
    rest = [f for f in range(len(factors)) if f not in grouped]
    size = math.prod(factors[f] for f in grouped)
    return flat.reshape(factors).transpose(rest + grouped).reshape(-1, size).tolist()


def parse_groups(attrs: str, num_devices: int | None = None) -> tuple:
    """The devices an instruction's collective joins.

    Args:
      attrs: the instruction's attribute text (``Instruction.attrs``).
      num_devices: the program's device count, for ``replica_groups={}`` (every device).

    Returns:
      ``("groups", [[ids]])``, ``("pairs", [(source, target)])`` or ``(None, None)``.
    """
    match = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if match:
        return "pairs", [tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)", match.group(1) + "}")]
    match = re.search(r"replica_groups=(mesh\[[^\]]*\](?:,\s*device_ids=\([^)]*\))?\s*\{[^}]*\})", attrs)
    if match:
        return "groups", _mesh_groups(match.group(1))
    match = re.search(r"replica_groups=(\[\d+,\d+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if match:
        return "groups", _iota_groups(match.group(1))
    match = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if match:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", match.group(1))]
        return "groups", groups or ([list(range(num_devices))] if num_devices else [])
    return None, None


class AxisMap:
    """Logical device id to mesh coordinates, to name the mesh axes a group or a pair spans.

    Args:
      axis_names, shape: the mesh's.
      devices: the mesh's devices (``mesh.devices``), for hops and for multi-slice programs.
    """

    def __init__(self, axis_names, shape, devices=None):
        self.names, self.shape = tuple(axis_names), tuple(shape)
        self.devices = None if devices is None else list(np.asarray(devices, dtype=object).flat)
        self.local = None  # logical id -> mesh flat index, when the program is one slice's
        self.by_device_id = {} if self.devices is None else {d.id: i for i, d in enumerate(self.devices)}
        self.slices = {}  # slice index -> mesh flat indices of its devices
        for i, device in enumerate(self.devices or []):
            self.slices.setdefault(getattr(device, "slice_index", 0) or 0, []).append(i)

    @classmethod
    def from_mesh(cls, mesh):
        return cls(mesh.axis_names, mesh.devices.shape, mesh.devices)

    def for_partitions(self, num_partitions):
        """A multi-slice program is compiled per slice (``num_partitions`` is one slice's devices):
        its logical ids are then slice 0's devices in mesh order."""
        if num_partitions and num_partitions < math.prod(self.shape) and len(self.slices) > 1:
            first = self.slices[min(self.slices)]
            if len(first) == num_partitions:
                self.local = first
        return self

    def flat(self, i):
        return i if self.local is None else self.local[i]

    def coords(self, i):
        return np.unravel_index(self.flat(i), self.shape)

    def group_axis(self, groups) -> str:
        """The mesh axes the groups vary along (``"data"``, ``"stage,data"``), with ``[n of m]`` for
        part of an axis; groups that differ are joined by ``|``."""
        labels = set()
        for group in groups:
            if len(group) <= 1:
                labels.add("none")
                continue
            coords = np.array([self.coords(i) for i in group])
            varying = [a for a in range(len(self.shape)) if len(set(coords[:, a])) > 1]
            whole = math.prod(self.shape[a] for a in varying)
            label = ",".join(self.names[a] for a in varying)
            labels.add(label if whole == len(group) else f"{label}[{len(group)} of {whole}]")
        return "|".join(sorted(labels)) if labels else "all"

    def pair_axis(self, pairs) -> tuple:
        """``(axis label, sorted shifts along it)`` of collective-permute pairs."""
        labels, shifts = set(), set()
        for a, b in pairs:
            ca, cb = self.coords(a), self.coords(b)
            differ = [i for i in range(len(self.shape)) if ca[i] != cb[i]]
            labels.add(",".join(self.names[i] for i in differ) or "self")
            if len(differ) == 1:
                shifts.add(int(cb[differ[0]]) - int(ca[differ[0]]))
        return "|".join(sorted(labels)), sorted(shifts)

    def pair_hops(self, pairs, wrap=NO_WRAP):
        """Per pair, the ICI hops between its two chips (None across slices); None for devices
        without coordinates (CPU, GPU) or without ``devices``."""
        if self.devices is None:
            return None
        dims = physical_grid(self.devices)[1]
        if dims is None:
            return None
        return [hop(self.devices[self.flat(a)], self.devices[self.flat(b)], wrap, dims) for a, b in pairs]
