"""The collectives of a compiled program, read from its HLO text: kind, mesh axis, bytes, and how
often each runs per clock and per step.

Bytes are the result shape's (a tuple's elements summed). An async ``-start``/``-done`` pair counts
once, with the ``-done`` result's bytes: a ``collective-permute-start`` tuple also holds its operand
and two context scalars. A collective inside while loops runs once per iteration of the innermost
one, which for lpjax's SPMD program is the scan over clocks ("per clock"); its per-step count is the
product of the loops' trip counts (``hlo_text.trip_count``). Outside any loop it runs once per step.
Inside a 0-or-1-trip loop (lpjax's per-stage task and update branches, ``hlo_text.runs_at_most_once``)
it runs only on its stage's devices and only when the branch runs: its scope says "one branch", its
per-step count is an upper bound (every clock), and a device's bytes per step count only the largest
of the branches, since each device runs its own stage's.

A multi-slice TPU program is compiled per slice: collectives within a slice are ordinary ones, and
the cross-slice part is a ``send``/``recv`` pair for the megascale runtime over DCN, counted once per
``send`` as ``<kind> (dcn)``. Two TPU compiler habits show in the bytes: the activation a ppermute
sends crosses ICI as bf16 when the matmul that made it runs at default precision (XLA converts early),
and an all_gather of a scalar becomes an all-reduce.
"""

import dataclasses
import json
import math
import re

from lpjax.distributed.hlo_text import called_computations, closing, parse_module, runs_at_most_once, shape_bytes, trip_count
from lpjax.distributed.replica_groups import AxisMap, parse_groups
from lpjax.executors.torus import NO_WRAP

BRANCH = "0-1"  # the trip count of a 0-or-1-trip loop in ``Collective.loops``
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all", "collective-broadcast",
         "ragged-all-to-all")
_PRIMITIVES = {"ppermute": "collective-permute", "psum": "all-reduce", "pmean": "all-reduce", "pmax": "all-reduce",
               "pmin": "all-reduce", "all_gather": "all-gather", "all_to_all": "all-to-all",
               "reduce_scatter": "reduce-scatter", "psum_scatter": "reduce-scatter"}


@dataclasses.dataclass
class Collective:
    kind: str
    name: str  # the HLO instruction
    computation: str
    bytes: int
    axis: str | None  # the mesh axes it spans (AxisMap.group_axis / pair_axis)
    groups: list | None = None
    pairs: list | None = None  # (source, target) mesh positions (index into mesh.devices.flat)
    shifts: list | None = None  # for pairs along one axis: target - source
    loops: list = dataclasses.field(default_factory=list)  # [(while, trips, None or BRANCH)], outermost first
    is_async: bool = False
    op_name: str | None = None  # the JAX operation it came from
    pair_hops: list | None = None  # per pair, ICI hops (None across slices)
    dcn: bool = False  # a cross-slice transfer, not an ICI collective

    @property
    def branch(self) -> str | None:
        """The innermost 0-or-1-trip loop it runs in (a stage's task or update branch), or None."""
        return next((name for name, trips in reversed(self.loops) if trips == BRANCH), None)

    @property
    def scope(self) -> str:
        counted = any(trips != BRANCH for _, trips in self.loops)
        return ("per clock" if counted else "per step") + (", one branch" if self.branch else "")

    @property
    def per_step_count(self):
        """Runs per execution of the program: the product of its loops' trip counts (None if one is
        unknown); inside a branch, at most that."""
        trips = [t for _, t in self.loops if t != BRANCH]
        return None if any(t is None for t in trips) else math.prod(trips)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(scope=self.scope, per_step_count=self.per_step_count)
        if self.groups is not None and len(self.groups) > 8:
            d["groups"] = self.groups[:8] + [["..."]]
        if self.pairs is not None and len(self.pairs) > 16:
            d["pairs"] = self.pairs[:16] + [["..."]]
        return d


def _loop_chains(computations, entry) -> dict:
    """Per computation, the chains of while loops it runs under: ``{name: [[(while, trips)]]}``."""
    out, seen, stack = {}, set(), [(entry, ())]
    while stack:
        name, chain = stack.pop()
        if (name, chain) in seen or name not in computations:
            continue
        seen.add((name, chain))
        out.setdefault(name, []).append(list(chain))
        for inst in computations[name]:
            for callee, role in called_computations(inst):
                if inst.opcode == "while" and role == "body":
                    trips = BRANCH if runs_at_most_once(inst, computations) else trip_count(inst, computations)[0]
                    stack.append((callee, chain + ((inst.name, trips),)))
                elif not (inst.opcode == "while" and role == "condition"):
                    stack.append((callee, chain))
    return out


def collectives(hlo_text: str, mesh=None, axis_map: AxisMap | None = None, wrap=NO_WRAP) -> list:
    """Every collective of a compiled program.

    Args:
      hlo_text: ``compiled.as_text()``.
      mesh: the mesh the program was lowered on, to name axes and count hops; or ``axis_map``.
      wrap: the topology's wraparound links (``Topology.wrap``), for hops.

    Returns:
      ``[Collective]``, one per (instruction, chain of loops it runs under).
    """
    computations, entry = parse_module(hlo_text)
    if axis_map is None and mesh is not None:
        axis_map = AxisMap.from_mesh(mesh)
    partitions = re.search(r"num_partitions=(\d+)", hlo_text)
    num_devices = int(partitions.group(1)) if partitions else None
    if axis_map is not None:
        axis_map.for_partitions(num_devices)
    chains = _loop_chains(computations, entry)
    done_shape = {inst.operands[0]: inst.shape for insts in computations.values() for inst in insts
                  if inst.opcode.endswith("-done") and inst.operands}
    out = []
    for name, insts in computations.items():
        for inst in insts:
            if inst.opcode == "send" and "xla_megascale_runtime" in inst.attrs:
                out += [_dcn_collective(inst, chain, axis_map) for chain in chains.get(name, [])]
                continue
            is_async = inst.opcode.endswith("-start")
            kind = inst.opcode[:-len("-start")] if is_async else inst.opcode
            if kind not in KINDS:
                continue
            shape = done_shape.get(inst.name, inst.shape) if is_async else inst.shape
            form, value = parse_groups(inst.attrs, num_devices)
            op_name = re.search(r'op_name="([^"]*)"', inst.attrs)
            axis = shifts = hops = None
            if axis_map is not None and form == "groups":
                axis = axis_map.group_axis(value)
            elif axis_map is not None and form == "pairs":
                axis, shifts = axis_map.pair_axis(value)
                hops = axis_map.pair_hops(value, wrap)
                value = [(axis_map.flat(a), axis_map.flat(b)) for a, b in value]  # as mesh positions
            for chain in chains.get(name, []):
                out.append(Collective(kind, inst.name, name, shape_bytes(shape), axis,
                                      value if form == "groups" else None, value if form == "pairs" else None,
                                      shifts, chain, is_async, op_name.group(1) if op_name else None, hops))
    return out


def _dcn_collective(inst, chain, axis_map) -> Collective:
    """A cross-slice ``send``: named after the JAX primitive (``_xla_host_transfer_rendezvous=
    "ppermute.8_0"``), with global device-id pairs (``_xla_megascale_target={{100048->200000},...}``)
    or, for a reduction, ``"{1,2}x{0:63}"`` (slices x in-slice ids); bytes: the sent operand."""
    rendezvous = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', inst.attrs)
    primitive = re.sub(r"\.\d+(_\d+)?$", "", rendezvous.group(1)) if rendezvous else "?"
    operand = inst.shape[1:closing(inst.shape, 0) - 1] if inst.shape.startswith("(") else inst.shape
    first = re.match(r"\s*([a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)", operand)
    pairs = [(int(a), int(b)) for a, b in re.findall(r"\{(\d+)->(\d+)\}", inst.attrs)]
    axis = groups = None
    if axis_map is not None:
        saved, axis_map.local = axis_map.local, None  # global ids: mesh positions over every slice
        if pairs and axis_map.by_device_id:
            flat = [(axis_map.by_device_id.get(a), axis_map.by_device_id.get(b)) for a, b in pairs]
            flat = [(a, b) for a, b in flat if a is not None and b is not None]
            axis = axis_map.pair_axis(flat)[0] if flat else None
        elif axis_map.slices:
            span = re.search(r'_xla_megascale_target="\{[\d,]*\}x\{(\d+):(\d+)\}"', inst.attrs)
            if span:
                members = list(axis_map.slices.values())
                lo, hi = int(span.group(1)), int(span.group(2))
                groups = [[m[i] for m in members] for i in range(lo, min(hi + 1, len(members[0])))]
                axis = axis_map.group_axis(groups)
        axis_map.local = saved
    op_name = re.search(r'op_name="([^"]*)"', inst.attrs)
    return Collective(_PRIMITIVES.get(primitive, primitive), inst.name, inst.computation,
                      shape_bytes(first.group(1)) if first else 0, axis, groups, pairs or None, None, chain, True,
                      op_name.group(1) if op_name else primitive, None, dcn=True)


def summarize(colls) -> list:
    """Rows ``{kind, axis, scope, count, bytes, branches, per_step_count, per_step_bytes, trip_counts,
    max_pair_hops}``: per clock (one iteration of the innermost loop) and per step (times the trips).
    Collectives in 0-or-1-trip branches are one row per kind, axis and loops, holding the largest
    branch (what one device runs) and how many branches there are."""
    groups = {}
    for c in colls:
        kind = c.kind + (" (dcn)" if c.dcn else "")
        key = (kind, c.axis, c.scope, tuple(t for _, t in c.loops))
        groups.setdefault(key, {}).setdefault(c.branch, []).append(c)
    rows = []
    for (kind, axis, scope, trips), by_branch in groups.items():
        members = max(by_branch.values(), key=lambda cs: sum(c.bytes for c in cs))
        counts = [c.per_step_count for c in members]
        known = None not in counts
        row = {"kind": kind, "axis": axis, "scope": scope, "count": len(members), "bytes": sum(c.bytes for c in members),
               "branches": len(by_branch) if None not in by_branch else 0,
               "per_step_count": sum(counts) if known else None,
               "per_step_bytes": sum(n * c.bytes for n, c in zip(counts, members)) if known else None,
               "trip_counts": list(trips), "max_pair_hops": None}
        for c in (c for cs in by_branch.values() for c in cs):
            if c.dcn:
                row["max_pair_hops"] = "dcn"
            elif c.pair_hops:
                ici = [h for h in c.pair_hops if h is not None]
                most = "dcn" if len(ici) < len(c.pair_hops) else max(ici, default=None)
                row["max_pair_hops"] = most if row["max_pair_hops"] in (None, most) else "mixed"
        rows.append(row)
    return sorted(rows, key=lambda r: (not r["scope"].startswith("per clock"), r["scope"], r["kind"], str(r["axis"])))


def bytes_per_axis(colls) -> dict:
    """Per mesh axis label, the bytes one device moves per step (unknown trip counts count once).
    Of the collectives in 0-or-1-trip branches only the largest branch counts, at every clock: a
    device runs its own stage's, at most once a clock, so this is an upper bound."""
    out, branches = {}, {}
    for c in colls:
        moved = c.bytes * (c.per_step_count or 1)
        if c.branch is None:
            out[c.axis] = out.get(c.axis, 0) + moved
        else:
            axis = branches.setdefault(c.axis, {})
            axis[c.branch] = axis.get(c.branch, 0) + moved
    for axis, sizes in branches.items():
        out[axis] = out.get(axis, 0) + max(sizes.values())
    return out


def hop_pairs(colls) -> list:
    """Per collective-permute within a slice: its axis, and each ``(source, target, hops)`` pair (ids
    are mesh positions; hops ``"dcn"`` across slices, None for devices without coordinates)."""
    out = []
    for c in colls:
        if c.kind != "collective-permute" or not c.pairs or c.dcn:
            continue
        hops = ["dcn" if h is None else h for h in c.pair_hops] if c.pair_hops is not None else [None] * len(c.pairs)
        out.append({"name": c.name, "axis": c.axis, "loops": [t for _, t in c.loops],
                    "pairs": [(a, b, h) for (a, b), h in zip(c.pairs, hops)]})
    return out


def format_table(rows) -> str:
    head = (f"{'scope':<21} {'kind':<25} {'axis':<12} {'count':>5} {'bytes':>14} {'trips':>8} {'step count':>10} "
            f"{'step bytes':>16} {'hops':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        trips = "x".join("?" if t is None else str(t) for t in r["trip_counts"]) or "-"
        hops = "-" if r["max_pair_hops"] is None else r["max_pair_hops"]
        bound = "<=" if r["branches"] else ""
        lines.append(f"{r['scope']:<21} {r['kind']:<25} {str(r['axis']):<12} {r['count']:>5} {r['bytes']:>14,} "
                     f"{trips:>8} {bound + _count(r['per_step_count']):>10} {bound + _count(r['per_step_bytes']):>16} "
                     f"{hops:>5}")
    branches = max((r["branches"] for r in rows), default=0)
    if branches:
        lines.append(f"one branch: in one of {branches} loops of 0 or 1 trips (a stage's task or update), which run only "
                     f"on their stage's devices; the largest is shown, and its step figures are at most that")
    return "\n".join(lines)


def _count(value):
    return "?" if value is None else f"{value:,}"


def to_json(colls) -> str:
    return json.dumps({"collectives": [c.as_dict() for c in colls], "summary": summarize(colls)}, indent=1, default=str)
