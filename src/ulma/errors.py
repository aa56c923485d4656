"""The error a user can act on: the CLI prints its message as one line, without a traceback."""


class UsageError(RuntimeError):
    """Something the user can fix (a model or data set that cannot be had, a missing package):
    the message names the thing and the way out."""
