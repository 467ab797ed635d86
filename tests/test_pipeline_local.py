"""The KFP pipeline end to end under kfp.local (SubprocessRunner in this venv, backend=local, CPU),
and its train step against a scripted Kubernetes API server (backend=pytorchjob).

Tiny synthetic data, one epoch and one process per training step keep it short; the steps, the
launcher contract, torchrun, the trainer, the index, batch recommendations, evaluation and MLflow
(SQLite) are all real.
"""

import math
from pathlib import Path

import pytest
from conftest import TINY_TWO_TOWER, load_pipeline

from recsys.config import load_config
from tests.test_kube_launch import CM, PODS, V1, FakeApi, _created, api, tracked  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]

TWO_TOWER = TINY_TWO_TOWER
DLRM = [
    "data.source.rows=1500",
    "data.source.cardinality=20",
    "data.source.num_sparse=3",
    "data.source.num_dense=2",
    "data.block_size=32",
    "train.batch_size=64",
    "eval.batch_size=128",
    "model.embedding_dim=8",
    "model.dlrm.dense_arch_layers=[16,8]",
    "model.dlrm.over_arch_layers=[16,1]",
]
COMMON = ["train.epochs=1", "train.max_steps=4", "train.log_every_steps=1"]


def _pipeline_module():
    return load_pipeline("recsys_pipeline")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Launchers write scratch files relative to the working directory; keep them out of the repo.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.slow
@pytest.mark.timeout(1800)  # nine step subprocesses, each importing torch: minutes on a loaded 2-core box
def test_pipeline_runs_locally_and_records_both_models(in_tmp: Path) -> None:
    import mlflow
    import pyarrow.parquet as pq

    from recsys.retrieval.runs import INDEX_DIR, has_artifact
    from recsys.tracking import JOB_TAG

    result = _pipeline_module().run_local(
        in_tmp / "kfp",
        {
            "overrides": COMMON,
            "two_tower_overrides": TWO_TOWER,
            "dlrm_overrides": DLRM,
            "procs_per_node": 1,
            "recommend_k": 10,
        },
    )
    client = mlflow.MlflowClient(result["mlflow_tracking_uri"])
    headline = {"two_tower": "test/recall_at_10", "dlrm": "test/auc"}
    job_names = set()
    for model, key in headline.items():
        summary = result["summary"][model]
        artifact = result["metrics"][model]
        # The KFP Metrics artifact holds the evaluation, finite and in range.
        assert key in artifact.metadata, sorted(artifact.metadata)
        assert 0.0 <= artifact.metadata[key] <= 1.0
        assert all(math.isfinite(v) for v in artifact.metadata.values())
        assert summary["metrics"] == artifact.metadata
        # The MLflow run of that job: finished, tagged with the job name, with training and eval metrics.
        run = client.get_run(summary["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags[JOB_TAG] == summary["job_name"]
        assert "train/loss" in run.data.metrics
        for name, value in artifact.metadata.items():
            assert run.data.metrics[f"eval/{name}"] == pytest.approx(value)
        job_names.add(summary["job_name"])
    assert len(job_names) == 2
    assert all(len(n) <= 40 for n in job_names)

    # Two-Tower: index logged with the run → top-10 for every user on the data volume → scored.
    tt = result["summary"]["two_tower"]
    assert has_artifact(tt["run_id"], result["mlflow_tracking_uri"], INDEX_DIR)
    recs = Path(tt["recommendations"])
    assert recs.is_relative_to(in_tmp / "kfp" / "data") and recs.suffix == ".parquet"
    table = pq.read_table(recs).to_pandas()
    assert list(table.columns) == ["user", "rank", "item", "score", "fallback"]
    assert table["user"].nunique() == 40 and table.groupby("user").size().max() == 10
    assert not table.duplicated(["user", "item"]).any()
    metrics = result["metrics"]["two_tower"].metadata
    assert metrics["recs_users"] > 0
    assert 0.0 <= metrics["recs_recall_at_10"] <= 1.0 and 0.0 <= metrics["recs_ndcg_at_10"] <= 1.0
    assert "dlrm" not in result["summary"] or "recommendations" not in result["summary"]["dlrm"]


@pytest.mark.slow
def test_failing_training_fails_the_pipeline_with_the_reason(
    in_tmp: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """DLRM on data without dense features: the trainer refuses, the job fails, so does the pipeline."""
    dlrm = [o for o in DLRM if not o.startswith("data.source.num_dense")] + ["data.source.num_dense=0"]
    with pytest.raises(RuntimeError, match="FAILURE") as failed:
        _pipeline_module().run_local(
            in_tmp / "kfp",
            {"overrides": COMMON, "two_tower_overrides": TWO_TOWER, "dlrm_overrides": dlrm},
        )
    out = capfd.readouterr()
    logs = out.out + out.err
    # The train step's error names the job and carries the trainer's reason, a value from the ranks'
    # result files (recsys.launch.worker), not a line picked out of the log.
    failure = next(ln for ln in logs.splitlines() if "RuntimeError: training job" in ln)
    assert "(local) failed: " in failure and "DLRM needs dense features" in failure, failure
    assert "Inner task failed: 'train-model-2'" in _strip_ansi(str(failed.value))
    # The DLRM training (task train-model-2) failed and nothing downstream of it ran.
    done = _task_successes(logs)
    assert "train-model-2" not in done and "evaluate-model-2" not in done and "summarize" not in done


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _task_successes(logs: str) -> set[str]:
    import re

    return set(re.findall(r"Task '([\w-]+)' finished with status SUCCESS", _strip_ansi(logs)))


TEAM = dict(
    image="registry.example/recsys/trainer:1.2.3",
    nodes=2,
    gpus_per_node=4,
    procs_per_node=1,
    job_node_selector={"nvidia.com/gpu.present": "true"},
    job_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    data_pvc="team-data",
    checkpoint_pvc="team-ckpt",
    mlflow_secret="team-mlflow",
    object_store_secret="team-objects",
)


def test_cluster_train_step_submits_a_job_with_the_runs_volumes_and_secrets(
    in_tmp: Path,
    api: FakeApi,  # noqa: F811 (the fixture imported above)
    tracked: tuple[str, str],  # noqa: F811
    capfd: pytest.CaptureFixture[str],
) -> None:
    """backend=pytorchjob: the KFP step (kfp.local subprocess) submits through the launcher contract to
    a scripted API server; the PyTorchJob it POSTs mounts the run's PVCs and reads both secrets in every
    pod, and the step returns the job's MLflow run id as a value."""
    import mlflow
    from kfp import local

    from recsys.launch.steps import unique_job_name
    from recsys.tracking import JOB_TAG

    uri, _ = tracked
    name = unique_job_name("dlrm", "Nightly run (v2)", "1234")
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(load_config("dlrm_synth").tracking.experiment)
    run_id = client.create_run(exp.experiment_id, tags={JOB_TAG: name}).info.run_id
    done = {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}
    api.answers[("POST", CM)] = (201, _created)
    api.answers[("PATCH", CM)] = (200, _created)
    api.answers[("POST", V1)] = (201, _created)
    api.answers[("GET", V1)] = (200, {"kind": "PyTorchJob", "status": {"conditions": [done]}})
    api.answers[("GET", f"{PODS}/")] = (200, "step 1 loss 0.5\ntraining done\n")
    api.answers[("GET", PODS)] = (200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
        "items": [{"metadata": {"name": f"{name}-master-0"}, "status": {"phase": "Succeeded"}}]})  # fmt: skip
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(in_tmp / "kfp"))
    task = _pipeline_module().train_model(
        config="dlrm_synth",
        overrides=[],
        model_overrides=[],
        prepared_dir="/data/pipelines/run-1/dlrm-synth",
        backend="pytorchjob",
        mlflow_tracking_uri=uri,
        pipeline_job_name="Nightly run (v2)",
        pipeline_task_id="1234",
        **TEAM,
    )
    assert (task.outputs["job_name"], task.outputs["run_id"]) == (name, run_id)
    assert "training done" in capfd.readouterr().out
    (job,) = [b for m, p, b in api.requests if m == "POST" and p.startswith(V1)]
    assert job["metadata"]["name"] == name and len(name) <= 40
    assert job["spec"]["nprocPerNode"] == "4"
    for rep in job["spec"]["pytorchReplicaSpecs"].values():
        pod = rep["template"]["spec"]
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert claims == {"team-data", "team-ckpt"}, claims
        assert pod["containers"][0]["envFrom"] == [
            {"secretRef": {"name": "team-mlflow", "optional": True}},
            {"secretRef": {"name": "team-objects", "optional": True}},
        ]
        assert pod["nodeSelector"] == TEAM["job_node_selector"]


def test_trainjob_of_a_step_carries_the_runs_volumes_and_secret_keys() -> None:
    """The TrainJob has no envFrom: each secret's keys are optional env entries, with the PVCs patched in."""
    from recsys.launch.kube import render_objects
    from recsys.launch.steps import OBJECT_STORE_SECRET_KEYS, ClusterParams, train_config

    params = ClusterParams(
        **{k: v for k, v in TEAM.items() if not k.startswith("job_")},
        node_selector={},
        tolerations=[],
        mlflow_tracking_uri="",
        object_store_keys=tuple(OBJECT_STORE_SECRET_KEYS),
    )
    cfg = train_config("two_tower_synth", ["train.epochs=1"], "/data/p/x", params, "run", "task")
    _, job = render_objects(cfg, "trainjob")
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in job["spec"]["trainer"]["env"]
        if "valueFrom" in e
    }
    assert {k for k, v in env.items() if v == "team-objects"} == set(OBJECT_STORE_SECRET_KEYS)
    assert "MLFLOW_TRACKING_PASSWORD" in env and env["MLFLOW_TRACKING_PASSWORD"] == "team-mlflow"
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    volumes = patch["template"]["spec"]["template"]["spec"]["volumes"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v} == {
        "team-data",
        "team-ckpt",
    }
    assert cfg.data.prepared_dir == "/data/p/x" and cfg.train.epochs == 1


def test_cluster_step_without_a_cluster_fails_with_the_reason(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """No cluster configured: the step fails with the launcher's one-line reason."""
    from kfp import local

    monkeypatch.setenv("KUBECONFIG", str(in_tmp / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(in_tmp / "kfp"))
    with pytest.raises(RuntimeError, match="FAILURE"):
        _pipeline_module().train_model(
            config="dlrm_synth",
            overrides=[],
            model_overrides=[],
            prepared_dir="/data/pipelines/run-1/dlrm-synth",
            backend="pytorchjob",
            mlflow_tracking_uri="http://mlflow.recsys.svc:5000",
            pipeline_job_name="Nightly run (v2)",
            pipeline_task_id="1234",
            **TEAM,
        )
    logs = capfd.readouterr()
    assert "no Kubernetes cluster configured" in logs.out + logs.err
