"""`eval`: evaluation after (and during) training."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from recsys.config.base import Strict


class EvalConfig(Strict):
    """Evaluation after (and during) training."""

    ks: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [10, 50, 100],
        min_length=1,
        description="Cut-offs for Recall/NDCG/HitRate@K (each at least 1).",
    )
    batch_size: int = Field(4096, gt=0, description="Per-rank evaluation batch size.")
    exclude_train_items: bool = Field(
        True, description="Exclude items a user saw in training from retrieval."
    )
    val_retrieval: bool = Field(
        True,
        description="Two-Tower: also compute Recall/NDCG/HitRate@K and AUROC on the val split at every "
        "validation (needed to monitor val/ndcg@10 and the like).",
    )
