"""`train`: optimizers, sharding, checkpoints, early stopping and the training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recsys.config.base import Strict


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
    init_from: str | None = Field(
        None,
        description="Warm start: an MLflow run id of ours or a checkpoint (run or step folder) whose weights "
        "this run begins from, rows matched by raw id (docs/guides/warm-start.md); None: random init.",
    )
