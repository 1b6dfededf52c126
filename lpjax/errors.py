"""The one exception type that means "the user asked for something that cannot work".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""


class ConfigError(ValueError):
    """A bad model, method, schedule, layout or data request; the message names the fix."""
