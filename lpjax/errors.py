"""The one exception type that means "the user asked for something that cannot work".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""


class ConfigError(ValueError):
    """A bad model, method, schedule, layout or data request; the message names the fix."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or state and the policy is to halt (exit code 1)."""


class WriteError(RuntimeError):
    """Writing the workdir failed (a full disk, lost permissions); the message says what, where, and
    that rerunning resumes (exit code 1)."""
