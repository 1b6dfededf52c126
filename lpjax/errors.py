"""The exceptions that end a run with one line instead of a traceback, and the helper that makes
that line.

The CLI prints each as ``lpjax: error: MESSAGE`` on stderr: ``ConfigError`` (the user asked for
something that cannot work) exits with code 2 before anything is written; ``NonFiniteError`` and
``WriteError`` (training or the workdir failed part way) exit with code 1 and say how to resume.
Any other exception is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A bad model, method, schedule, layout or data request; the message names the fix."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or state and the policy is to halt (exit code 1)."""


class WriteError(RuntimeError):
    """Writing the workdir failed (a full disk, lost permissions); the message says what, where, and
    that rerunning resumes (exit code 1)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for quoting it inside a one-line error.

    Args:
      err: any exception.

    Returns:
      The first non-blank line of ``str(err)``, or the exception's type name when the message is
      empty (``KeyError()``, ``AssertionError``), so the quote is never blank.
    """
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
