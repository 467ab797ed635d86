"""data.history and leave_last_n with rows without a user or an item, whole chunks of them included:
rows without a user carry an empty history and are in no one's; a row without an item is in its
user's later histories as row 0 (the OOV row), as an item outside the vocabulary is. Checked on the
builder against a brute-force reference, through prepare (where an empty user/item is a bad row), and
on the Spark path's `with_history` against the builder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from recsys.config import config_from_dict
from recsys.data import splits as S
from recsys.data.history import KNOWN_PARTS, HistoryBuilder
from recsys.data.last_events import LastEvents
from tests import test_spark
from tests.test_spark import needs_spark

spark = test_spark.spark  # the module's local[2] session, as a fixture of this module too

L, N, CHUNK = 4, 240, 20
#: Parts a row of each part draws on under the profile rule (tests/test_history_profile.py).
PROFILE_KNOWN = {S.TRAIN: (S.TRAIN,), S.VAL: (S.TRAIN,), S.TEST: (S.TRAIN, S.VAL)}


def events(seed: int = 3) -> tuple[list, list, np.ndarray, np.ndarray]:
    """(users, items, ts, parts) of N rows: chunk 2 has no user at all, chunk 4 no item at all, and a
    few scattered rows lack one or the other; items name their line (item k → row k + 1)."""
    rng = np.random.default_rng(seed)
    users: list = [f"u{u}" for u in rng.integers(0, 8, N)]
    items: list = [str(k) for k in range(N)]
    for k in range(2 * CHUNK, 3 * CHUNK):
        users[k] = None
    for k in range(4 * CHUNK, 5 * CHUNK):
        items[k] = None
    for k in rng.choice(N, 12, replace=False):
        if k // CHUNK not in (2, 4):
            (users if k % 2 else items)[k] = None
    return users, items, rng.integers(0, 15, N).astype(float), S.random_split(N, 0.2, 0.2, 1)


def reference(
    users: list, items: list, ts: np.ndarray, parts: np.ndarray, rule: str
) -> list[tuple[list[int], int]]:
    """Per row: (its history as item rows, oldest first, last L; its rank) by plain Python."""
    out = []
    for k, u in enumerate(users):
        if u is None:
            out.append(([], 0))
            continue
        if rule == "causal":
            seen = [
                j
                for j in range(N)
                if users[j] == u and (ts[j], j) < (ts[k], k) and parts[j] in KNOWN_PARTS[int(parts[k])]
            ]
        else:
            seen = [
                j for j in range(N) if users[j] == u and j != k and parts[j] in PROFILE_KNOWN[int(parts[k])]
            ]
        seen.sort(key=lambda j: (ts[j], j))
        out.append(([0 if items[j] is None else j + 1 for j in seen][-L:], len(seen)))
    return out  # fmt: skip


def built(
    users: list, items: list, ts: np.ndarray, parts: np.ndarray, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """(history, rank) from HistoryBuilder fed CHUNK rows at a time; item k → vocabulary row k + 1."""
    b = HistoryBuilder(L, N, rule)
    for at in range(0, N, CHUNK):
        cut = slice(at, at + CHUNK)
        b.observe(pa.chunked_array([pa.array(users[cut], pa.string())]),
                  pa.chunked_array([pa.array(items[cut], pa.string())]), ts[cut], parts[cut])  # fmt: skip
    b.finish(np.array([int(i) + 1 for i in b.item_ids().to_pylist()], np.int64))
    return b.rows(0, N)


@pytest.mark.parametrize("rule", ["causal", "profile"])
def test_builder_with_chunks_without_users_or_items_equals_the_reference(rule: str) -> None:
    users, items, ts, parts = events()
    hist, rank = built(users, items, ts, parts, rule)
    for k, (want, r) in enumerate(reference(users, items, ts, parts, rule)):
        assert (int(rank[k]), hist[k, : min(r, L)].tolist()) == (r, want), (k, users[k], parts[k])
        assert not hist[k, min(r, L) :].any()
    # the data holds what the rule is about: histories through rows without an item (row 0)
    assert ((hist == 0) & (np.arange(L) < np.minimum(rank, L)[:, None])).sum() > 10


def test_last_events_with_a_chunk_without_users_equals_leave_last_n() -> None:
    """Rows without a user form one group, as in splits.leave_last_n (a whole chunk of them too)."""
    users, _, ts, _ = events()
    col = pa.array(users, pa.string())
    codes = col.dictionary_encode().indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    last = LastEvents(2)
    for at in range(0, N, CHUNK):
        last.observe(col[at : at + CHUNK], ts[at : at + CHUNK], at)
    got = np.concatenate([last.assign(at, CHUNK) for at in range(0, N, CHUNK)])
    np.testing.assert_array_equal(got, S.leave_last_n(codes, ts, 2))


def write_csv(path: Path, drop_empty: bool = False) -> None:
    """user,item,ts lines of `events`, a missing user or item an empty field (or the line left out)."""
    users, items, ts, _ = events()
    rows = [(u, i, t) for u, i, t in zip(users, items, ts, strict=True) if not drop_empty or (u and i)]
    path.write_text("user,item,ts\n" + "".join(f"{u or ''},{i or ''},{int(t)}\n" for u, i, t in rows))


def prepare_cfg(src: Path, out: Path, skip: bool, split: str = "random") -> Any:
    return config_from_dict(
        {
            "name": "history-nulls",
            "data": {
                "source": {"kind": "table", "path": str(src), "user": "user", "item": "item",
                           "sparse": ["user", "item"], "timestamp": "ts"},
                "prepared_dir": str(out),
                "label": {"mode": "all_positive"},
                "split": {"mode": split, "seed": 1},
                "block_size": 4,
                "chunk_rows": CHUNK,
                "skip_bad_rows": skip,
                "history": {"length": L},
            },
            "model": {"kind": "two_tower", "embedding_dim": 8,
                      "two_tower": {"user_features": ["user"], "item_features": ["item"],
                                    "history_pooling": "mean"}},
            "train": {"batch_size": 8, "pipeline": False},
        }
    )  # fmt: skip


@pytest.mark.parametrize("split", ["random", "leave_last_n"])
def test_prepare_treats_empty_users_and_items_as_bad_rows(tmp_path: Path, split: str) -> None:
    """Through prepare an empty user or item is a bad row (data.source.user/item are required): refused
    with the file and line, or skipped — whole chunks of them too — giving the folder of the file
    without those lines."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.prepare import prepare
    from recsys.errors import DataError

    write_csv(tmp_path / "nulls.csv")
    write_csv(tmp_path / "clean.csv", drop_empty=True)
    with pytest.raises(DataError, match=r"nulls.csv:\d+.*column '(user|item)' is empty"):
        prepare(
            prepare_cfg(tmp_path / "nulls.csv", tmp_path / "refused", skip=False, split=split),
            overwrite=False,
        )
    prepare(prepare_cfg(tmp_path / "nulls.csv", tmp_path / "skip", skip=True, split=split), overwrite=False)
    prepare(prepare_cfg(tmp_path / "clean.csv", tmp_path / "clean", skip=False, split=split), overwrite=False)
    for name in ("train", "val", "test"):
        x, y = read_split_arrays(tmp_path / "skip", name), read_split_arrays(tmp_path / "clean", name)
        for k in ("sparse", "history", "history_rank"):
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}/{k}")


@needs_spark
@pytest.mark.parametrize(
    ("rule", "split"), [("causal", "random"), ("causal", "leave_last_n"), ("profile", "random")]
)
def test_spark_with_history_equals_the_builder_without_users_or_items(
    rule: str, split: str, spark: Any, tmp_path: Path
) -> None:
    """spark_history.with_history on a frame of rows without a user or an item (as spark_mds maps them:
    raw ids `_s{j}`, vocabulary rows `_r{j}`) gives the builder's columns row for row: no group of
    userless rows sharing items, a missing item as row 0."""
    from recsys.data.spark_history import HISTORY, with_history

    users, items, ts, parts = events()
    if split == "leave_last_n":  # parts that follow time per user: every part's frame is the same
        col = pa.array(users, pa.string())
        codes = col.dictionary_encode().indices.fill_null(-1).to_numpy(zero_copy_only=False)
        parts = S.leave_last_n(codes.astype(np.int64), ts, 1)
    cfg = prepare_cfg(tmp_path / "x.csv", tmp_path / "out", skip=False, split=split)
    h = cfg.data.history.model_copy(update={"rule": rule})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"history": h})})
    rows = [
        (u, i, None if i is None else int(i) + 1, float(t), k, int(p))
        for k, (u, i, t, p) in enumerate(zip(users, items, ts, parts, strict=True))
    ]
    frame = spark.createDataFrame(rows, "_s0 string, _s1 string, _r1 long, _ts double, _pos long, _split int")
    got = {
        r["_pos"]: r[HISTORY]
        for r in with_history(frame, cfg, ["user", "item"]).select("_pos", HISTORY).collect()
    }
    hist, rank = built(users, items, ts, parts, rule)
    for k in range(N):
        assert got[k] == [*hist[k].tolist(), int(rank[k])], (k, users[k], parts[k])


@needs_spark
@pytest.mark.parametrize("split", ["random", pytest.param("leave_last_n", marks=pytest.mark.slow)])
def test_spark_prepare_skips_the_rows_the_file_prepare_skips(split: str, spark: Any, tmp_path: Path) -> None:
    """Parquet with null users and items (whole chunks of them), skip_bad_rows: both paths skip the same
    rows and write equal folders, histories included."""
    import pyarrow.parquet as pq

    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare
    from recsys.data.spark_mds import prepare_dataframe

    users, items, ts, _ = events()
    src = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user": pa.array(users, pa.string()), "item": pa.array(items, pa.string()),
                             "ts": pa.array(ts.astype(np.int64))}), src)  # fmt: skip
    prepare(prepare_cfg(src, tmp_path / "file", skip=True, split=split), overwrite=False)
    prepare_dataframe(
        spark.read.parquet(str(src)), prepare_cfg(src, tmp_path / "spark", skip=True, split=split)
    )
    a, b = read_metadata(tmp_path / "file"), read_metadata(tmp_path / "spark")
    assert a.model_dump(exclude={"sources"}) == b.model_dump(exclude={"sources"})
    assert (
        a.sources[0].bad_rows.count
        == b.sources[0].bad_rows.count
        == sum(u is None or i is None for u, i in zip(users, items, strict=True))
    )
    for name in ("train", "val", "test"):
        x, y = read_split_arrays(tmp_path / "file", name, a), read_split_arrays(tmp_path / "spark", name, b)
        for k in ("sparse", "history", "history_rank"):
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}/{k}")
