"""What the benches' training runs print (plans, tables, progress bars) goes to a log file, not the
bench's own table.

The file stays open for the life of the process: a library that installs a logging handler while
the output is redirected keeps writing to it, and would raise "I/O operation on closed file" on
every later log line if it were closed after each run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@functools.cache
def _log(path: Path) -> IO[str]:
    return open(path, "a", buffering=1)  # noqa: SIM115 (kept open on purpose, see above)


@contextlib.contextmanager
def quiet(log: Path) -> Iterator[None]:
    """Send stdout and stderr to `log` (appended; opened once per process) inside the block."""
    out = _log(log.resolve())
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        yield
