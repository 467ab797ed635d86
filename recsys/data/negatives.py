"""Sampled negatives for rankers trained on interaction data (`data.negatives`).

Implicit-feedback data holds positives only; a ranker (DLRM/DCN) needs label-0 rows. For each
positive row of every split, `per_positive` items are drawn uniformly (with replacement, seeded) from
the catalogue (the items with a train row, what retrieval can return) among those the user has no row
with in that split or an earlier one (train < val < test): a train negative never looks at the
user's later interactions, a val negative is never a train or val interaction of that user.

A negative row copies its positive's row (user, user side features, dense, timestamp, split) and
takes the item id and item side features from the sampled item's last train row. Test negatives
only serve the ranker's own test AUC; retrieve → rank is scored on the retrieval data's positives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from recsys.data import splits as S
from recsys.data import vocab as V
from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import NegativesConfig
    from recsys.data.readers import Table

#: Redraw rounds for negatives that hit an interaction; the rest (users who saw nearly all) are dropped.
MAX_ROUNDS = 100
#: Name of the constant dense feature added to data without dense features (DLRM needs one).
CONST_DENSE = "const"


def _pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    return users.astype(np.int64) * n_items + items.astype(np.int64)


def sample_negatives(
    users: np.ndarray,
    items: np.ndarray,
    assign: np.ndarray,
    positive: np.ndarray,
    per_positive: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(positive row [m], sampled item code [m]) for each positive row's negatives.

    `users`/`items` are codes (>= 0; -1 = missing, such rows get none), `assign` the split per row.
    A sampled item is one with a train row that the user has no row with in a split <= the row's.
    """
    n_items = int(items.max(initial=-1)) + 1
    ok = (users >= 0) & (items >= 0)
    catalogue = np.unique(items[ok & (assign == S.TRAIN)])
    rows = np.flatnonzero(positive & ok)
    if per_positive == 0 or len(catalogue) == 0 or len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Earliest split of each (user, item) pair: a candidate is taken when that split is later than its row's.
    keys = _pair_keys(users[ok], items[ok], n_items)
    order = np.lexsort((assign[ok], keys))
    first = np.r_[True, keys[order][1:] != keys[order][:-1]]
    pair_keys, pair_split = keys[order][first], assign[ok][order][first]

    def taken(src: np.ndarray, cand: np.ndarray) -> np.ndarray:
        k = _pair_keys(users[src], cand, n_items)
        at = np.minimum(np.searchsorted(pair_keys, k), len(pair_keys) - 1)
        return (pair_keys[at] == k) & (pair_split[at] <= assign[src])

    rng = np.random.default_rng(seed)
    src = np.repeat(rows, per_positive)
    cand = catalogue[rng.integers(len(catalogue), size=len(src))]
    bad = np.flatnonzero(taken(src, cand))
    for _ in range(MAX_ROUNDS):
        if not len(bad):
            break
        cand[bad] = catalogue[rng.integers(len(catalogue), size=len(bad))]
        bad = bad[taken(src[bad], cand[bad])]
    keep = np.ones(len(src), bool)
    keep[bad] = False
    return src[keep], cand[keep]


def _take(column: pa.ChunkedArray, idx: np.ndarray) -> pa.ChunkedArray:
    return column.take(pa.array(idx, pa.int64()))


def add_negatives(
    table: Table, assign: np.ndarray, labels: np.ndarray, cfg: NegativesConfig
) -> tuple[Table, np.ndarray, np.ndarray]:
    """`table`, `assign` and `labels` with the sampled label-0 rows appended (unchanged when off)."""
    from dataclasses import replace

    if not cfg.per_positive:
        return table, assign, labels
    if table.user_feature is None or table.item_feature is None:
        raise UserError(
            "data.negatives.per_positive: needs interaction data with user and item columns "
            f"(data.source.kind {table.kind!r} has none); set it to 0"
        )
    names = table.sparse_names
    users, _ = V.encode(table.sparse[names.index(table.user_feature)])
    items, _ = V.encode(table.sparse[names.index(table.item_feature)])
    src, neg_items = sample_negatives(users, items, assign, labels > 0, cfg.per_positive, cfg.seed)
    # Each item's side features come from its last train row (side features are per item).
    item_row = np.full(int(items.max(initial=-1)) + 1, -1, np.int64)
    train = np.flatnonzero((assign == S.TRAIN) & (items >= 0))
    item_row[items[train]] = train
    from_item = item_row[neg_items]
    item_cols = {table.item_feature, *table.item_side}
    sparse = [
        pa.concat_arrays([*col.chunks, *_take(col, from_item if name in item_cols else src).chunks])
        for name, col in zip(names, table.sparse, strict=True)
    ]
    dense, dense_names = table.dense[np.r_[np.arange(table.rows), src]], table.dense_names
    if not dense_names:  # DLRM's dense arch needs an input: a constant one acts as a learned bias
        dense, dense_names = np.ones((len(dense), 1), np.float32), [CONST_DENSE]

    def extend(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.concatenate([a, a[src]])

    out = replace(
        table,
        label=extend(table.label),
        dense=dense,
        dense_names=dense_names,
        sparse=[pa.chunked_array([c], pa.string()) for c in sparse],
        timestamp=extend(table.timestamp),
        day=extend(table.day),
        notes=[
            *table.notes,
            f"negatives: {len(src):,} sampled rows (label 0) for {int((labels > 0).sum()):,} positives",
        ],
    )
    return (
        out,
        np.concatenate([assign, assign[src]]),
        np.concatenate([labels, np.zeros(len(src), labels.dtype)]),
    )
