"""`promotion`: the gate of `recsys promote` (continuous training)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recsys.config.base import Strict


class PromotionConfig(Strict):
    """The gate of `recsys promote`: a candidate run against the registered champion on a new window."""

    model_name: str | None = Field(
        None, description="Registered model name (MLflow Model Registry); None: recsys-<config name>."
    )
    metric: str = Field(
        "auto",
        description="Metric both models are compared on, as evaluation names it (ndcg@10, recall@50, "
        "auc, ...); auto: ndcg@10 for two_tower, auc for dlrm. Higher is better.",
    )
    margin: float = Field(
        0.0, ge=0, description="Promote when candidate >= champion - margin (absolute, in metric units)."
    )
    split: Literal["val", "test"] = Field(
        "test",
        description="Split of the new window scored (its train split is each user's known items, excluded).",
    )
    index_kind: Literal["flat", "ivf", "hnsw"] = Field(
        "flat", description="Two-Tower: FAISS index built for the served version (flat = exact)."
    )
