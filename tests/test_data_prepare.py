"""Preprocessing: vocabularies, labels, splits, `prepare` end to end (MDS round trip, metadata, refusals)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.cli import main as cli
from recsys.config import config_from_dict, load_config
from recsys.data import splits as S
from recsys.data import vocab as V
from recsys.data.loader import read_split_arrays
from recsys.data.metadata import OOV_TOKEN, read_metadata, read_vocab
from recsys.data.prepare import binarize, prepare
from recsys.errors import UserError


# ------------------------------------------------------------------------------------------- vocab
def test_vocab_round_trip_keeps_id_zero_and_orders_stably(tmp_path: Path) -> None:
    col = pa.chunked_array([["0", "7", None, "0", "x", "7", "0", "rare", "onlyval"]])
    train = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    codes, dictionary = V.encode(col)
    vocab, lookup = V.fit(codes, dictionary, train, min_count=1)
    assert vocab.ids == ["0", "7", "rare", "x"]  # by train count desc, then text
    rows = V.apply(codes, lookup)
    assert rows.tolist() == [1, 2, 0, 1, 4, 2, 1, 3, 0]  # missing and val-only ids → OOV row 0
    for raw in vocab.ids:  # row → raw id → row
        assert vocab.raw(vocab.row(raw)) == raw
    assert vocab.raw(0) == OOV_TOKEN and vocab.row("unseen") == 0
    vocab.save(tmp_path / "v.txt")
    assert V.Vocab.load(tmp_path / "v.txt").ids == vocab.ids
    assert (tmp_path / "v.txt").read_text().splitlines()[:2] == [OOV_TOKEN, "0"]

    vocab2, lookup2 = V.fit(codes, dictionary, train, min_count=2)
    assert vocab2.ids == ["0", "7"] and V.apply(codes, lookup2).tolist() == [1, 2, 0, 1, 0, 2, 1, 0, 0]


# ------------------------------------------------------------------------------------------ labels
def test_label_modes() -> None:
    from recsys.config import LabelConfig

    rating = np.array([1.0, 4.0, 5.0, 3.0])
    assign = np.array([0, 0, 0, 2], np.int8)
    assert binarize(rating, assign, LabelConfig(mode="threshold", threshold=4))[0].tolist() == [0, 1, 1, 0]
    lab, info = binarize(rating, assign, LabelConfig(mode="mean"))  # mean of train rows only: 10/3
    assert lab.tolist() == [0, 1, 1, 0] and info["threshold"] == pytest.approx(10 / 3)
    assert binarize(None, assign, LabelConfig(mode="all_positive"))[0].tolist() == [1, 1, 1, 1]
    with pytest.raises(UserError, match="as_is needs 0/1 labels"):
        binarize(rating, assign, LabelConfig(mode="as_is"))


# ------------------------------------------------------------------------------------------ splits
def test_random_split_is_seeded() -> None:
    a = S.random_split(1000, 0.1, 0.2, seed=3)
    assert np.array_equal(a, S.random_split(1000, 0.1, 0.2, seed=3))
    assert not np.array_equal(a, S.random_split(1000, 0.1, 0.2, seed=4))
    # Each row is decided alone from (seed, position): counts are binomial, not exact fractions.
    train, val, test = np.bincount(a).tolist()
    assert abs(val - 100) < 4 * (1000 * 0.1 * 0.9) ** 0.5 and abs(test - 200) < 4 * (1000 * 0.2 * 0.8) ** 0.5
    assert np.array_equal(S.random_split_at(np.arange(500, 1000), 0.1, 0.2, seed=3), a[500:])


def test_leave_last_n_is_per_user_temporal() -> None:
    users = np.array([1, 2, 1, 1, 2, 1, 3])
    ts = np.array([10, 5, 30, 20, 6, 40, 1])
    # user 1 in time order: rows 0 (10), 3 (20), 2 (30), 5 (40) → test row 5, val row 2
    # user 2 has 2 rows: only test is held out (one train row kept); user 3 has 1 row: train
    assert S.leave_last_n(users, ts, 1).tolist() == [0, 0, 1, 0, 2, 2, 0]
    assert np.array_equal(S.leave_last_n(users, ts, 1), S.leave_last_n(users, ts, 1))


def test_by_day() -> None:
    assert S.by_day(np.array([0, 0, 1, 2, 2, 3])).tolist() == [0, 0, 0, 1, 1, 2]
    with pytest.raises(UserError, match="at least 3 days"):
        S.by_day(np.array([0, 1]))


# ------------------------------------------------------------------------------------ end to end
def ml_config(tmp_path: Path, path: Path, **data: object) -> object:
    return config_from_dict(
        {
            "name": "t",
            "data": {
                "source": {"kind": "movielens", "path": str(path)},
                "prepared_dir": str(tmp_path / "prep"),
                "label": {"mode": "threshold", "threshold": 4},
                "split": {"mode": "leave_last_n", "n": 1},
                "block_size": 4,
                **data,
            },
            "model": {"kind": "two_tower"},
            "train": {"batch_size": 8},
            "eval": {"batch_size": 8},
        }
    )


def write_udata(path: Path, users: int = 6, per_user: int = 7, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    rows = [
        (u, int(rng.integers(0, 20)), int(rng.integers(1, 6)), 1000 + 10 * k + u)
        for u in range(users)
        for k in range(per_user)
    ]
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return rows


def test_prepare_mds_round_trip_equals_source_rows(tmp_path: Path) -> None:
    src = tmp_path / "u.data"
    rows = write_udata(src)
    cfg = ml_config(tmp_path, src)
    meta = prepare(cfg, overwrite=False)
    assert meta.kind == "interactions" and meta.user_feature == "user_id" and meta.item_feature == "item_id"
    assert {k: v.rows for k, v in meta.splits.items()} == {"train": 30, "val": 6, "test": 6}
    uv = read_vocab(cfg.data.prepared_dir, meta.sparse_features[0])
    iv = read_vocab(cfg.data.prepared_dir, meta.sparse_features[1])
    assert "0" in uv  # user id 0 kept
    got = []
    for split in ("train", "val", "test"):
        a = read_split_arrays(cfg.data.prepared_dir, split)
        assert a["dense"].shape == (meta.splits[split].rows, 0)
        assert meta.splits[split].positives == int(a["label"].sum())
        for lab, (u, i) in zip(a["label"], a["sparse"], strict=True):
            got.append((split, uv[u], iv[i], float(lab)))
    # Each user's last interaction is test, the one before val (computed here from the definition).
    by_user: dict[int, list[tuple]] = {}
    for u, i, r, t in rows:
        by_user.setdefault(u, []).append((t, i, r))
    split_of = {}
    for u, v in by_user.items():
        v.sort()
        for k, (t, i, _r) in enumerate(v):
            split_of[(u, i, t)] = "test" if k == len(v) - 1 else "val" if k == len(v) - 2 else "train"
    train_items = {str(i) for (u, i, t), s in split_of.items() if s == "train"}
    # Every source row comes back exactly once, in its split, with raw ids through the vocabularies
    # (items never seen in train map to the OOV row) and label = rating >= 4.
    want = sorted(
        (split_of[(u, i, t)], str(u), str(i) if str(i) in train_items else OOV_TOKEN, float(r >= 4))
        for u, i, r, t in rows
    )
    assert sorted(got) == want
    assert meta.sources[0].sha256 and meta.label == {"mode": "threshold", "threshold": 4.0}


def test_prepare_is_deterministic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "u.data"
    write_udata(src)
    cfg = ml_config(
        tmp_path, src, split={"mode": "random", "seed": 5, "val_fraction": 0.2, "test_fraction": 0.2}
    )
    prepare(cfg, overwrite=False)
    first = {s: read_split_arrays(cfg.data.prepared_dir, s) for s in ("train", "val", "test")}
    with pytest.raises(
        UserError, match=rf"^{cfg.data.prepared_dir}: already holds prepared data.*--overwrite"
    ):
        prepare(cfg, overwrite=False)
    prepare(cfg, overwrite=True)
    for s, arrays in first.items():
        again = read_split_arrays(cfg.data.prepared_dir, s)
        for k in arrays:
            assert np.array_equal(arrays[k], again[k])


def test_prepare_skip_bad_rows_records_counts_in_metadata(tmp_path: Path) -> None:
    src = tmp_path / "u.data"
    write_udata(src)
    with open(src, "a") as f:
        f.write("9\t9\tfive\t1\n9\t9\n")
    cfg = ml_config(tmp_path, src)
    with pytest.raises(UserError, match=rf"{src}:43: column 'rating'"):
        prepare(cfg, overwrite=False)
    cfg.data.skip_bad_rows = True
    meta = prepare(cfg, overwrite=False)
    bad = read_metadata(cfg.data.prepared_dir).sources[0].bad_rows
    assert (
        bad.count == 2
        and bad.examples[0].startswith(f"{src}:43:")
        and bad.examples[1].startswith(f"{src}:44:")
    )
    assert meta.sources[0].rows == 42


def test_presplit_source(tmp_path: Path) -> None:
    base, test = tmp_path / "u1.base", tmp_path / "u1.test"
    write_udata(base, seed=1)
    write_udata(test, users=3, per_user=2, seed=2)
    cfg = config_from_dict(
        {
            "name": "t",
            "data": {
                "source": {
                    "kind": "presplit",
                    "train": {"kind": "movielens", "path": str(base)},
                    "test": {"kind": "movielens", "path": str(test)},
                },
                "prepared_dir": str(tmp_path / "prep"),
                "label": {"mode": "all_positive"},
                "split": {"mode": "presplit", "val_fraction": 0.25},
                "block_size": 4,
            },
            "model": {"kind": "two_tower"},
            "train": {"batch_size": 8},
            "eval": {"batch_size": 8},
        }
    )
    meta = prepare(cfg, overwrite=False)
    assert meta.splits["test"].rows == 6 and meta.splits["train"].rows + meta.splits["val"].rows == 42
    val = meta.splits["val"].rows  # val carved out of train row by row (binomial, ~10.5 of 42)
    assert val == int((S.random_split(42, 0.25, 0.0, seed=0) == S.VAL).sum()) and 0 < val < 42
    assert len(meta.sources) == 2


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("two_tower_synth", ["data.source.num_users=100", "data.source.num_items=400"]),
        ("dlrm_synth", ["data.source.rows=5000", "data.source.cardinality=50"]),
    ],
)
def test_shipped_synthetic_configs_prepare_at_tiny_size(
    tmp_path: Path, name: str, overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data", "prepare", "--config", name, "--set", f"data.prepared_dir={tmp_path / 'p'}"]
    for o in overrides:
        argv += ["--set", o]
    assert cli(argv) == 0
    cfg = load_config(name, [f"data.prepared_dir={tmp_path / 'p'}", *overrides])
    meta = read_metadata(cfg.data.prepared_dir)
    assert (
        sum(s.rows for s in meta.splits.values())
        == json.loads((tmp_path / "p/raw/synth.json").read_text())["rows"]
    )
    assert meta.synthetic is not None
    if name == "dlrm_synth":
        assert 0.6 < meta.synthetic["bayes_auc"] < 1 and set(meta.synthetic["bayes_auc_by_split"]) == {
            "train",
            "val",
            "test",
        }
        assert len(meta.dense_features) == 13 and len(meta.sparse_features) == 26
    else:
        assert meta.synthetic["oracle_recall_at_10"] > 2 * meta.synthetic["popularity_recall_at_10"]
    assert cli(argv) == 2  # second time: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
