"""`recsys bench continuous`'s own rules: equal-count time windows and the returning-user cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.bench.continuous import known_user_rows, returning_users, window_bounds


def test_windows_cut_sorted_timestamps_into_equal_counts_with_half_open_bounds() -> None:
    stamps = np.array([50, 10, 40, 20, 30, 60, 70, 80, 90, 100, 110, 120])
    bounds = window_bounds(stamps, 3)
    assert bounds == [10, 50, 90, 121]
    counts = [int(((stamps >= a) & (stamps < b)).sum()) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert counts == [4, 4, 4] and sum(counts) == len(stamps)  # every row in exactly one window


def test_too_many_windows_for_the_timestamps_is_an_error() -> None:
    with pytest.raises(ValueError, match="too many"):
        window_bounds(np.array([5, 5, 5, 5]), 2)


def test_returning_users_are_the_test_rows_of_users_the_window_before_had(tmp_path: Path) -> None:
    """Two real windows prepared by `recsys data prepare --since/--until --previous`; the cut is checked
    against a brute-force count over raw user ids (not vocabulary rows)."""
    from recsys.cli import main
    from recsys.data.metadata import OOV_TOKEN, read_metadata, read_vocab
    from recsys.promotion.window_eval import open_window
    from tests.test_data_windows import config_sets, write_source

    write_source(tmp_path, rows=600)  # users and items grow with time: window 2 brings new users
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    for out, window in ((w1, ["--until", "1300"]), (w2, ["--since", "1300", "--previous", str(w1)])):
        # A large test split, so that window 2's test holds OOV users and the first user it added.
        sets = [
            a for s in [*config_sets(tmp_path, out), "data.split.test_fraction=0.3"] for a in ("--set", s)
        ]
        assert main(["data", "prepare", "--config", "movielens_100k", *sets, *window]) == 0

    meta1 = read_metadata(w1)
    before = set(read_vocab(w1, meta1.sparse_features[meta1.sparse_index("user_id")])) - {OOV_TOKEN}
    win = open_window(w2)
    col = win.meta.sparse_index("user_id")
    users2 = read_vocab(w2, win.meta.sparse_features[col])
    rows = win.arrays["test"]["sparse"][:, col]
    raw = [users2[r] for r in rows]
    want = [u for u in raw if u in before]  # brute force: by raw id, in row order
    known = known_user_rows(w1)
    # The edges the cut must get right are in the data: OOV users (row 0) and the first added user's row.
    assert 0 < len(want) < len(raw) and 0 in rows and known in rows

    back = returning_users(win, known)
    got = [users2[r] for r in back.arrays["test"]["sparse"][:, col]]
    assert got == want
    assert back.users == len(set(want))
    keep = np.isin(raw, list(before))
    for key, values in win.arrays["test"].items():  # every column cut alike, nothing reordered
        np.testing.assert_array_equal(back.arrays["test"][key], values[keep])
    assert back.arrays["train"] is win.arrays["train"]  # only the scored split is cut
