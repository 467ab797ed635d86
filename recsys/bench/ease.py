"""EASE (Steck, WWW 2019), a reference row of `recsys bench quality`: what reading a user's known items can reach.

EASE is a linear item-to-item model fit in closed form: B = argmin ‖X − XB‖² + λ‖B‖², diag(B) = 0,
over the users × items matrix X of known interactions; a user's scores are their row of X times B.
It reads nothing but the set of items each user is known to have interacted with — which is exactly
what a history-reading Two-Tower sees on a random split — and it is among the strongest models of
that kind on MovieLens. So its ratio to the Two-Tower bounds what issue 19's history-aware Two-Tower
can be expected to reach there (the aim is ≥ 1.10×).

Protocol, as every row of the bench: scoring val, X holds the train rows; scoring test, X holds train
and val (what is known then; the Two-Tower's user vectors never saw val). λ is chosen on val.
"""

from __future__ import annotations

from typing import Any

import torch

from recsys.retrieval.item_item import ease_weights

#: The ridge strengths tried on val (ML-100K's best is in the middle of this range).
LAMBDAS = (50.0, 100.0, 200.0, 300.0, 500.0, 800.0, 1200.0)


def ease_scores(split: Any, part: str, lam: float) -> torch.Tensor:
    """[U, I] EASE scores for scoring `part` of a bench Split: fit on (and read from) the parts known then."""
    known = split.mask("train") | (split.mask("val") if part == "test" else False)
    return (known.double() @ ease_weights(known, lam)).float()


def ease_row(split: Any, ev: Any, log: Any, metric: str = "ndcg@10") -> tuple[torch.Tensor, float, float]:
    """(test scores, val `metric`, λ) of EASE with λ chosen on val `metric` among LAMBDAS; `ev` is the
    bench's Evaluator (handed in: this module stays a leaf that recsys.bench.quality imports)."""
    vals = {lam: ev(ease_scores(split, "val", lam), "val")[metric] for lam in LAMBDAS}
    for lam, v in vals.items():
        log(f"  ease λ {lam:g}: val {metric} {v:.4f}")
    lam = max(vals, key=lambda x: vals[x])
    log(f"ease: chosen λ {lam:g}")
    return ease_scores(split, "test", lam), vals[lam], lam
