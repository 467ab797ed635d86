"""data.history.rule profile: a row's history is its user's last L items of the parts known when the
row's part is scored (train: the other train items; val: train; test: train and val), never the row
itself — checked against a brute-force reference, in the builder and through prepare's MDS columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.config import config_from_dict
from recsys.data import history
from recsys.data import splits as S
from recsys.data.history import HistoryBuilder
from recsys.data.loader import read_split_arrays
from recsys.data.metadata import read_metadata, read_vocab
from recsys.data.prepare import prepare
from tests import test_spark
from tests.test_spark import needs_spark

spark = test_spark.spark  # the local[2] Spark session fixture, for the Spark path's equality test

#: Parts whose events a row of each part draws on under the profile rule.
KNOWN = {S.TRAIN: (S.TRAIN,), S.VAL: (S.TRAIN,), S.TEST: (S.TRAIN, S.VAL)}


def reference(users: list, ts: np.ndarray, parts: np.ndarray, length: int) -> list[tuple[list[int], int]]:
    """Per row k: (the lines of its history, oldest first, its rank) by plain Python over the events."""
    out = []
    for k, u in enumerate(users):
        if u is None:
            out.append(([], 0))
            continue
        known = [(ts[j], j) for j in range(len(users))
                 if users[j] == u and j != k and parts[j] in KNOWN[int(parts[k])]]  # fmt: skip
        out.append(([j for _, j in sorted(known)][-length:], len(known)))
    return out


def build(users: list, items: np.ndarray, ts: np.ndarray | None, parts: np.ndarray, length: int, chunk: int):  # noqa: ANN201
    """(history, rank) of every row from HistoryBuilder under the profile rule, fed in chunks."""
    b = HistoryBuilder(length, len(users), "profile")
    for at in range(0, len(users), chunk):
        cut = slice(at, at + chunk)
        b.observe(pa.chunked_array([pa.array(users[cut], pa.string())]),
                  pa.chunked_array([pa.array(items[cut].astype(str))]),
                  None if ts is None else ts[cut], parts[cut])  # fmt: skip
    b.finish(np.arange(len(b.item_ids())) + 1)  # item code c → row c + 1
    return b.rows(0, len(users))


@pytest.mark.parametrize("length", [3, 40])  # shorter and longer than most users' histories
@pytest.mark.parametrize("timed", [True, False])  # no timestamp column: file order is time
@pytest.mark.parametrize("step", [1 << 18, 29])  # finish's per-row steps: one, or many cutting users apart
def test_builder_equals_the_brute_force_rule(
    length: int, timed: bool, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history, "PROFILE_CHUNK", step)
    rng = np.random.default_rng(length)
    n = 400
    users = [None if x < 0 else f"u{x}" for x in rng.integers(-1, 15, n)]  # ~1/16 rows without a user
    items = np.arange(n)  # the item names the line: item code == line, vocabulary row == line + 1
    ts = rng.integers(0, 20, n).astype(float) if timed else None  # many ties in time
    parts = S.random_split(n, 0.15, 0.15, 3)
    hist, rank = build(users, items, ts, parts, length, chunk=37)
    ref = reference(users, np.arange(n, dtype=float) if ts is None else ts, parts, length)
    for k, (lines, r) in enumerate(ref):
        assert rank[k] == r, (k, rank[k], r)
        n_k = min(r, length)
        assert list(hist[k, :n_k] - 1) == lines, (k, parts[k], list(hist[k, :n_k] - 1), lines)
        assert not hist[k, n_k:].any()
        assert k not in lines and all(parts[j] in KNOWN[int(parts[k])] for j in lines)


def test_causal_is_unchanged_by_the_rule_argument() -> None:
    rng = np.random.default_rng(1)
    n = 300
    users, items = [f"u{x}" for x in rng.integers(0, 9, n)], np.arange(n)
    ts, parts = rng.integers(0, 30, n).astype(float), S.random_split(n, 0.2, 0.2, 1)
    a = HistoryBuilder(5, n)
    b = HistoryBuilder(5, n, "causal")
    for h in (a, b):
        h.observe(
            pa.chunked_array([pa.array(users)]), pa.chunked_array([pa.array(items.astype(str))]), ts, parts
        )
        h.finish(np.arange(n) + 1)
    assert all(np.array_equal(x, y) for x, y in zip(a.rows(0, n), b.rows(0, n), strict=True))
    assert a._prev is not None and a._prev.shape[0] == 3 and a._start is None


def make_cfg(
    src: Path, out: Path, length: int, split: tuple[float, float, int] = (0.2, 0.2, 1), **model: object
) -> object:
    """A table source (user, item, ts; dense `line` when the file has it) with data.history profile;
    `split`: the random split's (val, test, seed)."""
    dense = ["line"] if "line" in src.read_text().split("\n", 1)[0].split(",") else []
    return config_from_dict(
        {
            "name": "profile-test",
            "data": {
                "source": {"kind": "table", "path": str(src), "user": "user", "item": "item",
                           "sparse": ["user", "item"], "dense": dense, "timestamp": "ts"},
                "prepared_dir": str(out),
                "label": {"mode": "all_positive"},
                "split": {"mode": "random", "val_fraction": split[0], "test_fraction": split[1], "seed": split[2]},
                "block_size": 4,
                "chunk_rows": 53,
                "shuffle_window": 64,
                "history": {"length": length, "rule": "profile"},
            },
            "model": {"kind": "two_tower", "embedding_dim": 8,
                      "two_tower": {"user_features": ["user"], "item_features": ["item"],
                                    "history_pooling": "mean"}, **model},
            "train": {"batch_size": 8, "pipeline": False},
            "eval": {"batch_size": 8},
        }
    )  # fmt: skip


def write_events(path: Path, n: int = 240, seed: int = 7) -> tuple[list, np.ndarray]:
    """(users, ts) of a file of n lines: users with ~20 events, ties in time, item i{line % 50}; the
    dense column `line` tells a prepared row's line."""
    rng = np.random.default_rng(seed)
    users, ts = [f"u{x}" for x in rng.integers(0, 12, n)], rng.integers(0, 15, n)
    lines = [f"{u},i{k % 50},{t},{k}\n" for k, (u, t) in enumerate(zip(users, ts, strict=True))]
    path.write_text("user,item,ts,line\n" + "".join(lines))
    return users, ts.astype(float)


@pytest.mark.parametrize("length", [4, 64])
def test_prepare_writes_the_profile_rule_in_every_split(tmp_path: Path, length: int) -> None:
    users, ts = write_events(tmp_path / "events.csv")
    cfg = make_cfg(tmp_path / "events.csv", tmp_path / "prep", length)
    prepare(cfg, overwrite=False)
    parts = S.random_split(len(users), 0.2, 0.2, 1)
    ref = reference(users, ts, parts, length)
    meta = read_metadata(cfg.data.prepared_dir)
    item_vocab = read_vocab(cfg.data.prepared_dir, meta.sparse_features[meta.sparse_index("item")])
    row_of = {x: r for r, x in enumerate(item_vocab)}
    seen = 0
    for code, split in enumerate(("train", "val", "test")):
        a = read_split_arrays(cfg.data.prepared_dir, split, meta)
        # dense holds log(1 + line)
        for line, h, r in zip(
            np.expm1(a["dense"][:, 0]).round().astype(int), a["history"], a["history_rank"], strict=True
        ):
            lines, want_rank = ref[line]
            assert parts[line] == code and r == want_rank
            want = [row_of.get(f"i{j % 50}", 0) for j in lines]  # items never in train: the OOV row
            assert list(h[: min(r, length)]) == want and not h[min(r, length) :].any(), (split, line)
            seen += 1
    assert seen == len(users)


def test_user_histories_are_the_profile_histories_of_val_and_test(tmp_path: Path) -> None:
    """Scoring val reads the user's train items, test its train and val items (what those rows carry);
    the exported (full) history is the test history followed by the user's test items."""
    from collections import Counter

    from recsys.evaluate import read_all_splits, user_histories

    users, ts = write_events(tmp_path / "events.csv")
    cfg = make_cfg(tmp_path / "events.csv", tmp_path / "prep", 64)  # L above every user's count
    prepare(cfg, overwrite=False)
    parts = S.random_split(len(users), 0.2, 0.2, 1)
    meta = read_metadata(cfg.data.prepared_dir)
    arrays = read_all_splits(cfg, meta)
    user_vocab = read_vocab(cfg.data.prepared_dir, meta.sparse_features[meta.sparse_index("user")])
    item_vocab = read_vocab(cfg.data.prepared_dir, meta.sparse_features[meta.sparse_index("item")])
    row_of = {x: r for r, x in enumerate(item_vocab)}

    def items_of(u: str, known: tuple[int, ...]) -> list[int]:
        lines = sorted((ts[k], k) for k in range(len(users)) if users[k] == u and parts[k] in known)
        return [row_of.get(f"i{k % 50}", 0) for _, k in lines]

    by_split = {s: user_histories(meta, arrays, s) for s in ("val", "test", None)}
    for row, u in enumerate(user_vocab):
        if row == 0:
            continue
        mine = parts[[k for k in range(len(users)) if users[k] == u]]
        for split, code, known in (("val", S.VAL, (S.TRAIN,)), ("test", S.TEST, (S.TRAIN, S.VAL))):
            hist, lengths = by_split[split]
            if (mine == code).any():  # a user without a row there gets the full history
                assert list(hist[row, : lengths[row]].numpy()) == items_of(u, known), (split, u)
        hist, lengths = by_split[None]
        full = list(hist[row, : lengths[row]].numpy())
        before = items_of(u, (S.TRAIN, S.VAL))
        assert full[: len(before)] == before and Counter(full[len(before) :]) == Counter(
            items_of(u, (S.TEST,))
        )
    # the folder records the rule: a causal config does not train on it unawares
    from recsys.errors import UserError
    from recsys.train import check_data_settings

    h = cfg.data.history.model_copy(update={"rule": "causal"})  # type: ignore[union-attr]
    causal = cfg.model_copy(update={"data": cfg.data.model_copy(update={"history": h})})  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="data.history.rule"):
        check_data_settings(causal, meta, allow=False)


def test_profile_is_refused_for_a_next_item_model(tmp_path: Path) -> None:
    """A next-item model needs causal histories: refused at config load, naming the field."""
    write_events(tmp_path / "events.csv")
    seq = {"kind": "sequential"}
    with pytest.raises(ValueError, match="data.history.rule profile .* needs data.history.rule causal"):
        make_cfg(tmp_path / "events.csv", tmp_path / "prep", 4, **seq)


@needs_spark
@pytest.mark.parametrize("split", ["random", pytest.param("leave_last_n", marks=pytest.mark.slow)])
def test_spark_profile_histories_equal_file_prepare(split: str, spark: object, tmp_path: Path) -> None:
    """The Spark path's profile columns equal the file prepare's, row for row (ties, OOV items, users
    with more than L events)."""
    from recsys.data.spark_mds import prepare_dataframe
    from tests.test_spark_history import history_config
    from tests.test_spark_history import write_events as write_parquet

    src = write_parquet(tmp_path / "events.parquet")
    cfgs = {}
    for name in ("file", "spark"):
        c = history_config(src, tmp_path / name, split, "ts")
        h = c.data.history.model_copy(update={"rule": "profile"})  # type: ignore[union-attr]
        cfgs[name] = c.model_copy(update={"data": c.data.model_copy(update={"history": h})})
    prepare(cfgs["file"], overwrite=False)
    prepare_dataframe(spark.read.parquet(str(src)), cfgs["spark"])  # type: ignore[attr-defined]
    a, b = read_metadata(tmp_path / "file"), read_metadata(tmp_path / "spark")
    assert a.model_dump(exclude={"sources"}) == b.model_dump(exclude={"sources"})
    for name in ("train", "val", "test"):
        x, y = read_split_arrays(tmp_path / "file", name, a), read_split_arrays(tmp_path / "spark", name, b)
        for k in ("sparse", "history", "history_rank"):
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}/{k}")
    assert (x["history_rank"] > 5).any()  # histories truncated at L = 5


def test_history_two_tower_trains_and_exports_under_profile(tmp_path: Path, mlflow_server: str) -> None:
    """The product end to end: prepare, train the history Two-Tower, log its user/item vectors; the
    exported user vectors are the model's on each user's full known history."""
    import mlflow
    import pyarrow.parquet as pq

    from recsys.evaluate import read_all_splits, retrieval_embeddings
    from recsys.models.task import build_task
    from recsys.tracking import load_logged_state
    from recsys.train import train

    write_events(tmp_path / "events.csv", n=600)
    cfg = make_cfg(tmp_path / "events.csv", tmp_path / "prep", 8)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(  # type: ignore[attr-defined]
        update={"enabled": True, "uri": mlflow_server, "experiment": "test-history-profile"})})  # fmt: skip
    prepare(cfg, overwrite=False)
    res = train(cfg, resume="never")
    assert np.isfinite(res.metrics["ndcg@10"]) and res.steps > 0
    mlflow.set_tracking_uri(mlflow_server)
    got = pq.read_table(mlflow.artifacts.download_artifacts(
        run_id=res.run_id, artifact_path="embeddings/user_embeddings.parquet", dst_path=str(tmp_path / "dl")))  # fmt: skip
    meta = read_metadata(cfg.data.prepared_dir)
    task = build_task(cfg, meta, ebc_device="cpu", training=False)
    task.load_state_dict(load_logged_state(cfg, res.run_id), strict=False)
    want = retrieval_embeddings(task.eval(), cfg, meta, read_all_splits(cfg, meta))["user"][1:]
    np.testing.assert_allclose(
        np.stack(got.column("embedding").to_numpy(zero_copy_only=False)), want, atol=1e-5
    )


def test_bench_scoring_at_last_is_the_products_profile_rule(tmp_path: Path) -> None:
    """history_random's "last" histories (every known item) equal the product's val/test histories
    under profile, user for user (check_profile_scoring); the "first" ones do not."""
    from recsys.bench.history_random import AT, KNOWN, check_profile_scoring, known_histories, timed_parts
    from recsys.bench.quality import random_split_of
    from tests.test_bench_history_random import FRACTIONS, write_inter

    events = write_inter(tmp_path / "r.inter", users=8, rows=300)
    split = random_split_of(tmp_path / "r.inter", *FRACTIONS)
    pairs, parts = timed_parts(tmp_path / "r.inter", split, *FRACTIONS)
    (tmp_path / "r.csv").write_text("user,item,ts\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    cfg = make_cfg(tmp_path / "r.csv", tmp_path / "prep", 9, split=FRACTIONS)
    prepare(cfg, overwrite=False)
    hists = {
        (p, at): known_histories(pairs, parts, p, len(split.user_ids), 9, at) for p in KNOWN for at in AT
    }
    check_profile_scoring(cfg, split, hists)
    swapped = {(p, "last"): hists[p, "first"] for p in KNOWN}
    with pytest.raises(RuntimeError, match="differ from known_histories"):
        check_profile_scoring(cfg, split, swapped)
