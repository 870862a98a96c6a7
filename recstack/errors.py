"""Errors shared across commands."""


class UserError(Exception):
    """An error caused by input the user can fix; the CLI prints it without a traceback."""
