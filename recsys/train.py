"""`recsys train`: the same entry under torchrun, a PyTorchJob/TrainJob pod, Spark or a plain process.

seeds → process group → metadata (read once) → resume decision (rank 0, broadcast) → MLflow run (new,
or the checkpoint's run continued) → Trainer → fit with checkpoints → best state restored → test →
model, embeddings and metrics to MLflow (rank 0) → the run folder marked finished.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import PREEMPTED_EXIT, Preempted, UserError
from recsys.trainer import Trainer, TrainResult, seed_everything

if TYPE_CHECKING:
    from torch import nn

    from recsys.checkpoint import CheckpointInfo
    from recsys.config import Config
    from recsys.data.metadata import Metadata
    from recsys.distributed import DistEnv
    from recsys.tracking import Tracker
    from recsys.warm_start import Parent

__all__ = ["TrainResult", "check_data_settings", "train"]


def train(
    cfg: Config,
    resume: str = "auto",
    allow_data_mismatch: bool = False,
    extra_tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train cfg.model on cfg.data (resuming per `resume`: auto, never or a path), validate, test, log.

    `extra_tags` are added to the MLflow run's tags (e.g. `mlflow.parentRunId` for a tuning trial)."""
    import torch.distributed as dist

    from recsys.console import quiet_libraries
    from recsys.distributed import cleanup, init_distributed

    quiet_libraries()  # also when called in-process (Spark workers, notebooks, pipeline steps)
    owns_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    try:
        return _train(cfg, env, resume, allow_data_mismatch, extra_tags or {})
    finally:
        if owns_group:
            cleanup()


def check_data_settings(cfg: Config, meta: Metadata, allow: bool) -> None:
    """Stop when the prepared folder was made from other data settings than cfg.data names."""
    from recsys.config import config_differences
    from recsys.data.metadata import data_settings

    if meta.settings is None:
        return
    diffs = config_differences(meta.settings, data_settings(cfg), "data.")
    if diffs and not allow:
        raise UserError(
            f"{cfg.data.prepared_dir}/metadata.json was prepared with other data settings ({'; '.join(diffs)}); "
            "re-prepare it (recsys data prepare --overwrite) or pass --allow-data-mismatch"
        )


def _decide_resume(
    cfg: Config, env: DistEnv, meta: Metadata, resume: str
) -> tuple[Path, CheckpointInfo | None]:
    """Rank 0 picks the run folder and checkpoint (and checks it fits); every rank gets the answer."""
    from recsys.checkpoint import default_root, fingerprint, resolve_resume
    from recsys.config import config_differences
    from recsys.distributed import broadcast_object

    answer: Any = None
    if env.is_main:
        try:
            run_dir, info = resolve_resume(default_root(cfg), resume)
            if info is not None:
                now = fingerprint(cfg, {f.name: f.num_embeddings for f in meta.sparse_features})
                # Fields added to the config since the checkpoint was written keep their defaults.
                diffs = config_differences(info.meta.get("fingerprint", {}), now, new_fields=False)
                if diffs:
                    raise UserError(
                        f"checkpoint {info.path} does not fit this config: {'; '.join(diffs)}; resume it "
                        "with the config it was saved with, or start fresh with --resume never"
                    )
            answer = (run_dir, info)
        except UserError as e:
            answer = e
    answer = broadcast_object(answer)
    if isinstance(answer, UserError):
        raise answer
    return answer


def _decide_parent(cfg: Config, env: DistEnv, meta: Metadata) -> Parent:
    """Rank 0 finds train.init_from's checkpoint and row maps; every rank gets them (or the UserError)."""
    from recsys.distributed import broadcast_object
    from recsys.warm_start import find_parent

    answer: Any = None
    if env.is_main:
        try:
            answer = find_parent(cfg, meta, str(cfg.train.init_from))
        except UserError as e:
            answer = e
    answer = broadcast_object(answer)
    if isinstance(answer, UserError):
        raise answer
    return answer


def _train(
    cfg: Config, env: DistEnv, resume: str, allow_data_mismatch: bool, extra_tags: dict[str, str]
) -> TrainResult:
    from recsys.checkpoint import Checkpointer
    from recsys.data.metadata import read_metadata
    from recsys.distributed import broadcast_object
    from recsys.tracking import make_tracker, run_tags
    from recsys.warm_start import CHECKPOINT_DIR_TAG, provenance, provenance_tags, warm_start

    seed_everything(cfg.train.seed)
    meta = read_metadata(cfg.data.prepared_dir)
    check_data_settings(cfg, meta, allow_data_mismatch)
    run_dir, info = _decide_resume(cfg, env, meta, resume)
    # A checkpoint of this job wins over init_from: a restarted warm-started job continues its own run.
    parent = _decide_parent(cfg, env, meta) if info is None and cfg.train.init_from else None
    prov = (info.meta.get("provenance") if info is not None else None) or provenance(cfg, meta, parent)
    tracker = make_tracker(cfg, env.rank)
    name = cfg.tracking.run_name or f"{cfg.name}-{cfg.model.kind}"
    resume_run = info.meta.get("run_id") if info is not None else None
    tags = {**run_tags(cfg, env.world_size), **provenance_tags(prov), **extra_tags}
    with tracker.start(name, tags, resume_run_id=resume_run):
        trainer = Trainer(cfg, meta, env, tracker)
        trainer.provenance = prov
        ckpt = Checkpointer(cfg, env, run_dir, cfg.best_mode())
        if info is not None:
            trainer.restore(ckpt, info)
            if env.is_main:
                print(
                    f"recsys: resumed from {info.path} (step {info.step}, epoch {trainer.epoch})", flush=True
                )
        elif parent is not None:
            said = "\n".join(warm_start(trainer, parent))
            if env.is_main:
                print(said, flush=True)
            tracker.log_text(said + "\n", "warm_start.txt")
        trainer.run_id = broadcast_object(tracker.run_id)
        ckpt.start_run(trainer.run_id, info.step if info is not None else None)
        tracker.set_tags({CHECKPOINT_DIR_TAG: str(ckpt.run_dir.resolve())})
        tracker.log_dict(prov, "lineage.json")
        # A checkpoint whose MLflow run is gone continues in a new run: that run needs the params,
        # config and vocabularies (index/recommend/serve read them), so log them as for a fresh one.
        _log_setup(trainer, tracker, resumed=info is not None and tracker.resumed)
        seconds = trainer.fit(ckpt)
        if trainer.preempted:
            raise Preempted(
                f"preempted (SIGTERM) at step {trainer.step}: checkpoint saved in {ckpt.run_dir}; exiting "
                f"{PREEMPTED_EXIT} (a restart with --resume auto continues from it)"
            )
        result = _finish(trainer, ckpt, tracker, seconds)
        result.resumed_from = info.step if info is not None else None
        ckpt.mark_finished()
        return result


def _log_setup(trainer: Trainer, tracker: Tracker, resumed: bool) -> None:
    """Rank 0: params, resolved config, plan, vocabularies and metadata (params only on a new run)."""
    from recsys.config import dump_config, flatten

    cfg, env = trainer.cfg, trainer.env
    tracker.set_tags({"device": env.device.type, "global_batch_size": str(trainer.global_batch)})
    if env.is_main:
        print(f"sharding plan (world size {env.world_size}):\n{trainer.plan}", flush=True)
    if resumed:
        # Params are immutable in MLflow; a resumed run keeps the first attempt's and records this one's.
        tracker.log_text(dump_config(cfg), f"config/resolved-resume-step-{trainer.step}.yaml")
        tracker.log_text(trainer.plan, f"sharding_plan-resume-step-{trainer.step}.txt")
        return
    replaced = getattr(tracker, "replaced_run_id", None)
    if replaced:
        tracker.set_tags({"recsys.resumed_from_step": str(trainer.step)})
    tracker.log_params(flatten(cfg))
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")
    tracker.log_text(trainer.plan, "sharding_plan.txt")
    for f in trainer.meta.sparse_features:
        tracker.log_artifact(str(Path(cfg.data.prepared_dir) / f.vocab_file), "vocab")
    tracker.log_artifact(str(Path(cfg.data.prepared_dir) / "metadata.json"), "data")


def _finish(trainer: Trainer, ckpt: Any, tracker: Tracker, seconds: float) -> TrainResult:
    """Restore the best state, test, log and export; the TrainResult of the run."""
    from recsys.tracking import mlflow_metrics

    cfg, env = trainer.cfg, trainer.env
    steps = trainer.step
    samples_per_s = trainer.steps_this_run * trainer.global_batch / max(seconds, 1e-9)
    tracker.log_metrics({"train/samples_per_s_total": samples_per_s, "train/seconds": seconds}, step=steps)
    best_step = trainer.restore_best(ckpt)
    if trainer.best is not None:
        tracker.set_tags({"best_step": str(trainer.best["step"]), "best_metric": trainer.best["metric"]})
        tracker.log_metrics(
            {"best/value": trainer.best["value"], "best/step": trainer.best["step"]}, step=steps
        )
    metrics, baselines, plain = trainer.test()
    if env.is_main and plain is not None:
        _log_model(cfg, trainer, plain, tracker)
    tracker.log_metrics(mlflow_metrics("test", metrics), step=steps)
    tracker.log_metrics(mlflow_metrics("baseline", baselines), step=steps)
    tracker.log_dict(
        {"metrics": metrics, "baselines": baselines, "best": trainer.best, "tested_step": best_step or steps},
        "results.json",
    )
    tested_val = trainer.tested_validation(best_step)
    if env.is_main:
        print(format_results(tested_val, metrics, baselines))
    # 100 % only now: test evaluation and export are part of the job (a TrainJob at 100 % is done).
    trainer.job_status.update(steps, trainer.total, mlflow_metrics("test", metrics))
    trainer.job_status.finish(steps, trainer.total)
    return TrainResult(
        run_id=trainer.run_id,
        metrics=metrics,
        baselines=baselines,
        plan=trainer.plan,
        world_size=env.world_size,
        global_batch_size=trainer.global_batch,
        steps=steps,
        samples_per_s=samples_per_s,
        train_seconds=seconds,
        history=trainer.history,
        best=trainer.best,
        stopped_early=trainer.stopped_early,
        validations=trainer.validations,
        tested_validation=tested_val,
    )


def format_results(val: dict[str, float], test: dict[str, float], baselines: dict[str, float]) -> str:
    """The final table printed by `recsys train`: validation and test of the tested state, baseline.

    The val column is the validation of the state that was tested (the restored best, else the last
    state): `recsys tune` optimises that value, and Katib's collector reads it from this table.
    """
    names = [k for k in test if k not in ("rows", "count")]
    lines = [f"{'metric':<16} {'val (tested)':>12} {'test':>12} {'baseline':>12}"]
    for k in names:
        cells = [val.get(k), test.get(k), baselines.get(k)]
        lines.append(f"{k:<16} " + " ".join(f"{c:>12.5f}" if c is not None else f"{'':>12}" for c in cells))
    if "bayes_auc" in baselines:
        lines.append(f"{'bayes_auc':<16} {'':>12} {'':>12} {baselines['bayes_auc']:>12.5f}")
    return "\n".join(lines)


def _log_table_embeddings(cfg: Config, meta: Metadata, plain: nn.Module, tracker: Tracker, tmp: Path) -> None:
    """Rank 0: embeddings/<feature>.parquet of every capped or managed-collision table, keyed by raw id."""
    import pyarrow.parquet as pq

    from recsys.models.tables import table_embeddings

    for f in meta.sparse_features:
        if f.table != "exact":
            out = tmp / f"{f.name}.parquet"
            pq.write_table(table_embeddings(plain, meta, cfg.data.prepared_dir, f.name), out)
            tracker.log_artifact(str(out), "embeddings")


def _log_model(cfg: Config, trainer: Trainer, plain: nn.Module, tracker: Tracker) -> None:
    """Rank 0: the plain model, its state dict and (Two-Tower) user/item embeddings keyed by raw id."""
    if not (cfg.tracking.enabled and cfg.tracking.log_model):
        return
    from recsys.data.metadata import read_vocab
    from recsys.evaluate import retrieval_embeddings, write_embeddings

    meta = trainer.meta
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.model.kind != "dlrm":
            emb = retrieval_embeddings(plain, cfg, meta, trainer.split_arrays())
            for side, feat in (("user", meta.user_feature), ("item", meta.item_feature)):
                sf = meta.sparse_features[meta.sparse_index(feat or "")]
                vocab = read_vocab(cfg.data.prepared_dir, sf)
                out = write_embeddings(emb[side], vocab, Path(tmp) / f"{side}_embeddings.parquet")
                tracker.log_artifact(str(out), "embeddings")
        _log_table_embeddings(cfg, meta, plain, tracker, Path(tmp))
    tracker.log_model(plain, "model")
