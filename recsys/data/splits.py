"""Train/val/test assignment of rows: seeded random, per-user temporal leave-last-N-out, by day."""

from __future__ import annotations

import numpy as np

from recsys.errors import UserError

TRAIN, VAL, TEST = 0, 1, 2


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(seed: int, positions: np.ndarray) -> np.ndarray:
    """A well-mixed uint64 per row from (seed, global row position): splitmix64's finalizer.

    The rule every prepare path shares (in-memory, streaming, Spark through a pandas UDF), so a row's
    split and shuffle key depend only on where it stands in the input, never on how it was chunked.
    """
    with np.errstate(over="ignore"):
        z = (
            np.asarray(positions, dtype=np.uint64)
            + (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(1)) * _GOLDEN
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seed: int, positions: np.ndarray) -> np.ndarray:
    """A uniform float64 in [0, 1) per row from (seed, position) (the top 53 bits of mix64)."""
    return (mix64(seed, positions) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_split_at(
    positions: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Seeded random assignment (int8 per row) decided per row from (seed, position): test where
    uniform < test_fraction, val where it is below test_fraction + val_fraction, else train."""
    if val_fraction + test_fraction >= 1:
        raise UserError("data.split: val_fraction + test_fraction must be below 1")
    u = uniform(seed, positions)
    out = np.full(len(u), TRAIN, dtype=np.int8)
    out[u < test_fraction + val_fraction] = VAL
    out[u < test_fraction] = TEST
    return out


def random_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """random_split_at for rows 0..n-1 (the whole input in one piece)."""
    return random_split_at(np.arange(n, dtype=np.int64), val_fraction, test_fraction, seed)


def shuffle_keys(seed: int, positions: np.ndarray) -> np.ndarray:
    """Sort key of train rows within a shuffle window: mix64 of (split seed + 1, position)."""
    return mix64(seed + 1, positions)


def leave_last_n(users: np.ndarray, timestamps: np.ndarray | None, n: int) -> np.ndarray:
    """Per user in time order (ties: file order): the last n rows are test, the n before val.

    A user keeps at least one train row: with fewer than 2n+1 rows only test is held out, with
    fewer than n+1 everything stays in train.
    """
    rows = len(users)
    pos = np.arange(rows)
    order = np.lexsort((pos, timestamps if timestamps is not None else pos, users))
    u = users[order]
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    sizes = np.diff(np.r_[starts, rows])
    size_of_row = np.repeat(sizes, sizes)
    rank_from_end = np.repeat(starts + sizes, sizes) - np.arange(rows) - 1  # 0 = last row of the user
    out_sorted = np.full(rows, TRAIN, dtype=np.int8)
    out_sorted[(rank_from_end < n) & (size_of_row > n)] = TEST
    out_sorted[(rank_from_end >= n) & (rank_from_end < 2 * n) & (size_of_row > 2 * n)] = VAL
    out = np.empty(rows, dtype=np.int8)
    out[order] = out_sorted
    return out


def by_day(days: np.ndarray) -> np.ndarray:
    """Criteo by day: the last day is test, the one before val, the rest train."""
    distinct = np.unique(days)
    if len(distinct) < 3:
        raise UserError(
            f"data.split.mode by_day needs at least 3 days (day files); got {len(distinct)}: "
            "add day files or use mode: random"
        )
    out = np.full(len(days), TRAIN, dtype=np.int8)
    out[days == distinct[-1]] = TEST
    out[days == distinct[-2]] = VAL
    return out
