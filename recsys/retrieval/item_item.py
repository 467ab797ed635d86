"""EASE item-to-item weights (Steck, WWW 2019) and the ranker's features read from them.

EASE fits B = argmin ‖X − XB‖² + λ‖B‖², diag(B) = 0, in closed form over the users × items 0/1 matrix
X of known interactions; the score of (u, i) is X[u] · B[:, i], how strongly the user's known items
point at i. The Two-Tower's user-id vector does not carry this co-occurrence signal, so a candidate
ranker gets it as a feature (`data.candidates.item_item_lambda`), and `recsys bench quality --ease`
uses the same fit as a reference row. The fit holds an I × I float64 matrix and inverts it: fine at
ML-100K (1.7k items), refused above `data.candidates.item_item_max_items`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    import torch

#: Dense feature names the item-to-item scores add to a candidate row (candidates.DENSE follows them).
ITEM_ITEM_DENSE = ("item_item_z", "item_item_log_rank")


def ease_weights(known: torch.Tensor, lam: float) -> torch.Tensor:
    """[I, I] item-to-item weights of EASE fit on the [U, I] 0/1 matrix `known`, ridge `lam` (float64)."""
    x = known.double()
    return ease_from_gram(x.T @ x, lam)


def ease_from_gram(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """[I, I] EASE weights from the item co-occurrence counts XᵀX (`gram`; float64 [I, I], not changed)."""
    import torch

    gram = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64)
    inv = torch.linalg.inv(gram)
    weights = -inv / torch.diag(inv)  # the closed form with the zero-diagonal constraint
    return weights.fill_diagonal_(0.0)


def check_items(num_items: int, max_items: int) -> None:
    """Refuse an EASE fit over more items than `data.candidates.item_item_max_items` (one line)."""
    if num_items > max_items:
        gb = num_items * num_items * 8 * 3 / 1e9  # gram, inverse, weights in float64
        raise UserError(
            f"data.candidates.item_item_lambda: {num_items:,} items is above "
            f"data.candidates.item_item_max_items ({max_items:,}); the item-to-item fit holds ~{gb:.0f} GB "
            "of I × I matrices — set item_item_lambda: null (off) or raise item_item_max_items if it fits"
        )


def item_item_features(
    code: np.ndarray, u: np.ndarray, i: np.ndarray, indptr: np.ndarray, known: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """float32 [n, 2] of candidate rows: the EASE score z-scored within each user's list (`code` groups
    rows by user) and its log rank there (1 = the list's highest). `indptr`/`known` is the CSR of each
    user row `u`'s known items. Scale-free, so a fold's fit and the full fit give the same scale."""
    out = np.zeros((len(u), 2), np.float32)
    order = np.argsort(code, kind="stable")
    _, starts = np.unique(code[order], return_index=True)
    for rows in np.split(order, starts[1:]):
        user = u[rows[0]]
        seen = known[indptr[user] : indptr[user + 1]]
        s = weights[seen][:, i[rows]].sum(0, dtype=np.float64) if len(seen) else np.zeros(len(rows))
        sd = s.std()
        out[rows, 0] = (s - s.mean()) / sd if sd > 0 else 0.0
        # Rank 1 = highest score; ties share the order of the list (stable).
        rank = np.empty(len(rows), np.int64)
        rank[np.argsort(-s, kind="stable")] = np.arange(1, len(rows) + 1)
        out[rows, 1] = np.log(rank)
    return out
