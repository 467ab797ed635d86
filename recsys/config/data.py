"""`data`: labels, splits, sampled negatives, and how raw data becomes MDS shards."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from recsys.config.base import Strict
from recsys.config.sources import Source


class LabelConfig(Strict):
    """How raw ratings/clicks become binary labels."""

    mode: Literal["as_is", "threshold", "mean", "all_positive"] = Field(
        "as_is",
        description="as_is: use the source label; threshold: rating >= threshold; mean: rating >= global "
        "mean (the Databricks reference); all_positive: every interaction is a positive.",
    )
    threshold: float = Field(4.0, description="Rating threshold for mode=threshold.")


class SplitConfig(Strict):
    """How rows are divided into train / val / test."""

    mode: Literal["random", "leave_last_n", "by_day", "presplit"] = Field(
        "random",
        description="random: seeded row split; leave_last_n: per-user temporal, last N to test and the "
        "N before to val; by_day: Criteo days (last day test, the one before val); presplit: as given.",
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of rows for validation (random).")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of rows for test (random).")
    n: int = Field(1, ge=1, description="Interactions per user held out for val and for test (leave_last_n).")
    seed: int = Field(0, description="Seed of the random split.")


class NegativesConfig(Strict):
    """Sampled negatives: label-0 rows added to interaction data so a ranker (DLRM/DCN) can train on it."""

    per_positive: int = Field(
        0, ge=0, description="Items drawn per positive among those its user has no row with (0: none)."
    )
    seed: int = Field(0, description="Seed of the negative sampling.")


class CandidatesConfig(Strict):
    """Ranker data from a retriever's own top-N (`recsys data candidates`), cross-fitted so the
    retriever never scores the interactions it trained on (see recsys/retrieval/candidates.py)."""

    top_n: int = Field(
        0, ge=0, description="Retrieved items per user that become ranker rows (0: off, use `data prepare`)."
    )
    folds: int = Field(
        5,
        ge=2,
        description="Cross-fitting folds of the train rows: one retriever per fold, trained on the rest.",
    )
    seed: int = Field(0, description="Seed of the train rows' fold assignment.")
    item_item_lambda: float | None = Field(
        None,
        gt=0,
        description="EASE ridge λ of the item-to-item history features (z-scored EASE score and its rank "
        "in the user's list); null: off.",
    )
    item_item_max_items: int = Field(
        20_000,
        gt=0,
        description="Most items the item-to-item fit accepts (it holds and inverts I × I float64 matrices).",
    )


class HistoryConfig(Strict):
    """Per-interaction histories: each row carries its user's previous items (recsys.data.history)."""

    length: int = Field(gt=0, description="L: the user's previous ≤ L items attached to each interaction.")
    max_rows: int = Field(
        50_000_000,
        gt=0,
        description="Most input rows prepare orders in memory (~110 bytes a row at the peak of ordering "
        "the histories); beyond it prepare stops and points at the Spark path, which builds them on the executors.",
    )
    rule: Literal["causal", "profile"] = Field(
        "causal",
        description="causal: the user's items strictly earlier in time, of the parts known to the row's part "
        "(next-item protocols); profile: the user's last L items of the parts known when the row's part is "
        "scored, earlier or later in time, never the row itself (train: other train items; val: train; "
        "test: train and val) — for random splits.",
    )


class WindowConfig(Strict):
    """A time window of the source and the earlier prepared folder whose vocabularies it extends."""

    since: str | int | float | None = Field(
        None,
        description="First timestamp kept (inclusive): ISO date/date-time (naive = UTC) or epoch seconds; "
        "null: from the start.",
    )
    until: str | int | float | None = Field(
        None,
        description="Timestamps kept are before this (exclusive): ISO date/date-time (naive = UTC) or "
        "epoch seconds; null: to the end.",
    )
    previous: str | None = Field(
        None,
        description="An earlier prepared folder: its ids keep their rows, new ids get rows after them.",
    )

    @field_validator("since", "until", mode="before")
    @classmethod
    def _iso_text(cls, value: Any) -> Any:
        # YAML reads 1998-03-01 as a date; keep the text form so the resolved config round-trips.
        if isinstance(value, (_dt.date, _dt.datetime)):
            return value.isoformat()
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> WindowConfig:
        since, until = self.bounds()
        if since is not None and until is not None and since >= until:
            raise ValueError(f"data.window: since ({self.since}) must be before until ({self.until})")
        return self

    def bounds(self) -> tuple[float | None, float | None]:
        """(since, until) as epoch seconds (None = unbounded)."""
        return _epoch_seconds(self.since, "data.window.since"), _epoch_seconds(
            self.until, "data.window.until"
        )


def _epoch_seconds(value: str | int | float | None, where: str) -> float | None:
    """A window bound as epoch seconds: numbers (or numeric text) as they are, ISO text parsed (naive = UTC)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected an ISO date/date-time or epoch seconds, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value.strip())
    except ValueError:
        pass
    try:
        when = _dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"{where}: {value!r} is neither an ISO date/date-time (1998-03-01, 1998-03-01T12:00:00Z) "
            "nor epoch seconds"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=_dt.UTC)).timestamp()


class DataConfig(Strict):
    """Where raw data comes from and how it becomes MDS shards."""

    source: Source = Field(description="The raw data source (discriminated by `kind`).")
    prepared_dir: str = Field(
        description="Output folder: train/ val/ test/ MDS datasets, vocab/, metadata.json."
    )
    raw_dir: str | None = Field(
        None, description="Where `recsys data synth` writes raw files (default: prepared_dir/raw)."
    )
    label: LabelConfig = Field(default_factory=LabelConfig, description="Label binarization.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/val/test split.")
    negatives: NegativesConfig = Field(
        default_factory=NegativesConfig, description="Sampled label-0 rows per positive (rankers)."
    )
    candidates: CandidatesConfig = Field(
        default_factory=CandidatesConfig, description="Hard-negative ranker data from a retriever's top-N."
    )
    history: HistoryConfig | None = Field(
        None, description="Attach each interaction's previous items as the `history` feature; None: off."
    )
    min_count: int = Field(1, ge=1, description="Raw ids seen fewer times in train map to the OOV row.")
    block_size: int = Field(
        256, gt=0, description="Rows per MDS sample (columnar block); batch_size must be a multiple."
    )
    compression: str | None = Field(
        "zstd:2",
        description="MDS shard compression, e.g. zstd:N (None for none); zstd:2 gave smaller shards "
        "for 25% less CPU than zstd's default level 3 on Criteo-layout blocks.",
    )
    shard_size_limit: int = Field(1 << 26, gt=0, description="Bytes per MDS shard before a new one starts.")
    skip_bad_rows: bool = Field(False, description="Skip (and count) malformed rows instead of stopping.")
    chunk_rows: int = Field(
        262_144,
        gt=0,
        description="Rows `recsys data prepare` reads per chunk; peak memory grows with it, the output does not.",
    )
    shuffle_window: int = Field(
        1_048_576,
        gt=0,
        description="Train rows are shuffled within windows of this many source rows (bounded memory; the same on every prepare path).",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank (0 = in-process).")
    num_canonical_nodes: int = Field(
        1, ge=1, description="Pinned StreamingDataset canonical nodes (shuffle determinism)."
    )
    shuffle_seed: int = Field(
        17, description="Seed of the StreamingDataset shuffle and within-block shuffle."
    )
    window: WindowConfig = Field(
        default_factory=WindowConfig,
        description="Prepare one time window; grow an earlier folder's vocabularies.",
    )
    train_dirs: list[str] = Field(
        default_factory=list,
        description="Earlier prepared folders (ancestors of prepared_dir) whose train splits are trained on "
        "with prepared_dir's; prepared_dir's vocabularies and val/test govern.",
    )
