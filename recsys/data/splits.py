"""Train/val/test assignment of rows: seeded random, per-user temporal leave-last-N-out, by day."""

from __future__ import annotations

import numpy as np

from recsys.errors import UserError

TRAIN, VAL, TEST = 0, 1, 2


def random_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Seeded random assignment (int8 per row): the first test_fraction of a permutation is test, then val."""
    if val_fraction + test_fraction >= 1:
        raise UserError("data.split: val_fraction + test_fraction must be below 1")
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    out = np.full(n, TRAIN, dtype=np.int8)
    out[perm[:n_test]] = TEST
    out[perm[n_test : n_test + n_val]] = VAL
    return out


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
