"""Sampled negatives for rankers trained on interaction data (`data.negatives`): the rule.

Implicit-feedback data holds positives only; a ranker (DLRM/DCN) needs label-0 rows. For each
positive row of every split, `per_positive` items are drawn uniformly (with replacement) from the
catalogue (the items with a train row, what retrieval can return) among those the user has no row
with in that split or an earlier one (train < val < test): a train negative never looks at the
user's later interactions, a val negative is never a train or val interaction of that user. A draw
that hits such an item is redrawn, up to MAX_ROUNDS rounds; what still hits is dropped.

Draw k of round r for the row at global position p is a counter-based random number of (seed,
p · per_positive + k, r), so the result depends on the rows, never on how they were chunked or
bucketed. The catalogue is ordered by the items' raw ids (bytes), for the same reason.

A negative row copies its positive's row (user, user side features, dense, split) and takes the
item id and item side features from the sampled item's last train row. Test negatives only serve
the ranker's own test AUC; retrieve → rank is scored on the retrieval data's positives. How prepare
applies this in bounded memory: recsys.data.negative_buckets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from recsys.data import splits as S
from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config

#: Redraw rounds for negatives that hit an interaction; the rest (users who saw nearly all) are dropped.
MAX_ROUNDS = 100
#: Name of the constant dense feature added to data without dense features (DLRM needs one).
CONST_DENSE = "const"


def check_source(cfg: Config) -> None:
    """Refuse data.negatives on a source without user and item columns, before reading it."""
    if not cfg.data.negatives.per_positive:
        return
    src = cfg.data.source
    parts = [src] if src.kind != "presplit" else [p for p in (src.train, src.val, src.test) if p]
    for part in parts:
        kind = part["kind"] if isinstance(part, dict) else part.kind
        no_columns = kind == "table" and not (_get(part, "user") and _get(part, "item"))
        if kind in ("criteo", "synthetic_ctr") or no_columns:
            raise UserError(
                "data.negatives.per_positive: needs interaction data with user and item columns "
                f"(data.source.kind {kind!r} has none); set it to 0"
            )


def _get(part: object, name: str) -> object:
    return part.get(name) if isinstance(part, dict) else getattr(part, name, None)


def draw(seed: int, keys: np.ndarray, round_: int, n: int) -> np.ndarray:
    """Catalogue index (int64, 0..n-1) of draw `keys` (position · per_positive + k) in round `round_`."""
    h = S.mix64(round_, S.mix64(seed, keys))
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.minimum((u * n).astype(np.int64), n - 1)


def negative_keys(seed: int, positions: np.ndarray, k: np.ndarray, per_positive: int) -> np.ndarray:
    """Train shuffle keys of negative rows (draw k of the positive at `positions`), a stream apart
    from the source rows' splits.shuffle_keys."""
    keys = positions.astype(np.uint64) * np.uint64(per_positive) + k.astype(np.uint64)
    return S.mix64(seed + 2, keys)


def draw_negatives(
    users: np.ndarray,
    items: np.ndarray,
    assign: np.ndarray,
    positive: np.ndarray,
    positions: np.ndarray,
    n_catalogue: int,
    per_positive: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source row [m], draw k [m], catalogue index [m]) of the negatives of rows holding all of
    their users' rows, in row then k order.

    `users` are codes >= 0 (-1: the row gets none — callers pass -1 where the user or item is
    missing); `items` catalogue indices (-1: not in the catalogue — never drawn, blocks nothing; a
    positive with such an item still gets negatives);
    `assign` the split, `positions` the rows' global positions (what the draws are keyed by).
    """
    rows = np.flatnonzero(positive & (users >= 0))
    if per_positive == 0 or n_catalogue == 0 or len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    users = users.astype(np.int64)
    # Earliest split of each (user, catalogue item) pair: a draw is taken when it is <= its row's split.
    pairs = np.flatnonzero((users >= 0) & (items >= 0))
    keys = users[pairs] * n_catalogue + items[pairs]
    order = np.lexsort((assign[pairs], keys))
    first = np.r_[True, keys[order][1:] != keys[order][:-1]]
    pair_keys, pair_split = keys[order][first], assign[pairs][order][first]

    def taken(src: np.ndarray, cand: np.ndarray) -> np.ndarray:
        k = users[src] * n_catalogue + cand
        if not len(pair_keys):
            return np.zeros(len(k), bool)
        at = np.minimum(np.searchsorted(pair_keys, k), len(pair_keys) - 1)
        return (pair_keys[at] == k) & (pair_split[at] <= assign[src])

    src = np.repeat(rows, per_positive)
    k = np.tile(np.arange(per_positive, dtype=np.int64), len(rows))
    draw_keys = positions[src].astype(np.uint64) * np.uint64(per_positive) + k.astype(np.uint64)
    cand = draw(seed, draw_keys, 0, n_catalogue)
    bad = np.flatnonzero(taken(src, cand))
    for round_ in range(1, MAX_ROUNDS + 1):
        if not len(bad):
            break
        cand[bad] = draw(seed, draw_keys[bad], round_, n_catalogue)
        bad = bad[taken(src[bad], cand[bad])]
    keep = np.ones(len(src), bool)
    keep[bad] = False
    return src[keep], k[keep], cand[keep]


def sample_negatives(
    users: np.ndarray,
    items: np.ndarray,
    assign: np.ndarray,
    positive: np.ndarray,
    per_positive: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(positive row [m], sampled item code [m]) for rows held in memory at positions 0..n-1.

    `users`/`items` are codes (>= 0; -1 = missing, such rows get none), `assign` the split per row;
    the catalogue is ordered by item code here (prepare orders it by raw id).
    """
    ok = (users >= 0) & (items >= 0)
    catalogue = np.unique(items[ok & (assign == S.TRAIN)])
    at = np.searchsorted(catalogue, items)
    found = ok & (at < len(catalogue)) & (catalogue[np.minimum(at, max(len(catalogue) - 1, 0))] == items)
    cat_items = np.where(found, at, -1)
    positions = np.arange(len(users), dtype=np.int64)
    src, _, cand = draw_negatives(
        np.where(ok, users, -1), cat_items, assign, positive, positions, len(catalogue), per_positive, seed
    )
    return src, catalogue[cand] if len(catalogue) else cand
