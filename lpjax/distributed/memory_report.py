"""Per-device memory of a compiled program against the chip's HBM.

``compiled.memory_analysis()`` gives, per device, argument, output, alias (outputs that reuse donated
arguments), temporary and generated-code bytes (and host_* twins for host-offloaded memory), on jax
0.10.2 and 0.12 alike, with ``peak_memory_in_bytes`` on both. Where the peak is missing or 0 the
report takes ``argument + output + temp - alias`` (an upper bound: every temporary live at once) and
marks it "computed".

Generated code is program memory on the device: on TPU it must fit in HBM beside the buffers (the
compiler's own check counts it), so ``needed = peak + generated_code`` is what is compared with HBM.
A deviceless TPU compile that does not fit fails with ``RESOURCE_EXHAUSTED: ... CompileTimeHbmOom``
naming the required and available sizes; ``from_oom_error`` makes that a report too.
"""

import dataclasses
import json
import re

GiB = 2 ** 30
FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
          "host_alias_size_in_bytes", "host_temp_size_in_bytes", "host_generated_code_size_in_bytes",
          "peak_memory_in_bytes", "total_allocation_bytes", "peak_unpadded_heap_bytes")


@dataclasses.dataclass
class MemoryReport:
    """One program's bytes per device; ``needed`` (peak + generated code) is what must fit in ``hbm``."""

    program: str
    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int
    peak: int
    peak_source: str  # "peak_memory_in_bytes", "computed" or "compile error"
    hbm: int | None  # bytes one device may use (None: unknown, e.g. CPU)
    host: dict = dataclasses.field(default_factory=dict)  # host_* fields that are non-zero
    compile_seconds: float | None = None
    error: str | None = None

    @property
    def needed(self) -> int:
        return self.peak + self.generated_code

    @property
    def fits(self) -> bool | None:
        if self.error is not None:
            return False
        return None if self.hbm is None else self.needed <= self.hbm

    @property
    def headroom(self) -> int | None:
        """HBM left over (negative: the shortfall)."""
        return None if self.hbm is None else self.hbm - self.needed

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(needed=self.needed, fits=self.fits, headroom=self.headroom)
        return d

    def shortfall_line(self) -> str | None:
        """The one line ``lpjax train --compile-only`` prints when it exits 1."""
        if self.fits is not False:
            return None
        return (f"{self.program} does not fit: needs {gib(self.needed)} per device, HBM has {gib(self.hbm)} "
                f"(short by {gib(-self.headroom)})")


def memory_stats(compiled) -> dict:
    """The fields of ``compiled.memory_analysis()`` that this jax has, as ints ({} when it gives none)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    if isinstance(stats, (list, tuple)):  # a few backends answered one per device
        stats = stats[0]
    return {f: int(getattr(stats, f)) for f in FIELDS if isinstance(getattr(stats, f, None), int)}


def memory_report(compiled, program: str = "program", hbm: int | None = None, compile_seconds=None) -> MemoryReport:
    """The memory of one compiled program.

    Args:
      compiled: a ``jax.stages.Compiled``.
      program: the name the report and the shortfall line give it.
      hbm: the bytes one device may use (``Topology.hbm_bytes``); None where unknown (CPU).
      compile_seconds: how long the compile took.

    Returns:
      The ``MemoryReport``.
    """
    return from_stats(memory_stats(compiled), program, hbm, compile_seconds)


def from_stats(stats: dict, program: str = "program", hbm: int | None = None, compile_seconds=None) -> MemoryReport:
    """``memory_report`` from ``memory_stats``' fields (a jaxlib without ``peak_memory_in_bytes``: the
    peak is computed and marked so)."""
    arg, out, alias, temp = (stats.get(f"{k}_size_in_bytes", 0) for k in ("argument", "output", "alias", "temp"))
    peak = stats.get("peak_memory_in_bytes") or 0
    source = "peak_memory_in_bytes"
    if peak <= 0:
        peak, source = arg + out + temp - alias, "computed"
    host = {k: v for k, v in stats.items() if k.startswith("host_") and v}
    return MemoryReport(program, arg, out, alias, temp, stats.get("generated_code_size_in_bytes", 0), peak, source,
                        hbm, host, compile_seconds)


_OOM = re.compile(r"required for (?:HLO temporaries|[^(]*) \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM \(([\d.]+)([KMGT]?)i?B?\)")
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def is_oom(err) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "HbmOom" in text or "Ran out of memory" in text


def from_oom_error(err, program: str = "program", hbm: int | None = None, compile_seconds=None) -> MemoryReport:
    """A failing report from the TPU compiler's out-of-memory error: the compile itself fails when a
    program does not fit ("the total memory required for HLO temporaries (30.00G) exceeds available
    HBM (15.75G)"; G = GiB, two decimals).

    Args:
      err: the exception ``lowered.compile()`` raised (``is_oom(err)``).
      program, hbm, compile_seconds: as for ``memory_report``; the error's HBM figure wins over ``hbm``.

    Returns:
      A ``MemoryReport`` whose ``needed`` is the error's required size and whose ``error`` is its first line.
    """
    text = str(err)
    m = _OOM.search(text)
    needed = available = 0
    if m:
        needed = int(float(m.group(1)) * _UNIT[m.group(2)])
        available = int(float(m.group(3)) * _UNIT[m.group(4)])
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    return MemoryReport(program, 0, 0, 0, needed, 0, needed, "compile error", available or hbm, {},
                        compile_seconds, first.strip()[:300])


def gib(n) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.2f} MiB"


def format_table(reports) -> str:
    """One line per program: its bytes per device, what must fit (peak + generated code) and against what."""
    width = max([14] + [len(r.program) for r in reports])
    head = (f"{'program':<{width}} {'argument':>11} {'output':>11} {'temp':>11} {'code':>11} {'alias':>11} "
            f"{'peak':>11} {'peak+code':>11} {'HBM':>11} {'fits':>5} {'headroom':>12} {'compile':>8}")
    lines = [head, "-" * len(head)]
    for r in reports:
        fits = {True: "yes", False: "NO", None: "?"}[r.fits]
        secs = "-" if r.compile_seconds is None else f"{r.compile_seconds:.1f}s"
        peak = gib(r.peak) + ("*" if r.peak_source == "computed" else "")
        lines.append(f"{r.program:<{width}} {gib(r.argument):>11} {gib(r.output):>11} {gib(r.temp):>11} "
                     f"{gib(r.generated_code):>11} {gib(r.alias):>11} {peak:>11} {gib(r.needed):>11} {gib(r.hbm):>11} "
                     f"{fits:>5} {gib(r.headroom):>12} {secs:>8}")
    if any(r.peak_source == "computed" for r in reports):
        lines.append("* peak computed as argument + output + temp - alias (memory_analysis gave none)")
    lines += [f"{r.program}: {r.error}" for r in reports if r.error]
    return "\n".join(lines)


def to_json(reports) -> str:
    return json.dumps({"memory": [r.as_dict() for r in reports]}, indent=1)
