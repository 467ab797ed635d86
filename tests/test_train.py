"""The trainer end to end on planted synthetic data: 1 rank in-process and 2 ranks under torchrun (gloo).

Quality bars (from the issue): Two-Tower Recall@10 ≥ 2× popularity's; DLRM test AUC within 0.02 of
the data's Bayes-optimal AUC. The MLflow run contents are checked against a real `mlflow server`.
Sizes are small so this file stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recsys.config import Config, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]

TT_SET = [
    "data.source.num_users=1000",
    "data.source.num_items=500",
    "data.source.interactions_per_user=30",
    "train.batch_size=256",
    "train.epochs=3",
    "train.log_every_steps=20",
    "train.val_every_steps=100",
]
# 8 sparse × 50 values (all 8 interact in the hidden model), 5 days so train is 360k rows: the
# factor interactions need ~250k+ train rows before a DLRM learns them (150k rows / 3 days gave
# AUC 0.77 vs Bayes 0.83); model and optimizer settings come from dlrm_synth.yaml.
DLRM_SET = [
    "data.source.rows=600000",
    "data.source.num_sparse=8",
    "data.source.cardinality=50",
    "data.source.days=5",
    "train.epochs=4",
    "train.log_every_steps=20",
]


def _cfg(name: str, sets: list[str], root: Path, uri: str) -> Config:
    return load_config(
        name,
        [
            *sets,
            f"data.prepared_dir={root / name}",
            f"train.checkpoint.dir={root / name / 'checkpoints'}",
            f"tracking.uri={uri}",
            "tracking.experiment=test-train",
        ],
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, Config]:
    """Small Two-Tower and DLRM datasets, prepared once for this module."""
    from recsys.data.prepare import prepare

    root = tmp_path_factory.mktemp("train_data")
    cfgs = {
        "two_tower": _cfg("two_tower_synth", TT_SET, root, mlflow_server),
        "dlrm": _cfg("dlrm_synth", DLRM_SET, root, mlflow_server),
    }
    for cfg in cfgs.values():
        prepare(cfg, overwrite=False)
    return cfgs


def _artifacts(uri: str, run_id: str) -> set[str]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    out: set[str] = set()

    def walk(path: str | None) -> None:
        for f in client.list_artifacts(run_id, path):
            if f.is_dir:
                walk(f.path)
            else:
                out.add(f.path)

    walk(None)
    return out


def _check_two_tower(metrics: dict[str, float], baselines: dict[str, float]) -> None:
    assert metrics["recall@10"] >= 2 * baselines["recall@10"], (metrics, baselines)
    assert metrics["ndcg@10"] > baselines["ndcg@10"]
    assert metrics["auroc"] > 0.7


def _check_dlrm(metrics: dict[str, float], baselines: dict[str, float]) -> None:
    assert metrics["logloss"] < baselines["logloss"], (metrics, baselines)
    assert metrics["auc"] >= baselines["bayes_auc"] - 0.02, (metrics, baselines)


@pytest.mark.slow
def test_two_tower_one_rank_meets_bar_and_logs_everything(
    prepared: dict[str, Config], mlflow_server: str
) -> None:
    import mlflow
    import pandas as pd

    from recsys.train import train

    cfg = prepared["two_tower"]
    result = train(cfg)
    _check_two_tower(result.metrics, result.baselines)
    assert result.world_size == 1 and result.steps > 0 and "table_wise" in result.plan

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.two_tower.loss"] == "softmax"
    assert run.data.params["train.batch_size"] == "256"
    for tag in ("model", "dataset", "world_size", "config"):
        assert tag in run.data.tags
    assert run.data.tags["world_size"] == "1" and run.data.tags["model"] == "two_tower"
    assert abs(run.data.metrics["test/recall_at_10"] - result.metrics["recall@10"]) < 1e-9
    assert "baseline/recall_at_10" in run.data.metrics
    losses = client.get_metric_history(result.run_id, "train/loss")
    assert len(losses) >= 3 and losses[-1].value < losses[0].value
    assert client.get_metric_history(result.run_id, "val/loss")

    files = _artifacts(mlflow_server, result.run_id)
    for f in (
        "config/resolved.yaml",
        "sharding_plan.txt",
        "vocab/user_id.txt",
        "vocab/item_id.txt",
        "embeddings/user_embeddings.parquet",
        "embeddings/item_embeddings.parquet",
        "state_dict/model.pt",
        "results.json",
    ):
        assert f in files, (f, sorted(files))
    # MLflow 3 logs models as LoggedModels linked to the run (not under the run's artifacts/model/).
    mlflow.set_tracking_uri(mlflow_server)
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{result.run_id}'",
        output_format="list",
    )
    assert [m.name for m in logged] == ["model"], logged
    assert run.outputs.model_outputs, run.outputs

    resolved = mlflow.artifacts.load_text(f"runs:/{result.run_id}/config/resolved.yaml")
    assert yaml.safe_load(resolved) == yaml.safe_load(dump_config(cfg))
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="embeddings/item_embeddings.parquet", tracking_uri=mlflow_server
    )
    items = pd.read_parquet(local)
    vocab = (Path(cfg.data.prepared_dir) / "vocab/item_id.txt").read_text().splitlines()
    assert list(items["id"]) == vocab[1:]  # every real item, keyed by its raw id, OOV left out
    assert len(items["embedding"][0]) == cfg.model.two_tower.layers[-1]

    # `recsys evaluate --run-id` reloads the logged model and reproduces the retrieval metrics.
    from recsys.evaluate import evaluate_run

    again = evaluate_run(cfg, result.run_id)
    assert abs(again["test/recall@10"] - result.metrics["recall@10"]) < 1e-6


@pytest.mark.slow
def test_dlrm_one_rank_meets_bayes_bar(prepared: dict[str, Config]) -> None:
    from recsys.train import train

    cfg = prepared["dlrm"]
    cfg.tracking.log_model = False
    result = train(cfg)
    _check_dlrm(result.metrics, result.baselines)


def _torchrun(cfg: Config, tmp_path: Path) -> None:
    path = tmp_path / f"{cfg.name}.yaml"
    path.write_text(dump_config(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_port()),
        "-m", "recsys", "train", "--config", str(path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latest_run(uri: str, experiment: str, run_name: str) -> tuple[dict[str, float], dict[str, str]]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].data.metrics, runs[0].data.tags


def _unprefix(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {
        k.removeprefix(prefix).replace("_at_", "@"): v for k, v in metrics.items() if k.startswith(prefix)
    }


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_under_torchrun_meet_the_bars(
    prepared: dict[str, Config], mlflow_server: str, tmp_path: Path
) -> None:
    tt = prepared["two_tower"].model_copy(deep=True)
    tt.tracking.run_name = "tt-2rank"
    _torchrun(tt, tmp_path)
    metrics, tags = _latest_run(mlflow_server, "test-train", "tt-2rank")
    assert tags["world_size"] == "2"
    _check_two_tower(_unprefix(metrics, "test/"), _unprefix(metrics, "baseline/"))

    dl = prepared["dlrm"].model_copy(deep=True)
    dl.tracking.run_name = "dlrm-2rank"
    dl.tracking.log_model = False
    _torchrun(dl, tmp_path)
    metrics, tags = _latest_run(mlflow_server, "test-train", "dlrm-2rank")
    assert tags["world_size"] == "2"
    _check_dlrm(_unprefix(metrics, "test/"), _unprefix(metrics, "baseline/"))


def _bare_trainer(sets: list[str]):  # noqa: ANN202 (a Trainer with only what _track_best reads)
    """A Trainer with the real Config and a 1-rank DistEnv, without building model or loader."""
    import torch

    from recsys.distributed import DistEnv
    from recsys.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = load_config("dlrm_synth", sets)
    t.env = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")
    t.best, t.bad_validations, t.stopped_early, t.step, t.epoch = None, 0, False, 0, 0
    return t


@pytest.mark.parametrize("metric", ["val/auc", "val/logloss"])
def test_a_nan_validation_is_never_the_best(metric: str) -> None:
    """A NaN first validation must not become the best forever: later finite values still win."""
    t = _bare_trainer([f"train.early_stopping.metric={metric}", "train.early_stopping.patience=3"])
    key = metric.removeprefix("val/")
    t.step = 10
    assert t._track_best({key: float("nan")}) is False
    assert t.best is None and t.bad_validations == 1
    t.step = 20
    assert t._track_best({key: 0.7}) is True
    assert t.best is not None and t.best["step"] == 20 and t.best["value"] == 0.7
    t.step = 30
    assert t._track_best({key: float("nan")}) is False
    assert t.best["step"] == 20 and t.bad_validations == 1


def test_nan_validations_until_patience_stop_early_without_a_best() -> None:
    """Only NaN validations: early stopping triggers and reports that no finite value was seen."""
    t = _bare_trainer(["train.early_stopping.metric=val/auc", "train.early_stopping.patience=2"])
    for step in (10, 20):
        t.step = step
        assert t._track_best({"auc": float("nan")}) is False
    assert t.stopped_early and t.best is None
