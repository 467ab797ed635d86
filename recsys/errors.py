"""Errors the user can act on: the CLI prints them as one clear line and exits with status 2."""

from __future__ import annotations

from collections.abc import Callable


class UserError(Exception):
    """Bad input the user can fix (missing file, bad row, wrong mapping); the message says what to do."""


class DataError(UserError):
    """A malformed input row or file: the message starts with `file:line:`."""


def exit_status(fn: Callable[[], int | None]) -> int:
    """Run an entry point: its status, or 2 after printing a config error or a UserError as one message."""
    import sys

    from recsys.config import ConfigError

    try:
        return int(fn() or 0)
    except ConfigError as e:
        print(f"recsys: config error:\n{e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"recsys: {e}", file=sys.stderr)
        return 2
