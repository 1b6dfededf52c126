"""One writer per workdir: an advisory ``flock`` on ``WORKDIR/lock``, held for the whole run.

Two runs writing one workdir corrupt each other (orbax tracebacks, mixed metrics), so a run takes
the lock right after the workdir is created and before it writes anything else there. A second run
is refused with one line naming the holder's pid and host, which the holder writes into the file.

The kernel drops a ``flock`` when its process ends, however it ends, SIGKILL included, so a lock is
never left held by a dead run. A run that ends normally empties the file; a file that still names
a holder once the lock is free belongs to a run that died without cleaning up, and the next run
takes it over with a warning that names it.

``flock`` is advisory and local to one machine's kernel: on network filesystems (NFS) it may not be
seen by other hosts, so two hosts can still share a workdir; the host name in the message is there
to make that visible.
"""

import fcntl
import json
import os
import socket
import sys
import time

from lpjax.errors import ConfigError

LOCK = "lock"


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir's lock; raises ``ConfigError`` if another
    process holds it."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK)
        self._fd = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_holder_of_held_lock(fd))
            os.close(fd)
            raise ConfigError(f"workdir {self.workdir!r} is in use by another lpjax run ({holder}); wait for it "
                              f"to finish or choose another --workdir") from None
        except OSError as err:
            os.close(fd)
            raise ConfigError(f"cannot lock workdir {self.workdir!r}: {err.strerror}; choose another --workdir "
                              f"on a filesystem that supports file locks") from None
        stale = _read_holder(fd)
        if stale:
            print(f"lpjax: warning: taking over the lock of workdir {self.workdir!r} from a run that ended without "
                  f"releasing it ({_describe(stale)})", file=sys.stderr, flush=True)
        _write(fd, {"pid": os.getpid(), "host": socket.gethostname()})
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            _write(self._fd, None)  # an empty file: nobody to warn about next time
        except OSError:
            pass  # a full disk cannot truncate; the next run then warns about a stale holder, harmlessly
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _holder_of_held_lock(fd) -> dict:
    """The holder's record; it writes it just after taking the lock, so wait a moment for it."""
    for _ in range(20):
        holder = _read_holder(fd)
        if holder:
            return holder
        time.sleep(0.05)
    return {}


def _read_holder(fd) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 4096)
    if not data.strip():
        return {}
    try:
        holder = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "pid and host unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host', 'unknown')}"


def _write(fd, holder) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
