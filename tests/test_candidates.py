"""Ranker data from the retriever's own candidates (recsys/retrieval/candidates.py) on a slice of
MovieLens-100K: a Two-Tower is trained once, then 2 cross-fitted fold retrievers. Checked: every train
row is its fold retriever's top-N, never a pair that retriever trained on, labelled 1 exactly when it is
a held-out pair of its fold; val/test rows come from the served run with its seen items removed; the
folder trains the DCN ranker, which re-ranks with the same dense features it was trained on, and the
funnel evaluation runs on it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.config import Config, load_config
from recsys.errors import UserError

# Three Two-Tower trainings (20 steps each) and one ranker: ~1 min on an idle 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

USERS = 120
TOP_N = 15


@dataclasses.dataclass
class Built:
    """The trained runs and configs of this module."""

    uri: str
    tt: str
    tt_cfg: Config
    rk_cfg: Config
    cands: Any  # recsys.retrieval.candidates.Candidates
    ranker: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, ml100k_slice: Any) -> Built:
    """Two-Tower → candidates (2 folds, top-15) → DCN ranker (the pipeline's rank step), all on a
    120-user slice, 20 steps each."""
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare
    from recsys.launch.steps import rank_step
    from recsys.retrieval.candidates import candidate_rows
    from recsys.train import train

    root = tmp_path_factory.mktemp("candidates")
    raw = ml100k_slice(USERS)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = [
        *(f"data.source.{k}={raw / f'ml-100k.{k}'}" for k in ("inter", "user", "item")),
        f"tracking.uri={uri}",
        "tracking.experiment=test-candidates",
        "train.epochs=1",
        "train.max_steps=20",
        "train.early_stopping.metric=null",
    ]
    tt_cfg = load_config(
        "movielens_100k_recbole",
        [*common, f"data.prepared_dir={root / 'tt'}", f"train.checkpoint.dir={root / 'ck-tt'}",
         "eval.ks=[10]", "eval.val_retrieval=false", "train.batch_size=256"],
    )  # fmt: skip
    prepare(tt_cfg, overwrite=False)
    tt = train(tt_cfg, resume="never").run_id
    sets = [
        *common,
        f"train.checkpoint.dir={root / 'ck-rk'}",
        "data.candidates.folds=2",
        "train.batch_size=256",
    ]
    # The pipeline's rank step: candidates, ranker, retrieval alone vs re-ranked on test (logged).
    done = rank_step("movielens_100k_candidate_ranker", sets, tt, uri, str(root / "rk"), TOP_N)
    rk_cfg = load_config(
        "movielens_100k_candidate_ranker",
        [*sets, f"data.prepared_dir={root / 'rk'}", f"data.candidates.top_n={TOP_N}"],
    )
    folds = list(read_metadata(rk_cfg.data.prepared_dir).label["fold_run_ids"])
    cands = candidate_rows(rk_cfg, tt, uri, folds)  # the same rows, kept in memory for the checks
    ranker = done["ranker_run_id"]
    assert 0 <= done[f"rank_n{TOP_N}/ndcg@10"] <= 1 and 0 <= done["retrieval/ndcg@10"] <= 1
    return Built(uri, tt, tt_cfg, rk_cfg, cands, ranker)


def _pairs(sparse: np.ndarray, uc: int, ic: int) -> set[tuple[int, int]]:
    return set(map(tuple, sparse[:, [uc, ic]].tolist()))


def _train_folds(built: Built) -> tuple[Any, Any, Any, int, int, np.ndarray, np.ndarray]:
    """(candidates, metadata, the retriever's prepared folder, user and item columns, its train sparse
    ids, each train row's fold)."""
    from recsys.data.loader import read_split_arrays
    from recsys.retrieval.candidates import fold_of

    c = built.cands
    meta, prepared = c.meta, built.tt_cfg.data.prepared_dir
    uc, ic = meta.sparse_index("user_id"), meta.sparse_index("item_id")
    train = read_split_arrays(prepared, "train", meta)["sparse"]
    return c, meta, prepared, uc, ic, train, fold_of(len(train), 2, built.rk_cfg.data.candidates.seed)


def test_train_rows_are_each_fold_retrievers_top_n_and_never_its_training_pairs(built: Built) -> None:
    from recsys.retrieval.recommend import open_retriever

    c, meta, prepared, uc, ic, train, folds = _train_folds(built)
    vocab_u = _vocab(prepared, meta, "user_id")
    item_row = {raw: row for row, raw in enumerate(_vocab(prepared, meta, "item_id"))}
    r = c.rows["train"]
    assert set(np.unique(r.fold)) == {0, 1} and r.rank.max() <= TOP_N and r.label.sum() > 0
    for k, rid in enumerate(c.fold_runs):
        trained_on = _pairs(train[folds != k], uc, ic)  # what fold k's retriever saw
        held = _pairs(train[folds == k], uc, ic)
        mine = r.fold == k
        scored = set(zip(r.user[mine].tolist(), r.item[mine].tolist(), strict=True))
        assert not scored & trained_on  # the retriever never scores an interaction it trained on
        labels = zip(r.user[mine].tolist(), r.item[mine].tolist(), r.label[mine].tolist(), strict=True)
        assert all(((u, i) in held) == (y == 1) for u, i, y in labels)  # positives: exactly the fold's
        assert {u for u, _ in held} == set(r.user[mine].tolist())  # every user with a held-out row
        # Each user's rows are its fold retriever's top-N, in rank order (checked on a few users).
        ret = open_retriever(rid, built.uri)
        for user in sorted(set(r.user[mine].tolist()))[:5]:
            t = ret.recommend([vocab_u[user]], TOP_N)
            expect = [item_row[i] for i in t.column("item").to_pylist()]
            rows = mine & (r.user == user)
            assert r.item[rows][np.argsort(r.rank[rows])].tolist() == expect


def _vocab(prepared: str, meta: Any, feature: str) -> list[str]:
    from recsys.data.metadata import read_vocab

    return read_vocab(prepared, meta.sparse_features[meta.sparse_index(feature)])


def test_val_and_test_rows_come_from_the_served_run_without_seen_items(built: Built) -> None:
    from recsys.data.loader import read_split_arrays

    c, prepared = built.cands, built.tt_cfg.data.prepared_dir
    uc, ic = c.meta.sparse_index("user_id"), c.meta.sparse_index("item_id")
    split = {s: read_split_arrays(prepared, s, c.meta)["sparse"] for s in ("train", "val", "test")}
    for name, seen in (("val", ("train",)), ("test", ("train", "val"))):
        r = c.rows[name]
        scored = set(zip(r.user.tolist(), r.item.tolist(), strict=True))
        assert (r.fold == -1).all() and not scored & set().union(*(_pairs(split[s], uc, ic) for s in seen))
        held = _pairs(split[name], uc, ic)
        pos = {(u, i) for u, i, y in zip(r.user.tolist(), r.item.tolist(), r.label, strict=True) if y == 1}
        assert pos == scored & held and pos


@pytest.mark.parametrize("split", ["val", "test"])
def test_the_folder_loads_in_the_trainer_and_serves_the_features_it_was_trained_on(
    built: Built, split: str
) -> None:
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata
    from recsys.retrieval.candidates import DENSE
    from recsys.retrieval.item_item import ITEM_ITEM_DENSE
    from recsys.retrieval.rank import known_history, open_ranker, pair_dense
    from recsys.retrieval.recommend import open_retriever

    meta = read_metadata(built.rk_cfg.data.prepared_dir)
    # The shipped config turns the item-to-item (EASE) features on.
    assert (
        tuple(meta.dense_features) == DENSE + ITEM_ITEM_DENSE and meta.label["retriever_run_id"] == built.tt
    )
    assert meta.splits["train"].rows == len(built.cands.rows["train"].label)
    ranker = open_ranker(built.ranker, built.uri)
    written_rows = read_split_arrays(built.rk_cfg.data.prepared_dir, split, meta)
    # Rows written for val (test) are the served run's lists: the features serving computes must be the
    # same, the user's known items being what the list excludes (test: train and val).
    exclude = ("train", "val") if split == "test" else ("train",)
    ret = open_retriever(built.tt, built.uri, exclude)
    r = built.cands.rows[split]
    vocab_u = _vocab(built.tt_cfg.data.prepared_dir, meta, "user_id")
    users = [vocab_u[u] for u in np.unique(r.user)[:10]]
    table = ret.recommend(users, TOP_N)
    history = known_history(ranker, built.tt_cfg.data.prepared_dir, built.cands.meta, exclude)
    dense = pair_dense(table, ranker, np.ones(table.num_rows, bool), history)
    assert dense is not None and dense.shape[1] == len(meta.dense_features)
    uc, ic = meta.sparse_index("user_id"), meta.sparse_index("item_id")
    u_rows = np.array([ranker.user_row[x] for x in table.column("user").to_pylist()])
    i_rows = np.array([ranker.item_row[x] for x in table.column("item").to_pylist()])
    sparse = written_rows["sparse"]
    written = {(a, b): d for a, b, d in zip(sparse[:, uc], sparse[:, ic], written_rows["dense"], strict=True)}
    for a, b, d in zip(u_rows, i_rows, dense, strict=True):
        np.testing.assert_allclose(written[(a, b)], d, rtol=1e-5, atol=1e-5)
    assert np.abs(dense[:, -2]).max() > 0  # the EASE score varies within the lists


def _ease_z(x: np.ndarray, lam: float, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """EASE scores of (user, item) rows from the 0/1 matrix x, z-scored per user (numpy, on its own)."""
    g = x.T @ x + lam * np.eye(x.shape[1])
    p = np.linalg.inv(g)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    s = (x[users] * b[:, items].T).sum(1)
    out = np.zeros(len(s))
    for user in np.unique(users):
        m = users == user
        out[m] = (s[m] - s[m].mean()) / s[m].std()
    return out


def test_fold_rows_item_item_feature_is_fit_on_the_other_folds_only(built: Built) -> None:
    from recsys.retrieval.item_item import ITEM_ITEM_DENSE

    c, meta, prepared, uc, ic, train, folds = _train_folds(built)
    nu, ni = meta.sparse_features[uc].num_embeddings, meta.sparse_features[ic].num_embeddings
    lam = built.rk_cfg.data.candidates.item_item_lambda
    assert lam is not None
    col = len(c.rows["train"].dense[0]) - len(ITEM_ITEM_DENSE)  # item_item_z
    r = c.rows["train"]
    for k in range(2):
        x = np.zeros((nu, ni))
        x[train[folds != k, uc], train[folds != k, ic]] = 1.0  # fold k's rows are its labels: never here
        mine = r.fold == k
        expect = _ease_z(x, lam, r.user[mine], r.item[mine])
        np.testing.assert_allclose(r.dense[mine, col], expect, rtol=1e-3, atol=1e-3)


def test_item_item_above_max_items_is_refused_naming_the_field(built: Built) -> None:
    from recsys.retrieval.candidates import candidate_rows

    cfg = built.rk_cfg.model_copy(deep=True)
    cfg.data.candidates.item_item_max_items = 10
    with pytest.raises(UserError, match=r"data\.candidates\.item_item_max_items \(10\)"):
        candidate_rows(cfg, built.tt, built.uri, built.cands.fold_runs)


def test_funnel_evaluation_runs_on_the_candidate_ranker(built: Built) -> None:
    from recsys.retrieval.funnel import evaluate_funnel

    out = evaluate_funnel(built.tt, built.ranker, built.uri, (10, TOP_N), "val", log=False)
    for key in ("retrieval/ndcg@10", "rank_n10/ndcg@10", f"rank_n{TOP_N}/recall@10"):
        assert 0.0 <= out[key] <= 1.0
    with pytest.raises(UserError, match="trained on the candidates of retrieval run"):
        evaluate_funnel(built.cands.fold_runs[0], built.ranker, built.uri, (10,), "val", log=False)


def test_prepare_refuses_a_candidates_config(tmp_path: Path) -> None:
    from recsys.data.prepare import prepare

    cfg = load_config("movielens_100k_candidate_ranker", [f"data.prepared_dir={tmp_path / 'x'}"])
    with pytest.raises(UserError, match="recsys data candidates"):
        prepare(cfg, overwrite=False)


def test_folds_depend_on_seed_and_position_only() -> None:
    from recsys.retrieval.candidates import fold_of

    a = fold_of(10_000, 5, 0)
    assert np.array_equal(a[:100], fold_of(100, 5, 0)) and not np.array_equal(a, fold_of(10_000, 5, 1))
    assert np.bincount(a).min() > 1_800


def test_a_history_reading_retriever_is_refused_in_one_line() -> None:
    from recsys.retrieval.candidates import refuse_history_retriever
    from recsys.retrieval.runs import TwoTowerRun

    plain = load_config("movielens_100k_recbole")
    refuse_history_retriever(TwoTowerRun("r0", "sqlite:///x.db", plain))  # no history: accepted
    pooled = load_config(
        "movielens_100k_recbole",
        ["data.history.length=5", "model.two_tower.history_pooling=mean", "train.pipeline=false"],
    )
    for cfg in (pooled, load_config("movielens_100k_sequential")):
        with pytest.raises(UserError, match="run r1 reads histories.*held-out items"):
            refuse_history_retriever(TwoTowerRun("r1", "sqlite:///x.db", cfg))
