"""Retrieval evaluation counts what it cannot rank: cold users (popularity, own group, in the overall
figure), test items unseen in training (misses, kept in the denominator), and val items are known
interactions when scoring test. Checked against a brute-force numpy computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.config import load_config
from recsys.data.metadata import read_metadata

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


def test_cold_users_and_unseen_items_are_counted(tmp_path: Path) -> None:
    from recsys.data.prepare import prepare
    from recsys.evaluate import evaluate_retrieval, read_all_splits, tower_embeddings
    from recsys.models.task import build_task

    cfg = load_config("two_tower_synth", [*SETS, f"data.prepared_dir={tmp_path / 'd'}"])
    prepare(cfg, overwrite=False)
    meta = read_metadata(cfg.data.prepared_dir)
    torch.manual_seed(0)
    model = build_task(cfg, meta, ebc_device="cpu").eval()
    arrays = read_all_splits(cfg, meta)
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
    expected = (warm_recall * warm_users + metrics["cold_recall@10"] * cold_rows) / (warm_users + cold_rows)
    assert metrics["recall@10"] == pytest.approx(expected, abs=1e-9)
