"""Retrieval-only vs retrieve → rank on val or test (`recsys evaluate --run-id R --ranker-run-id RR`).

The ranked lists of both stages are scored by the same metric code and protocol as the trainer's
retrieval metrics (recsys.evaluate): the full catalogue, train (and, for test, val) items removed,
unseen items kept as misses, cold users answered by popularity. It sits beside recsys.retrieval.rank
(which re-ranks) and above recsys.evaluate (which it reads), so neither imports the other back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recsys.evaluate import _cold_start, read_all_splits, split_targets

if TYPE_CHECKING:
    from recsys.data.metadata import Metadata
    from recsys.evaluate import SplitTargets


def list_metrics(lists: np.ndarray, sets: SplitTargets, ks: list[int], num_items: int) -> dict[str, float]:
    """Recall/NDCG/HitRate@K of given ranked lists (item rows [U, K] by user row, -1 = empty), through
    the same metric code as `retrieval_metrics` (a list's order becomes its scores), cold users added."""
    from recsys.metrics import combine_retrieval, list_retrieval_metrics

    ranked = torch.from_numpy(lists)
    metrics = list_retrieval_metrics(ranked, num_items, sets.targets, sets.exclude, ks, sets.unseen)
    cold = _cold_start(sets.counts, sets.cold_items, ks)
    return metrics if cold is None else combine_retrieval([metrics, cold])


def _lists(table: Any, user_row: dict[str, int], item_row: dict[str, int], nu: int, k: int) -> np.ndarray:
    """A recommendation table (user, rank, item) as item rows [nu, k] by user row (-1 = empty)."""
    out = np.full((nu, k), -1, np.int64)
    rank = table.column("rank").to_numpy()
    keep = rank <= k
    users = [user_row[u] for u, ok in zip(table.column("user").to_pylist(), keep, strict=True) if ok]
    items = [item_row[i] for i, ok in zip(table.column("item").to_pylist(), keep, strict=True) if ok]
    out[np.asarray(users, np.int64), rank[keep] - 1] = items
    return out


def _funnel_users(prepared: str, meta: Metadata, arrays: dict, split: str) -> tuple[list[str], dict, dict]:
    """Raw ids of the split's warm users with positives, and raw id → row maps of users and items."""
    from recsys.data.metadata import read_vocab

    uc, ic = meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")
    vocab_u = read_vocab(prepared, meta.sparse_features[uc])
    vocab_i = read_vocab(prepared, meta.sparse_features[ic])
    test = arrays[split]
    rows = np.unique(test["sparse"][test["label"] > 0, uc])
    users = [vocab_u[r] for r in rows if r > 0]
    return users, {u: r for r, u in enumerate(vocab_u)}, {i: r for r, i in enumerate(vocab_i)}


def evaluate_funnel(
    run_id: str,
    ranker_run_id: str,
    uri: str | None = None,
    candidates: tuple[int, ...] = (100,),
    split: str = "test",
    ks: tuple[int, ...] = (10,),
    config: str | None = None,
    overrides: list[str] | None = None,
    ranker_overrides: list[str] | None = None,
    log: bool = True,
) -> dict[str, float]:
    """Retrieval-only vs retrieve → rank (each N in `candidates`) on `split` of Two-Tower run `run_id`.

    Same protocol as the retrieval metrics: the full catalogue, train (and, for test, val) items
    removed, unseen items kept as misses, cold users answered by popularity. Keys: retrieval/<metric>,
    rank_n<N>/<metric>; logged to the retrieval run as funnel/<split>/… when `log`. Choose N on val.
    """
    import tempfile

    from recsys.errors import UserError
    from recsys.retrieval.rank import (
        check_vocab,
        known_history,
        open_ranker,
        rerank,
        retrieval_data,
        score_table,
    )
    from recsys.retrieval.recommend import recommend

    kmax = max(ks)
    if split not in ("val", "test") or min(candidates) < kmax:
        raise UserError(f"--split {split}: val or test; every --candidates must be >= {kmax}")
    run, prepared, meta = retrieval_data(run_id, uri, config, overrides)
    cfg = run.cfg
    ranker = open_ranker(ranker_run_id, run.tracking_uri, ranker_overrides)
    check_vocab(ranker, run_id, prepared, meta)
    arrays = read_all_splits(cfg, meta)
    users, user_row, item_row = _funnel_users(prepared, meta, arrays, split)
    nu, ni = len(user_row), len(item_row)
    sets = split_targets(cfg, meta, arrays, split, nu, ni)
    exclude = ("train", "val") if split == "test" else ("train",)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "users.txt")
        path.write_text("".join(f"{u}\n" for u in users))
        table = recommend(
            run_id, run.tracking_uri, path, max(candidates), exclude, None, config, overrides
        ).table
    out = {
        f"retrieval/{k}": v
        for k, v in list_metrics(_lists(table, user_row, item_row, nu, kmax), sets, list(ks), ni).items()
    }
    scores = score_table(table, ranker, known_history(ranker, prepared, meta, exclude))
    for n in sorted(set(candidates)):
        ranked = rerank(table, scores, kmax, n)
        lists = _lists(ranked, user_row, item_row, nu, kmax)
        out.update({f"rank_n{n}/{k}": v for k, v in list_metrics(lists, sets, list(ks), ni).items()})
    if log:
        _log_funnel(run, ranker_run_id, split, out)
    return out


def _log_funnel(run: Any, ranker_run_id: str, split: str, out: dict[str, float]) -> None:
    """Log the funnel metrics to the retrieval run (funnel/<split>/…) and name the ranker in a tag."""
    from recsys.tracking import mlflow_metrics

    client = run.client()
    for k, v in mlflow_metrics(f"funnel/{split}", out).items():
        if not math.isnan(v):
            client.log_metric(run.run_id, k, v)
    client.set_tag(run.run_id, "funnel.ranker_run_id", ranker_run_id)
