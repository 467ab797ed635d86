"""Retrieve → rank end to end on a slice of MovieLens-100K (real mlflow server): a Two-Tower and a DCN
ranker with sampled negatives are trained once; re-ranked lists are well-formed and drawn from the
retrieved candidates; `evaluate_funnel` scores both stages with the retrieval protocol and logs them;
a ranker that is not a ranking model or does not know the retrieval data's ids is one clear line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.cli import main
from recsys.config import Config, load_config
from recsys.errors import UserError

# Slow under load: the module trains two models (~1 min on an idle 2-core machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

USERS = 150  # users 1..150 of ML-100K: ~17k ratings, ~1.3k items


@dataclasses.dataclass
class Runs:
    """The two trained runs of this module and their configs."""

    uri: str
    tt: str
    ranker: str
    tt_cfg: Config


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, ml100k_slice: Any) -> Runs:
    """A Two-Tower and a DCN ranker trained on the same ML-100K slice (20 steps each)."""
    from recsys.data.prepare import prepare
    from recsys.train import train

    root = tmp_path_factory.mktemp("funnel")
    raw = ml100k_slice(USERS)
    common = [
        *(f"data.source.{k}={raw / f'ml-100k.{k}'}" for k in ("inter", "user", "item")),
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=test-retrieve-rank",
        "train.epochs=1",
        "train.max_steps=20",
        "train.early_stopping.metric=null",
        "data.split.mode=leave_last_n",  # one val and one test rating per user (the checks below count users)
    ]
    tt_cfg = load_config(
        "movielens_100k_recbole",
        [*common, f"data.prepared_dir={root / 'tt'}", "eval.ks=[10]", "eval.val_retrieval=false"],
    )
    rk_cfg = load_config(
        "movielens_100k_ranker",
        [*common, f"data.prepared_dir={root / 'rk'}", "data.negatives.per_positive=2"],
    )
    out = []
    for cfg in (tt_cfg, rk_cfg):
        prepare(cfg, overwrite=False)
        out.append(train(cfg).run_id)
    return Runs(mlflow_server, out[0], out[1], tt_cfg)


def _train_pairs(cfg: Config) -> set[tuple[str, str]]:
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata, read_vocab

    meta = read_metadata(cfg.data.prepared_dir)
    u, i = meta.sparse_index("user_id"), meta.sparse_index("item_id")
    vu = read_vocab(cfg.data.prepared_dir, meta.sparse_features[u])
    vi = read_vocab(cfg.data.prepared_dir, meta.sparse_features[i])
    s = read_split_arrays(cfg.data.prepared_dir, "train", meta)["sparse"]
    return {(vu[a], vi[b]) for a, b in s[:, [u, i]].tolist()}


def test_reranked_lists_come_from_the_candidates_in_ranker_order(runs: Runs, tmp_path: Path) -> None:
    from recsys.retrieval.rank import open_ranker, retrieve_and_rank
    from recsys.retrieval.recommend import recommend

    users = tmp_path / "users.txt"
    users.write_text("\n".join([*(str(u) for u in range(1, 21)), "nobody"]) + "\n")
    rec = retrieve_and_rank(
        runs.tt, runs.ranker, runs.uri, users, candidates=30, k=10, out=tmp_path / "r.parquet"
    )
    t = pq.read_table(tmp_path / "r.parquet").to_pandas()
    assert list(t.columns) == ["user", "rank", "item", "score", "fallback", "retrieval_rank"]
    assert rec.users == 21 and rec.fallback == 1 and len(t) == 21 * 10
    cands = recommend(runs.tt, runs.uri, users, k=30).table.to_pandas()
    seen = _train_pairs(runs.tt_cfg)
    moved = 0
    for user, g in t.groupby("user", sort=False):
        assert g["rank"].tolist() == list(range(1, 11))
        assert g["item"].is_unique and not {(user, i) for i in g["item"]} & seen
        if user == "nobody":  # the cold user keeps its popularity list
            assert g["fallback"].all() and g["retrieval_rank"].tolist() == list(range(1, 11))
            continue
        assert np.all(np.diff(g["score"].to_numpy()) <= 0) and not g["fallback"].any()
        mine = cands[cands.user == user]
        rank_of = dict(zip(mine["item"], mine["rank"], strict=True))
        assert set(g["item"]) <= set(rank_of)  # drawn from this user's 30 candidates
        assert [rank_of[i] for i in g["item"]] == g["retrieval_rank"].tolist()
        moved += g["retrieval_rank"].tolist() != list(range(1, 11))
    assert moved > 0  # the ranker changed some order
    # The scores are the ranker's on each pair's real feature row: re-score the listed pairs that occur
    # in the ranker's own prepared rows (held-out ratings and sampled negatives) from those stored
    # rows, not from score_pairs' user/item feature tables.
    ranker = open_ranker(runs.ranker, runs.uri)
    stored = _stored_rows(ranker)
    warm = t[~t.fallback]
    pairs = [
        (u, i, s)
        for u, i, s in zip(warm["user"], warm["item"], warm["score"], strict=True)
        if (u, i) in stored
    ]
    assert len(pairs) >= 10, len(pairs)
    rows = [stored[(u, i)] for u, i, _ in pairs]
    want = _model_scores(ranker, np.stack([d for d, _ in rows]), np.stack([sp for _, sp in rows]))
    np.testing.assert_allclose([s for _, _, s in pairs], want, rtol=1e-5, atol=1e-7)


def _stored_rows(ranker: Any) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(raw user, raw item) → its (dense, sparse) feature rows as stored in the ranker's prepared splits."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_vocab

    prepared, meta = ranker.cfg.data.prepared_dir, ranker.meta
    u, i = meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")
    vu, vi = (read_vocab(prepared, meta.sparse_features[c]) for c in (u, i))
    out = {}
    for split in ("train", "val", "test"):
        a = read_split_arrays(prepared, split, meta)
        for dense, row in zip(a["dense"], a["sparse"], strict=True):
            out[(vu[row[u]], vi[row[i]])] = (dense, row)
    return out


def _model_scores(ranker: Any, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """sigmoid(model(rows)) of stored rows (dense [n, D], sparse [n, S]) through a KeyedJaggedTensor."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = [f.name for f in ranker.meta.sparse_features]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys,
        torch.from_numpy(np.ascontiguousarray(sparse.T).reshape(-1)),
        torch.ones(sparse.size, dtype=torch.int32),
    )
    x = torch.from_numpy(np.ascontiguousarray(dense[:, : len(ranker.meta.dense_features)]))
    with torch.no_grad():
        return torch.sigmoid(ranker.task.model(x, kjt).squeeze(-1)).numpy()


def test_funnel_metrics_match_the_retrieval_protocol_and_are_logged(runs: Runs) -> None:
    import mlflow

    from recsys.retrieval.funnel import evaluate_funnel

    out = evaluate_funnel(runs.tt, runs.ranker, runs.uri, candidates=(20, 50), split="test")
    for stage in ("retrieval", "rank_n20", "rank_n50"):
        for m in ("recall@10", "ndcg@10", "hitrate@10"):
            assert 0.0 <= out[f"{stage}/{m}"] <= 1.0
        assert out[f"{stage}/users"] == USERS  # every user has one test rating
    for n in (20, 50):  # the rank stages against lists re-ranked and scored here (one test item per user)
        expect = _reranked_metrics(runs, n)
        for m in ("recall@10", "ndcg@10", "hitrate@10"):
            assert out[f"rank_n{n}/{m}"] == pytest.approx(expect[m], abs=1e-9), (n, m)
    assert out["rank_n20/ndcg@10"] != out["rank_n50/ndcg@10"]  # the candidate count matters
    run = mlflow.MlflowClient(runs.uri).get_run(runs.tt)
    # Retrieval-only through FAISS lists equals what training measured with exact torch scores.
    assert out["retrieval/recall@10"] == pytest.approx(run.data.metrics["test/recall_at_10"], abs=1e-9)
    assert out["retrieval/ndcg@10"] == pytest.approx(run.data.metrics["test/ndcg_at_10"], abs=1e-6)
    for key in ("retrieval/recall_at_10", "rank_n20/ndcg_at_10", "rank_n50/recall_at_10"):
        assert run.data.metrics[f"funnel/test/{key}"] == pytest.approx(out[key.replace("_at_", "@")])
    assert run.data.tags["funnel.ranker_run_id"] == runs.ranker


def _reranked_metrics(runs: Runs, n: int) -> dict[str, float]:
    """Recall/nDCG/HitRate@10 of each user's first n retrieved items (train and val removed) re-ordered
    by the ranker's score, against the user's one test item, computed here with pandas."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata, read_vocab
    from recsys.retrieval.rank import open_ranker, score_table
    from recsys.retrieval.recommend import recommend

    prepared = runs.tt_cfg.data.prepared_dir
    meta = read_metadata(prepared)
    u, i = meta.sparse_index("user_id"), meta.sparse_index("item_id")
    vu, vi = (read_vocab(prepared, meta.sparse_features[c]) for c in (u, i))
    test = read_split_arrays(prepared, "test", meta)["sparse"]
    target = {vu[a]: vi[b] if b else None for a, b in test[:, [u, i]].tolist()}  # OOV item: a miss
    assert len(target) == USERS
    table = recommend(
        runs.tt, runs.uri, "all", k=50, exclude=("train", "val")
    ).table  # as the funnel: 50, then n
    df = table.to_pandas().assign(ranker=score_table(table, open_ranker(runs.ranker, runs.uri)))
    hits, gains = [], []
    for user, item in target.items():
        top = (
            df[df.user == user]
            .sort_values("rank")
            .head(n)
            .sort_values("ranker", ascending=False, kind="stable")
        )
        pos = [p for p, x in enumerate(top["item"].head(10), 1) if x == item]
        hits.append(1.0 if pos else 0.0)
        gains.append(1.0 / math.log2(pos[0] + 1) if pos else 0.0)
    return {
        "recall@10": float(np.mean(hits)),
        "hitrate@10": float(np.mean(hits)),
        "ndcg@10": float(np.mean(gains)),
    }


def test_cli_recommend_and_evaluate_with_a_ranker(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["--run-id", runs.tt, "--tracking-uri", runs.uri, "--ranker-run-id", runs.ranker]
    out = tmp_path / "recs.parquet"
    assert main(["recommend", *base, "--candidates", "20", "--k", "5", "-o", str(out)]) == 0
    assert pq.read_table(out).num_rows == USERS * 5
    assert main(["evaluate", *base, "--candidates", "20,40", "--split", "val"]) == 0
    assert "val/rank_n40/ndcg@10" in capsys.readouterr().out
    assert main(["recommend", *base, "--candidates", "5", "--k", "10", "-o", str(out)]) == 2
    assert "--candidates (5) must be >= --k (10)" in capsys.readouterr().err


def test_bad_rankers_are_one_line(runs: Runs) -> None:
    from recsys.retrieval.rank import check_vocab, open_ranker, retrieve_and_rank

    with pytest.raises(UserError, match="a two_tower run, not a ranking model"):
        retrieve_and_rank(runs.tt, runs.tt, runs.uri, candidates=20, k=10)
    with pytest.raises(UserError, match="not found"):
        open_ranker("0" * 32, runs.uri)
    # A ranker trained on other interactions: its item vocabulary lacks some of the retrieval data's items.
    ranker = open_ranker(runs.ranker, runs.uri)
    fewer = dataclasses.replace(ranker, item_row=dict(list(ranker.item_row.items())[:-3]))
    meta_dir = runs.tt_cfg.data.prepared_dir
    from recsys.data.metadata import read_metadata

    with pytest.raises(UserError, match=r"item vocabulary .* lacks 3 of the"):
        check_vocab(fewer, runs.tt, meta_dir, read_metadata(meta_dir))
