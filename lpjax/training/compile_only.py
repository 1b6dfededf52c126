"""Will it fit on my pod? Compile a recipe's training programs for a TPU topology that is not attached.

    lpjax train --config RECIPE --topology v5e:4x4 --compile-only [--num-slices N] [--workdir DIR]

As MaxText's ``train_compile.py`` does for its train step: the target's devices come from libtpu
without any TPU (``topology.describe``), the model and every buffer are abstract (shapes, dtypes and
shardings: nothing of the model is allocated on any host), and each program a run uses is lowered on
the target's mesh and compiled by the TPU compiler. What the compiler says is the answer: per device
and per program, the memory against the chip's HBM (``lpjax.distributed.memory_report``), the compile
time, and the collectives per clock and per step with the hops of each ppermute pair
(``lpjax.distributed.hlo_collectives``). ``--topology cpu`` compiles for this host's CPU devices.

Exit codes (``lpjax.cli``): 0 when every program fits; 1 with one line naming the first program that
does not and by how much; 2 for an unknown topology, a layout the topology cannot hold, or no libtpu.
"""

import dataclasses
import json
import os
import time

from lpjax.distributed import hlo_collectives, memory_report
from lpjax.errors import ConfigError
from lpjax.executors import topology as topologies
from lpjax.executors import torus

REPORT_FILE = "compile_only.json"
PAIRS_SHOWN = 24  # ppermute pairs printed per collective; the JSON holds them all


@dataclasses.dataclass
class ProgramReport:
    """One compiled program: its memory per device, its collectives, and how long lowering and compiling took."""

    name: str
    memory: memory_report.MemoryReport
    collectives: list
    lower_seconds: float

    def as_dict(self) -> dict:
        return {"name": self.name, "memory": self.memory.as_dict(), "lower_seconds": round(self.lower_seconds, 3),
                "collectives": hlo_collectives.summarize(self.collectives),
                "bytes_per_step_per_axis": hlo_collectives.bytes_per_axis(self.collectives),
                "ppermute_hops": hlo_collectives.hop_pairs(self.collectives)}


@dataclasses.dataclass
class CompileReport:
    """Every program of a run compiled for one target, and where the mesh put the stages."""

    target: str
    layout: tuple  # (stages, data)
    mesh: object  # the jax Mesh the programs were lowered on
    placement: dict  # the stage-neighbour hops of that mesh (torus.hop_summary)
    programs: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)  # lines printed under the tables

    @property
    def fits(self) -> bool:
        return all(p.memory.fits is not False for p in self.programs)

    def shortfall_line(self) -> str | None:
        """The first program that does not fit, and by how much; None when all do."""
        return next((p.memory.shortfall_line() for p in self.programs if p.memory.fits is False), None)

    def step_bytes_per_axis(self) -> dict:
        """Bytes per step per mesh axis of the step programs (the largest of them, axis by axis)."""
        out = {}
        for program in self.programs:
            if program.name.startswith("step"):
                for axis, n in hlo_collectives.bytes_per_axis(program.collectives).items():
                    out[axis] = max(out.get(axis, 0), n)
        return out

    def as_dict(self) -> dict:
        stages, data = self.layout
        return {"target": self.target, "layout": {"stages": stages, "data": data}, "placement": self.placement,
                "fits": self.fits, "shortfall": self.shortfall_line(), "notes": self.notes,
                "programs": [p.as_dict() for p in self.programs]}

    def text(self) -> str:
        stages, data = self.layout
        lines = [f"target {self.target}: mesh stage={stages} x data={data}, stage neighbours "
                 f"{_hops_phrase(self.placement)}; every device runs the same program, so the figures are per device",
                 "", memory_report.format_table([p.memory for p in self.programs])]
        for program in self.programs:
            if not program.collectives:
                continue
            lines += ["", f"{program.name}: collectives (per clock: once per clock of the scan; per step: "
                          f"times the trip counts)", hlo_collectives.format_table(hlo_collectives.summarize(program.collectives))]
            lines += [f"  {line}" for line in _pair_lines(program, self.mesh)]
        lines += [""] + self.notes if self.notes else []
        return "\n".join(lines)


def _hops_phrase(summary: dict) -> str:
    if summary.get("max_hops") is None:
        return "without chip coordinates (CPU devices)"
    dcn = f", {summary['dcn_pairs']} pairs across slices" if summary.get("dcn_pairs") else ""
    return f"at most {summary['max_hops']} hop(s) apart (mean {summary['mean_hops']}){dcn}"


def _pair_lines(program, mesh) -> list:
    """Each ppermute's pairs as ``s0d1->s1d1:1`` (stage, data position; ICI hops, ``dcn`` across slices)."""
    import numpy as np

    lines = []
    for entry in hlo_collectives.hop_pairs(program.collectives):
        def where(i):
            s, d = np.unravel_index(i, mesh.devices.shape)
            return f"s{s}d{d}"

        shown = [f"{where(a)}->{where(b)}:{'-' if h is None else h}" for a, b, h in entry["pairs"][:PAIRS_SHOWN]]
        more = f" ... ({len(entry['pairs'])} pairs)" if len(entry["pairs"]) > PAIRS_SHOWN else ""
        lines.append(f"ppermute {entry['name']} over {entry['axis']} (pair: hops): {' '.join(shown)}{more}")
    return lines


def compile_program(name: str, lowered, hbm, mesh=None, wrap=torus.NO_WRAP, lower_seconds: float = 0.0) -> ProgramReport:
    """Compile one lowered program and read its memory and collectives.

    Args:
      name: the program's name in the report.
      lowered: a ``jax.stages.Lowered`` for the target's devices.
      hbm: the bytes one device may use (None: unknown, the host's CPU).
      mesh, wrap: the mesh it was lowered on and the topology's wraparound, to name axes and count hops.
      lower_seconds: how long tracing and lowering took.

    Returns:
      The ``ProgramReport``. A program the TPU compiler refuses for lack of HBM is a failing report
      built from the compiler's error; any other compile error is raised.
    """
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # the TPU compiler's only verdict on a program that does not fit is an error
        if not memory_report.is_oom(err):
            raise
        report = memory_report.from_oom_error(err, name, hbm, time.perf_counter() - start)
        return ProgramReport(name, report, [], lower_seconds)
    seconds = time.perf_counter() - start
    colls = hlo_collectives.collectives(compiled.as_text(), mesh, wrap=wrap)
    return ProgramReport(name, memory_report.memory_report(compiled, name, hbm, seconds), colls, lower_seconds)


def check_layout_fills(target, stages: int, data: int) -> None:
    """A compile-only layout uses every device of the target; ``ConfigError`` naming the layouts that do."""
    n = len(target.devices)
    if stages * data != n:
        grids, dims = torus.physical_grid(target.devices)
        fits = torus.format_layouts(torus.fitting_layouts(n, dims, target.num_slices))
        raise ConfigError(f"layout stages={stages} x data={data} uses {stages * data} of {target.name}'s {n} devices; "
                          f"set --config.layout.data={max(1, n // stages)} or pick a layout that fits: {fits}")


def write_report(report: CompileReport, workdir: str | None) -> str | None:
    """The report as ``compile_only.json`` in ``workdir`` (created if needed); returns the path."""
    if not workdir:
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, REPORT_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(report.as_dict(), f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def describe_target(topology: str, num_slices: int | None = None):
    """The target's devices: libtpu's for a TPU topology (its environment set first), the host's for ``cpu``."""
    topologies.quiet_libtpu_env()
    return topologies.describe(topology, num_slices)


def compile_only(config, topology: str, workdir: str | None = None, *, num_slices: int | None = None,
                 programs: tuple | None = None, progress=None) -> CompileReport:
    """Compile every program a training run of ``config`` uses for ``topology``, and report.

    Args:
      config: a recipe's config (``ml_collections.ConfigDict`` or dict); its layout must be the spmd
        executor's, with ``stages x data`` equal to the topology's devices.
      topology: a TPU topology name (``lpjax.executors.topology.parse_topology``) or ``"cpu"``.
      workdir: where to write ``compile_only.json`` (nothing is written when None).
      num_slices: the topology's slices, if not in its name.
      programs: compile only the programs whose names start with one of these (``"init"``,
        ``"step (first"``, ...); None compiles every one.
      progress: called with a line as each program is compiled (a 1.2B model's take minutes each).

    Returns:
      The ``CompileReport`` (``report.fits``, ``report.shortfall_line()``, ``report.text()``).
      ``ConfigError`` (one line) for an unknown topology, a missing libtpu, or a layout that does
      not fill the topology.
    """
    from lpjax.config.build import build_experiment, resolve

    target = describe_target(topology, num_slices)
    cfg = resolve(config)
    if cfg["layout"]["executor"] != "spmd":
        raise ConfigError(f"--compile-only compiles the spmd executor's programs, not {cfg['layout']['executor']!r}'s; "
                          f"set --config.layout.executor=spmd")
    stages = cfg["layout"]["stages"] or cfg["stages"]
    if stages is not None:
        check_layout_fills(target, stages, cfg["layout"]["data"])
    experiment = build_experiment(config, devices=target.devices, abstract=True)
    trainer = experiment.trainer
    mesh = trainer.executor.mesh
    check_layout_fills(target, mesh.shape["stage"], mesh.shape["data"])
    report = CompileReport(target.name, (mesh.shape["stage"], mesh.shape["data"]), mesh,
                           torus.hop_summary(torus.stage_hops(mesh.devices, target.wrap)))
    x, y = experiment.dataset.example_batch(experiment.config["batch_size"])
    xs, ys = trainer.split_batch(x, y)
    eval_x, eval_y = experiment.dataset.example_batch(experiment.config["eval_batch_size"])
    for name, lowered, seconds in trainer.executor.lowered_programs(_spec(xs[0]), _spec(ys[0]),
                                                                    eval_batch=(_spec(eval_x), _spec(eval_y))):
        if programs is None or name.startswith(tuple(programs)):
            report.programs.append(compile_program(name, lowered, target.hbm_bytes, mesh, target.wrap, seconds))
            if progress is not None:
                memory = report.programs[-1].memory
                of = f", HBM {memory_report.gib(memory.hbm)}" if memory.hbm else ""
                progress(f"compiled {name} in {memory.compile_seconds:.1f} s: peak + code "
                         f"{memory_report.gib(memory.needed)} per device{of}")
    report.notes += _slice_notes(report, target)
    write_report(report, workdir)
    return report


def _spec(array):
    """An array's shape and dtype, the dtype as jax stores it (int64 labels are int32 without x64)."""
    import jax
    import numpy as np

    return jax.ShapeDtypeStruct(np.shape(array), jax.dtypes.canonicalize_dtype(np.asarray(array).dtype))


def _slice_notes(report: CompileReport, target) -> list:
    """Which mesh axis moves fewer bytes per step, measured in the step programs, and so belongs across
    slices (over DCN, much slower than ICI); what this run did with several slices."""
    measured = {axis: n for axis, n in report.step_bytes_per_axis().items() if axis in ("stage", "data")}
    if not measured:
        return []
    best = torus.choose_slice_axis(measured)
    other = "data" if best == "stage" else "stage"
    line = (f"across slices belongs '{best}': the step programs move {memory_report.gib(measured.get(best, 0))} per "
            f"step and device over it against {memory_report.gib(measured.get(other, 0))} over '{other}'")
    if target.num_slices > 1:
        used = "stage"  # make_stage_mesh's default (torus.choose_slice_axis without a measurement)
        line += f"; this run put its {target.num_slices} slices on '{used}'" + (
            "" if used == best else f", where '{best}' would send less over DCN (make_stage_mesh(..., slices_on='{best}'))")
    return [line]
