"""What a run keeps in its workdir, and the checks made before anything there is created or changed.

    config.json     the resolved config
    metrics.jsonl   training and evaluation records (lpjax.training.metrics_log)
    results.json    per-stage figures after training
    tb/             TensorBoard event files
    checkpoints/    orbax checkpoints, one directory per step
    corrupt/        checkpoints that failed to read back, moved aside (never deleted)
    lock            the pid and host of the run writing here (lpjax.training.lock)

A workdir that holds checkpoints is resumed; a config that changes what is being trained is refused
there, because its checkpoints would not fit. Everything here is checked before the first write, so
a refused run leaves the workdir as it found it.
"""

import contextlib
import errno
import json
import os
import re
import shutil

from lpjax.errors import ConfigError, WriteError

CONFIG, METRICS, RESULTS, TENSORBOARD, CHECKPOINTS = "config.json", "metrics.jsonl", "results.json", "tb", "checkpoints"
CORRUPT, LOCK = "corrupt", "lock"
# each entry a run reads or writes, and whether it is a file or a directory
LAYOUT = {CONFIG: "file", METRICS: "file", RESULTS: "file", LOCK: "file",
          TENSORBOARD: "directory", CHECKPOINTS: "directory", CORRUPT: "directory"}

# Keys that may change between a run and its resumption: how long, how often, on which devices.
RESUMABLE_CHANGES = ("layout", "num_steps", "num_epochs", "log_every", "eval_every", "eval_batch_size",
                     "checkpoint", "nonfinite", "probe", "distributed")

# The longest path a run creates below its workdir, with room to spare: orbax's temporary checkpoint
# directories, e.g. checkpoints/1000000.orbax-checkpoint-tmp-1732781234567890/stage15/ocdbt.process_0/d/<32 hex>.
LONGEST_INSIDE = 200


def path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def check_writable(workdir) -> None:
    """Refuse a missing, too long, file-like or unwritable workdir before anything is built or written."""
    if not workdir:
        raise ConfigError("no workdir given; pass the directory that should receive the run's files")
    check_local(workdir)
    check_path_length(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} exists and is not a directory; choose another --workdir")
    existing = _existing_ancestor(workdir)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir!r} is not writable ({existing} does not let this user write); "
                          f"choose another --workdir or fix its permissions")


def check_local(workdir) -> None:
    """Refuse a URL (``gs://bucket/run``, any ``scheme://``): the lock, logs, metrics and TensorBoard
    files go through the local filesystem, which would take ``gs:`` for a directory name and write
    the run on this host's disk."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(workdir))
    if scheme:
        raise ConfigError(f"workdir {workdir!r} is a {scheme.group(1)}:// URL, but a workdir must be a path; "
                          f"mount the bucket (for gs://, with gcsfuse) or use a shared filesystem (NFS), and pass "
                          f"the mounted path as --workdir")


def _existing_ancestor(workdir) -> str:
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def check_path_length(workdir) -> None:
    """Every name within the filesystem's limit, and room below the workdir for the checkpoints' own
    paths, checked before any directory is made (a too-long path fails half way through makedirs)."""
    full = os.path.abspath(workdir)
    existing = _existing_ancestor(full)
    while not os.path.isdir(existing):  # a file on the way: check_writable names it
        existing = os.path.dirname(existing)
    name_max, path_max = _limit(existing, "PC_NAME_MAX", 255), _limit(existing, "PC_PATH_MAX", 4096)
    for name in full.split(os.sep):
        if len(os.fsencode(name)) > name_max:
            raise ConfigError(f"workdir {workdir!r} has a name of {len(os.fsencode(name))} bytes ({name[:20]}...); "
                              f"this filesystem allows {name_max}; choose a shorter --workdir")
    if len(os.fsencode(full)) + LONGEST_INSIDE >= path_max:
        raise ConfigError(f"workdir {workdir!r} is {len(os.fsencode(full))} bytes long; the files a run writes "
                          f"below it need about {LONGEST_INSIDE} more and this system allows {path_max}; "
                          f"choose a shorter --workdir")


def _limit(directory, name, default) -> int:
    try:
        return os.pathconf(directory, name)
    except (OSError, ValueError):
        return default


def check_contents(workdir) -> None:
    """Refuse a workdir whose entries are of the wrong kind (a file named ``checkpoints``, a plain file
    where a checkpoint step should be) or cannot be read and written, before anything is written."""
    if not os.path.isdir(workdir):
        return
    for name, kind in LAYOUT.items():
        entry = path(workdir, name)
        if not os.path.lexists(entry):
            continue
        if (kind == "file") != os.path.isfile(entry) or (kind == "directory") != os.path.isdir(entry):
            raise ConfigError(f"{entry} is not a {kind} as a run's {name} must be; move it away or choose "
                              f"another --workdir")
        wanted = os.R_OK | os.W_OK | (os.X_OK if kind == "directory" else 0)
        if not os.access(entry, wanted):
            raise ConfigError(f"{entry} cannot be read and written by this user; fix its permissions or "
                              f"choose another --workdir")
    checkpoints = path(workdir, CHECKPOINTS)
    if os.path.isdir(checkpoints):
        for name in os.listdir(checkpoints):
            entry = os.path.join(checkpoints, name)
            if name.isdigit() and not os.path.isdir(entry):
                raise ConfigError(f"{entry} is a file, not a checkpoint directory; move it away (a run would "
                                  f"replace it) or choose another --workdir")


def create(workdir) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create workdir {workdir!r}: {err.strerror}; choose another --workdir") from None


# Every checkpoint a run writes holds this item; orbax renames a step's folder into place only when it
# is complete, so a step folder without it (left empty, or emptied by hand) holds no checkpoint.
CHECKPOINT_MARKER = "meta"


def holds_checkpoint(step_directory) -> bool:
    """Whether a step folder holds a complete checkpoint (damaged or not), rather than nothing of one."""
    return os.path.isdir(os.path.join(step_directory, CHECKPOINT_MARKER))


def checkpoint_steps(workdir) -> list:
    """The steps of the complete checkpoints in ``workdir``; the run sets any other step folder aside
    (``Checkpointer.restore_latest``), so none of them counts here."""
    directory = path(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and holds_checkpoint(os.path.join(directory, name)))


def has_checkpoints(workdir) -> bool:
    return bool(checkpoint_steps(workdir))


def check_resumable(workdir, cfg: dict) -> None:
    """A workdir with checkpoints may only be resumed by a config that trains the same thing, at least
    as far as its newest checkpoint."""
    steps = checkpoint_steps(workdir)
    if not steps:
        return
    try:
        with open(path(workdir, CONFIG), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise ConfigError(f"workdir {workdir!r} has checkpoints but no readable {CONFIG}; "
                          f"choose a new --workdir") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path(workdir, CONFIG)} holds a JSON {type(saved).__name__}, not the object a run "
                          f"writes; restore it from a copy or choose a new --workdir")
    for key in sorted(set(saved) | set(cfg)):
        if key in RESUMABLE_CHANGES:
            continue
        if _comparable(saved.get(key)) != _comparable(cfg.get(key)):
            raise ConfigError(f"workdir {workdir!r} holds a run with a different {key} ({saved.get(key)!r}, "
                              f"now {cfg.get(key)!r}); resume with the same config or choose a new --workdir")
    if cfg.get("num_steps") is not None and steps[-1] > cfg["num_steps"]:
        raise ConfigError(f"workdir {workdir!r} holds a checkpoint at step {steps[-1]}, past num_steps="
                          f"{cfg['num_steps']}; set --config.num_steps={steps[-1]} or more, or choose a new --workdir")


def _comparable(value):
    """JSON's view of a value (tuples become lists), so a saved and a live config compare equal."""
    return json.loads(json.dumps(value, default=str))


# -- failures while writing -------------------------------------------------------------------------------
def os_error_in(err):
    """The ``OSError`` behind ``err``, or None. Orbax wraps the one its background threads met, and
    tensorstore (which writes the arrays, in C++) raises ``ValueError("RESOURCE_EXHAUSTED: ... No
    space left on device [os_error_code='28']")``; that code is turned back into an ``OSError``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        code = re.search(r"os_error_code='?(\d+)", str(err))
        if code:
            number = int(code.group(1))
            return OSError(number, os.strerror(number))
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def writing(what: str, where: str, workdir: str, needed_bytes: int | None = None):
    """Turn an ``OSError`` (a full disk, a vanished mount, lost permissions) met while writing ``what``
    under ``where`` into one ``WriteError`` line: what failed, where, the space needed when known,
    and that rerunning resumes."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        cause = os_error_in(err)
        if cause is None:
            raise
        raise write_error(what, where, workdir, cause, needed_bytes) from err


def write_error(what, where, workdir, cause, needed_bytes=None) -> WriteError:
    reason = cause.strerror or str(cause) or type(cause).__name__
    full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
    space = ""
    if full:
        free = _free_bytes(where)
        parts = ([f"its arrays alone take {_size(needed_bytes)}"] if needed_bytes else []) + \
                ([f"{_size(free)} free there"] if free is not None else [])
        space = f" ({'; '.join(parts)})" if parts else ""
    fix = "free some space" if full else "fix that"
    return _WorkdirWriteError(f"could not write {what} in {where}: {reason}{space}; {fix}, then rerun the same "
                              f"command: ", workdir)


class _WorkdirWriteError(WriteError):
    """Names the checkpoint a rerun resumes from when it is printed, not when it is raised: a save
    still in flight at the failure is finished (or not) by the time the run has unwound."""

    def __init__(self, message, workdir):
        super().__init__(message)
        self.workdir = workdir

    def __str__(self) -> str:
        steps = checkpoint_steps(self.workdir)
        resume = (f"it resumes from the checkpoint at step {steps[-1]}" if steps
                  else "no checkpoint was written yet, so it starts over")
        return super().__str__() + resume


def _free_bytes(where):
    probe = where
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or ".").free
    except OSError:
        return None


def _size(count) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
