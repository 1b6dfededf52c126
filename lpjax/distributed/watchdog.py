"""Stop every process of a multi-process run soon after one of them dies, with one clear line.

What JAX does on its own (measured with jax 0.10.2 and 0.12, two CPU processes, gloo): when one
process is killed, a survivor's pending collective either fails at once (``JaxRuntimeError: ...
Gloo AllGather failed ... Connection reset by peer``, with a Python traceback) or blocks for good
(a device waiting on a sibling device that already gave up). JAX's coordination service notices the
dead process only after ``heartbeat_timeout_seconds`` (100 s by default; after a traceback, the
exit's shutdown barrier waits that long) and then ends every survivor with a fatal C++ log and a
stack dump (SIGABRT, exit status -6). The coordination client's ``missed_heartbeat_callback``
cannot replace that: a Python callable there aborts with ``std::bad_cast`` (jaxlib cannot hand the
``absl::Status`` to Python), and ``jax.distributed.initialize`` does not expose it anyway.

So, when ``lpjax.distributed.join.initialize`` joins a run of two or more processes, it

* sets JAX's ``heartbeat_timeout_seconds`` to the peer timeout (``LPJAX_PEER_TIMEOUT``, 30 s). The
  heartbeats come from a C++ thread of JAX's, so a long compilation or a slow step never looks like
  death; the service calls a process dead between half the timeout and the timeout after its last
  heartbeat;
* sets ``jax_enable_recoverability``: the coordination service then records a dead process without
  aborting the others itself;
* starts this watchdog: a daemon thread that asks the service which processes are alive
  (``DistributedRuntimeClient.get_live_nodes``, what ``jax.experimental.multihost_utils
  .live_devices`` uses). When one is missing it prints ``lpjax: error: process K of N stopped
  responding (...); the run stopped; restart it to resume from the last checkpoint`` on stderr and
  ends the process with ``os._exit(1)``: the main thread may be stuck in a collective that will
  never finish, so it cannot be asked to unwind;
* installs a ``sys.excepthook`` that, for an uncaught ``JaxRuntimeError`` (how a collective with a
  dead peer fails), waits for the watchdog's verdict instead of printing a traceback first;
* puts back the shutdown barrier that recoverable mode drops, in ``jax.distributed.shutdown()``
  (which JAX also calls at exit) and in an exit handler of its own: after a normal finish every
  process waits for the others there, and process 0, which hosts the coordination service, stays
  until the others have disconnected (else they lose the service and JAX aborts them).

Known limit: if process 0 itself dies, the service dies with it and JAX ends the others at once
with its own fatal log ("Terminating process because the JAX distributed service detected fatal
errors ..."): quick and non-zero, but not this module's line.
"""

import atexit
import contextlib
import os
import sys
import threading
import time

import jax

from lpjax.errors import first_line

EXIT_BARRIER = "lpjax_exit"
EXIT_TIMEOUT_S = 300  # as long as JAX's own shutdown barrier waits by default
POLL_S = 1.0

_active = None  # the running _PeerWatch, if any


def supported():
    """Whether this JAX has what the watchdog relies on (checked before ``initialize``)."""
    try:
        from jax._src import distributed as jax_distributed
        from jax._src.lib import _jax
    except ImportError:
        return False
    client_type = getattr(_jax, "DistributedRuntimeClient", None)
    return ("jax_enable_recoverability" in jax.config.values
            and hasattr(jax_distributed, "global_state")
            and all(hasattr(client_type, name) for name in ("get_live_nodes", "wait_at_barrier")))


def start(timeout_s, coordinator=None):
    """Watch the other processes of the run joined by ``jax.distributed.initialize``."""
    global _active
    if _active is not None or jax.process_count() < 2:
        return _active
    from jax._src import distributed as jax_distributed  # the client JAX itself connected
    client = jax_distributed.global_state.client
    if client is None:
        return None
    _active = watch = _PeerWatch(client, jax.process_index(), jax.process_count(), timeout_s, coordinator)
    watch.start()
    # Recoverable mode drops the shutdown barrier from JAX's shutdown; put ours back in its place,
    # so that ``jax.distributed.shutdown()`` (called by the program, or by JAX at exit) waits as
    # it did before.
    state, jax_shutdown = jax_distributed.global_state, jax_distributed.global_state.shutdown

    def shutdown():
        if state.client is client:
            watch.leave()
        jax_shutdown()

    state.shutdown = shutdown
    return watch


@contextlib.contextmanager
def hold_exit():
    """Let the block finish before a peer failure ends this process (waiting at most the peer
    timeout): wrap short, local work that must not be cut in half, such as writing a checkpoint
    file. A block that itself waits on another process cannot finish once that process is dead, so
    write checkpoints to a temporary name and ``os.replace`` them as well."""
    watch = _active
    if watch is None:
        yield
        return
    with watch.cond:
        watch.holds += 1
    try:
        yield
    finally:
        with watch.cond:
            watch.holds -= 1
            watch.cond.notify_all()


def mark_failed():
    """Say that this process is about to exit because of an error it has reported itself (for
    example a command line's ``lpjax: error: ...`` and exit status 2): the exit handler then skips
    the end-of-run barrier, so the other processes see this one leave at once instead of waiting
    for it there. An uncaught exception does the same on its own."""
    if _active is not None:
        _active.crashed = True


def await_verdict():
    """After a runtime error: if a peer is dying, end this process the way the watchdog does (this
    call then never returns); otherwise return after at most the peer timeout plus a few seconds."""
    watch = _active
    if watch is not None and not watch.stopping.is_set():
        watch.await_verdict()


class _PeerWatch:
    def __init__(self, client, process_id, count, timeout_s, coordinator):
        self.client, self.pid, self.count = client, process_id, count
        self.timeout_s, self.coordinator = timeout_s, coordinator
        self.stopping = threading.Event()  # the run is ending normally: peers may leave now
        self.failing = threading.Event()  # a failure was seen; the process is about to end
        self.peers_gone = threading.Event()  # (process 0, while stopping) every other process left
        self.cond = threading.Condition()
        self.holds = 0
        self.crashed = False  # the main thread ended with an uncaught exception
        self._previous_hook = sys.excepthook

    def start(self):
        threading.Thread(target=self._run, name="lpjax-peer-watch", daemon=True).start()
        sys.excepthook = self._excepthook
        atexit.register(self.leave)

    # -- the watchdog thread ------------------------------------------------------------------
    def _run(self):
        ids = list(range(self.count))
        first = None  # each process's incarnation id when first seen: a restarted process gets a new one
        while True:
            try:
                # Returns once every live process has asked (a barrier over the live ones), or
                # once the service has declared the missing ones dead.
                live = self.client.get_live_nodes(ids)
            except Exception as err:  # the service is gone: process 0 died or the network broke
                if self.stopping.is_set() or self._shut_down():
                    return
                where = f" at {self.coordinator}" if self.coordinator else ""
                self.fail(f"lost contact with process 0 of {self.count}, which hosts the coordinator{where} "
                          f"({first_line(err)[:160]})")
            if self.stopping.is_set():
                if self.pid != 0:
                    return
                if set(live) <= {self.pid}:
                    self.peers_gone.set()
                    return
                time.sleep(0.01)
                continue
            first = first or dict(live)
            dead = [i for i in ids if i != self.pid and (i not in live or live[i] != first.get(i, live[i]))]
            if dead:
                self.fail(self._describe(dead))
            self.stopping.wait(POLL_S)

    def _shut_down(self, grace_s=0.5):
        """Whether the program itself called ``jax.distributed.shutdown()``."""
        from jax._src import distributed as jax_distributed
        time.sleep(grace_s)  # shutdown() forgets the client only once the client has shut down
        return jax_distributed.global_state.client is not self.client

    def _describe(self, dead):
        who = (f"process {dead[0]}" if len(dead) == 1 else
               f"processes {', '.join(map(str, dead[:-1]))} and {dead[-1]}")
        where = f" at {self.coordinator}" if self.coordinator else ""
        return (f"{who} of {self.count} stopped responding (it died, exited or lost its connection to "
                f"the coordinator{where}; peer timeout {self.timeout_s:g} s)")

    def fail(self, what):
        """Print the one line and end the process; never returns."""
        if self.failing.is_set():  # another thread is already ending the process
            while True:
                time.sleep(3600)
        self.failing.set()
        deadline = time.monotonic() + self.timeout_s
        with self.cond:
            while self.holds and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
        # Flush what the program printed, but never wait long: the main thread may hold a stream.
        try:
            flusher = threading.Thread(target=_flush_streams, daemon=True)
            flusher.start()
            flusher.join(1.0)
        except RuntimeError:  # no new threads at interpreter shutdown; we are the main thread then
            _flush_streams()
        line = f"lpjax: error: {what}; the run stopped; restart it to resume from the last checkpoint\n"
        os.write(2, line.encode())
        os._exit(1)

    # -- the main thread ------------------------------------------------------------------------
    def await_verdict(self):
        # The service needs up to the heartbeat timeout to call a peer dead; the watchdog asks
        # every POLL_S. If it finds one, it ends the process from its own thread.
        self.failing.wait(self.timeout_s + 2 * POLL_S + 5)
        if self.failing.is_set():
            while True:
                time.sleep(3600)

    def _excepthook(self, etype, value, tb):
        self.crashed = True
        if isinstance(value, jax.errors.JaxRuntimeError) and not self.stopping.is_set():
            self.await_verdict()
        self._previous_hook(etype, value, tb)

    def leave(self):
        """This process is leaving the run: at exit, or from ``jax.distributed.shutdown()``."""
        if self.failing.is_set():
            self.await_verdict()
        if self.crashed:  # the traceback is out; the others see this process leave and stop
            self.stopping.set()
            return
        self.finish()

    def finish(self):
        """End of a healthy run: the shutdown barrier that recoverable mode leaves out."""
        if self.stopping.is_set() or self._shut_down(0):
            self.stopping.set()
            return
        try:
            self.client.wait_at_barrier(EXIT_BARRIER, int(EXIT_TIMEOUT_S * 1000))
        except Exception as err:
            if not self.failing.is_set():
                self.await_verdict()  # a peer died while we waited: let the watchdog say which
            self.fail(f"not every process reached the end of the run within {EXIT_TIMEOUT_S} s "
                      f"({first_line(err)})")
        self.stopping.set()
        if self.pid == 0:  # keep the coordination service up until every other process has left
            self.peers_gone.wait(self.timeout_s + 10)


def leave_process(code):
    """End a command-line process that joined a multi-process run with exit status ``code``;
    return at once otherwise.

    It does what the interpreter would do at exit (wait for non-daemon threads, run the exit
    handlers: the end-of-run barrier, JAX's shutdown) and then skips finalization. Finalization
    kills daemon threads, and the watchdog thread may still be inside a jaxlib call then; killing it
    there aborts the process ("FATAL: exception not rethrown", status -6) after a clean exit."""
    if _active is None:
        return
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    _flush_streams()
    os._exit(code)


def _flush_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
