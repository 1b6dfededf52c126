"""Device layouts: a mesh with a ``stage`` axis and an optional ``data`` axis."""

import dataclasses

from lpjax.errors import ConfigError

EXECUTORS = ("mpmd", "spmd")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a staged model runs: a ``(stage, data)`` mesh of ``stages x data`` devices.

    Attributes:
      stages: devices along the ``stage`` axis; the executor requires it to equal the model's stage
        count (stage k runs on row k).
      data: devices per stage; a stage's microbatches are split over them (data parallelism inside
        a stage, gradients averaged).
      executor: ``"mpmd"`` (each stage jitted on its own row, activations moved between rows) or
        ``"spmd"`` (all stages as one program over the ``stage`` axis).

    Construction raises ConfigError for a count below 1 or an unknown executor. The devices are
    taken when a Trainer is built (the first ``stages x data`` of ``jax.devices()``); a layout needing
    more than are visible is refused there.
    """

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
    def num_devices(self) -> int:
        """``stages * data``: the devices the layout uses."""
        return self.stages * self.data
