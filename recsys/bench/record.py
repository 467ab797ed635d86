"""Benchmark figures as files: what `recsys bench NAME --record` printed, with when, where and at which
commit it ran, written to docs/benchmarks/results/NAME.txt. The docs pages include those files, so a
figure in the docs is always the output of a run, and its date and commit show how stale it is.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent.parent / "docs" / "benchmarks" / "results"


class _Tee(io.TextIOBase):
    """Writes to the console and keeps a copy."""

    def __init__(self, console: io.TextIOBase) -> None:
        self.console, self.copy = console, io.StringIO()

    def write(self, text: str) -> int:
        self.console.write(text)
        return self.copy.write(text)

    def flush(self) -> None:
        self.console.flush()


def _commit() -> str:
    """The checkout's commit (with `+changes` when the tree differs from it), or 'unknown'."""
    root = RESULTS.parent.parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+changes" if dirty else "")


def header(name: str, argv: list[str], seconds: float) -> str:
    """The first lines of a results file: command, date, commit, machine and its load."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"# recsys bench {name}: {' '.join(argv)}\n"
        f"# measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}, "
        f"{seconds:.0f} s\n"
        f"# machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"load average at the end {load}\n"
    )


@contextlib.contextmanager
def recorded(name: str, argv: list[str], enabled: bool) -> Iterator[None]:
    """Run the body; when `enabled` and it succeeds, write what it printed to RESULTS/NAME.txt."""
    if not enabled:
        yield
        return
    tee, console, t0 = _Tee(sys.stdout), sys.stdout, time.perf_counter()
    sys.stdout = tee  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = console
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.txt"
    out.write_text(header(name, argv, time.perf_counter() - t0) + tee.copy.getvalue())
    print(f"recorded: {out}", file=sys.stderr)
