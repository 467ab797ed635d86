"""The typed config tree: strict YAML load, `--set` overrides, resolved dump.

One resolved config flows from the CLI (or a launcher) to the trainer; nothing downstream re-derives
settings. Every field carries a one-line description; unknown keys and wrong types are errors that
name the dotted path.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be loaded: the message names the file and dotted path."""


class Strict(BaseModel):
    """Base for every config section: unknown keys and silent coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------- data
class SyntheticCTRSource(Strict):
    """Criteo-layout click rows whose labels come from a hidden logistic model."""

    kind: Literal["synthetic_ctr"] = Field(description="Source kind selector.")
    rows: int = Field(200_000, gt=0, description="Number of rows to generate.")
    num_dense: int = Field(13, ge=0, description="Integer (count-like) dense features per row.")
    num_sparse: int = Field(26, ge=1, description="Categorical features per row.")
    cardinality: int = Field(1000, gt=1, description="Distinct raw values per categorical feature.")
    days: int = Field(3, ge=1, description="Number of day files (day_0 … day_N-1) to write.")
    signal: float = Field(
        1.0, gt=0, description="Scale of the hidden model's logits (higher = more learnable)."
    )
    seed: int = Field(0, description="Seed of the generator.")


class SyntheticInteractionsSource(Strict):
    """User–item interactions from latent factors with popularity skew and timestamps."""

    kind: Literal["synthetic_interactions"] = Field(description="Source kind selector.")
    num_users: int = Field(2000, gt=0, description="Number of users.")
    num_items: int = Field(1000, gt=0, description="Number of items in the catalogue.")
    interactions_per_user: int = Field(40, gt=1, description="Mean interactions per user.")
    latent_dim: int = Field(8, gt=0, description="Dimension of the planted user/item factors.")
    popularity_skew: float = Field(1.0, ge=0, description="Zipf exponent of item popularity.")
    seed: int = Field(0, description="Seed of the generator.")


class MovieLensSource(Strict):
    """MovieLens ratings in an original layout (ml-100k u.data, ml-1m/10m ratings.dat, ml-latest/25m
    ratings.csv), optionally with user and item side features joined by id."""

    kind: Literal["movielens"] = Field(description="Source kind selector.")
    path: str = Field(
        description="Ratings file: u.data / u1.base, ratings.dat or ratings.csv (format detected from the content)."
    )
    users: str | None = Field(
        None, description="u.user (ml-100k) or users.dat (ml-1m): adds features age, gender, occupation."
    )
    items: str | None = Field(
        None,
        description="u.item (ml-100k), movies.dat (ml-1m/10m) or movies.csv (ml-latest/25m): adds "
        "features genre_0 … genre_{genre_slots-1} and year.",
    )
    genre_slots: int = Field(
        3, ge=1, description="Genre features per item; an item's genres beyond these are dropped (counted)."
    )


class RecBoleSource(Strict):
    """RecBole atomic files: `.inter` plus optional `.user` / `.item` whose fields are joined by id."""

    kind: Literal["recbole"] = Field(description="Source kind selector.")
    inter: str = Field(description="The .inter file (tab-separated, header `field:type`).")
    user: str | None = Field(None, description="The .user file; its fields become user side features.")
    item: str | None = Field(None, description="The .item file; its fields become item side features.")
    user_id_field: str = Field("user_id", description="User id field (in .inter and .user).")
    item_id_field: str = Field("item_id", description="Item id field (in .inter and .item).")
    rating_field: str | None = Field(
        "rating", description="Rating/label field of .inter; null: none (use data.label.mode all_positive)."
    )
    time_field: str | None = Field(
        "timestamp", description="Timestamp field of .inter (leave_last_n order); null: file order."
    )
    user_features: list[str] | None = Field(
        None, description=".user fields used as features; null: every field but the id."
    )
    item_features: list[str] | None = Field(
        None, description=".item fields used as features; null: every field but the id."
    )
    rename: dict[str, str] = Field(
        default_factory=dict, description="Feature names instead of field names, e.g. {class: genre}."
    )
    seq_slots: int = Field(
        3,
        ge=1,
        description="Features per token_seq field (<name>_0 …); tokens beyond them are dropped (counted).",
    )
    seq_separator: str = Field(" ", min_length=1, description="Separator of the tokens of a token_seq field.")
    float_buckets: int = Field(
        10,
        ge=2,
        description="Quantile buckets (over the side file's rows) that turn a float field into tokens.",
    )


class LearningFromSetsSource(Strict):
    """The "Learning from Sets" item_ratings.csv: hashed string user ids, movie ids, ratings."""

    kind: Literal["learning_from_sets"] = Field(description="Source kind selector.")
    path: str = Field(description="Path to item_ratings.csv.")


class CriteoSource(Strict):
    """Criteo TSV files: label, 13 integer and 26 hex categorical fields; empty fields allowed."""

    kind: Literal["criteo"] = Field(description="Source kind selector.")
    paths: list[str] = Field(
        min_length=1, description="TSV files in day order (train.txt, or day_0 … day_N)."
    )


class TableSource(Strict):
    """Generic Parquet or CSV with a column mapping."""

    kind: Literal["table"] = Field(description="Source kind selector.")
    path: str = Field(description="Parquet or CSV file (by extension).")
    label: str | None = Field(None, description="Label column; None makes every row a positive.")
    dense: list[str] = Field(default_factory=list, description="Numeric columns used as dense features.")
    sparse: list[str] = Field(default_factory=list, description="Categorical columns (embedded) in order.")
    timestamp: str | None = Field(None, description="Timestamp column used by temporal splits.")
    user: str | None = Field(None, description="User column for per-user splits and retrieval evaluation.")
    item: str | None = Field(None, description="Item column for retrieval evaluation.")


class PreSplitSource(Strict):
    """Separate train / validation / test files of one inner kind (e.g. ml-100k u1.base / u1.test)."""

    kind: Literal["presplit"] = Field(description="Source kind selector.")
    train: dict[str, Any] = Field(description="Inner source (any non-presplit kind) for the train split.")
    val: dict[str, Any] | None = Field(
        None, description="Inner source for validation; None: carved from train."
    )
    test: dict[str, Any] = Field(description="Inner source for the test split.")


Source = Annotated[
    SyntheticCTRSource
    | SyntheticInteractionsSource
    | MovieLensSource
    | RecBoleSource
    | LearningFromSetsSource
    | CriteoSource
    | TableSource
    | PreSplitSource,
    Field(discriminator="kind"),
]


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


# -------------------------------------------------------------------------------------------- model
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

    kind: Literal["two_tower", "dlrm"] = Field(description="Model family.")
    embedding_dim: int = Field(64, gt=0, description="Dimension of every embedding table.")
    two_tower: TwoTowerConfig = Field(default_factory=TwoTowerConfig, description="Two-Tower settings.")
    dlrm: DLRMConfig = Field(default_factory=DLRMConfig, description="DLRM settings.")
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


# -------------------------------------------------------------------------------------------- train
class OptimizerConfig(Strict):
    """One optimizer."""

    name: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = Field(description="Optimizer algorithm.")
    lr: float = Field(gt=0, description="Peak learning rate.")
    eps: float = Field(1e-8, gt=0, description="Numerical epsilon (adagrad/adam).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")


class ShardingConfig(Strict):
    """Constraints handed to TorchRec's EmbeddingShardingPlanner."""

    types: (
        list[Literal["table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel"]] | None
    ) = Field(
        None,
        description="Sharding types allowed for every table; None: table_wise+column_wise+data_parallel on CPU, all on GPU.",
    )
    per_table: dict[str, list[str]] = Field(
        default_factory=dict, description="Table name → allowed sharding types."
    )
    min_partition: int | None = Field(
        None,
        gt=0,
        description="Narrowest column-wise shard (a divisor of model.embedding_dim); None: TorchRec's 128, "
        "so tables of dim ≤ 128 stay one column-wise shard.",
    )
    uvm_caching: bool = Field(
        False,
        description="GPU: let the planner keep a table in host memory (UVM) with an HBM cache of its hot "
        "rows (fbgemm's fused_uvm_caching kernel) when HBM is short; off: every table in HBM.",
    )


class CheckpointConfig(Strict):
    """Distributed checkpoints of the whole Trainer state (torch.distributed.checkpoint)."""

    dir: str | None = Field(
        None,
        description="Checkpoint root; None: runs/checkpoints/<name> locally, the checkpoint PVC in rendered jobs.",
    )
    every_steps: int = Field(0, ge=0, description="Save every N steps (0: only at epoch ends / never).")
    every_epoch: bool = Field(True, description="Save at the end of every epoch.")
    keep_last: int = Field(
        2, ge=1, description="Complete checkpoints kept, newest first (older ones pruned)."
    )
    keep_best: bool = Field(
        True, description="Also keep the checkpoint with the best train.early_stopping.metric value."
    )
    async_save: bool = Field(
        True,
        description="Write in the background (dcp.async_save on a gloo group of its own); the loop "
        "waits only for the copy of the state.",
    )
    on_save_error: Literal["continue", "stop"] = Field(
        "continue",
        description="A save that fails (volume full, I/O error): continue training and try again at the "
        "next save (one line each time; earlier checkpoints stay intact), or stop with that line.",
    )
    preempt_grace_s: float = Field(
        25.0,
        gt=0,
        le=3600,
        description="On SIGTERM (pod preemption, eviction, torchrun shutdown) checkpoint at the next step "
        "boundary and exit 143 within this many seconds; rendered jobs get terminationGracePeriodSeconds "
        "= this + 5 and torchrun's shutdown timeout to match.",
    )


class EarlyStoppingConfig(Strict):
    """Which validation value is "best", when to stop, and whether the best state is restored."""

    metric: str | None = Field(
        None,
        description="Monitored validation metric, e.g. val/auc, val/ndcg@10, val/loss; None: no early "
        "stopping and the last state is tested.",
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="max: higher is better; min: lower is better; auto: min for losses, else max."
    )
    patience: int | None = Field(
        None, ge=1, description="Stop after N validations without improvement; None: never stop early."
    )
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")
    restore_best: bool = Field(
        True, description="Restore the best state (by `metric`) before the test evaluation and export."
    )


class TrainConfig(Strict):
    """The training loop."""

    batch_size: int = Field(1024, gt=0, description="Per-rank batch size (global = batch_size × world size).")
    epochs: int = Field(1, ge=1, description="Passes over the train split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (None: epochs decide).")
    dense_optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3), description="Optimizer of the MLPs."
    )
    sparse_optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="rowwise_adagrad", lr=0.05),
        description="Fused optimizer of the embedding tables.",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear LR warmup steps.")
    decay: Literal["none", "linear", "cosine"] = Field(
        "none", description="LR decay after warmup, to 0 at the last step."
    )
    seed: int = Field(0, description="Seed of model init and everything random in training.")
    val_every_steps: int = Field(
        0, ge=0, description="Validate every N steps (0: only at the end of each epoch)."
    )
    log_every_steps: int = Field(50, ge=1, description="Log metrics to MLflow every N steps.")
    pipeline: bool = Field(True, description="Use TorchRec's TrainPipelineSparseDist.")
    sharding: ShardingConfig = Field(default_factory=ShardingConfig, description="Planner constraints.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A collective that waits longer than this for a peer (frozen, unreachable) fails "
        "the rank instead of hanging; torchrun then restarts the group, which resumes.",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Distributed checkpoints and their retention."
    )
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="Best-state tracking and early stopping."
    )


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


class TrackingConfig(Strict):
    """MLflow tracking."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///./runs/mlflow.db (artifacts in ./runs/artifacts).",
    )
    experiment: str = Field("recsys", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Run name (default: <config name>-<model>).")
    log_model: bool = Field(True, description="Log the gathered model and embeddings when they fit.")
    enabled: bool = Field(True, description="Set false to train without MLflow.")
    connect_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds an http(s) tracking server may take to answer at start before the run stops with one line.",
    )
    buffer_points: int = Field(
        100_000,
        ge=1,
        description="Metric points kept in memory while the server does not answer; beyond it the oldest are dropped and counted.",
    )
    flush_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds the run waits for an absent server to take buffered metrics before artifacts and at the end.",
    )


# ---------------------------------------------------------------------------------------------- job
class Toleration(Strict):
    """A pod toleration."""

    key: str = Field(description="Taint key.")
    operator: Literal["Equal", "Exists"] = Field("Exists", description="Toleration operator.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: str | None = Field(None, description="Taint effect (NoSchedule, …).")


class SparkAppConfig(Strict):
    """The Spark prepare as a Kubeflow Spark Operator SparkApplication (`recsys render --data-prep spark`)."""

    image: str = Field(
        "ghcr.io/recsys/trainer:0.1.0-spark",
        description="Driver and executor image: recsys and its locked packages plus Java 17 and Spark's "
        "Kubernetes entrypoint (/opt/entrypoint.sh), as Spark's own images have.",
    )
    spark_version: str = Field("4.3.0", description="Spark version of the image (the pinned pyspark).")
    driver_cores: int = Field(1, ge=1, description="CPU cores of the driver pod.")
    driver_memory: str = Field(
        "2g", description="Driver JVM heap: it holds no per-row data (bench spark-scale ran local[2] in 1g)."
    )
    executor_instances: int = Field(2, ge=1, description="Executor pods.")
    executor_cores: int = Field(4, ge=1, description="CPU cores (concurrent tasks) per executor.")
    executor_memory: str = Field("8g", description="JVM heap per executor (sorts and joins spill beyond it).")
    service_account: str = Field(
        "spark-operator-spark",
        description="ServiceAccount of the driver, allowed to create executor pods (the Spark Operator "
        "Helm chart's default for job namespaces).",
    )
    spark_conf: dict[str, str] = Field(
        default_factory=dict,
        description="Extra Spark properties (sparkConf), e.g. spark.sql.shuffle.partitions.",
    )


class JobConfig(Strict):
    """How big the job is and where it runs; the trainer reads rank/world from the environment."""

    name: str = Field("recsys-train", description="Job name (DNS-1123).")
    namespace: str = Field("recsys", description="Kubernetes namespace.")
    image: str = Field("ghcr.io/recsys/trainer:0.1.0", description="Trainer image.")
    nodes: int = Field(1, ge=1, description="Nodes (pods): Master ×1 + Worker ×(nodes−1).")
    procs_per_node: int = Field(1, ge=1, description="torchrun processes per node (= GPUs per node on GPU).")
    gpus_per_node: int = Field(0, ge=0, description="nvidia.com/gpu per pod (0: CPU job).")
    cpu: str = Field("4", description="CPU request per pod.")
    memory: str = Field("16Gi", description="Memory request and limit per pod.")
    shm_size: str = Field("8Gi", description="Size of the /dev/shm memory emptyDir.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    data_pvc: str = Field("recsys-data", description="PVC mounted at /data (prepared MDS data).")
    checkpoint_pvc: str = Field("recsys-checkpoints", description="PVC mounted at /checkpoints.")
    mlflow_tracking_uri: str = Field(
        "http://mlflow.recsys.svc:5000", description="MLflow URI inside the cluster."
    )
    mlflow_secret: str | None = Field(
        "mlflow-credentials", description="Secret whose keys become env (credentials)."
    )
    mlflow_secret_keys: list[str] = Field(
        default_factory=lambda: [
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ],
        description="Keys of mlflow_secret passed as optional env in TrainJobs (no envFrom there); "
        "PyTorchJobs take every key of the Secret through envFrom.",
    )
    extra_secrets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="More Secrets for the trainer's env, name → keys (all optional; e.g. object-store "
        "credentials); PyTorchJobs take every key through envFrom, TrainJobs the listed keys.",
    )
    env: dict[str, str] = Field(
        default_factory=lambda: {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"},
        description="Extra env of the trainer container (NCCL settings by default).",
    )
    backoff_limit: int = Field(
        2,
        ge=0,
        description="Failures the job survives (each resumes from the last checkpoint); one failure "
        "restarts every pod, so the PyTorchJob's runPolicy.backoffLimit is this × nodes + 1.",
    )
    ttl_seconds_after_finished: int = Field(86400, ge=0, description="Seconds a finished job is kept.")
    service_account: str = Field("recsys-trainer", description="ServiceAccount of the pods.")
    spark: SparkAppConfig = Field(
        default_factory=SparkAppConfig, description="The Spark prepare's SparkApplication (Spark Operator)."
    )


# --------------------------------------------------------------------------------------------- root
class Config(Strict):
    """The whole resolved configuration of one recsys run."""

    name: str = Field(description="Name of this config (used in run names and job names).")
    data: DataConfig = Field(description="Data sources and preparation.")
    model: ModelConfig = Field(description="Model family and shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    job: JobConfig = Field(default_factory=JobConfig, description="Job size and placement.")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if self.train.batch_size % self.data.block_size:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of data.block_size "
                f"({self.data.block_size}): batches are whole MDS blocks so resume is exact"
            )
        if self.eval.batch_size % self.data.block_size:
            raise ValueError(
                f"eval.batch_size ({self.eval.batch_size}) must be a multiple of data.block_size ({self.data.block_size})"
            )
        if self.model.kind == "dlrm":
            if self.model.dlrm.dense_arch_layers[-1] != self.model.embedding_dim:
                raise ValueError(
                    f"model.dlrm.dense_arch_layers: last size {self.model.dlrm.dense_arch_layers[-1]} must equal "
                    f"model.embedding_dim {self.model.embedding_dim}"
                )
            if self.model.dlrm.over_arch_layers[-1] != 1:
                raise ValueError("model.dlrm.over_arch_layers: the last size must be 1 (one logit)")
        if self.train.sparse_optimizer.weight_decay:
            # TorchRec passes it to fbgemm with weight_decay_mode NONE, so it would be silently ignored.
            raise ValueError(
                "train.sparse_optimizer.weight_decay: the fused embedding optimizers do not apply weight "
                "decay (fbgemm's mode is NONE); set it to 0"
            )
        metric = self.train.early_stopping.metric
        if metric is not None and metric not in self.validation_metrics():
            raise ValueError(
                f"train.early_stopping.metric: {metric!r} is not a validation metric of model.kind "
                f"{self.model.kind!r}; choose one of {self.validation_metrics()}"
            )
        mc = [f for f, t in self.model.tables.items() if t.kind == "managed_collision"]
        if self.model.table_default.kind == "managed_collision":
            mc.insert(0, "table_default")
        if mc and self.model.kind != "dlrm":
            raise ValueError(
                f"model.tables: managed_collision ({', '.join(mc)}) is for model.kind dlrm only; the "
                "Two-Tower's retrieval maps rows through vocabularies (use exact or capped)"
            )
        if (self.data.split.mode == "presplit") != (self.data.source.kind == "presplit"):
            raise ValueError(
                "data.split.mode 'presplit' goes with data.source.kind 'presplit' and only with it"
            )
        return self

    def validation_metrics(self) -> list[str]:
        """Names of the metrics each validation produces (what train.early_stopping.metric may name)."""
        if self.model.kind == "dlrm":
            return ["val/loss", "val/auc", "val/logloss", "val/calibration"]
        names = ["val/loss"]
        if self.eval.val_retrieval:
            names += [f"val/{m}@{k}" for m in ("recall", "ndcg", "hitrate") for k in self.eval.ks]
            names.append("val/auroc")
        return names

    def best_mode(self) -> str:
        """'max' or 'min' for train.early_stopping.metric (auto: min for losses, else max)."""
        mode = self.train.early_stopping.mode
        if mode != "auto":
            return mode
        return "min" if (self.train.early_stopping.metric or "").endswith("loss") else "max"


# ------------------------------------------------------------------------------------------ loading
def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (recsys/configs/*.yaml)."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("recsys.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def _read_yaml(ref: str) -> tuple[dict[str, Any], str]:
    """Read a config by path or shipped name; returns (mapping, where it came from)."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{ref}: config file not found (shipped names: {', '.join(shipped_configs())})")
        text, origin = path.read_text(), str(path)
    else:
        res = resources.files("recsys.configs").joinpath(f"{ref}.yaml")
        if not res.is_file():
            raise ConfigError(
                f"{ref}: no such config file or shipped config (shipped: {', '.join(shipped_configs())})"
            )
        text, origin = res.read_text(), f"recsys/configs/{ref}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    return data, origin


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.path=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in dotted path")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML: {e}") from e
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string; everyone means a number
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _SOURCE_KINDS))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `recsys config schema`)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg}, got {e['input']!r}"
        lines.append(f"{origin}: {loc or '<root>'}: {msg}")
    return "\n".join(lines)


_SOURCE_KINDS = {
    "synthetic_ctr",
    "synthetic_interactions",
    "movielens",
    "recbole",
    "learning_from_sets",
    "criteo",
    "table",
    "presplit",
}


def load_config(ref: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a config by shipped name or path, apply `--set` overrides, validate strictly."""
    data, origin = _read_yaml(str(ref))
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return config_from_dict(data, origin)


def config_from_dict(data: dict[str, Any], origin: str = "<config>") -> Config:
    """Validate a plain mapping into a Config; errors name `origin` and the dotted path."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (every default filled in), loadable by load_config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_differences(
    saved: dict[str, Any], now: dict[str, Any], prefix: str = "", new_fields: bool = True
) -> list[str]:
    """Dotted `field: saved → now` lines where two nested config mappings differ.

    With new_fields=False, keys absent from `saved` (fields added since it was written) are skipped.
    """
    out: list[str] = []
    keys = set(saved) | set(now) if new_fields else set(saved)
    for key in sorted(keys):
        a, b = saved.get(key), now.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, where + ".", new_fields)
        elif a != b:
            out.append(f"{where}: {a!r} → {b!r}")
    return out


def flatten(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted-key → string, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)

    walk("", cfg.model_dump(mode="json"))
    return out
