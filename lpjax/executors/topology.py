"""TPU topologies that need not be attached: their names, their compile-only devices and their HBM.

A name is ``KIND:AxB[xC]``, the chips along each physical axis of one slice, as libtpu's
``get_topology_desc`` takes it: ``v5e:4x4``, ``v5e:16x16``, ``v5p:4x4x4`` (libtpu also says ``v5``),
``v4:4x4x4``, ``v6e:4x4``, ``tpu7x:2x2x2``. Several slices take an ``Nx`` prefix (``2xv4:4x4x4``), so
one string fits a command-line flag and a recipe field. Cloud names such as ``v5litepod-16`` are
refused with the form to use: the number after the dash counts chips on some kinds and cores on others.

``describe(name)`` gives the slice's devices without any TPU attached ("deviceless AOT"): programs
lowered on a mesh of them compile for that topology with libtpu, from the package registry
(``pip install 'lpjax[tpu]'``). ``describe("cpu")`` is this host's own CPU devices, a valid target too.

The rules libtpu does not apply itself are ours, from MaxText's ``accelerator_to_spec_map``:
chips per host are 2x2x1 (a smaller slice whole, and 2x4 for 8-chip v5e/v6e: one host in the
cloud); and the wraparound links, which libtpu's topology leaves out unless told (``wrap=``):
v4/v5p/tpu7x wrap every axis once all axes are multiples of 4, v5e/v6e wrap an axis of 16 chips
(16x16 both, 8x16 the second, 4x4 none).
"""

import dataclasses
import importlib.util
import math
import os
import re

from lpjax.errors import ConfigError

GiB = 2 ** 30
INSTALL_HINT = "pip install 'lpjax[tpu]'"
CPU = "cpu"


@dataclasses.dataclass(frozen=True)
class ChipKind:
    name: str  # lpjax's name
    libtpu_name: str  # the prefix get_topology_desc accepts
    ndim: int  # physical axes of a slice
    chip_config: str  # "default" or "megacore"
    cores_per_chip: int  # JAX devices per chip
    hbm_bytes: int  # nominal HBM per chip
    usable_hbm_bytes: int | None  # what the TPU compiler says is available; None where not measured
    max_shape: tuple  # the largest single slice
    device_kind: str  # jax's Device.device_kind


# usable_hbm_bytes: the "exceeds available HBM (15.75G)" figure of the CompileTimeHbmOom error that
# libtpu 0.0.50.1 raises when a deviceless compile does not fit (G = GiB). tpu7x is not measured.
CHIPS = {
    "v4": ChipKind("v4", "v4", 3, "megacore", 1, 32 * GiB, int(30.75 * GiB), (16, 16, 16), "TPU v4"),
    "v5e": ChipKind("v5e", "v5e", 2, "default", 1, 16 * GiB, int(15.75 * GiB), (16, 16), "TPU v5 lite"),
    "v5p": ChipKind("v5p", "v5p", 3, "megacore", 1, 95 * GiB, int(95.73 * GiB), (32, 32, 32), "TPU v5"),
    "v6e": ChipKind("v6e", "v6e", 2, "default", 1, 32 * GiB, int(31.24 * GiB), (16, 16), "TPU v6 lite"),
    "tpu7x": ChipKind("tpu7x", "tpu7x", 3, "default", 2, 192 * GiB, None, (32, 32, 32), "TPU7x"),
}
ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v6lite": "v6e", "v7x": "tpu7x"}
CHIP_BY_DEVICE_KIND = {chip.device_kind: chip for chip in CHIPS.values()}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """A parsed topology name: the chip kind, the chips per physical axis of one slice, the slices."""

    chip: ChipKind
    shape: tuple
    num_slices: int = 1

    @property
    def name(self) -> str:
        """libtpu's name for one slice."""
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    def __str__(self):
        prefix = f"{self.num_slices}x" if self.num_slices > 1 else ""
        return f"{prefix}{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape) * self.chip.cores_per_chip * self.num_slices

    @property
    def wrap(self) -> tuple:
        return wraparound(self.chip, self.shape)

    @property
    def chips_per_host_bounds(self) -> tuple:
        return host_bounds(self.chip, self.shape)

    @property
    def hosts(self) -> int:
        return self.num_slices * math.prod(self.shape) // math.prod(self.chips_per_host_bounds)

    @property
    def hbm_bytes(self) -> int:
        return device_hbm_bytes(self.chip)


_NAME = re.compile(r"^(?:(\d+)x(?=[a-z]))?([a-z][a-z0-9]*):(\d+(?:x\d+)*)$")


def parse_topology(text: str, num_slices: int | None = None) -> TopologySpec:
    """Read a topology name.

    Args:
      text: ``KIND:AxB[xC]``, optionally with an ``Nx`` slice prefix.
      num_slices: the slice count, if not in ``text``; both may be given only if they agree.

    Returns:
      The ``TopologySpec``; a one-line ``ConfigError`` naming the expected form for anything else.
    """
    raw = str(text).strip().lower()
    match = _NAME.match(raw)
    example = "e.g. v5e:4x4, v5p:4x4x4, 2xv4:4x4x4"
    if not match:
        if re.match(r"^[a-z0-9]+-\d+$", raw):
            raise ConfigError(f"topology {text!r}: give the chip kind and the chips per axis, not a cloud "
                              f"accelerator name ({example})")
        raise ConfigError(f"unknown topology {text!r}: expected KIND:AxB[xC] with KIND one of {', '.join(CHIPS)} "
                          f"({example}), or 'cpu' for this host's CPU devices")
    prefix, kind, dims = match.groups()
    kind = ALIASES.get(kind, kind)
    if kind not in CHIPS:
        raise ConfigError(f"unknown TPU kind {match.group(2)!r} in topology {text!r}; known kinds: {', '.join(CHIPS)}")
    chip = CHIPS[kind]
    shape = tuple(int(d) for d in dims.split("x"))
    if chip.ndim == 3 and len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != chip.ndim:
        raise ConfigError(f"topology {text!r}: {kind} slices have {chip.ndim} axes, got {len(shape)}")
    if any(d < 1 for d in shape) or any(d > most for d, most in zip(shape, chip.max_shape)):
        raise ConfigError(f"topology {text!r}: a {kind} slice is at most {'x'.join(map(str, chip.max_shape))}")
    bounds = host_bounds(chip, shape)
    if any(d % b for d, b in zip(shape, bounds)):
        raise ConfigError(f"topology {text!r}: each axis must be a multiple of the host's "
                          f"{'x'.join(map(str, bounds[:len(shape)]))} chips")
    slices = int(prefix) if prefix else None
    if slices is not None and num_slices is not None and slices != num_slices:
        raise ConfigError(f"topology {text!r} says {slices} slices but num_slices={num_slices}; give one of them")
    slices = slices or num_slices or 1
    if slices < 1:
        raise ConfigError(f"num_slices must be at least 1, got {slices}")
    return TopologySpec(chip, shape, slices)


def wraparound(chip: ChipKind, shape: tuple) -> tuple:
    """Per physical axis (always 3), whether the slice has a wraparound link along it (a torus)."""
    if chip.ndim == 3:
        return (all(d % 4 == 0 for d in shape),) * 3
    return tuple(d == 16 for d in shape) + (False,)


def host_bounds(chip: ChipKind, shape: tuple) -> tuple:
    """Chips per host along each axis (3 long): 2x2x1, a smaller slice whole, 2x4 for 8-chip v5e/v6e."""
    full = tuple(shape) + (1,) * (3 - len(shape))
    if chip.ndim == 2 and math.prod(shape) == 8:
        return (*full[:2], 1)
    return tuple(min(b, d) for b, d in zip((2, 2, 1), full))


def device_hbm_bytes(chip: ChipKind) -> int:
    """HBM one JAX device of ``chip`` may use: the compiler's figure where measured, else nominal."""
    return (chip.usable_hbm_bytes or chip.hbm_bytes) // chip.cores_per_chip


def hbm_bytes_for(device) -> int | None:
    """HBM one device may use, by its ``device_kind``; None for CPU, GPU or an unknown kind."""
    chip = CHIP_BY_DEVICE_KIND.get(getattr(device, "device_kind", None))
    return None if chip is None else device_hbm_bytes(chip)


def chip_of(device) -> ChipKind | None:
    return CHIP_BY_DEVICE_KIND.get(getattr(device, "device_kind", None))


# -- libtpu ------------------------------------------------------------------------------------
def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def require_libtpu():
    if not libtpu_available():
        raise ConfigError(f"compiling for a TPU topology needs libtpu, which is not installed; {INSTALL_HINT}")


def quiet_libtpu_env(environ=None) -> dict:
    """Set the environment a compile-only run needs on a host without TPUs, keeping what is set.

    Without them libtpu asks the missing TPU VM for its worker hostnames and accelerator type and
    prints two warnings and an INVALID_ARGUMENT line (it compiles anyway), and a second libtpu
    process fails on ``/tmp/libtpu_lockfile``. On a TPU VM these variables describe the real slice,
    so only defaults are set. Call it before jax starts a backend (with libtpu installed, even
    ``jax.devices()`` loads it).

    Args:
      environ: the mapping to update (``os.environ`` when None).

    Returns:
      The variables it set.
    """
    environ = os.environ if environ is None else environ
    defaults = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_SKIP_MDS_QUERY": "1",
                "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "JAX_PLATFORMS": "cpu"}
    set_now = {key: value for key, value in defaults.items() if key not in environ}
    environ.update(set_now)
    return set_now


@dataclasses.dataclass
class Topology:
    """A compile target: its name, its devices (every slice), each device's HBM and the wraparound."""

    name: str
    devices: list
    hbm_bytes: int | None  # None: not known (CPU)
    wrap: tuple = (False, False, False)
    spec: TopologySpec | None = None  # None for the host's CPU devices

    @property
    def num_slices(self) -> int:
        return 1 if self.spec is None else self.spec.num_slices


def describe(text: str, num_slices: int | None = None) -> Topology:
    """The devices of a topology, to lower programs for it.

    Args:
      text: a topology name (``parse_topology``), or ``"cpu"`` for this host's CPU devices.
      num_slices: the slice count, if not in ``text``.

    Returns:
      The ``Topology``. ``ConfigError`` (one line) for an unknown name, or when libtpu is missing
      or refuses the topology.
    """
    if str(text).strip().lower() == CPU:
        import jax

        if num_slices not in (None, 1):
            raise ConfigError(f"the host's CPU devices are one slice, not {num_slices}; drop --num-slices")

        return Topology(CPU, list(jax.devices(CPU)), None)
    spec = parse_topology(text, num_slices)
    require_libtpu()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=spec.name, chip_config_name=spec.chip.chip_config,
            chips_per_host_bounds=spec.chips_per_host_bounds, num_slices=spec.num_slices, wrap=spec.wrap)
    except Exception as err:  # libtpu's errors are long and span many lines
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"libtpu cannot describe topology {str(spec)!r}: {first}") from None
    devices = list(desc.devices)
    if len(devices) != spec.num_devices:
        raise ConfigError(f"topology {str(spec)!r}: libtpu gave {len(devices)} devices, expected {spec.num_devices}")
    return Topology(str(spec), devices, spec.hbm_bytes, spec.wrap, spec)
