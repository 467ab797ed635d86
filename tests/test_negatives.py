"""Sampled negatives (`data.negatives`): no interaction of the user among a row's negatives, seeded,
the counts, and through `recsys data prepare` on RecBole files: item side features follow the item."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.config import load_config
from recsys.data import splits as S
from recsys.data.negatives import CONST_DENSE, sample_negatives
from recsys.errors import UserError


def _interactions(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """50 users x ~12 of 40 items each; per user the last row is test and the one before val."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(50):
        chosen = rng.choice(40, size=rng.integers(3, 20), replace=False)
        users += [u] * len(chosen)
        items += list(chosen)
    users_a, items_a = np.array(users), np.array(items)
    return users_a, items_a, S.leave_last_n(users_a, None, 1)


def test_negatives_avoid_interactions_are_seeded_and_counted() -> None:
    users, items, assign = _interactions()
    positive = np.ones(len(users), bool)
    positive[::7] = False  # label-0 rows: still interactions (never drawn), but get no negatives
    src, neg = sample_negatives(users, items, assign, positive, 3, seed=1)
    assert len(src) == 3 * int(positive.sum())
    assert np.array_equal(np.bincount(src, minlength=len(users)), 3 * positive)
    # A negative is never an item of its user in the row's split or an earlier one (train < val < test).
    for r, i in zip(src, neg, strict=True):
        earlier = (users == users[r]) & (assign <= assign[r])
        assert i not in items[earlier]
    # Train negatives never look at later splits: some of them are the user's own val/test items.
    later = [(r, i) for r, i in zip(src, neg, strict=True) if assign[r] == S.TRAIN]
    held_out = {(users[r], items[r]) for r in np.flatnonzero(assign != S.TRAIN)}
    assert any((users[r], i) in held_out for r, i in later)
    assert set(neg) <= set(items[assign == S.TRAIN])  # the catalogue retrieval can return
    again = sample_negatives(users, items, assign, positive, 3, seed=1)
    other = sample_negatives(users, items, assign, positive, 3, seed=2)
    assert np.array_equal(again[1], neg) and np.array_equal(again[0], src)
    assert not np.array_equal(other[1], neg)


def test_negatives_skip_missing_ids_and_full_users() -> None:
    users = np.array([0, 0, 1, -1])
    items = np.array([0, 1, 0, 1])
    assign = np.zeros(4, np.int8)
    # User 0 has seen the whole catalogue {0, 1}: no negative exists; user 1 can only get item 1.
    src, neg = sample_negatives(users, items, assign, np.ones(4, bool), 5, seed=0)
    assert src.tolist() == [2] * 5 and neg.tolist() == [1] * 5


def _recbole(root: Path) -> Path:
    """Tiny RecBole atomic files: 30 users, 25 items with a genre and a year each."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    t = 0
    for u in range(30):
        for i in rng.choice(25, size=int(rng.integers(4, 10)), replace=False):
            t += 1
            inter.append(f"u{u}\ti{i}\t4\t{t}")
    (root / "x.inter").write_text("\n".join(inter) + "\n")
    users = ["user_id:token\tage:token"] + [f"u{u}\t{20 + u % 5}" for u in range(30)]
    (root / "x.user").write_text("\n".join(users) + "\n")
    items = ["item_id:token\tclass:token_seq\trelease_year:token"]
    items += [f"i{i}\tg{i % 4}\t{1990 + i}" for i in range(25)]
    (root / "x.item").write_text("\n".join(items) + "\n")
    return root


def test_prepare_writes_negatives_with_the_items_side_features(tmp_path: Path) -> None:
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare

    raw = _recbole(tmp_path / "raw")
    cfg = load_config(
        "movielens_100k_ranker",
        [
            f"data.source.inter={raw / 'x.inter'}",
            f"data.source.user={raw / 'x.user'}",
            f"data.source.item={raw / 'x.item'}",
            "data.source.user_features=[age]",
            "data.source.seq_slots=1",
            "data.negatives.per_positive=2",
            "data.split.mode=leave_last_n",  # one val and one test positive per user: counts below
            "data.block_size=8",
            "train.batch_size=64",
            "eval.batch_size=64",
            f"data.prepared_dir={tmp_path / 'prepared'}",
        ],
    )
    meta = prepare(cfg, overwrite=False)
    assert meta.dense_features == [CONST_DENSE]
    names = [f.name for f in meta.sparse_features]
    ui, ii, gi, yi = (names.index(n) for n in ("user_id", "item_id", "genre_0", "year"))
    seen: set[tuple[int, int]] = set()
    for split in ("train", "val", "test"):
        a = read_split_arrays(cfg.data.prepared_dir, split, meta)
        pos, neg = a["label"] > 0, a["label"] == 0
        assert meta.splits[split].positives == int(pos.sum()) == {"train": 184 - 60}.get(split, 30)
        assert int(neg.sum()) == 2 * int(pos.sum())
        seen |= set(zip(a["sparse"][pos, ui].tolist(), a["sparse"][pos, ii].tolist(), strict=True))
        negatives = set(zip(a["sparse"][neg, ui].tolist(), a["sparse"][neg, ii].tolist(), strict=True))
        assert not negatives & seen  # none is an interaction of this split or an earlier one
        # Every row of an item carries that item's genre and year, positives and negatives alike.
        for col in (gi, yi):
            pairs = set(zip(a["sparse"][:, ii].tolist(), a["sparse"][:, col].tolist(), strict=True))
            assert len(pairs) == len({i for i, _ in pairs})
        assert np.all(a["dense"] == 1.0)
    # data_settings records the negatives, so a folder prepared without them is a different one.
    assert read_metadata(cfg.data.prepared_dir).settings["negatives"] == {"per_positive": 2, "seed": 0}


def test_negatives_need_interaction_data(tmp_path: Path) -> None:
    from recsys.data.prepare import prepare

    csv = tmp_path / "ctr.csv"
    csv.write_text("label,a\n1,x\n0,y\n")
    src = f"{{kind: table, path: {csv}, label: label, sparse: [a]}}"
    cfg = load_config(
        "dlrm_synth",
        [
            f"data.source={src}",
            "data.split.mode=random",
            "data.negatives.per_positive=1",
            f"data.prepared_dir={tmp_path / 'p'}",
        ],
    )
    with pytest.raises(UserError, match="data.negatives.per_positive: needs interaction data"):
        prepare(cfg, overwrite=False)
