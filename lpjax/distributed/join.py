"""Multi-process start-up: one JAX process per host (or, on CPU, per emulated device).

Coordinator address, process count and process id come from arguments or from the environment
(``LPJAX_COORDINATOR``, ``LPJAX_NUM_PROCESSES``, ``LPJAX_PROCESS_ID``). With none of them set,
``jax.distributed.initialize()`` is called without arguments, so JAX's own cluster detection
(SLURM, Cloud TPU, Open MPI) applies.

With two or more processes, a process that dies stops the others too: within the peer timeout
(``peer_timeout_s``, else ``LPJAX_PEER_TIMEOUT``, else 30 s) each survivor prints one line,
``lpjax: error: process K of N stopped responding (...); the run stopped; restart it to resume from
the last checkpoint``, and exits with status 1. ``LPJAX_PEER_TIMEOUT=0`` turns this off and leaves
JAX's defaults (a 100 s heartbeat timeout, then a fatal log). See ``lpjax/distributed/watchdog.py``.
"""

import os

import jax

from lpjax.distributed import watchdog
from lpjax.errors import ConfigError

ENV = ("LPJAX_COORDINATOR", "LPJAX_NUM_PROCESSES", "LPJAX_PROCESS_ID")
PEER_TIMEOUT_ENV = "LPJAX_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT_S = 30

# for training loops and command lines; see lpjax/distributed/watchdog.py
hold_exit = watchdog.hold_exit
await_verdict = watchdog.await_verdict
mark_failed = watchdog.mark_failed


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


def peer_timeout(value=None):
    """Seconds without a heartbeat after which a process counts as dead (0: JAX's defaults)."""
    source = "peer_timeout_s"
    if value is None:
        value, source = os.environ.get(PEER_TIMEOUT_ENV) or DEFAULT_PEER_TIMEOUT_S, PEER_TIMEOUT_ENV
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not (seconds == 0 or 1 <= seconds <= 24 * 3600):
        raise ConfigError(f"{source} must be a number of seconds from 1 to 86400 (or 0 to turn the "
                          f"peer watchdog off), got {value!r}")
    return seconds


def initialize(coordinator=None, num_processes=None, process_id=None, *, cluster_detection=False,
               peer_timeout_s=None, init_timeout_s=300):
    """Join the process group. Call before any other JAX call. Returns ``(process_id, count)``.

    ``peer_timeout_s`` (default ``LPJAX_PEER_TIMEOUT`` or 30): how long a process may go without a
    heartbeat before the others stop with a one-line error and exit status 1; 0 leaves JAX's
    defaults. Heartbeats come from a JAX thread, so long compilations or steps do not count.
    ``init_timeout_s``: how long to wait for every process to join before JAX raises.
    """
    if coordinator is None and num_processes is None and process_id is None:
        settings = settings_from_env()
        if settings is not None:
            coordinator, num_processes, process_id = settings
        elif not cluster_detection:
            return 0, 1
    if num_processes is not None and not 0 <= int(process_id) < int(num_processes):
        raise ConfigError(f"process id {process_id} is outside 0..{int(num_processes) - 1}")
    timeout = peer_timeout(peer_timeout_s)
    # CPU devices of different processes need a collectives backend; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    options, watch = {"initialization_timeout": max(1, round(init_timeout_s))}, False
    if timeout and (num_processes is None or int(num_processes) > 1):
        options["heartbeat_timeout_seconds"] = max(1, round(timeout))
        watch = watchdog.supported()  # otherwise JAX's fatal log still ends the survivors in time
        if watch:
            # The coordination service then records a dead process instead of aborting every other
            # one with a fatal log; the watchdog turns the record into a clear error.
            jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(coordinator, num_processes, process_id, **options)
    if watch and jax.process_count() > 1:
        watchdog.start(timeout, coordinator)
    return jax.process_index(), jax.process_count()
