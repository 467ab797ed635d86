"""Evaluation: CTR metrics of the sharded model (all ranks), exact retrieval of the gathered model (rank 0).

- `evaluate_sharded`: loss (and, for DLRM, AUC / log loss / calibration with the constant-CTR
  baseline) over an exact partition of a split; every rank runs the same number of forwards.
- `evaluate_retrieval`: on one process with a plain (unsharded) Two-Tower: user embeddings for the
  test users, item embeddings for the whole catalogue, items seen in training excluded,
  Recall/NDCG/HitRate@K beside the popularity baseline, plus pointwise AUROC on the test split.
- `evaluate_run`: `recsys evaluate --run-id`: rebuild the model logged in an MLflow run, evaluate it on
  the test split and log the metrics back to that run.
- retrieve → rank figures (`recsys evaluate --ranker-run-id`) live in recsys.retrieval.funnel, which
  uses this module's splits and metrics; this module never imports the retrieval stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.metadata import Metadata
    from recsys.distributed import DistEnv


def dummy_batch(meta: Metadata) -> Any:
    """A one-row batch of OOV ids: the forward a rank without data still runs so collectives match."""
    from recsys.data.loader import to_batch

    s = len(meta.sparse_features)
    return to_batch(
        np.zeros(1, np.float32),
        np.zeros((1, len(meta.dense_features)), np.float32),
        np.zeros((1, s), np.int64),
        [f.name for f in meta.sparse_features],
    )


@torch.no_grad()
def evaluate_sharded(
    model: nn.Module, cfg: Config, meta: Metadata, split: str, env: DistEnv, train_ctr: float | None
) -> dict[str, float]:
    """Loss (+ CTR metrics for DLRM) of `split` over all ranks; a collective, call on every rank.

    `model` is the train task (sharded or not) whose forward(batch) gives (loss, (loss, logits, labels)).
    The loss is the row-weighted mean of batch losses (the exact mean of per-row BCE for DLRM).
    """
    from recsys.data.loader import iter_eval_batches
    from recsys.distributed import all_reduce_sum
    from recsys.metrics import CTRMetrics

    was_training = model.training
    model.eval()
    _, batches = iter_eval_batches(cfg, meta, split, env.rank, env.world_size)
    ctr = CTRMetrics(device=env.device) if cfg.model.kind == "dlrm" else None
    dummy = None
    loss_sum, rows = 0.0, 0.0
    for batch in batches:
        real = batch is not None
        if not real:
            dummy = dummy if dummy is not None else dummy_batch(meta)
            batch = dummy
        batch = batch.to(env.device)
        loss, (_, logits, labels) = model(batch)
        if not real:
            continue
        n = float(labels.numel())
        loss_sum += float(loss) * n
        rows += n
        if ctr is not None:
            ctr.update(torch.sigmoid(logits), labels)
    loss_sum, rows = all_reduce_sum([loss_sum, rows], env.device)
    out: dict[str, float] = {"loss": loss_sum / rows if rows else math.nan, "rows": rows}
    if ctr is not None:
        out.update(ctr.compute())
        if train_ctr is not None:
            base = ctr.constant_baseline(train_ctr)
            out.update({f"baseline_{k}": v for k, v in base.items() if k in ("logloss", "auc")})
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ retrieval
def _csr(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> tuple[Any, Any]:
    key = np.unique(users.astype(np.int64) * num_items + items.astype(np.int64))
    u, i = key // num_items, key % num_items
    indptr = np.zeros(num_users + 1, np.int64)
    indptr[1:] = np.bincount(u, minlength=num_users).cumsum()
    return torch.from_numpy(indptr), torch.from_numpy(i)


def _entity_table(arrays: list[dict[str, np.ndarray]], key_col: int, cols: list[int], n: int) -> np.ndarray:
    """Per entity row (user or item), the value of each of its features from its last row seen (0 = OOV)."""
    table = np.zeros((n, len(cols)), np.int64)
    if key_col in cols:
        table[:, cols.index(key_col)] = np.arange(n)
    for a in arrays:
        s = a["sparse"]
        table[s[:, key_col]] = s[:, cols]
    return table


def user_histories(
    meta: Metadata, arrays: dict[str, dict[str, np.ndarray]], split: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """([U, L] item rows left-aligned, [U] lengths) per user row: the history of the user's earliest
    row of `split` (what was known before it), else (split None, or no row there) the full known
    history — the last L items before and of the user's latest row in its latest part, that row's own
    item included (what is exported). A row's history holds its own and earlier parts only
    (recsys.data.history), so the latest part's latest row sees every part; on a random split the
    user's rows of earlier parts that come after it in time are in no stored history and not in it.
    Under data.history.rule profile a val/test row's history is every item of the parts known when its
    part is scored, so the full history is that history followed by the user's items of that part (in
    stored order: the folder keeps no times), the last L of them."""
    from recsys.data.history import history_rule

    assert meta.history_length is not None
    L = meta.history_length
    uc, ic = meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")
    nu = meta.sparse_features[uc].num_embeddings
    hist, lengths = np.zeros((nu, L), np.int64), np.zeros(nu, np.int64)
    parts = [arrays[s] for s in ("train", "val", "test") if s in arrays]
    users = np.concatenate([a["sparse"][:, uc] for a in parts])
    ranks = np.concatenate([a["history_rank"] for a in parts])
    rows = np.concatenate([a["history"] for a in parts])
    items = np.concatenate([a["sparse"][:, ic] for a in parts])
    part = np.concatenate([np.full(len(a["history_rank"]), k) for k, a in enumerate(parts)])
    last = np.lexsort((ranks, part, users))  # per user, the last entry: its latest row of its latest part
    latest = last[np.r_[users[last][1:] != users[last][:-1], True]]
    own = _items_of_latest_part(users, part, items) if history_rule(meta) == "profile" else {}
    for r in latest:  # one row per user: the full history is its history and its own item(s)
        n = min(int(ranks[r]), L)
        seq = np.r_[rows[r, :n], own.get(int(users[r]), items[r : r + 1])][-L:]
        hist[users[r], : len(seq)] = seq
        lengths[users[r]] = len(seq)
    if split is not None and len(arrays[split]["label"]):
        a = arrays[split]
        su, sr = a["sparse"][:, uc], a["history_rank"]
        order = np.lexsort((sr, su))
        first = order[np.r_[True, su[order][1:] != su[order][:-1]]]
        hist[su[first]] = a["history"][first]
        lengths[su[first]] = np.minimum(sr[first], L)
        hist[su[first]] *= np.arange(L)[None, :] < lengths[su[first], None]
    return torch.from_numpy(hist), torch.from_numpy(lengths)


def _items_of_latest_part(users: np.ndarray, part: np.ndarray, items: np.ndarray) -> dict[int, np.ndarray]:
    """Profile rule: {user row: the user's items of its latest part} for users whose latest part is not train."""
    if not len(users):
        return {}
    order = np.lexsort((part, users))  # stable: each (user, part)'s rows in stored order
    u, p = users[order], part[order]
    group = np.flatnonzero(np.r_[True, (u[1:] != u[:-1]) | (p[1:] != p[:-1])])  # (user, part) starts
    last = group[np.r_[u[group[1:]] != u[group[:-1]], True]]  # each user's latest part's start
    ends = np.r_[group[1:], len(order)][np.searchsorted(group, last)]
    # a train row's history holds the user's other train items: its own item completes it
    return {int(u[a]): items[order[a:b]] for a, b in zip(last, ends, strict=True) if p[a] != 0}


@torch.no_grad()
def tower_embeddings(
    model: nn.Module,
    meta: Metadata,
    arrays: list[dict[str, np.ndarray]],
    histories: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """All user and item rows' embeddings from a plain TwoTower: {'user': [U, E], 'item': [I, E]};
    a model reading histories takes each user row's from `histories` (see user_histories)."""
    # In eval mode whatever mode the caller left: a freshly built task trains, and its dropout would
    # make every user vector a random draw (issue 19: the bench's val nDCG@10 read low, differently per
    # call). The caller's mode is restored.
    was_training = model.training
    model.eval()
    try:
        return _tower_embeddings(model, meta, arrays, histories)
    finally:
        model.train(was_training)


def _tower_embeddings(
    model: nn.Module,
    meta: Metadata,
    arrays: list[dict[str, np.ndarray]],
    histories: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[str, Any]:
    """tower_embeddings' work, the model already in eval mode."""
    tt = model.model if hasattr(model, "model") else model
    names = [f.name for f in meta.sparse_features]
    out = {}
    for side, key, feats, fn in (
        ("user", meta.user_feature, tt.user_features, tt.user_embeddings),
        ("item", meta.item_feature, tt.item_features, tt.item_embeddings),
    ):
        assert key is not None
        n = meta.sparse_features[meta.sparse_index(key)].num_embeddings
        cols = [names.index(f) for f in feats]
        table = _entity_table(arrays, names.index(key), cols, n)
        embs = []
        for start in range(0, n, 8192):
            part = torch.from_numpy(table[start : start + 8192])
            ids = {f: part[:, j] for j, f in enumerate(feats)}
            if side == "user" and getattr(tt, "history", None) is not None:
                assert histories is not None, "a model reading histories needs user_histories"
                h = (histories[0][start : start + 8192], histories[1][start : start + 8192])
                embs.append(tt.user_embeddings(ids, h))
            else:
                embs.append(fn(ids))
        out[side] = torch.cat(embs)
    return out


def retrieval_embeddings(
    model: nn.Module,
    cfg: Config,
    meta: Metadata,
    arrays: dict[str, dict[str, np.ndarray]],
    split: str | None = None,
    histories: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """tower_embeddings with model.two_tower.popularity_prior β folded in: user rows gain a coordinate 1,
    item rows β·τ·log q (q: train share, τ: the logits' temperature), so every inner product — exact
    metrics, FAISS index, serving — ranks by logit + β·log q without knowing about the prior.
    Models reading histories see each user's as of `split`'s first row (None: everything known), or
    the given `histories` ([U, L] item rows, [U] lengths per user row; a benchmark's own protocol)."""
    from recsys.data.history import model_uses_history
    from recsys.models.task import logit_temperature
    from recsys.models.two_tower import item_log_q

    if histories is None and model_uses_history(cfg):
        histories = user_histories(meta, arrays, split)
    emb = tower_embeddings(model, meta, [arrays[s] for s in ("train", "val", "test")], histories)
    beta = cfg.model.two_tower.popularity_prior
    if not beta:
        return emb
    counts = train_item_counts(meta, arrays["train"], emb["item"].shape[0])
    prior = beta * logit_temperature(cfg) * item_log_q(torch.from_numpy(counts))
    return {
        "user": torch.cat([emb["user"], torch.ones(len(emb["user"]), 1)], dim=1),
        "item": torch.cat([emb["item"], prior.unsqueeze(1)], dim=1),
    }


def train_item_counts(meta: Metadata, train: dict[str, np.ndarray], num_items: int) -> np.ndarray:
    """float32 [I] train positives per item row (popularity); the OOV row 0."""
    ic = meta.sparse_index(meta.item_feature or "")
    counts = np.bincount(train["sparse"][train["label"] > 0, ic], minlength=num_items).astype(np.float32)
    counts[0] = 0
    return counts


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    if labels.numel() == 0 or labels.min() == labels.max():
        return math.nan
    return float(binary_auroc(scores, labels.long()))


def read_all_splits(cfg: Config, meta: Metadata) -> dict[str, dict[str, np.ndarray]]:
    """Every split's arrays, read once and handed to evaluate_retrieval (which runs many times)."""
    from recsys.data.loader import read_split_arrays, read_train_arrays

    held_out = {s: read_split_arrays(cfg.data.prepared_dir, s, meta) for s in ("val", "test")}
    return {"train": read_train_arrays(cfg, meta), **held_out}


@dataclass
class SplitTargets:
    """What a split's retrieval metrics are measured against (rows are vocabulary rows)."""

    targets: tuple[Any, Any]  # CSR per user row: the split's positives with a known item
    unseen: torch.Tensor  # [U] positives per user whose item is unseen in training (misses)
    exclude: tuple[Any, Any]  # CSR per user row: known items (train, and val when scoring test) + OOV
    counts: np.ndarray  # float32 [I] train positives per item row (popularity), OOV 0
    cold_items: np.ndarray  # item rows of the positives of users unseen in training (one query each)


def split_targets(
    cfg: Config, meta: Metadata, arrays: dict[str, dict[str, np.ndarray]], split: str, nu: int, ni: int
) -> SplitTargets:
    """Targets, exclusions and popularity of `split`, the protocol every retrieval metric here uses."""
    train, test = arrays["train"], arrays[split]
    uc, ic = meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")
    pos = test["label"] > 0
    users, items = test["sparse"][pos, uc], test["sparse"][pos, ic]
    warm, known_item = users > 0, items > 0
    # Items unseen in training (the OOV row) cannot be ranked; they stay relevant, as misses.
    targets = _csr(users[warm & known_item], items[warm & known_item], nu, ni)
    unseen = torch.from_numpy(np.bincount(users[warm & ~known_item], minlength=nu))
    # The OOV item row is not a recommendable item: excluded for every user.
    ex_u, ex_i = [np.arange(nu)], [np.zeros(nu, np.int64)]
    known = (["train"] if cfg.eval.exclude_train_items else []) + (["val"] if split == "test" else [])
    for s in known:
        ex_u.append(arrays[s]["sparse"][:, uc])
        ex_i.append(arrays[s]["sparse"][:, ic])
    exclude = _csr(np.concatenate(ex_u), np.concatenate(ex_i), nu, ni)
    return SplitTargets(targets, unseen, exclude, train_item_counts(meta, train, ni), items[~warm])


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    cfg: Config,
    meta: Metadata,
    arrays: dict[str, dict[str, np.ndarray]],
    split: str = "test",
    baseline: bool = True,
) -> tuple[dict[str, float], dict[str, float]]:
    """(model metrics, popularity baseline) on `split`, on this process only (no collectives).

    Recall/NDCG/HitRate@K for cfg.eval.ks over every item row but the OOV row, excluding each user's
    training items (cfg.eval.exclude_train_items) and, when scoring test, the validation items too
    (they are known interactions, not candidates). Items unseen in training stay in the targets as
    misses; users unseen in training get the popularity list, reported as `cold_*` and counted in
    the overall figures (`users` = warm users + cold queries). Also `auroc`: pointwise AUROC of user·item scores
    on the split's rows; when its labels hold one class only (implicit feedback), each positive is
    paired with one uniformly drawn catalogue item as its negative (a sampled AUROC).
    `arrays` comes from read_all_splits; `baseline=False` skips the popularity baseline.
    """
    from recsys.metrics import combine_retrieval, popularity_baseline, retrieval_metrics

    model.eval()
    test = arrays[split]
    emb = retrieval_embeddings(model, cfg, meta, arrays, split)
    uc, ic = meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")
    nu, ni = emb["user"].shape[0], emb["item"].shape[0]
    pos = test["label"] > 0
    sets = split_targets(cfg, meta, arrays, split, nu, ni)
    targets, unseen, exclude, counts = sets.targets, sets.unseen, sets.exclude, sets.counts
    ks = cfg.eval.ks
    metrics = retrieval_metrics(emb["user"], emb["item"], targets, exclude, ks=ks, unrankable=unseen)
    base: dict[str, float] = {}
    if baseline:
        base = popularity_baseline(counts, targets, exclude, ks=ks, num_users=nu, unrankable=unseen)
    # Users unseen in training all map to the OOV row: each of their interactions is its own query,
    # answered with the popularity list (what a served model does for them), and counted overall.
    cold = _cold_start(counts, sets.cold_items, ks)
    if cold is not None:
        metrics = {**combine_retrieval([metrics, cold]), **{f"cold_{k}": v for k, v in cold.items()}}
        if baseline:
            base = combine_retrieval([base, cold])

    tu = torch.from_numpy(test["sparse"][:, uc])
    ti = torch.from_numpy(test["sparse"][:, ic])
    labels = torch.from_numpy(test["label"]).float()
    scores = (emb["user"][tu] * emb["item"][ti]).sum(-1)
    if labels.numel() and labels.min() == labels.max():
        gen = torch.Generator().manual_seed(cfg.train.seed)
        # Uniform over the other real items (rows 1..ni-1 minus the positive): draw from one fewer, then
        # step past the positive, so a user's own item is never its negative.
        neg = torch.randint(1, max(ni - 1, 2), (int(pos.sum()),), generator=gen)
        neg = neg + (neg >= ti[torch.from_numpy(pos)]).long()
        scores = torch.cat([scores[torch.from_numpy(pos)], (emb["user"][tu[pos]] * emb["item"][neg]).sum(-1)])
        labels = torch.cat([torch.ones(int(pos.sum())), torch.zeros(int(pos.sum()))])
    metrics["auroc"] = _auroc(scores, labels)
    return metrics, base


def _cold_start(counts: np.ndarray, items: np.ndarray, ks: list[int]) -> dict[str, float] | None:
    """Popularity metrics of cold users' interactions, one query each (None when there are none)."""
    from recsys.metrics import popularity_baseline

    if len(items) == 0:
        return None
    n = len(items)
    known = items > 0
    targets = _csr(np.arange(n)[known], items[known], n, len(counts))
    oov_only = _csr(np.arange(n), np.zeros(n, np.int64), n, len(counts))
    unrankable = torch.from_numpy((~known).astype(np.int64))
    return popularity_baseline(counts, targets, oov_only, ks=ks, num_users=n, unrankable=unrankable)


# ------------------------------------------------------------------------------------- evaluate_run
def evaluate_run(cfg: Config, run_id: str) -> dict[str, float]:
    """Load the model of an MLflow run, evaluate it on the test split in this process, log back to the run."""
    from recsys.data.metadata import read_metadata
    from recsys.errors import UserError
    from recsys.models.task import build_task, log_q_from_train
    from recsys.tracking import load_logged_state

    meta = read_metadata(cfg.data.prepared_dir)
    state = load_logged_state(cfg, run_id)
    task = build_task(cfg, meta, ebc_device="cpu", item_log_q=log_q_from_train(cfg, meta))
    missing, unexpected = task.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"run {run_id}: the logged model does not match config {cfg.name} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass the config the run was trained with"
        )
    if cfg.model.kind != "dlrm":
        metrics, baseline = evaluate_retrieval(task, cfg, meta, read_all_splits(cfg, meta))
        out = {
            **{f"test/{k}": v for k, v in metrics.items()},
            **{f"baseline/{k}": v for k, v in baseline.items()},
        }
    else:
        out = _evaluate_ctr_local(task, cfg, meta)
    import mlflow

    from recsys.tracking import mlflow_metrics, resolve_tracking_uri

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(cfg))

    for k, v in mlflow_metrics("eval", out).items():
        if not math.isnan(v):
            client.log_metric(run_id, k, v)
    for k, v in sorted(out.items()):
        print(f"{k:<28} {v:.5f}")
    return out


@torch.no_grad()
def _evaluate_ctr_local(task: nn.Module, cfg: Config, meta: Metadata) -> dict[str, float]:
    """CTR metrics of a plain DLRM on the test split, in one process."""
    from recsys.data.loader import iter_eval_batches
    from recsys.metrics import CTRMetrics

    task.eval()
    _, batches = iter_eval_batches(cfg, meta, "test", 0, 1)
    ctr = CTRMetrics()
    for batch in batches:
        if batch is None:
            continue
        _, (_, logits, labels) = task(batch)
        ctr.update(torch.sigmoid(logits), labels)
    m = ctr.compute()
    train_ctr = meta.splits["train"].positives / max(meta.splits["train"].rows, 1)
    base = ctr.constant_baseline(train_ctr)
    return {**{f"test/{k}": v for k, v in m.items()}, **{f"baseline/{k}": v for k, v in base.items()}}


def write_embeddings(emb: torch.Tensor, vocab: list[str], path: Path) -> Path:
    """Embeddings of every vocabulary row but OOV as Parquet: columns id (raw id), row, embedding."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arr = emb[1:].float().numpy()
    table = pa.table(
        {
            "id": pa.array(vocab[1 : 1 + len(arr)], pa.string()),
            "row": pa.array(np.arange(1, 1 + len(arr)), pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1]),
        }
    )
    pq.write_table(table, path)
    return path
