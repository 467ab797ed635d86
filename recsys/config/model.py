"""`model`: the model family (Two-Tower, DLRM/DCN) and its embedding tables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from recsys.config.base import Strict


class TwoTowerConfig(Strict):
    """Two-Tower retrieval model settings."""

    user_features: list[str] = Field(
        default_factory=lambda: ["user_id"], description="Sparse features of the user tower."
    )
    item_features: list[str] = Field(
        default_factory=lambda: ["item_id"], description="Sparse features of the item tower."
    )
    layers: list[int] = Field(
        default_factory=lambda: [128, 64], description="MLP sizes of each tower; the last is the output dim."
    )
    loss: Literal["softmax", "bce"] = Field(
        "softmax", description="softmax: in-batch sampled softmax with log-Q correction; bce: pointwise BCE."
    )
    temperature: float = Field(0.05, gt=0, description="Softmax temperature.")
    logq_correction: bool = Field(
        True,
        description="Subtract each negative source's log expected count (in-batch: log(B·q_pop); uniform: "
        "log(M/num_items)) from the softmax logits.",
    )
    similarity: Literal["auto", "cosine", "dot"] = Field(
        "auto",
        description="Score of a user·item pair: cosine (L2-normalised towers), dot (raw inner product); "
        "auto: cosine for softmax, dot for bce. Logits are divided by temperature either way.",
    )
    embedding_l2: float = Field(
        0.0,
        ge=0,
        description="λ of an L2 penalty added to the loss: λ × (sum of squared norms of the batch's looked-up "
        "pooled embeddings, both towers) / batch size; regularises the fused sparse tables.",
    )
    num_uniform_negatives: int = Field(
        0,
        ge=0,
        description="Softmax: M items drawn uniformly from the catalogue per batch as extra negatives "
        "shared by every row (needs train.pipeline: false).",
    )
    popularity_prior: float = Field(
        0.0,
        ge=0,
        description="β: at retrieval (evaluation, exported embeddings, index, serving) each item's logit gains "
        "β·log(its share of train interactions), folded into the vectors as one extra coordinate; 0: off.",
    )
    history_pooling: Literal["none", "mean", "attention"] = Field(
        "none",
        description="Pool the `history` feature's item embeddings (the item table, shared) into the user "
        "tower beside its side features: mean, or attention with a learned query and recency; needs "
        "data.history and train.pipeline: false.",
    )


class SequentialConfig(Strict):
    """SASRec-style sequential retrieval: causal self-attention over the history gives the user vector."""

    layers: int = Field(2, ge=1, description="Transformer blocks.")
    block: Literal["sasrec", "hstu"] = Field(
        "sasrec",
        description="sasrec: pre-norm softmax attention + feed-forward; hstu: pointwise SiLU attention "
        "with a relative position bias, gated (ff_mult unused).",
    )
    heads: int = Field(1, ge=1, description="Attention heads (a divisor of model.embedding_dim).")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on embeddings, attention and feed-forward.")
    ff_mult: int = Field(1, ge=1, description="Feed-forward width as a multiple of model.embedding_dim.")
    softmax: Literal["sampled", "full"] = Field(
        "sampled",
        description="sampled: in-batch + uniform negatives, log-Q corrected; full: over every item row "
        "(small catalogues).",
    )
    num_uniform_negatives: int = Field(
        256, ge=0, description="sampled: M items drawn uniformly per batch as extra shared negatives."
    )
    logq_correction: bool = Field(
        True, description="sampled: subtract each negative source's log expected count."
    )
    temperature: float = Field(1.0, gt=0, description="Logits are user·item / temperature (dot product).")


class DLRMConfig(Strict):
    """DLRM ranking model settings."""

    interaction: Literal["dot", "dcn"] = Field(
        "dot", description="dot: classic DLRM; dcn: DCN-v2 low-rank cross net."
    )
    dense_arch_layers: list[int] = Field(
        default_factory=lambda: [512, 256, 64], description="Bottom MLP; last = embedding_dim."
    )
    over_arch_layers: list[int] = Field(
        default_factory=lambda: [512, 512, 256, 1], description="Top MLP; last must be 1."
    )
    dcn_num_layers: int = Field(3, ge=1, description="Cross layers (dcn).")
    dcn_low_rank_dim: int = Field(512, ge=1, description="Low-rank dimension of each cross layer (dcn).")


class TableConfig(Strict):
    """How one sparse feature's raw ids become rows of its embedding table (see docs/tables.md)."""

    kind: Literal["exact", "capped", "managed_collision"] = Field(
        "exact",
        description="exact: one row per train id (vocabulary); capped: the most frequent ids keep rows, "
        "the rest are hashed into reserved rows; managed_collision: TorchRec's MCH remapper assigns rows "
        "at run time with eviction.",
    )
    max_rows: int | None = Field(
        None,
        ge=3,
        description="Rows of the table, row 0 (missing values) included (capped, managed_collision).",
    )
    hashed_rows: int | None = Field(
        None,
        ge=1,
        description="capped: rows reserved for hashed ids (rare, beyond the cap, unseen); None: a tenth "
        "of max_rows (at least 1).",
    )
    eviction_policy: Literal["lfu", "distance_lfu", "lru"] = Field(
        "distance_lfu",
        description="managed_collision: which held ids give up their rows to new ones (TorchRec MCH policies).",
    )
    eviction_interval: int = Field(
        1,
        ge=1,
        description="managed_collision: train steps between evictions; resume is exact when checkpoints "
        "fall on multiples of it (1 always).",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> TableConfig:
        if self.kind == "exact":
            if self.max_rows is not None or self.hashed_rows is not None:
                raise ValueError("max_rows/hashed_rows apply to capped and managed_collision tables only")
            return self
        if self.max_rows is None:
            raise ValueError(f"max_rows: required for kind {self.kind}")
        if self.kind == "capped" and self.resolved_hashed_rows() > self.max_rows - 1:
            raise ValueError(
                f"hashed_rows ({self.hashed_rows}) must leave row 0: at most max_rows - 1 = {self.max_rows - 1}"
            )
        if self.kind == "managed_collision" and self.hashed_rows is not None:
            raise ValueError("hashed_rows applies to capped tables only")
        return self

    def resolved_hashed_rows(self) -> int:
        """capped: rows holding hashed ids (hashed_rows, or a tenth of max_rows, at least 1)."""
        if self.hashed_rows is not None:
            return self.hashed_rows
        return max(1, (self.max_rows or 0) // 10)


class ModelConfig(Strict):
    """Which model and its shape."""

    kind: Literal["two_tower", "dlrm", "sequential"] = Field(description="Model family.")
    embedding_dim: int = Field(64, gt=0, description="Dimension of every embedding table.")
    two_tower: TwoTowerConfig = Field(default_factory=TwoTowerConfig, description="Two-Tower settings.")
    dlrm: DLRMConfig = Field(default_factory=DLRMConfig, description="DLRM settings.")
    sequential: SequentialConfig = Field(
        default_factory=SequentialConfig, description="Sequential (SASRec-style) model settings."
    )
    table_default: TableConfig = Field(
        default_factory=TableConfig, description="Table of every sparse feature not named in `tables`."
    )
    tables: dict[str, TableConfig] = Field(
        default_factory=dict,
        description="Per sparse feature (by name): its table kind and size, overriding table_default.",
    )

    def table(self, feature: str) -> TableConfig:
        """The table settings of one sparse feature."""
        return self.tables.get(feature, self.table_default)
