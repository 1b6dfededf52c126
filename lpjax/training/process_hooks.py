"""Process-wide hooks for the command line and ``lpjax.fit``: never installed by a library constructor.

When a restore meets a damaged checkpoint or a save meets a full disk, orbax abandons its work and
prints tracebacks long after lpjax has reported the failure in one line. ``install()`` drops those
(and only those); a Python-API user who builds a ``Checkpointer`` gets orbax's output unchanged.
"""

import logging
import os
import sys
import threading


def install() -> None:
    """Drop the late orbax I/O errors that lpjax reports itself (idempotent)."""
    _quiet_orbax_errors()
    _silence_abandoned_io_errors()


def _is_late_io_error(exc_type, exc) -> bool:
    """An error of a read or write that an abandoned restore or save left behind: tensorstore
    completes it after orbax's event loop closed, so asyncio raises "Event loop is closed" on a
    background thread."""
    return exc_type is RuntimeError and "Event loop is closed" in str(exc)


def _is_orbax_coroutine(obj) -> bool:
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _silence_abandoned_io_errors() -> None:
    """When a restore meets a damaged checkpoint or a save meets a full disk, orbax abandons its work
    with reads or writes still in flight, and each of them later prints a traceback: 15 "Event loop
    is closed" after one fallback here, and at exit "Exception ignored in: <coroutine
    ...write_fragment>" after a full disk. lpjax reports the failure itself in one line, so these
    are dropped (from the moment the hooks are installed, as they can come before the failure
    reaches lpjax); every other error still prints."""
    if getattr(sys.excepthook, "lpjax_filter", False):
        return
    previous_except, previous_unraisable, previous_thread = sys.excepthook, sys.unraisablehook, threading.excepthook

    def excepthook(exc_type, exc, tb):
        if not _is_late_io_error(exc_type, exc):
            previous_except(exc_type, exc, tb)

    def unraisablehook(unraisable):
        if not (_is_late_io_error(unraisable.exc_type, unraisable.exc_value) or _is_orbax_coroutine(unraisable.object)):
            previous_unraisable(unraisable)

    def thread_excepthook(args):
        if not _is_late_io_error(args.exc_type, args.exc_value):
            previous_thread(args)

    excepthook.lpjax_filter = True
    sys.excepthook, sys.unraisablehook, threading.excepthook = excepthook, unraisablehook, thread_excepthook


class _OrbaxErrorFilter(logging.Filter):
    """Orbax logs each failure of a background save, with its traceback, several times (about 300
    lines for one full disk) before raising it; lpjax reports the raised error in one line instead."""

    def filter(self, record) -> bool:
        if record.levelno < logging.ERROR:
            return True
        orbax = f"{os.sep}orbax{os.sep}"
        # asyncio logs "Task exception was never retrieved" for an abandoned orbax write task from its
        # own file, and the task's repr does not always name the coroutine's file; the exception's
        # traceback does
        return not (orbax in record.pathname or orbax in record.getMessage() or _raised_in(record.exc_info, orbax))


def _raised_in(exc_info, path_part: str) -> bool:
    tb = exc_info[2] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
    while tb is not None:
        if path_part in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _quiet_orbax_errors() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxErrorFilter) for f in logger.filters):
            logger.addFilter(_OrbaxErrorFilter())
