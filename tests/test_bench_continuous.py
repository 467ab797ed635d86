"""`recsys bench continuous`'s own rules: equal-count time windows and the returning-user cut."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.bench.continuous import returning_users, window_bounds


def test_windows_cut_sorted_timestamps_into_equal_counts_with_half_open_bounds() -> None:
    stamps = np.array([50, 10, 40, 20, 30, 60, 70, 80, 90, 100, 110, 120])
    bounds = window_bounds(stamps, 3)
    assert bounds == [10, 50, 90, 121]
    counts = [int(((stamps >= a) & (stamps < b)).sum()) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert counts == [4, 4, 4] and sum(counts) == len(stamps)  # every row in exactly one window


def test_too_many_windows_for_the_timestamps_is_an_error() -> None:
    with pytest.raises(ValueError, match="too many"):
        window_bounds(np.array([5, 5, 5, 5]), 2)


@dataclass
class _Meta:
    user_feature: str = "user_id"

    def sparse_index(self, name: str) -> int:
        return {"user_id": 0, "item_id": 1}[name]


@dataclass
class _Window:
    path: Path
    meta: Any
    arrays: dict[str, dict[str, np.ndarray]]


def test_returning_users_keeps_the_rows_of_users_the_window_before_had() -> None:
    sparse = np.array([[1, 7], [4, 8], [2, 9], [0, 3], [5, 1], [3, 2]])  # user rows 1..3 known before
    test = {"label": np.ones(6, np.float32), "sparse": sparse, "dense": np.zeros((6, 1), np.float32)}
    win = _Window(Path("w"), _Meta(), {"train": test, "test": test})
    back = returning_users(win, known_rows=4)
    assert back.arrays["test"]["sparse"].tolist() == [[1, 7], [2, 9], [3, 2]]  # not OOV (0), not new (4, 5)
    assert back.users == 3
    assert back.arrays["train"] is test  # only the scored split is cut
