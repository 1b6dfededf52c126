"""Multi-process start-up: one JAX process per host (or, on CPU, per emulated device).

Coordinator address, process count and process id come from arguments or from the environment
(``LPJAX_COORDINATOR``, ``LPJAX_NUM_PROCESSES``, ``LPJAX_PROCESS_ID``). With none of them set,
``jax.distributed.initialize()`` is called without arguments, so JAX's own cluster detection
(SLURM, Cloud TPU, Open MPI) applies.
"""

import os

import jax

from .errors import ConfigError

ENV = ("LPJAX_COORDINATOR", "LPJAX_NUM_PROCESSES", "LPJAX_PROCESS_ID")


def settings_from_env():
    values = [os.environ.get(name) for name in ENV]
    if not any(values):
        return None
    if not all(values):
        missing = [name for name, value in zip(ENV, values) if not value]
        raise ConfigError(f"multi-process launch needs {', '.join(ENV)}; missing {', '.join(missing)}")
    coordinator, count, pid = values
    try:
        return coordinator, int(count), int(pid)
    except ValueError:
        raise ConfigError("LPJAX_NUM_PROCESSES and LPJAX_PROCESS_ID must be integers") from None


def initialize(coordinator=None, num_processes=None, process_id=None, *, cluster_detection=False):
    """Join the process group. Call before any other JAX call. Returns ``(process_id, count)``."""
    if coordinator is None and num_processes is None and process_id is None:
        settings = settings_from_env()
        if settings is not None:
            coordinator, num_processes, process_id = settings
        elif not cluster_detection:
            return 0, 1
    if num_processes is not None and not 0 <= int(process_id) < int(num_processes):
        raise ConfigError(f"process id {process_id} is outside 0..{int(num_processes) - 1}")
    # CPU devices of different processes need a collectives backend; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return jax.process_index(), jax.process_count()
