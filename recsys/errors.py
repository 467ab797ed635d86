"""Errors the user can act on: the CLI prints them as one clear line and exits with status 2."""

from __future__ import annotations

from collections.abc import Callable


class UserError(Exception):
    """Bad input the user can fix (missing file, bad row, wrong mapping); the message says what to do."""


class DataError(UserError):
    """A malformed input row or file: the message starts with `file:line:`."""


#: Exit status after a preemption checkpoint: 128 + SIGTERM, as a shell reports a process SIGTERM ended.
#: Kubernetes (restartPolicy OnFailure; ExitCode: 128-255 are retryable) and torchrun restart it.
PREEMPTED_EXIT = 143


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; a restart resumes from it."""


def exit_status(fn: Callable[[], int | None]) -> int:
    """Run an entry point: its status, or 2 after printing a config error or a UserError as one message
    (143 after a preemption checkpoint)."""
    import sys

    from recsys.config import ConfigError

    try:
        return int(fn() or 0)
    except Preempted as e:
        print(f"recsys: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except ConfigError as e:
        print(f"recsys: config error:\n{e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"recsys: {e}", file=sys.stderr)
        return 2
