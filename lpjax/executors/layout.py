"""Device layouts: a mesh with a ``stage`` axis and an optional ``data`` axis."""

import dataclasses

from lpjax.errors import ConfigError

EXECUTORS = ("mpmd", "spmd")


@dataclasses.dataclass(frozen=True)
class Layout:
    """``stages`` x ``data`` devices. ``executor`` picks per-stage jit (mpmd) or one program (spmd)."""

    stages: int
    data: int = 1
    executor: str = "mpmd"

    def __post_init__(self):
        for name in ("stages", "data"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"layout.{name} must be a positive integer, got {value!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.executor!r}; choose one of {', '.join(EXECUTORS)}")

    @property
    def num_devices(self):
        return self.stages * self.data
