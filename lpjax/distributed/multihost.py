"""``lpjax train`` on several hosts: joining the process group and the checks every host makes.

Where the process group comes from, first match wins:

1. the config, ``--config.distributed.coordinator/num_processes/process_id`` (all three);
2. the environment, ``LPJAX_COORDINATOR``, ``LPJAX_NUM_PROCESSES``, ``LPJAX_PROCESS_ID`` (what
   ``lpjax launch`` sets);
3. the cluster JAX detects by itself: a Cloud TPU pod slice, SLURM (``srun``), Kubernetes/GKE,
   Open MPI. ``--config.distributed.auto_detect=false`` turns this off.

With none of them the run is a single-process one, as before. Once joined, every process checks
that it holds the same config as process 0 (a digest gathered from all of them; the
``distributed`` section, which names the process, is left out), that the executor is ``spmd`` (the
only one whose program spans hosts) and that the layout uses every process's devices. Each failure
is a ``ConfigError`` raised in every process alike, so all of them exit 2 with the same line.

Process 0 alone writes the workdir's files (logs, metrics, TensorBoard, results.json, checkpoints);
every process reads the same data stream and the same checkpoints, so all hosts must see one
filesystem (a shared path or a GCS bucket).
"""

import contextlib
import hashlib
import json
import socket
import time

import jax
import numpy as np

from lpjax.distributed import join as distributed
from lpjax.config.checks import boolean
from lpjax.errors import ConfigError

KEYS = ("coordinator", "num_processes", "process_id")


class SharedConfigError(ConfigError):
    """A config error every process raises alike, after meeting the others (``_together``): the
    processes then leave through JAX's end-of-run barrier, so that process 0, which hosts the
    coordination service, does not vanish under the others (JAX would abort them)."""


def cluster_detected() -> str | None:
    """The name of the cluster JAX would join on its own (TPU pod, SLURM, Kubernetes, MPI), or None.

    Asks JAX's own cluster classes (``jax._src.clusters``, private, hence guarded): the same test
    ``jax.distributed.initialize()`` makes, without joining anything."""
    try:
        from jax._src.clusters import ClusterEnv

        for env in ClusterEnv._cluster_types:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                return env.__name__
    except Exception:  # a JAX whose private layout moved: no detection rather than a crash
        return None
    return None


def start(settings: dict | None) -> tuple[int, int]:
    """Join the process group described by ``settings`` (the config's ``distributed`` section), the
    ``LPJAX_*`` environment or the detected cluster; returns ``(process_id, process_count)``. Call
    before anything else touches JAX's devices. A second call returns the group already joined."""
    settings = dict(settings or {})
    boolean(settings.get("auto_detect", True), "distributed.auto_detect")
    timeout = settings.get("init_timeout_s") or 300
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"distributed.init_timeout_s must be a positive number of seconds, got {timeout!r}")
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    given = {key: settings.get(key) for key in KEYS}
    if any(v is not None for v in given.values()):
        missing = [key for key, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"distributed.{', distributed.'.join(missing)} missing: set all of "
                              f"--config.distributed.coordinator/num_processes/process_id, or none of them")
        coordinator, count, pid = given["coordinator"], int(given["num_processes"]), int(given["process_id"])
    elif distributed.settings_from_env() is not None:
        coordinator, count, pid = distributed.settings_from_env()
    elif settings.get("auto_detect", True) and cluster_detected():
        coordinator = count = pid = None  # JAX reads them from the cluster
    else:
        return 0, 1
    if count is not None and count < 1:
        raise ConfigError(f"the number of processes must be at least 1, got {count}")
    if count == 1:
        return 0, 1
    if coordinator and pid:  # process 0 hosts the service; the others first check they can reach it
        _wait_for_coordinator(coordinator, pid, timeout)
    try:
        distributed.initialize(coordinator, count, pid, cluster_detection=True,
                               peer_timeout_s=settings.get("peer_timeout_s"), init_timeout_s=timeout)
    except ConfigError:
        raise
    except Exception as err:  # JAX raises RuntimeError/XlaRuntimeError/ValueError with pages of detail
        where = f"the coordinator at {coordinator}" if coordinator else "the cluster's coordinator"
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"process {pid if pid is not None else '?'} could not join {where} within "
                          f"{timeout:g} s ({type(err).__name__}: {reason}); start every process with the "
                          f"same coordinator address and process count, process 0 first, and check the "
                          f"port is reachable (--config.distributed.init_timeout_s sets the wait)") from None
    return jax.process_index(), jax.process_count()


def _wait_for_coordinator(address: str, pid: int, timeout: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; ConfigError after ``timeout`` seconds.
    (JAX itself, failing to connect, ends the process with a fatal log and a stack dump.)"""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"the coordinator address must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(f"process {pid} could not join the coordinator at {address} within {timeout:g} s "
                                  f"({err.strerror or err}); start process 0 there first with the same address, check "
                                  f"the port is reachable, or raise --config.distributed.init_timeout_s") from None
            time.sleep(0.5)


def config_digest(cfg: dict) -> np.ndarray:
    """A digest of everything in ``cfg`` but the ``distributed`` section, as 4 uint32 words."""
    shared = {key: value for key, value in cfg.items() if key != "distributed"}
    text = json.dumps(shared, sort_keys=True, default=str)
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype=np.uint32).copy()


def check_same_config(cfg: dict) -> None:
    """Every process gathers every process's config digest; any difference from process 0 is a
    ``ConfigError`` in every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digests = np.asarray(multihost_utils.process_allgather(config_digest(cfg)))
    differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if differ:
        _together()
        raise SharedConfigError(f"process(es) {', '.join(map(str, differ))} hold a different config from process 0; "
                          f"start every process with the same recipe and --config overrides")


def check_config(cfg: dict) -> None:
    """The multi-host rules a config must meet before anything is built: the spmd executor (the
    only one whose program spans hosts), no probes that need every stage in one process. No-op in a
    single-process run."""
    count = jax.process_count()
    if count == 1:
        return
    executor = (cfg.get("layout") or {}).get("executor")
    if executor != "spmd":
        _together()
        raise SharedConfigError(f"a run over {count} processes needs the spmd executor, got layout.executor={executor!r}; "
                          f"set --config.layout.executor=spmd (reference and mpmd run in one process)")
    layout = cfg.get("layout") or {}
    stages = layout.get("stages") or cfg.get("stages") or (len(cfg["split_points"]) + 1 if cfg.get("split_points") else None)
    if isinstance(stages, int) and isinstance(layout.get("data"), int):
        _check_devices(stages, layout["data"])  # before building: a process without devices in the mesh cannot build
    if (cfg.get("probe") or {}).get("alignment_every"):
        _together()
        raise SharedConfigError("probe.alignment_every is not supported on several processes yet; set "
                          "--config.probe.alignment_every=0")


def check_layout(trainer) -> None:
    """A multi-host layout must use every process's devices (stages x data = all devices)."""
    count = jax.process_count()
    if count == 1:
        return
    _check_devices(trainer.num_stages, trainer.num_data)


def _check_devices(stages: int, data: int) -> None:
    used, total, count = stages * data, jax.device_count(), jax.process_count()
    if used != total:
        _together()
        raise SharedConfigError(f"layout stages={stages} x data={data} uses {used} devices but {count} processes "
                                f"hold {total} ({jax.local_device_count()} each); make stages x data equal {total}, "
                                f"or change the number of processes")


def check_shared_filesystem(directory: str) -> None:
    """Over several processes: process 0 writes a marker file with a fresh token under
    ``directory``; every other process must read the same token there, else every process raises
    one ``ConfigError`` (checkpoints are written from every process into one directory, and
    process 0 alone writes the rest). A collective: every process calls it."""
    if jax.process_count() == 1:
        return
    import os
    import secrets

    from jax.experimental import multihost_utils

    marker = os.path.join(directory, ".lpjax_shared_filesystem")
    token = np.frombuffer(secrets.token_bytes(8), np.uint32).copy() if is_writer() else np.zeros(2, np.uint32)
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    if is_writer():
        with open(marker, "w") as f:
            f.write(token.tobytes().hex())
    sync("lpjax_marker_written")
    try:
        with open(marker) as f:
            seen = f.read().strip() == token.tobytes().hex()
    except OSError:
        seen = False
    flags = np.asarray(multihost_utils.process_allgather(np.array([seen], np.int32))).ravel()
    sync("lpjax_marker_read")
    if is_writer():
        with contextlib.suppress(OSError):
            os.remove(marker)
    blind = [p for p in range(len(flags)) if not flags[p]]
    if blind:
        raise SharedConfigError(f"process(es) {', '.join(map(str, blind))} do not see the files process 0 writes "
                                f"under {directory}; every host must see one filesystem (a shared path such as NFS, "
                                f"or a bucket mounted on every host): give --workdir a directory they all share")


def is_writer() -> bool:
    """Whether this process writes the run's files: process 0 alone."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process got here (no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _together() -> None:
    """Before an error every process raises alike: wait for all of them, so that none (process 0
    hosts the coordination service) leaves while another is still building and would then report
    a lost peer instead of the error."""
    sync("lpjax_config_error")
