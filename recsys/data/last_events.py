"""leave_last_n without per-row state: per user, only the keys of its last 2n events and its event count.

`splits.leave_last_n` orders every row of every user; but a row's split depends only on whether it is
among its user's last 2n events (by time, ties by position) and on the user's event count. So pass 0
keeps, per user, the (time, position) keys of its latest 2n events seen so far and a count, merging
each chunk into them; later passes decide each chunk's rows from those keys alone, by position (a row
that is not among its user's last 2n events is train), so they need no user look-up. Memory grows with
the users (like their vocabulary: 16·2n + 8 bytes a user, plus the user ids), never with the rows; the
assignment equals `splits.leave_last_n` of the whole input (tests/test_last_events.py).

Users are told apart by their raw id (codes in order of first appearance); rows without a user form one
group, as in `splits.leave_last_n`. Without a timestamp column the position is the time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recsys.data import splits as S
from recsys.data.history import _GlobalCodes


class LastEvents:
    """Pass 0: `observe` every chunk in order; then `assign` any chunk's rows to train/val/test."""

    def __init__(self, n: int) -> None:
        self.n, self.k = n, 2 * n
        self._codes = _GlobalCodes()
        # Slot 0 is the group of rows without a user; user code c is slot c + 1.
        self._time = np.zeros((1, self.k), np.float64)  # kept keys, oldest first, right-aligned
        self._pos = np.full((1, self.k), -1, np.int64)  # -1: an empty slot (the user has fewer events)
        self._count = np.zeros(1, np.int64)
        self._timed: bool | None = None  # whether the chunks carry timestamps (all or none)
        self._kept: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # built by the first assign

    def _slots(self, users: np.ndarray) -> np.ndarray:
        return users + 1

    def _grow(self, size: int) -> None:
        extra = size - len(self._count)
        if extra > 0:
            grow = max(extra, len(self._count))  # amortised doubling, not a copy per chunk
            self._time = np.concatenate([self._time, np.zeros((grow, self.k), np.float64)])
            self._pos = np.concatenate([self._pos, np.full((grow, self.k), -1, np.int64)])
            self._count = np.concatenate([self._count, np.zeros(grow, np.int64)])

    def _times(self, timestamp: np.ndarray | None, pos: np.ndarray) -> np.ndarray:
        timed = timestamp is not None
        if self._timed is None:
            self._timed = timed
        elif self._timed != timed:
            raise ValueError("leave_last_n: some chunks have timestamps and others not")
        return np.asarray(timestamp, np.float64) if timed else pos.astype(np.float64)

    def observe(self, user: pa.ChunkedArray | pa.Array, timestamp: np.ndarray | None, start: int) -> None:
        """Merge one chunk (rows start .. start + len - 1, in file order) into the kept keys."""
        self._kept = None
        slots = self._slots(self._codes.add(user))
        pos = np.arange(start, start + len(slots), dtype=np.int64)
        time = self._times(timestamp, pos)
        self._grow(len(self._codes.known) + 1)
        self._count += np.bincount(slots, minlength=len(self._count))
        touched = np.unique(slots)
        old_pos, old_time = self._pos[touched], self._time[touched]
        valid = old_pos >= 0
        all_slot = np.concatenate([np.repeat(touched, valid.sum(axis=1)), slots])
        all_time = np.concatenate([old_time[valid], time])
        all_pos = np.concatenate([old_pos[valid], pos])
        order = np.lexsort((all_pos, all_time, all_slot))
        s, t, p = all_slot[order], all_time[order], all_pos[order]
        # From the end of each slot's run: 0 = its latest event; keep the last k, right-aligned.
        ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
        from_end = np.repeat(ends, np.diff(np.r_[-1, ends])) - np.arange(len(s))
        keep = from_end < self.k
        col = self.k - 1 - from_end[keep]
        self._pos[touched] = -1
        self._pos[s[keep], col] = p[keep]
        self._time[s[keep], col] = t[keep]

    def assign(self, start: int, n: int) -> np.ndarray:
        """int8 split of rows start .. start + n - 1, after every `observe`: a row is val or test only if
        it is among its user's last 2n events, found by its position (no user look-up)."""
        if self._kept is None:  # every kept key by position, once: (position, slot, place from the end)
            valid = self._pos >= 0
            slot, col = np.nonzero(valid)
            order = np.argsort(self._pos[valid], kind="stable")
            self._kept = (self._pos[valid][order], slot[order], (self.k - 1 - col[order]).astype(np.int64))
        pos, slot, from_end = self._kept
        lo, hi = np.searchsorted(pos, [start, start + n])
        rows, from_end, size = pos[lo:hi] - start, from_end[lo:hi], self._count[slot[lo:hi]]
        out = np.full(n, S.TRAIN, np.int8)
        out[rows[(from_end < self.n) & (size > self.n)]] = S.TEST
        out[rows[(from_end >= self.n) & (size > self.k)]] = S.VAL
        return out

    def nbytes(self) -> int:
        """Bytes of the kept state (ids aside): grows with the users, not the rows."""
        return self._time.nbytes + self._pos.nbytes + self._count.nbytes
