"""The MLflow tracker against a real `mlflow server` on 127.0.0.1, and the local default store."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from recsys.config import Config, dump_config, flatten, load_config
from recsys.errors import UserError
from recsys.tracking import (
    JOB_TAG,
    MlflowTracker,
    NullTracker,
    find_run_by_job,
    git_sha,
    local_ui_command,
    make_tracker,
    resolve_tracking_uri,
    run_tags,
)


def _cfg(uri: str | None, experiment: str | None = None, enabled: bool = True) -> Config:
    sets = [
        f"tracking.experiment={experiment or 'exp-' + uuid.uuid4().hex[:8]}",
        f"tracking.enabled={enabled}",
    ]
    if uri is not None:
        sets.append(f"tracking.uri={uri}")
    return load_config("two_tower_synth", sets)


def _all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _all_artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_run_contents_on_a_server(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_JOB_NAME", "tt-job-1")
    monkeypatch.setenv("RECSYS_IMAGE", "ghcr.io/recsys/trainer:test")
    cfg = _cfg(mlflow_server)
    tracker = make_tracker(cfg, rank=0)
    assert isinstance(tracker, MlflowTracker)
    params = flatten(cfg)
    # More than MLflow's 100 params per call, and one value beyond its 6000-character limit.
    params |= {f"extra.p{i}": str(i) for i in range(150)}
    params["extra.long"] = "x" * 7000 + "END"
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "user_id.txt").write_text("u0\nu1\n")
    (vocab / "item_id.txt").write_text("i0\n")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))

    with tracker.start("tt-run", run_tags(cfg, world_size=2)) as t:
        t.log_params(params)
        t.log_metrics({"train/loss": 0.9, "train/samples_per_s": 1000.0}, step=1)
        t.log_metrics({"train/loss": 0.5}, step=2)
        t.log_text(dump_config(cfg), "config/resolved.yaml")
        t.log_dict({"tables": {"user_id": "table_wise"}}, "plan/plan.json")
        t.log_artifact(vocab, "vocab")
        model_uri = t.log_model(model, "model")
        t.set_tags({"stage": "done"})
        run_id = t.run_id

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tt-run"
    # Artifacts went to the server's proxied store, not to a path on this machine.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    got = run.data.params
    assert len(got) == len(params)
    assert all(got[k] == v for k, v in params.items() if k != "extra.long")
    assert got["extra.long"].startswith("[7003 characters; full value in artifact params/extra.long.txt]")
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, tracking_uri=mlflow_server, dst_path=str(tmp_path / "dl")
        )
    )
    assert (local / "params/extra.long.txt").read_text() == params["extra.long"]
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.5)]
    tags = run.data.tags
    assert tags["model"] == "two_tower" and tags["world_size"] == "2" and tags["stage"] == "done"
    assert tags["image"] == "ghcr.io/recsys/trainer:test" and tags[JOB_TAG] == "tt-job-1"
    assert tags["dataset"].startswith("synthetic_interactions:")
    if git_sha() is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_sha"])
    files = set(_all_artifacts(client, run_id))
    assert {
        "config/resolved.yaml",
        "plan/plan.json",
        "vocab/user_id.txt",
        "vocab/item_id.txt",
        "state_dict/model.pt",
    } <= files
    assert load_config(str(local / "config/resolved.yaml")) == cfg
    loaded = mlflow.pytorch.load_model(model_uri)
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x))
    state = torch.load(local / "state_dict/model.pt")
    torch.testing.assert_close(state["0.weight"], model[0].weight)
    assert find_run_by_job(mlflow_server, cfg.tracking.experiment, "tt-job-1") == run_id
    assert find_run_by_job(mlflow_server, cfg.tracking.experiment, "other-job") is None


def test_exception_marks_run_failed(mlflow_server: str) -> None:
    cfg = _cfg(mlflow_server)
    tracker = make_tracker(cfg, 0)
    with pytest.raises(RuntimeError, match="boom"), tracker.start("fails", {}):
        tracker.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("boom")
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == "FAILED"
    tracker.end("FINISHED")  # a second end is a no-op, the run stays FAILED
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == "FAILED"


def test_other_ranks_and_disabled_tracking_write_nothing(mlflow_server: str, tmp_path: Path) -> None:
    cfg = _cfg(mlflow_server)
    for tracker in (
        make_tracker(cfg, rank=1),
        make_tracker(_cfg(mlflow_server, cfg.tracking.experiment, False), 0),
    ):
        assert isinstance(tracker, NullTracker) and not tracker.enabled
        with tracker.start("nothing", {"a": "b"}) as t:
            t.log_params({"a": "1"})
            t.log_metrics({"m": 1.0}, step=3)
            t.log_text("x", "x.txt")
            t.log_dict({"a": 1}, "a.json")
            t.log_artifact(tmp_path, "dir")
            assert t.log_model(torch.nn.Linear(1, 1)) is None
            t.set_tags({"a": "c"})
        assert tracker.run_id is None
    # Not even the experiment was created.
    assert MlflowClient(mlflow_server).get_experiment_by_name(cfg.tracking.experiment) is None


def test_local_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(None)
    uri = resolve_tracking_uri(cfg)
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert local_ui_command(cfg) == f"mlflow ui --backend-store-uri {uri}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(cfg) == "http://mlflow.example:5000"
    assert local_ui_command(cfg).startswith("open http://mlflow.example:5000")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with make_tracker(cfg, 0).start("local", {}) as t:
        t.log_metrics({"auc": 0.75}, step=0)
        t.log_text("hello", "notes/hello.txt")
    assert (tmp_path / "runs/mlflow.db").is_file()
    # Artifacts sit beside the database, not in MLflow's ./mlruns default.
    assert list((tmp_path / "runs/artifacts").rglob("hello.txt"))
    assert not (tmp_path / "mlruns").exists()
    assert MlflowClient(uri).get_run(t.run_id).data.metrics == {"auc": 0.75}
    # The old ./mlruns file store is refused with a way out, before MLflow's own error.
    with pytest.raises(UserError, match="sqlite:///"):
        make_tracker(_cfg("./mlruns"), 0)
    assert make_tracker(_cfg(None, enabled=False), 0).enabled is False


def test_bad_keys_and_logging_outside_a_run(mlflow_server: str) -> None:
    tracker = MlflowTracker(mlflow_server, "exp-" + uuid.uuid4().hex[:8])
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"a": 1.0})
    with tracker.start("r", {}):
        with pytest.raises(ValueError, match="'a/../b'"):
            tracker.log_params({"ok": "1", "a/../b": "2"})
        with pytest.raises(ValueError, match="8000"):
            tracker.set_tags({"t": "y" * 8001})
    # Nothing of the refused batch was logged.
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).data.params == {}


def test_git_sha(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_GIT_SHA", "abc123")
    assert git_sha() == "abc123"
    monkeypatch.delenv("RECSYS_GIT_SHA")
    sha = git_sha()
    assert sha is None or re.fullmatch(r"[0-9a-f]{40}", sha)
