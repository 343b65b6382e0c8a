"""Errors a user can cause. The CLI prints them as one line and exits with code 2 (no traceback)."""


class UserError(Exception):
    """Bad input from the user: a config key, a file, a dataset row, a checkpoint path. Message is one line."""

    exit_code = 2
