"""The errors a user can act on: the CLI prints their message as one line, without a traceback."""


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the dotted key."""


class UsageError(RuntimeError):
    """Something the user can fix (a model or data set that cannot be had, a missing package):
    the message names the thing and the way out."""
