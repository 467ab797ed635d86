"""The trainer: `train(cfg)` reads top to bottom, the same under torchrun, a pod, Spark or a plain process.

seeds → process group → metadata → model (tables on meta) → plan → DMP → optimizers → loader →
epochs × steps (TrainPipelineSparseDist or a plain loop) with logging and validation as plain ifs →
test evaluation → model, embeddings and metrics to MLflow (rank 0).

Checkpoint/resume is not implemented yet. What it needs is in `_train_tracked`: the loader's
`state_dict()` (exact mid-epoch resume), the `step`/`epoch` counters, the DMP state dict and the combined
optimizer's; torch.distributed.checkpoint would save them together at a segment boundary, where the
pipeline has drained.
"""

from __future__ import annotations

import itertools
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.metadata import Metadata
    from recsys.distributed import DistEnv


@dataclass
class TrainResult:
    """What a training run produced (the same on every rank; rank 0's values are authoritative)."""

    run_id: str | None
    metrics: dict[str, float]
    baselines: dict[str, float]
    plan: str
    world_size: int
    global_batch_size: int
    steps: int
    samples_per_s: float
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ builders
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the same seed on every rank: DMP broadcasts dense weights anyway)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log_q_from_train(cfg: Config, meta: Metadata) -> torch.Tensor | None:
    """log item sampling probabilities from the train split, for the softmax's log-Q correction."""
    if cfg.model.kind != "two_tower" or cfg.model.two_tower.loss != "softmax":
        return None
    if not cfg.model.two_tower.logq_correction:
        return None
    from recsys.data.loader import read_split_arrays
    from recsys.models.two_tower import item_log_q

    col = meta.sparse_index(meta.item_feature or "")
    n = meta.sparse_features[col].num_embeddings
    items = read_split_arrays(cfg.data.prepared_dir, "train")["sparse"][:, col]
    return item_log_q(torch.from_numpy(np.bincount(items, minlength=n)))


def build_task(
    cfg: Config,
    meta: Metadata,
    ebc_device: str | torch.device = "meta",
    item_log_q: torch.Tensor | None = None,
    dense_device: str | torch.device | None = None,
) -> nn.Module:
    """The train-task module of cfg.model.kind; tables on `ebc_device` (meta: DMP materialises them)."""
    from recsys.models.dlrm import DLRMTask, build_dlrm
    from recsys.models.two_tower import TwoTower, TwoTowerTask, make_ebc

    sparse = [(f.name, f.num_embeddings) for f in meta.sparse_features]
    m = cfg.model
    if m.kind == "dlrm":
        d = m.dlrm
        if not meta.dense_features:
            raise UserError(f"{cfg.data.prepared_dir}: DLRM needs dense features and the data has none")
        return DLRMTask(
            build_dlrm(
                sparse,
                len(meta.dense_features),
                m.embedding_dim,
                d.dense_arch_layers,
                d.over_arch_layers,
                d.interaction,
                d.dcn_num_layers,
                d.dcn_low_rank_dim,
                ebc_device=ebc_device,
                dense_device=dense_device,
            )
        )
    tt = m.two_tower
    names = [n for n, _ in sparse]
    for what, feats in (("user_features", tt.user_features), ("item_features", tt.item_features)):
        bad = [f for f in feats if f not in names]
        if bad:
            raise UserError(f"model.two_tower.{what}: {bad} not in the prepared data's features {names}")
    if meta.item_feature is None or meta.user_feature is None:
        raise UserError(
            f"{cfg.data.prepared_dir}: not interaction data (no user/item feature); Two-Tower needs one"
        )
    # Every prepared feature gets a table so the KJT the loader yields matches the sharded EBC exactly.
    model = TwoTower(
        make_ebc(sparse, m.embedding_dim, ebc_device),
        tt.user_features,
        tt.item_features,
        tt.layers,
        normalize=tt.loss == "softmax",
        dense_device=dense_device,
    )
    return TwoTowerTask(model, meta.item_feature, tt.loss, tt.temperature, item_log_q, dense_device)


def plain_model(cfg: Config, meta: Metadata, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded CPU train task loaded with a gathered state dict (for retrieval eval and MLflow)."""
    task = build_task(cfg, meta, ebc_device="cpu", item_log_q=None)
    task.load_state_dict(state, strict=True)
    return task.eval()


def load_logged_state(cfg: Config, run_id: str) -> dict[str, torch.Tensor]:
    """The gathered state dict logged with an MLflow run (artifact state_dict/model.pt)."""
    import mlflow

    from recsys.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="state_dict/model.pt", tracking_uri=uri
        )
    except Exception as e:
        raise UserError(
            f"run {run_id} in {uri}: no state_dict/model.pt artifact ({type(e).__name__}: {e}); was it "
            "trained with tracking.log_model=true against this tracking URI?"
        ) from None
    return torch.load(local, map_location="cpu", weights_only=True)


def mlflow_metrics(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """`prefix/name` keys MLflow accepts: it forbids '@', so recall@10 is logged as recall_at_10."""
    return {f"{prefix}/{k.replace('@', '_at_')}": float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------- loop
class _Progress:
    """Rank-0 tqdm bar with loss and samples/s; silent elsewhere."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not enabled, dynamic_ncols=True, desc="train")

    def update(self, loss: float, samples_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _steps_per_epoch(loader: Any, env: DistEnv) -> int:
    """Batches per epoch, the same on every rank (the minimum, should a loader disagree)."""
    import torch.distributed as dist

    n = torch.tensor([len(loader)], dtype=torch.int64)
    if dist.is_initialized() and env.world_size > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n.item())


def train(cfg: Config) -> TrainResult:
    """Train cfg.model on cfg.data, validate, test, log to MLflow; returns the run's results."""
    import torch.distributed as dist

    from recsys.distributed import cleanup, init_distributed

    owns_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(cfg.train.device)
    try:
        return _train(cfg, env)
    finally:
        if owns_group:
            cleanup()


def _train(cfg: Config, env: DistEnv) -> TrainResult:
    from recsys.data.metadata import read_metadata
    from recsys.tracking import make_tracker, run_tags

    seed_everything(cfg.train.seed)
    meta = read_metadata(cfg.data.prepared_dir)

    # ---- tracking (rank 0 talks to MLflow, other ranks hold a null tracker)
    tracker = make_tracker(cfg, env.rank)
    with tracker.start(
        cfg.tracking.run_name or f"{cfg.name}-{cfg.model.kind}", run_tags(cfg, env.world_size)
    ):
        return _train_tracked(cfg, env, meta, tracker)


def _train_tracked(cfg: Config, env: DistEnv, meta: Metadata, tracker: Any) -> TrainResult:
    from recsys.config import dump_config, flatten
    from recsys.data.loader import make_train_loader
    from recsys.distributed import (
        all_reduce_sum,
        broadcast_object,
        gather_state_dict,
        make_optimizer,
        shard_model,
    )
    from recsys.evaluate import evaluate_sharded

    train_ctr = meta.splits["train"].positives / max(meta.splits["train"].rows, 1)
    tracker.set_tags(
        {"device": env.device.type, "global_batch_size": str(cfg.train.batch_size * env.world_size)}
    )
    tracker.log_params(flatten(cfg))
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")

    # ---- model → plan → DMP → optimizers
    task = build_task(cfg, meta, "meta", log_q_from_train(cfg, meta), dense_device=env.device)
    model, plan = shard_model(task, cfg, env)
    if env.is_main:
        print(f"sharding plan (world size {env.world_size}):\n{plan}", flush=True)
    tracker.log_text(plan, "sharding_plan.txt")
    for f in meta.sparse_features:
        tracker.log_artifact(str(Path(cfg.data.prepared_dir) / f.vocab_file), "vocab")
    tracker.log_artifact(str(Path(cfg.data.prepared_dir) / "metadata.json"), "data")

    loader = make_train_loader(cfg)
    steps_per_epoch = _steps_per_epoch(loader, env)
    if steps_per_epoch == 0:
        raise UserError(
            f"{cfg.data.prepared_dir}: the train split has fewer rows than one global batch "
            f"({cfg.train.batch_size} × {env.world_size} ranks); lower train.batch_size"
        )
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    optimizer, schedule = make_optimizer(model, cfg, total)

    pipeline = None
    if cfg.train.pipeline:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(model, optimizer, env.device, execute_all_batches=True)

    def one_step(it: Any) -> float:
        """One optimizer step; returns the batch's mean loss (raises StopIteration when `it` is done)."""
        if pipeline is not None:
            loss, _, _ = pipeline.progress(it)
            return float(loss)
        batch = next(it).to(env.device)
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def validate(step: int) -> dict[str, float]:
        if pipeline is not None:
            # Restores the sharded modules' own forwards; progress() re-attaches ("1.9": detach/attach
            # exist since torchrec 0.8, so 1.6 has them).
            pipeline.detach()
        m = evaluate_sharded(model, cfg, meta, "val", env, train_ctr)
        tracker.log_metrics(mlflow_metrics("val", m), step=step)
        return m

    # ---- the loop: every rank runs exactly `total` steps
    global_batch = cfg.train.batch_size * env.world_size
    bar = _Progress(total, env.is_main)
    history: list[dict[str, float]] = []
    step, win_loss, win_n, win_t = 0, 0.0, 0, time.perf_counter()
    t0 = time.perf_counter()
    val_every = cfg.train.val_every_steps
    model.train()
    for epoch in range(cfg.train.epochs):
        if step >= total:
            break
        epoch_end = min(step + steps_per_epoch, total)
        it = iter(loader)
        while step < epoch_end:
            # A segment ends where validation is due, so the pipeline drains before evaluating.
            stop = epoch_end if not val_every else min(epoch_end, (step // val_every + 1) * val_every)
            seg = itertools.islice(it, stop - step)
            while True:
                schedule.set(step)
                try:
                    loss = one_step(seg)
                except StopIteration:
                    break
                step += 1
                win_loss += loss
                win_n += 1
                elapsed = time.perf_counter() - t0
                bar.update(loss, step * global_batch / max(elapsed, 1e-9))
                if step % cfg.train.log_every_steps == 0 or step == total:
                    s, n = all_reduce_sum([win_loss, float(win_n)], env.device)
                    now = time.perf_counter()
                    rec = {
                        "train/loss": s / n,  # mean over ranks and steps of batch means (equal batches)
                        "train/lr_dense": optimizer.param_groups[-1]["lr"],
                        "train/samples_per_s": win_n * global_batch / max(now - win_t, 1e-9),
                        "train/epoch": float(epoch),
                    }
                    tracker.log_metrics(rec, step=step)
                    history.append({"step": float(step), **rec})
                    win_loss, win_n, win_t = 0.0, 0, now
            if step != stop:
                raise RuntimeError(f"the train loader ended early at step {step} (expected {stop})")
            if val_every and step % val_every == 0 and step < epoch_end:
                validate(step)
        validate(step)
    train_seconds = time.perf_counter() - t0
    bar.close()
    samples_per_s = step * global_batch / max(train_seconds, 1e-9)
    tracker.log_metrics(
        {"train/samples_per_s_total": samples_per_s, "train/seconds": train_seconds}, step=step
    )
    if pipeline is not None:
        pipeline.detach()

    # ---- test evaluation
    metrics: dict[str, float] = {}
    baselines: dict[str, float] = {}
    need_gather = cfg.model.kind == "two_tower" or (cfg.tracking.enabled and cfg.tracking.log_model)
    state = gather_state_dict(model, env) if need_gather else None
    if cfg.model.kind == "dlrm":
        m = evaluate_sharded(model, cfg, meta, "test", env, train_ctr)
        metrics = {k: v for k, v in m.items() if not k.startswith("baseline_")}
        baselines = {k.removeprefix("baseline_"): v for k, v in m.items() if k.startswith("baseline_")}
        bayes = (meta.synthetic or {}).get("bayes_auc")
        if bayes is not None:
            baselines["bayes_auc"] = float(bayes)  # type: ignore[arg-type]
    else:
        m = evaluate_sharded(model, cfg, meta, "test", env, None)
        metrics["loss"] = m["loss"]
    plain = plain_model(cfg, meta, state) if state is not None else None
    if env.is_main and plain is not None:
        if cfg.model.kind == "two_tower":
            from recsys.evaluate import evaluate_retrieval

            rm, base = evaluate_retrieval(plain, cfg, meta)
            metrics.update(rm)
            baselines.update(base)
        _log_model(cfg, meta, plain, state, tracker)
    metrics, baselines = broadcast_object((metrics, baselines))
    tracker.log_metrics(mlflow_metrics("test", metrics), step=step)
    tracker.log_metrics(mlflow_metrics("baseline", baselines), step=step)
    tracker.log_dict({"metrics": metrics, "baselines": baselines}, "results.json")
    run_id = broadcast_object(tracker.run_id)
    return TrainResult(
        run_id=run_id,
        metrics=metrics,
        baselines=baselines,
        plan=plan,
        world_size=env.world_size,
        global_batch_size=global_batch,
        steps=step,
        samples_per_s=samples_per_s,
        train_seconds=train_seconds,
        history=history,
    )


def _log_model(
    cfg: Config, meta: Metadata, plain: nn.Module, state: dict[str, torch.Tensor] | None, tracker: Any
) -> None:
    """Rank 0: the plain model, its state dict and (Two-Tower) user/item embeddings keyed by raw id."""
    if not (cfg.tracking.enabled and cfg.tracking.log_model) or state is None:
        return
    from recsys.data.metadata import read_vocab
    from recsys.evaluate import tower_embeddings, write_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        if cfg.model.kind == "two_tower":
            from recsys.data.loader import read_split_arrays

            arrays = [read_split_arrays(cfg.data.prepared_dir, s) for s in ("train", "val", "test")]
            emb = tower_embeddings(plain, meta, arrays)
            for side, feat in (("user", meta.user_feature), ("item", meta.item_feature)):
                sf = meta.sparse_features[meta.sparse_index(feat or "")]
                vocab = read_vocab(cfg.data.prepared_dir, sf)
                out = write_embeddings(emb[side], vocab, Path(tmp) / f"{side}_embeddings.parquet")
                tracker.log_artifact(str(out), "embeddings")
    tracker.log_model(plain, "model")
