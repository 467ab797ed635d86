"""data.history: each row's previous items, strictly earlier in time (ties by file order), as MDS columns
and the jagged `history` KJT feature; checked against a brute-force reference on unsorted input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.config import Config, config_from_dict
from recsys.data.loader import iter_eval_batches, make_train_loader, read_split_arrays
from recsys.data.metadata import SPLITS, read_metadata, read_vocab
from recsys.data.prepare import prepare
from recsys.errors import UserError

L = 4


def write_events(path: Path, rows: int = 300, seed: int = 5) -> list[tuple[str, str, int]]:
    """(user, item, ts) in a shuffled file order with many equal timestamps; the item names the line."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 12, rows)
    ts = rng.integers(0, 25, rows)  # ~12 events per user over 25 seconds: many ties
    events = [(f"u{u}", f"i{k}", int(t)) for k, (u, t) in enumerate(zip(users, ts, strict=True))]
    path.write_text("user,item,ts\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    return events


def reference(events: list[tuple[str, str, int]], parts: np.ndarray | None = None) -> list[list[str]]:
    """Per line: the user's items on lines strictly earlier in (ts, line) order, last L, oldest first —
    with `parts` (split codes per line), only lines of the line's part or an earlier one (train < val <
    test); without, every earlier line (the rule before parts were known to data.history)."""
    part = np.zeros(len(events), np.int8) if parts is None else parts
    out = []
    for k, (u, _, t) in enumerate(events):
        earlier = [
            (t2, k2, i2)
            for k2, (u2, i2, t2) in enumerate(events)
            if u2 == u and (t2, k2) < (t, k) and part[k2] <= part[k]
        ]
        out.append([i for _, _, i in sorted(earlier)][-L:])
    return out


def random_parts(n: int) -> np.ndarray:
    """The split codes make_cfg's random split gives lines 0..n-1."""
    from recsys.data import splits as S

    return S.random_split(n, 0.2, 0.2, 1)


def make_cfg(src: Path, out: Path, chunk_rows: int = 1000, model: dict | None = None) -> Config:
    return config_from_dict(
        {
            "name": "history-test",
            "data": {
                "source": {"kind": "table", "path": str(src), "user": "user", "item": "item",
                           "sparse": ["user", "item"], "timestamp": "ts"},
                "prepared_dir": str(out),
                "label": {"mode": "all_positive"},
                "split": {"mode": "random", "val_fraction": 0.2, "test_fraction": 0.2, "seed": 1},
                "block_size": 4,
                "chunk_rows": chunk_rows,
                "shuffle_window": 64,
                "history": {"length": L},
            },
            "model": model or {"kind": "two_tower", "embedding_dim": 8,
                               "two_tower": {"user_features": ["user"], "item_features": ["item"],
                                             "history_pooling": "mean"}},
            "train": {"batch_size": 8, "pipeline": False},
            "eval": {"batch_size": 8},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, list[tuple[str, str, int]]]:
    d = tmp_path_factory.mktemp("history")
    events = write_events(d / "events.csv")
    cfg = make_cfg(d / "events.csv", d / "prep", chunk_rows=37)  # chunks cut users' events apart
    prepare(cfg, overwrite=False)
    return cfg, events


def _raw_histories(cfg: Config, split: str) -> tuple[list[str], list[list[str]]]:
    """(item of each row, its history as raw item ids) of one split."""
    meta = read_metadata(cfg.data.prepared_dir)
    vocab = read_vocab(cfg.data.prepared_dir, meta.sparse_features[meta.sparse_index("item")])
    a = read_split_arrays(cfg.data.prepared_dir, split, meta)
    lengths = np.minimum(a["history_rank"], L)
    hist = [[vocab[r] for r in row[:n]] for row, n in zip(a["history"], lengths, strict=True)]
    return [vocab[r] for r in a["sparse"][:, meta.sparse_index("item")]], hist


def test_histories_match_the_reference_no_self_no_future_ties_by_line(prepared) -> None:  # noqa: ANN001
    cfg, events = prepared
    ref = reference(events, random_parts(len(events)))
    meta = read_metadata(cfg.data.prepared_dir)
    assert meta.history_length == L
    # Every item is its line's own id, so a row's line is known from its item (when in the vocabulary).
    by_item = {i: k for k, (_, i, _) in enumerate(events)}
    vocab_ids = set(read_vocab(cfg.data.prepared_dir, meta.sparse_features[meta.sparse_index("item")]))
    checked = 0
    for split in ("train", "val", "test"):
        items, hists = _raw_histories(cfg, split)
        for item, hist in zip(items, hists, strict=True):
            if item == "<OOV>":
                continue  # val/test items are not in the train vocabulary
            k = by_item[item]
            want = [i if i in vocab_ids else "<OOV>" for i in ref[k]]
            assert hist == want, (split, events[k], hist, want)
            checked += 1
    assert checked == meta.splits["train"].rows  # every train row, in its shuffled place
    # the property itself, on the raw lines: no history holds its own line or a later one
    for k, h in enumerate(ref):
        u, _, t = events[k]
        for i in h:
            k2 = by_item[i]
            assert events[k2][0] == u and (events[k2][2], k2) < (t, k)
    assert sum(len(h) == L for h in ref) > 100 and any(
        any(events[by_item[i]][2] == events[k][2] for i in h) for k, h in enumerate(ref)
    )  # the data exercises truncation and ties


def test_val_test_rows_keep_their_lengths(prepared) -> None:  # noqa: ANN001
    """val/test keep source order: their ranks are the reference's history sizes, line by line."""
    cfg, events = prepared
    from recsys.data import splits as S

    assign = random_parts(len(events))
    sizes = [
        sum(1 for k2, (u2, _, t2) in enumerate(events) if u2 == u and (t2, k2) < (t, k) and assign[k2] <= a)
        for k, ((u, _, t), a) in enumerate(zip(events, assign, strict=True))
    ]
    for split, code in (("val", S.VAL), ("test", S.TEST)):
        ranks = read_split_arrays(cfg.data.prepared_dir, split)["history_rank"].tolist()
        assert ranks == [s for s, a in zip(sizes, assign, strict=True) if a == code]


def test_no_train_row_sees_a_val_or_test_item_on_a_random_split(prepared) -> None:  # noqa: ANN001
    """The leak data.history closes: a train row's history holds train items only, never one of its
    user's val/test rows. Every line has its own item, so the vocabulary (train items) tells the parts
    apart: a val/test item is <OOV>, and train histories have none while val/test ones do."""
    from recsys.data import splits as S

    cfg, events = prepared
    oov = {split: sum(i == "<OOV>" for h in _raw_histories(cfg, split)[1] for i in h) for split in SPLITS}
    items = sum(len(h) for h in _raw_histories(cfg, "train")[1])
    assert items > 500 and oov["train"] == 0 and oov["val"] > 0 and oov["test"] > 0
    # and the data has what the rule removes: train rows with earlier val/test events of their user
    assign = random_parts(len(events))
    leaky = [any(assign[int(i[1:])] != S.TRAIN for i in h) for h in reference(events)]
    assert sum(x for x, a in zip(leaky, assign, strict=True) if a == S.TRAIN) > 100


@pytest.mark.parametrize("n", [1, 2])
def test_leave_last_n_histories_are_those_of_every_earlier_event(tmp_path: Path, n: int) -> None:
    """On leave_last_n no earlier event is in a later part: the histories are the rule before parts
    (every earlier event), row for row, the val/test rows' included."""
    events = write_events(tmp_path / "events.csv")
    d = make_cfg(tmp_path / "events.csv", tmp_path / "prep", chunk_rows=37).model_dump(mode="json")
    d["data"]["split"] = {"mode": "leave_last_n", "n": n}
    cfg = config_from_dict(d)
    prepare(cfg, overwrite=False)
    ref = reference(events)
    meta = read_metadata(cfg.data.prepared_dir)
    vocab = read_vocab(cfg.data.prepared_dir, meta.sparse_features[meta.sparse_index("item")])
    users = read_vocab(cfg.data.prepared_dir, meta.sparse_features[meta.sparse_index("user")])
    # A line is known by (user, events of the user before it): val/test items are <OOV> here.
    line_of = {}
    for k, (u, _, t) in enumerate(events):
        line_of[u, sum(1 for k2, (u2, _, t2) in enumerate(events) if u2 == u and (t2, k2) < (t, k))] = k
    rows = 0
    for split in SPLITS:
        a = read_split_arrays(cfg.data.prepared_dir, split, meta)
        for user, hist, rank in zip(a["sparse"][:, 0], a["history"], a["history_rank"], strict=True):
            want = [i if i in vocab else "<OOV>" for i in ref[line_of[users[user], int(rank)]]]
            assert [vocab[r] for r in hist[: min(int(rank), L)]] == want, (split, users[user], rank)
            rows += 1
    assert rows == len(events) and meta.splits["val"].rows == meta.splits["test"].rows == 12 * n


def test_parts_in_time_order_change_nothing_in_the_builder() -> None:
    """HistoryBuilder with parts that follow time per user (a time or day split) gives the output of
    every row seen as train (the rule before parts), byte for byte; a random assignment does not."""
    import pyarrow as pa

    from recsys.data.history import HistoryBuilder

    rng = np.random.default_rng(3)
    n = 5000
    users, items, ts = rng.integers(0, 40, n), rng.integers(0, 300, n), rng.integers(0, 200, n).astype(float)
    by_time = np.digitize(ts, [150, 175]).astype(np.int8)  # train < 150 ≤ val < 175 ≤ test

    def built(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = HistoryBuilder(L, n)
        for at in range(0, n, 700):  # chunks, as prepare feeds them
            cut = slice(at, at + 700)
            b.observe(pa.chunked_array([users[cut].astype(str)]), pa.chunked_array([items[cut].astype(str)]),
                      ts[cut], parts[cut])  # fmt: skip
        b.finish(np.arange(len(b.item_ids())) + 1)
        return b.rows(0, n)

    before = built(np.zeros(n, np.int8))
    after = built(by_time)
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))
    mixed = built(rng.integers(0, 3, n).astype(np.int8))
    assert not np.array_equal(before[1], mixed[1])


def test_chunking_does_not_change_the_output(prepared, tmp_path: Path) -> None:  # noqa: ANN001
    cfg, _ = prepared
    one = make_cfg(Path(cfg.data.source.path), tmp_path / "one", chunk_rows=10_000)
    prepare(one, overwrite=False)
    for split in ("train", "val", "test"):
        a = read_split_arrays(cfg.data.prepared_dir, split)
        b = read_split_arrays(one.data.prepared_dir, split)
        for k in ("sparse", "history", "history_rank"):
            assert np.array_equal(a[k], b[k]), (split, k)


def test_loader_streams_history_as_a_jagged_kjt_feature(prepared) -> None:  # noqa: ANN001
    cfg, _ = prepared
    meta = read_metadata(cfg.data.prepared_dir)
    a = read_split_arrays(cfg.data.prepared_dir, "val", meta)
    _, batches = iter_eval_batches(cfg, meta, "val", 0, 1)
    first = next(batches)
    kjt = first.sparse_features
    assert kjt.keys() == ["user", "item", "history"]
    jt = kjt["history"]
    n = len(first.labels)
    lengths = np.minimum(a["history_rank"][:n], L)
    assert jt.lengths().tolist() == lengths.tolist()
    want = np.concatenate([a["history"][r, : lengths[r]] for r in range(n)])
    assert jt.values().tolist() == want.tolist()
    # the shuffled train loader carries each row's own history (its lengths follow the rows)
    batch = next(iter(make_train_loader(cfg, meta, 1)))
    assert batch.sparse_features["history"].lengths().sum() == len(batch.sparse_features["history"].values())


def test_models_without_history_get_no_history_key_and_old_folders_are_refused(prepared, tmp_path) -> None:  # noqa: ANN001
    cfg, _ = prepared
    meta = read_metadata(cfg.data.prepared_dir)
    plain = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={"two_tower": cfg.model.two_tower.model_copy(update={"history_pooling": "none"})}
            )
        }
    )
    _, batches = iter_eval_batches(plain, meta, "val", 0, 1)
    assert next(batches).sparse_features.keys() == ["user", "item"]
    bare = meta.model_copy(update={"history_length": None})
    with pytest.raises(UserError, match="prepared without histories"):
        iter_eval_batches(cfg, bare, "val", 0, 1)[1].__next__()


def test_history_needs_its_settings() -> None:
    from recsys.config import ConfigError

    base = make_cfg(Path("x.csv"), Path("out")).model_dump(mode="json")
    base["data"]["history"] = None
    with pytest.raises((ConfigError, ValueError), match="needs data.history"):
        config_from_dict(base)
    base["data"]["history"] = {"length": 3}
    base["train"]["pipeline"] = True
    with pytest.raises((ConfigError, ValueError), match="train.pipeline: false"):
        config_from_dict(base)
