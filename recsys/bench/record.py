"""Benchmark figures as files: what `recsys bench NAME --record` (or `recsys chaos --record`) printed,
with when, where and at which commit it ran, written to docs/benchmarks/results/NAME.txt, and the plots
the run wrote beside it (NAME.png). The docs pages include those files, so a figure in the docs is always
the output of a run, and its date and commit show how stale it is.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
RESULTS = REPO / "docs" / "benchmarks" / "results"


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
    """The checkout's commit (with `+changes` when files outside docs/ differ from it), or 'unknown'."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # The docs (results files rewritten by earlier --record runs included) do not change a figure.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+changes" if dirty else "")


def header(title: str, argv: list[str], seconds: float, commit: str | None = None) -> str:
    """The first lines of a results file: command, date, commit, machine and its load."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"# {title}: {' '.join(argv)}\n"
        f"# measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit or _commit()}, "
        f"{seconds:.0f} s\n"
        f"# machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"load average at the end {load}\n"
    )


class Record:
    """What a run hands to its record besides its printed lines: the plots it wrote."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.plots: list[Path] = []

    def keep(self, plot: Path) -> None:
        """Copy `plot` (a file this run wrote) to RESULTS/NAME<suffix> with the record; no-op without --record."""
        if self.enabled:
            self.plots.append(Path(plot))


@contextlib.contextmanager
def recorded(name: str, argv: list[str], enabled: bool, title: str | None = None) -> Iterator[Record]:
    """Run the body; when `enabled` and it succeeds, write what it printed to RESULTS/NAME.txt and copy
    the plots it kept to RESULTS/NAME.png (one per suffix). `title` heads the file (default `recsys bench NAME`)."""
    record = Record(enabled)
    if not enabled:
        yield record
        return
    # The commit is read before the run: what is committed while it runs is not what it measured.
    commit = _commit()
    tee, console, t0 = _Tee(sys.stdout), sys.stdout, time.perf_counter()
    sys.stdout = tee  # type: ignore[assignment]
    try:
        yield record
    finally:
        sys.stdout = console
    RESULTS.mkdir(parents=True, exist_ok=True)
    body = tee.copy.getvalue()
    for plot in record.plots:
        kept = RESULTS / f"{name}{plot.suffix}"
        shutil.copyfile(plot, kept)  # a plot the run said it wrote but did not is an error, not a gap
        body += f"# plot: {kept.name} (from {plot})\n"
    out = RESULTS / f"{name}.txt"
    out.write_text(header(title or f"recsys bench {name}", argv, time.perf_counter() - t0, commit) + body)
    print(
        f"recorded: {out}" + "".join(f", {RESULTS / (name + p.suffix)}" for p in record.plots),
        file=sys.stderr,
    )
