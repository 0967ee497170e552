"""Errors that reach the user as one line (``gpu-align: error: ...``), never as a traceback."""


class UserError(Exception):
    """Bad input or environment the user can fix: the message says what and where (file, line, key)."""
