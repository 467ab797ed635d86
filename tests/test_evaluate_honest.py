"""Retrieval evaluation counts what it cannot rank: cold users (popularity, own group, in the overall
figure), test items unseen in training (misses, kept in the denominator), and val items are known
interactions when scoring test. Checked against a brute-force numpy computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.config import Config, load_config
from recsys.data.metadata import Metadata, read_metadata

SETS = [
    "data.source.num_users=300",
    "data.source.num_items=400",
    "data.source.interactions_per_user=5",
    "data.split.mode=random",
    "data.split.val_fraction=0.1",
    "data.split.test_fraction=0.2",
    "data.label.mode=all_positive",
    "data.min_count=3",  # rare users and items map to the OOV row: cold users, unseen items
    "eval.ks=[10]",
]


def _brute_force_recall(u: np.ndarray, i: np.ndarray, arrays: dict, uc: int, ic: int) -> tuple[float, int]:
    """Mean recall@10 over warm test users, unseen items counted as misses (numpy, independent)."""
    test, known = arrays["test"], [arrays["train"], arrays["val"]]
    scores = u @ i.T
    scores[:, 0] = -np.inf
    for a in known:
        scores[a["sparse"][:, uc], a["sparse"][:, ic]] = -np.inf
    recalls = []
    users = test["sparse"][:, uc]
    for user in np.unique(users[users > 0]):
        rel = test["sparse"][users == user, ic]
        top = np.argsort(-scores[user], kind="stable")[:10]
        rankable = {int(x) for x in rel if x > 0 and np.isfinite(scores[user, x])}
        unseen = int((rel == 0).sum())
        if not rankable and not unseen:
            continue
        recalls.append(len(rankable & set(top.tolist())) / (len(rankable) + unseen))
    return float(np.mean(recalls)), len(recalls)


def _untrained(cfg: Config) -> tuple[Metadata, torch.nn.Module, dict]:
    """Prepare cfg's data; (its Metadata, an untrained seeded Two-Tower task, every split's arrays)."""
    from recsys.data.prepare import prepare
    from recsys.evaluate import read_all_splits
    from recsys.models.task import build_task

    prepare(cfg, overwrite=False)
    meta = read_metadata(cfg.data.prepared_dir)
    torch.manual_seed(0)
    model = build_task(cfg, meta, ebc_device="cpu").eval()
    arrays = read_all_splits(cfg, meta)
    return meta, model, arrays


def test_cold_users_and_unseen_items_are_counted(tmp_path: Path) -> None:
    from recsys.evaluate import evaluate_retrieval, tower_embeddings

    cfg = load_config("two_tower_synth", [*SETS, f"data.prepared_dir={tmp_path / 'd'}"])
    meta, model, arrays = _untrained(cfg)
    uc, ic = meta.sparse_index("user_id"), meta.sparse_index("item_id")
    test = arrays["test"]["sparse"]
    cold_rows = int((test[:, uc] == 0).sum())
    assert cold_rows > 0 and (test[:, ic] == 0).any()  # the data really has both cases

    metrics, base = evaluate_retrieval(model, cfg, meta, arrays, "test")
    emb = tower_embeddings(model, meta, [arrays[s] for s in ("train", "val", "test")])
    warm_recall, warm_users = _brute_force_recall(
        emb["user"].numpy().astype(np.float64), emb["item"].numpy().astype(np.float64), arrays, uc, ic
    )
    assert metrics["cold_users"] == cold_rows
    assert metrics["users"] == warm_users + cold_rows == base["users"]
    cold_recall = _brute_force_cold_recall(arrays, uc, ic)
    assert metrics["cold_recall@10"] == pytest.approx(cold_recall, abs=1e-9)
    expected = (warm_recall * warm_users + cold_recall * cold_rows) / (warm_users + cold_rows)
    assert metrics["recall@10"] == pytest.approx(expected, abs=1e-9)


def _brute_force_cold_recall(arrays: dict, uc: int, ic: int) -> float:
    """Recall@10 of the test rows of users unseen in training (one query each): a hit when the row's
    item is among the 10 items with the most train positives (OOV excluded; unseen items are misses;
    ties: lower item row first, as recsys.metrics.popularity_baseline documents)."""
    train, test = arrays["train"], arrays["test"]
    counts = np.bincount(train["sparse"][train["label"] > 0, ic]).astype(float)
    counts[0] = -1.0  # the OOV row is never recommended
    top10 = set(np.argsort(-counts, kind="stable")[:10].tolist())  # ties: lower item row first
    cold = test["sparse"][(test["sparse"][:, uc] == 0) & (test["label"] > 0), ic]
    return float(np.mean([1.0 if item > 0 and item in top10 else 0.0 for item in cold.tolist()]))


def test_popularity_prior_is_folded_into_every_score(tmp_path: Path) -> None:
    """model.two_tower.popularity_prior β: user·item of the retrieval embeddings = the towers' score +
    β·τ·log(train share of the item), and the retrieval metrics rank by exactly that."""
    from recsys.evaluate import evaluate_retrieval, retrieval_embeddings, tower_embeddings

    beta = 0.7
    sets = [*SETS, f"data.prepared_dir={tmp_path / 'd'}", f"model.two_tower.popularity_prior={beta}"]
    cfg = load_config("two_tower_synth", sets)
    meta, model, arrays = _untrained(cfg)
    uc, ic = meta.sparse_index("user_id"), meta.sparse_index("item_id")
    plain = tower_embeddings(model, meta, [arrays[s] for s in ("train", "val", "test")])
    emb = retrieval_embeddings(model, cfg, meta, arrays)
    assert emb["user"].shape[1] == emb["item"].shape[1] == plain["user"].shape[1] + 1

    # By hand: counts of train positives per item row, unseen rows count as 1 (the smallest share).
    train = arrays["train"]
    counts = np.bincount(train["sparse"][train["label"] > 0, ic], minlength=len(plain["item"])).astype(float)
    counts[0] = 0
    log_q = np.log(np.maximum(counts, 1.0) / np.maximum(counts, 1.0).sum())
    tau = cfg.model.two_tower.temperature
    u, i = plain["user"].numpy().astype(np.float64), plain["item"].numpy().astype(np.float64)
    want = u @ i.T + beta * tau * log_q[None, :]
    got = emb["user"].numpy().astype(np.float64) @ emb["item"].numpy().astype(np.float64).T
    assert np.allclose(got, want, atol=1e-5)
    assert float(np.ptp(log_q[1:])) > 1.0  # the data has popular and rare items: the prior matters

    metrics, _ = evaluate_retrieval(model, cfg, meta, arrays, "test")
    aug_u = np.concatenate([u, np.ones((len(u), 1))], 1)
    aug_i = np.concatenate([i, (beta * tau * log_q)[:, None]], 1)
    warm_recall, warm_users = _brute_force_recall(aug_u, aug_i, arrays, uc, ic)
    cold = metrics["cold_users"]
    expected = (warm_recall * warm_users + metrics["cold_recall@10"] * cold) / (warm_users + cold)
    assert metrics["recall@10"] == pytest.approx(expected, abs=1e-9)
    without, _ = evaluate_retrieval(model, load_config("two_tower_synth", sets[:-1]), meta, arrays, "test")
    assert without["recall@10"] != metrics["recall@10"]  # the prior changed the ranking
