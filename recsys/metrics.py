"""Evaluation metrics: CTR metrics for ranking (DLRM) and exact full-catalogue retrieval metrics (Two-Tower).

Ranking: `CTRMetrics` accumulates probabilities and labels over batches and computes AUC, log loss,
calibration and CTR; when a process group is initialised, torchmetrics' state sync reduces them over
all ranks (unequal counts per rank are fine). `constant_ctr_baseline` is the log loss of always
predicting the train CTR, the bar a ranking model must beat.

Retrieval: `retrieval_metrics` scores every user against the whole item catalogue (exact, no ANN),
masks the items each user saw in training, and computes Recall/NDCG/HitRate@K in user batches so the
U×I score matrix is never materialised at once. `popularity_baseline` ranks items by training
popularity for everyone, the bar a retrieval model must beat. `top_k` is the shared ranking primitive.

Nothing here imports torch.distributed at module level; torchmetrics does the collective itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Probabilities are clamped into [EPS, 1-EPS] for log loss so a confident wrong prediction costs
# a large but finite amount (-log 1e-7 ≈ 16.1) instead of inf.
EPS = 1e-7

# Upper bound of elements in one user-batch × catalogue score matrix (fp32: 64 MiB) when
# batch_users is not given.
_SCORE_BUDGET = 1 << 24


# ============================================================================================ ranking
def _sum_stats(process_group: Any) -> Any:
    """A torchmetrics Metric holding the sums behind log loss and calibration, reduced by sum."""
    # torchmetrics 1.0 pulls in transformers/torchvision on import (~10 s here): only pay that
    # when ranking metrics are used, not for retrieval.
    from torchmetrics import Metric

    class _SumStats(Metric):
        full_state_update = False

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            for name in ("bce_sum", "prob_sum", "label_sum", "count"):
                self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

        def update(self, probs: Tensor, labels: Tensor) -> None:
            p = probs.detach().to(torch.float64).clamp(EPS, 1 - EPS)
            y = labels.detach().to(torch.float64)
            self.bce_sum += -(y * p.log() + (1 - y) * (1 - p).log()).sum()
            self.prob_sum += probs.detach().to(torch.float64).sum()
            self.label_sum += y.sum()
            self.count += float(y.numel())

        def compute(self) -> dict[str, Tensor]:
            return {
                "bce_sum": self.bce_sum,
                "prob_sum": self.prob_sum,
                "label_sum": self.label_sum,
                "count": self.count,
            }

    return _SumStats(process_group=process_group)


def _constant_logloss(p: float, positives: float, count: float) -> float:
    """Mean log loss of predicting probability p for every one of `count` labels with `positives` ones."""
    q = min(max(p, EPS), 1 - EPS)
    return -(positives * math.log(q) + (count - positives) * math.log(1 - q)) / count


class CTRMetrics:
    """AUC, log loss, calibration and CTR of click predictions, reduced across ranks.

    `update` takes probabilities (not logits) and 0/1 labels. `compute` returns
    auc (exact ROC AUC, torchmetrics BinaryAUROC), logloss (mean BCE with probabilities clamped to
    [1e-7, 1-1e-7]), calibration (mean prediction / mean label; 1.0 is perfectly calibrated),
    ctr (mean label) and count (labels seen). When `torch.distributed` is initialised, every rank
    must call `compute` (it is a collective) and all get the global values.
    AUC is nan when the labels hold only one class; calibration is nan when there is no positive.
    """

    def __init__(self, device: torch.device | str | None = None, process_group: Any = None) -> None:
        from torchmetrics.classification import BinaryAUROC

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._auc = BinaryAUROC(process_group=process_group).to(self.device)
        self._sums = _sum_stats(process_group).to(self.device)
        self._updated = False

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch of predicted probabilities and their 0/1 labels (any matching shape)."""
        probs = probs.detach().reshape(-1).to(self.device, torch.float32)
        labels = labels.detach().reshape(-1).to(self.device)
        if probs.shape != labels.shape:
            raise ValueError(f"CTRMetrics.update: {probs.numel()} predictions but {labels.numel()} labels")
        if probs.numel() == 0:
            return
        # torchmetrics silently applies a sigmoid to batches outside [0, 1]; logits passed by
        # mistake would then be scored differently batch by batch, so refuse them here.
        if bool(((probs < 0) | (probs > 1) | probs.isnan()).any()):
            raise ValueError(
                "CTRMetrics.update expects probabilities in [0, 1]; apply sigmoid to logits first"
            )
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("CTRMetrics.update expects labels in {0, 1}")
        labels = labels.to(torch.long)
        self._auc.update(probs, labels)
        self._sums.update(probs, labels)
        self._updated = True

    def _ensure_state(self) -> None:
        # A rank that saw no batch would join the AUC state gather with an empty list and desync
        # the collective; an empty tensor keeps every rank's state shape-compatible.
        if not self._updated:
            self._auc.preds.append(torch.zeros(0, device=self.device))
            self._auc.target.append(torch.zeros(0, dtype=torch.long, device=self.device))
            self._updated = True

    def compute(self) -> dict[str, float]:
        """Global metrics: auc, logloss, calibration, ctr, count (a collective when distributed)."""
        self._ensure_state()
        s = {k: float(v) for k, v in self._sums.compute().items()}
        count, positives = s["count"], s["label_sum"]
        # The AUC state gather must run on every rank even when the result is undefined here;
        # torchmetrics warns about a single-class set, which is reported as nan below instead.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"No (positive|negative) samples in targets")
            auc = float(self._auc.compute())
        if count == 0:
            return {
                "auc": math.nan,
                "logloss": math.nan,
                "calibration": math.nan,
                "ctr": math.nan,
                "count": 0.0,
            }
        if positives == 0 or positives == count:
            auc = math.nan
        ctr = positives / count
        mean_pred = s["prob_sum"] / count
        return {
            "auc": auc,
            "logloss": s["bce_sum"] / count,
            "calibration": mean_pred / ctr if positives > 0 else math.nan,
            "ctr": ctr,
            "count": count,
        }

    def constant_baseline(self, train_ctr: float) -> dict[str, float]:
        """`constant_ctr_baseline` over the (globally reduced) labels this object has seen."""
        self._ensure_state()
        s = {k: float(v) for k, v in self._sums.compute().items()}
        return _baseline_from_counts(train_ctr, s["label_sum"], s["count"])

    def reset(self) -> None:
        """Forget every batch (start a new evaluation)."""
        self._auc.reset()
        self._sums.reset()
        self._updated = False


def _baseline_from_counts(train_ctr: float, positives: float, count: float) -> dict[str, float]:
    if not 0.0 <= train_ctr <= 1.0:
        raise ValueError(f"train_ctr must be in [0, 1], got {train_ctr}")
    if count == 0:
        return {"auc": 0.5, "logloss": math.nan, "calibration": math.nan, "ctr": math.nan, "count": 0.0}
    ctr = positives / count
    return {
        "auc": 0.5,
        "logloss": _constant_logloss(train_ctr, positives, count),
        "calibration": train_ctr / ctr if positives > 0 else math.nan,
        "ctr": ctr,
        "count": float(count),
    }


def constant_ctr_baseline(
    train_ctr: float, labels: Tensor | np.ndarray | Sequence[float]
) -> dict[str, float]:
    """Metrics of always predicting `train_ctr`: its log loss, AUC 0.5, calibration train_ctr / ctr.

    Same keys as `CTRMetrics.compute`, so the two print side by side; a ranking model must have a
    lower log loss than this.
    """
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64).reshape(-1)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("constant_ctr_baseline expects labels in {0, 1}")
    return _baseline_from_counts(train_ctr, float(y.sum()), float(y.numel()))


# ========================================================================================= retrieval
#: Per-user item sets: a mapping user row → item rows, a (indptr, indices) pair, anything with
#: `.indptr`/`.indices` (scipy.sparse.csr_matrix), or a torch sparse CSR tensor of shape [U, I].
ItemSets = Mapping[int, Iterable[int]] | tuple[Any, Any] | Any


def as_csr(sets: ItemSets, num_users: int, num_items: int, what: str = "item sets") -> tuple[Tensor, Tensor]:
    """Normalise per-user item sets to CSR (indptr [U+1], indices [nnz], int64, rows sorted & unique).

    Raises ValueError naming `what` for a user or item row outside [0, num_users) / [0, num_items).
    """
    if isinstance(sets, Mapping):
        counts = torch.zeros(num_users, dtype=torch.long)
        rows: list[Tensor] = [torch.zeros(0, dtype=torch.long)] * num_users
        for u, items in sets.items():
            u = int(u)
            if not 0 <= u < num_users:
                raise ValueError(f"{what}: user row {u} outside [0, {num_users})")
            t = torch.as_tensor(sorted({int(i) for i in items}), dtype=torch.long)
            rows[u] = t
            counts[u] = t.numel()
        indptr = torch.zeros(num_users + 1, dtype=torch.long)
        indptr[1:] = counts.cumsum(0)
        indices = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    else:
        if isinstance(sets, Tensor) and sets.layout == torch.sparse_csr:
            indptr, indices = sets.crow_indices(), sets.col_indices()
        elif hasattr(sets, "indptr") and hasattr(sets, "indices"):
            indptr, indices = sets.indptr, sets.indices
        elif isinstance(sets, tuple) and len(sets) == 2:
            indptr, indices = sets
        else:
            raise TypeError(
                f"{what}: expected a dict user→items, an (indptr, indices) pair or a CSR matrix, "
                f"got {type(sets).__name__}"
            )
        indptr = torch.as_tensor(np.asarray(indptr), dtype=torch.long).cpu()
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long).cpu()
        if indptr.numel() != num_users + 1:
            raise ValueError(
                f"{what}: indptr has {indptr.numel()} entries, expected num_users + 1 = {num_users + 1}"
            )
        if indptr[0] != 0 or indptr[-1] != indices.numel() or bool((indptr[1:] < indptr[:-1]).any()):
            raise ValueError(f"{what}: indptr is not a valid CSR row pointer for {indices.numel()} indices")
        # Duplicates inside a row would count one hit twice; sort and dedupe per row.
        row_of = torch.repeat_interleave(torch.arange(num_users), indptr.diff())
        key = torch.unique(row_of * max(num_items, 1) + indices) if indices.numel() else indices
        if key.numel() != indices.numel():
            row_of, indices = key // max(num_items, 1), key % max(num_items, 1)
            indptr = torch.zeros(num_users + 1, dtype=torch.long)
            indptr[1:] = torch.bincount(row_of, minlength=num_users).cumsum(0)
        else:
            order = torch.argsort(row_of * max(num_items, 1) + indices)
            indices = indices[order]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_items):
        bad = int(indices[(indices < 0) | (indices >= num_items)][0])
        raise ValueError(f"{what}: item row {bad} outside [0, {num_items})")
    return indptr, indices


def _batch_pairs(csr: tuple[Tensor, Tensor], users: Tensor) -> tuple[Tensor, Tensor]:
    """(batch row, item row) of every item of the given users, rows numbered 0..len(users)-1 (CPU)."""
    indptr, indices = csr
    starts, lengths = indptr[users], indptr[users + 1] - indptr[users]
    total = int(lengths.sum())
    rows = torch.repeat_interleave(torch.arange(len(users)), lengths)
    # Position of each pair inside `indices`: start of its user's row + offset within that row.
    offsets = torch.arange(total) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return rows, indices[torch.repeat_interleave(starts, lengths) + offsets]


def _batch_mask(
    csr: tuple[Tensor, Tensor] | None, users: Tensor, num_items: int, device: torch.device
) -> Tensor:
    """Dense bool [len(users), num_items] with True at each user's items (all False when csr is None)."""
    mask = torch.zeros(len(users), num_items, dtype=torch.bool, device=device)
    if csr is not None:
        rows, cols = _batch_pairs(csr, users)
        mask[rows.to(device), cols.to(device)] = True
    return mask


def _rank_rows(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row, ties broken by the lower column index, deterministically.

    torch.topk picks arbitrarily among equal scores. Asking it for k+1 shows where that matters:
    only rows whose (k+1)-th value equals their k-th have a tie across the cut. In those rows every
    element strictly above the k-th value is kept and the lowest-index elements equal to it fill
    the remaining slots. Every row is then ordered by (score desc, index asc).
    """
    n = scores.shape[1]
    vals, idx = torch.topk(scores, min(k + 1, n), dim=1)
    if k < n:
        tied = (vals[:, k] == vals[:, k - 1]).nonzero()[:, 0]
        vals, idx = vals[:, :k].clone(), idx[:, :k].clone()
        if tied.numel():
            sub = scores[tied]
            kth = vals[tied, k - 1 :]
            above, eq = sub > kth, sub == kth
            need = k - above.sum(1, keepdim=True)
            chosen = above | (eq & (eq.cumsum(1) <= need))
            # nonzero walks rows in order and columns ascending: exactly k columns per row.
            idx[tied] = chosen.nonzero()[:, 1].reshape(len(tied), k)
            vals[tied] = sub.gather(1, idx[tied])
    # Sort each row by index, then stably by score descending: lower indices first among ties.
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def _as_rows(users: Sequence[int] | Tensor | None, n: int) -> Tensor:
    if users is None:
        return torch.arange(n)
    rows = torch.as_tensor(users, dtype=torch.long).reshape(-1).cpu()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"user rows must be in [0, {n})")
    return rows


def top_k(
    user_emb: Tensor,
    item_emb: Tensor,
    exclude: ItemSets | None = None,
    k: int = 10,
    users: Sequence[int] | Tensor | None = None,
    batch_users: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k items by dot product for each user, over the whole catalogue.

    user_emb [U, d], item_emb [I, d]; `users` picks rows of user_emb (default all), `exclude` holds
    items to mask per user row (indexed like user_emb). Returns (scores [n, k'], item_rows [n, k'])
    with k' = min(k, I), best first, ties broken by the lower item row. Slots left when a user has
    fewer than k' allowed items hold item row -1 and score -inf.
    """
    num_users, num_items = user_emb.shape[0], item_emb.shape[0]
    if k < 1 or num_items == 0:
        raise ValueError(f"top_k: need k >= 1 and a non-empty catalogue, got k={k}, {num_items} items")
    rows = _as_rows(users, num_users)
    excl = as_csr(exclude, num_users, num_items, "exclude") if exclude is not None else None
    item_emb = item_emb.detach()

    def score(batch: Tensor) -> Tensor:
        return user_emb[batch.to(user_emb.device)].detach() @ item_emb.T

    return _top_k_scored(score, rows, excl, k, num_items, batch_users)


def _rank_batch(
    score: Callable[[Tensor], Tensor],
    batch: Tensor,
    excl: tuple[Tensor, Tensor] | None,
    k: int,
    num_items: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k (scores, item rows) of one user batch on the scores' device (-1 marks empty slots),
    and the batch's exclusion mask."""
    s = score(batch).float()
    emask = _batch_mask(excl, batch, num_items, s.device)
    s.masked_fill_(emask, -math.inf)
    vals, idx = _rank_rows(s, min(k, num_items))
    return vals, idx.masked_fill(vals == -math.inf, -1), emask


def _batch_size(batch_users: int | None, num_items: int) -> int:
    return batch_users or max(1, _SCORE_BUDGET // max(num_items, 1))


def _top_k_scored(
    score: Callable[[Tensor], Tensor],
    rows: Tensor,
    excl: tuple[Tensor, Tensor] | None,
    k: int,
    num_items: int,
    batch_users: int | None,
) -> tuple[Tensor, Tensor]:
    out_s, out_i = [], []
    bs = _batch_size(batch_users, num_items)
    for start in range(0, len(rows), bs):
        vals, idx, _ = _rank_batch(score, rows[start : start + bs], excl, k, num_items)
        out_s.append(vals.cpu())
        out_i.append(idx.cpu())
    if not out_s:
        kk = min(k, num_items)
        return torch.zeros(0, kk), torch.zeros(0, kk, dtype=torch.long)
    return torch.cat(out_s), torch.cat(out_i)


def _discounts(n: int) -> Tensor:
    return 1.0 / torch.log2(torch.arange(n, dtype=torch.float64) + 2.0)


def _evaluate(
    score: Callable[[Tensor], Tensor],
    num_users: int,
    num_items: int,
    targets: ItemSets,
    exclude: ItemSets | None,
    ks: Sequence[int],
    users: Sequence[int] | Tensor | None,
    batch_users: int | None,
    unrankable: Tensor | None = None,
) -> dict[str, float]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
    if num_items == 0:
        raise ValueError("retrieval metrics need a non-empty item catalogue")
    tgt = as_csr(targets, num_users, num_items, "targets")
    excl = as_csr(exclude, num_users, num_items, "exclude") if exclude is not None else None
    rows = _as_rows(users, num_users)
    n_tgt = tgt[0].diff()
    # Relevant items that cannot be ranked at all (e.g. unseen in training): misses in every list.
    extra = (
        torch.as_tensor(unrankable, dtype=torch.float64).reshape(-1)
        if unrankable is not None
        else torch.zeros(num_users, dtype=torch.float64)
    )
    rows = rows[(n_tgt[rows] + extra[rows]) > 0]
    kmax = ks[-1]
    disc = _discounts(min(kmax, num_items))
    idcg_cum = torch.cat([torch.zeros(1, dtype=torch.float64), disc.cumsum(0)])
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "hitrate")}
    count = 0
    bs = _batch_size(batch_users, num_items)
    for start in range(0, len(rows), bs):
        batch = rows[start : start + bs]
        _, idx, emask = _rank_batch(score, batch, excl, kmax, num_items)
        dev = idx.device
        # A target the user already saw in training is masked and can never be ranked: drop it
        # from the targets instead of charging the model for it; users left with none are skipped.
        t_rows, t_cols = (t.to(dev) for t in _batch_pairs(tgt, batch))
        rankable = ~emask[t_rows, t_cols]
        t_rows, t_cols = t_rows[rankable], t_cols[rankable]
        tmask = torch.zeros_like(emask)
        tmask[t_rows, t_cols] = True
        n = torch.bincount(t_rows, minlength=len(batch)).to(torch.float64) + extra[batch].to(dev)
        keep = n > 0
        count += int(keep.sum())
        hits = (tmask.gather(1, idx.clamp(min=0)) & (idx >= 0))[keep].to(torch.float64)
        n = n[keep]
        for k in ks:
            h = hits[:, :k]
            nhit = h.sum(1)
            dcg = (h * disc[: h.shape[1]].to(dev)).sum(1)
            idcg = idcg_cum.to(dev)[torch.clamp(n, max=min(k, num_items)).long()]
            sums[f"recall@{k}"] += float((nhit / n).sum())
            sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
            sums[f"hitrate@{k}"] += float((nhit > 0).to(torch.float64).sum())
    out = {key: (v / count if count else math.nan) for key, v in sums.items()}
    out["users"] = float(count)
    return out


def list_retrieval_metrics(
    lists: Tensor,
    num_items: int,
    targets: ItemSets,
    exclude: ItemSets | None = None,
    ks: Sequence[int] = (10, 50, 100),
    unrankable: Tensor | None = None,
) -> dict[str, float]:
    """`retrieval_metrics` of given ranked lists instead of embeddings: `lists` [U, K] item rows by user
    row (-1 = empty); a list's order becomes its scores, unlisted items rank nowhere."""
    width = lists.shape[1]

    def score(batch: Tensor) -> Tensor:
        out = torch.full((len(batch), num_items), -math.inf)
        rows = lists[batch]
        r, c = (rows >= 0).nonzero(as_tuple=True)
        out[r, rows[r, c]] = (width - c).float()  # rank 1 scores highest
        return out

    return _evaluate(score, len(lists), num_items, targets, exclude, ks, None, None, unrankable)


def retrieval_metrics(
    user_emb: Tensor,
    item_emb: Tensor,
    targets: ItemSets,
    exclude: ItemSets | None = None,
    ks: Sequence[int] = (10, 50, 100),
    users: Sequence[int] | Tensor | None = None,
    batch_users: int | None = None,
    unrankable: Tensor | None = None,
) -> dict[str, float]:
    """Exact Recall@K, NDCG@K and HitRate@K of dot-product retrieval over the full catalogue.

    user_emb [U, d] and item_emb [I, d] are indexed by user row / item row; `targets` and `exclude`
    are per-user item sets (see `ItemSets`) over those rows. For each evaluated user u with target
    set T (after removing T ∩ excluded, which cannot be ranked) and ranked list R_K (top K by
    score, excluded items masked to -inf, ties broken by the lower item row):

    - recall@K  = |R_K ∩ T| / |T|
    - hitrate@K = 1 if |R_K ∩ T| > 0 else 0
    - ndcg@K    = DCG / IDCG, DCG = Σ_{j<K} [R_K[j] ∈ T] / log2(j + 2) (binary gains, j from 0),
                  IDCG = Σ_{j < min(|T|, K)} 1 / log2(j + 2)

    `unrankable` [U] counts relevant items outside the catalogue (unseen in training): they stay in
    |T| (and IDCG) as misses instead of being dropped, which would inflate recall.
    Each is the mean over evaluated users: those in `users` (default all) with a non-empty T.
    The result also carries `users` (how many were evaluated) so partial results over user
    slices can be combined with `combine_retrieval`. Scores are computed `batch_users` users at a
    time (default: about 16M scores per batch).
    """
    if user_emb.ndim != 2 or item_emb.ndim != 2 or user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"retrieval_metrics: expected user_emb [U, d] and item_emb [I, d], got "
            f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}"
        )
    item_t = item_emb.detach().T

    def score(batch: Tensor) -> Tensor:
        return (user_emb[batch.to(user_emb.device)].detach() @ item_t).float()

    return _evaluate(
        score, user_emb.shape[0], item_emb.shape[0], targets, exclude, ks, users, batch_users, unrankable
    )


def popularity_baseline(
    item_counts: Tensor | np.ndarray | Sequence[float],
    targets: ItemSets,
    exclude: ItemSets | None = None,
    ks: Sequence[int] = (10, 50, 100),
    num_users: int | None = None,
    users: Sequence[int] | Tensor | None = None,
    batch_users: int | None = None,
    unrankable: Tensor | None = None,
) -> dict[str, float]:
    """`retrieval_metrics` when every user gets the same list: items by training count, descending.

    item_counts [I] are training interaction counts per item row; each user's excluded items are
    removed from the list (ties: lower item row first). `num_users` defaults to the largest user
    row in a dict `targets` + 1, or the CSR's row count.
    """
    counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float32).reshape(-1)
    if num_users is None:
        if isinstance(targets, Mapping):
            num_users = (max(int(u) for u in targets) + 1) if targets else 0
        elif isinstance(targets, Tensor) and targets.layout == torch.sparse_csr:
            num_users = targets.shape[0]
        else:
            indptr = targets.indptr if hasattr(targets, "indptr") else targets[0]
            num_users = len(indptr) - 1

    def score(batch: Tensor) -> Tensor:
        return counts.expand(len(batch), -1).clone()

    return _evaluate(score, num_users, counts.numel(), targets, exclude, ks, users, batch_users, unrankable)


def combine_retrieval(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine `retrieval_metrics` results over disjoint user slices (weighted by their `users`)."""
    total = sum(p["users"] for p in parts)
    keys = [k for k in parts[0] if k != "users"] if parts else []
    out = {
        k: (sum(p[k] * p["users"] for p in parts if p["users"]) / total if total else math.nan) for k in keys
    }
    out["users"] = float(total)
    return out
