"""leave_last_n from per-user last-2n keys (recsys.data.last_events) equals `splits.leave_last_n` of the
whole input, whatever the chunking, with ties, nulls and no timestamps; its state grows with users only."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recsys.data import splits as S
from recsys.data.last_events import LastEvents


def _events(rows: int, users: int, seed: int) -> tuple[pa.Array, np.ndarray]:
    rng = np.random.default_rng(seed)
    # zipf: a few busy users and many with 1 .. 2n events (held out partly or not at all); 0: no user
    ids = [f"u{u}" if u else None for u in rng.zipf(1.3, rows) % users]
    return pa.array(ids, pa.string()), rng.integers(0, 30, rows).astype(np.float64)  # many ties


def _chunked(user: pa.Array, ts: np.ndarray | None, n: int, chunk: int) -> np.ndarray:
    last = LastEvents(n)
    starts = range(0, len(user), chunk)
    for s in starts:
        last.observe(user[s : s + chunk], None if ts is None else ts[s : s + chunk], s)
    return np.concatenate([last.assign(s, len(user[s : s + chunk])) for s in starts])


@pytest.mark.parametrize(
    ("n", "chunk", "timed"), [(1, 7, True), (2, 50, True), (3, 1000, True), (2, 13, False)]
)
def test_equals_leave_last_n_of_the_whole_input(n: int, chunk: int, timed: bool) -> None:
    user, ts = _events(600, 300, seed=n)
    codes = user.dictionary_encode().indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    want = S.leave_last_n(codes, ts if timed else None, n)
    got = _chunked(user, ts if timed else None, n, chunk)
    np.testing.assert_array_equal(got, want)
    assert (want == S.TEST).sum() > 20 and (want == S.VAL).sum() > 20
    sizes = np.bincount(codes + 1)
    assert ((sizes > n) & (sizes <= 2 * n)).any() and (sizes <= n).any()  # users with test but no val, none


def test_state_grows_with_users_not_rows() -> None:
    sizes = []
    for rows in (2_000, 20_000):
        user, ts = _events(rows, 100, seed=1)
        last = LastEvents(1)
        for s in range(0, rows, 500):
            last.observe(user[s : s + 500], ts[s : s + 500], s)
        sizes.append(last.nbytes())
    assert sizes[0] == sizes[1]
