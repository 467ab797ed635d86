"""Time windows of a source: keep the rows whose timestamp lies in [data.window.since, data.window.until).

The bounds are ISO dates/date-times (naive = UTC) or epoch seconds (WindowConfig.bounds), compared with the source's
timestamp column as the readers give it (float seconds; recsys.data.readers). Rows are filtered chunk
by chunk as they are read, so a window costs no memory beyond the chunk; rows without a timestamp
are outside every window, and counted. A source without a timestamp column cannot be windowed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.readers import Table


def iso(seconds: float | None) -> str | None:
    """Epoch seconds as an ISO UTC date-time (for messages and metadata)."""
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()


def is_windowed(cfg: Config) -> bool:
    """Whether cfg selects a time window (since and/or until set)."""
    return cfg.data.window.since is not None or cfg.data.window.until is not None


@dataclass
class WindowCounts:
    """What one pass of the window filter saw."""

    kept: int = 0
    before: int = 0
    after: int = 0
    no_time: int = 0
    first: float | None = None  # earliest timestamp read (any row)
    last: float | None = None  # latest timestamp read


class WindowFilter:
    """Keeps a Table's rows inside [since, until); a no-op when cfg selects no window."""

    def __init__(self, cfg: Config) -> None:
        self.since, self.until = cfg.data.window.bounds()
        self.active = self.since is not None or self.until is not None
        self.kind = cfg.data.source.kind
        self.counts = WindowCounts()

    def reset(self) -> None:
        """Start counting a new pass over the source."""
        self.counts = WindowCounts()

    def apply(self, t: Table) -> Table:
        """The rows of `t` inside the window (t itself when they all are, or no window is set)."""
        if not self.active:
            self.counts.kept += t.rows
            return t
        if t.timestamp is None:
            raise self.no_timestamp()
        ts = t.timestamp
        c = self.counts
        known = ~np.isnan(ts)
        c.no_time += int((~known).sum())
        if known.any():
            lo, hi = float(ts[known].min()), float(ts[known].max())
            c.first = lo if c.first is None else min(c.first, lo)
            c.last = hi if c.last is None else max(c.last, hi)
        keep = known.copy()
        if self.since is not None:
            early = known & (ts < self.since)
            c.before += int(early.sum())
            keep &= ~early
        if self.until is not None:
            late = known & (ts >= self.until)
            c.after += int(late.sum())
            keep &= ~late
        c.kept += int(keep.sum())
        return t if keep.all() else take_rows(t, keep)

    def no_timestamp(self) -> UserError:
        """The error for a window on a source without a timestamp column."""
        return UserError(
            f"data.window: the {self.kind} source has no timestamp column to select a window on "
            "(MovieLens and RecBole have one; a table source names it in data.source.timestamp); "
            "unset data.window.since/until"
        )

    def check_not_empty(self) -> None:
        """After a pass: a window that kept no row is an error that says what the source spans."""
        if not self.active or self.counts.kept:
            return
        c = self.counts
        span = f"{iso(c.first)} .. {iso(c.last)}" if c.first is not None else "no timestamps"
        raise UserError(
            f"data.window: no rows in [{iso(self.since) or 'start'}, {iso(self.until) or 'end'}) — the source's "
            f"timestamps span {span} ({c.before} rows before, {c.after} after); move data.window.since/until"
        )

    def record(self) -> dict[str, Any]:
        """The bounds and the counts of the last pass, for metadata.json."""
        c = self.counts
        return {
            "since": self.since,
            "until": self.until,
            "rows_in_window": c.kept,
            "rows_before": c.before,
            "rows_after": c.after,
            "rows_without_timestamp": c.no_time,
        }


def take_rows(t: Table, keep: np.ndarray) -> Table:
    """The rows of a Table where `keep` (bool mask) is set, in order."""

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[keep]

    mask = pa.array(keep)
    return replace(
        t,
        label=cut(t.label),
        dense=t.dense[keep],
        sparse=[c.filter(mask) for c in t.sparse],
        timestamp=cut(t.timestamp),
        day=cut(t.day),
    )
