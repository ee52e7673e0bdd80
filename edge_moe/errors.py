"""Errors that reach users: one line that names the file, field or value, and the fix."""


class EdgeMoeError(Exception):
    """A user-facing error. The CLI prints it as one line and exits non-zero, without a traceback."""
