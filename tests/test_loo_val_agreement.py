"""Issue 19's val gap: the trainer's val nDCG@10 (what early stopping reads) and the leave-one-out
bench's own evaluation of the same logged sequential model must agree. They differed because the bench
built the model fresh (in training mode) and its dropout drew every user vector at random; user and
item vectors are now always computed in eval mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.bench.quality import Split
from tests.test_sequential import SEQUENTIAL, make_cfg, prepared_walks

#: Heavy dropout, so a vector computed in training mode is far from the eval-mode one.
DROPPY = {**SEQUENTIAL, "sequential": {**SEQUENTIAL["sequential"], "dropout": 0.5}}


@pytest.fixture(scope="module")
def walks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepared_walks(tmp_path_factory, DROPPY)


def walks_split(src: Path) -> Split:
    """The bench's leave-one-out Split of the walks file (raw ids; every user's timestamps differ)."""
    events: dict[str, list[tuple[int, str]]] = {}
    for line in src.read_text().splitlines()[1:]:
        u, i, t = line.split(",")
        events.setdefault(u, []).append((int(t), i))
    users, items = sorted(events), sorted({i for ev in events.values() for _, i in ev})
    ur, ir = {u: n for n, u in enumerate(users)}, {i: n for n, i in enumerate(items)}
    parts: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for u, ev in events.items():
        seq = [i for _, i in sorted(ev)]
        parts["train"] += [(ur[u], ir[i]) for i in seq[:-2]]
        parts["val"].append((ur[u], ir[seq[-2]]))
        parts["test"].append((ur[u], ir[seq[-1]]))
    arr = {k: np.array(v, np.int64) for k, v in parts.items()}
    return Split(users, items, arr["train"], arr["val"], arr["test"], ())


def test_user_vectors_ignore_the_callers_training_mode(walks, tmp_path: Path) -> None:  # noqa: ANN001
    """A task left in training mode (as build_task returns it) gets the eval-mode vectors, the same at
    every call, and keeps its mode."""
    from recsys.data.metadata import read_metadata
    from recsys.evaluate import read_all_splits, retrieval_embeddings
    from recsys.models.task import build_task

    src, prep = walks
    cfg = make_cfg(src, prep, tmp_path, DROPPY)
    meta = read_metadata(prep)
    arrays = read_all_splits(cfg, meta)
    torch.manual_seed(0)
    task = build_task(cfg, meta, ebc_device="cpu", training=False)
    assert task.training  # what the bench's history_scores got
    first = retrieval_embeddings(task, cfg, meta, arrays, split="val")
    again = retrieval_embeddings(task, cfg, meta, arrays, split="val")
    assert task.training
    ref = retrieval_embeddings(task.eval(), cfg, meta, arrays, split="val")
    for side in ("user", "item"):
        assert torch.equal(first[side], again[side]) and torch.equal(first[side], ref[side]), side


@pytest.mark.slow
def test_trainer_and_loo_bench_val_ndcg_agree(walks, tmp_path: Path) -> None:  # noqa: ANN001
    """One epoch, logged to MLflow: the trainer's val metrics of the tested state and the bench's
    LooEvaluator on `history_scores` of the logged model rank alike (same seen items, history, cold
    items, K). One legitimate difference: a user whose val item is one of their train items (a repeat;
    ML-100K has none) is a miss for the bench but not scored by the product (a seen target cannot be
    ranked: recsys.metrics drops it), so the sums over users agree and the counts differ by the repeats."""
    from recsys.bench.loo import K, LooEvaluator, history_scores
    from recsys.train import train

    src, prep = walks
    track = (("tracking.enabled", True), ("tracking.uri", f"sqlite:///{tmp_path / 'mlflow.db'}"))
    cfg = make_cfg(src, prep, tmp_path, DROPPY, ("train.epochs", 1), *track)
    r = train(cfg, resume="never")
    assert r.run_id is not None and r.tested_validation
    split = walks_split(src)
    seen = {(u, i) for u, i in split.train.tolist()}
    repeats = sum((u, i) in seen for u, i in split.val.tolist())
    assert repeats > 0  # the walks repeat items: the case the counts differ on is exercised
    trainer = r.tested_validation
    assert trainer["users"] == len(split.val) - repeats
    bench = LooEvaluator(split)(history_scores(cfg, r.run_id, split, "val"), "val")
    for ours, theirs in ((f"ndcg@{K}", f"ndcg@{K}"), (f"hr@{K}", f"hitrate@{K}")):
        total = bench[ours] * len(split.val)
        assert total == pytest.approx(trainer[theirs] * trainer["users"], abs=1e-5), (ours, bench, trainer)
    assert bench[f"ndcg@{K}"] > 0  # not a vacuous agreement of two zeros
