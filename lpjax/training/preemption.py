"""Stop at a step boundary on SIGTERM or SIGINT, with a checkpoint, in every process at the same step.

SIGTERM is what a pod scheduler sends before it preempts a host; SIGINT is Ctrl-C. The training
loop asks ``StopRequests.agreed(step)`` after every step; when it says yes the loop checkpoints that
step and raises ``Preempted``, which the command line reports as ``preempted at step N; run the same
command to resume`` with exit status 0 (SIGTERM), or as ``interrupted at step N; ...`` with exit
status 130 (SIGINT: whoever pressed Ctrl-C was not preempted). A second Ctrl-C stops at once.

One process: a Python signal handler records the signal; the next step boundary is the stop.
Several processes: the hosts must agree on the step, or one would wait forever in a collective the
others never join. JAX's preemption service does that (``multihost_utils
.reached_preemption_sync_point``): its own SIGTERM handler (installed by ``jax.distributed
.initialize``) tells the coordination service, which picks the step after the furthest one any
host has reached, and every host's call returns True at that step. SIGINT is turned into a SIGTERM
to this process so that it goes through the same service.
"""

import os
import signal
import threading

import jax

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}
WHAT_STOPPED = {signal.SIGTERM: "preempted", signal.SIGINT: "interrupted"}


class Preempted(Exception):
    """The run stopped at ``step`` on a signal, after saving a checkpoint there."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"{WHAT_STOPPED.get(signum, 'preempted')} at step {step}; run the same command to resume")
        self.step, self.signum = step, signum
        self.exit_code = EXIT_CODES.get(signum, 0)


class StopRequests:
    """While entered (in the main thread), SIGTERM and SIGINT ask the loop to stop at a step boundary."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        self._multiprocess = False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals can only be caught in the main thread; leave them as they are
        self._multiprocess = jax.process_count() > 1
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
        if not self._multiprocess:  # several processes: JAX's preemption service owns SIGTERM
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _on_signal(self, signum, _frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = self.signum or signum
        if self._multiprocess and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # through JAX's preemption service, like a scheduler's notice

    def agreed(self, step: int) -> bool:
        """Whether the run stops after ``step``: call after every step, in every process."""
        if self._multiprocess:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None
