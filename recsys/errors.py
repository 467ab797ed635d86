"""Errors the user can act on: the CLI prints them as one clear line and exits with status 2."""


class UserError(Exception):
    """Bad input the user can fix (missing file, bad row, wrong mapping); the message says what to do."""


class DataError(UserError):
    """A malformed input row or file: the message starts with `file:line:`."""
