"""The KFP pipeline end to end under kfp.local (SubprocessRunner in this venv, backend=local, CPU).

Tiny synthetic data, one epoch and one process per training step keep it short; the steps, the
launcher, torchrun, the trainer, evaluation and MLflow (SQLite) are all real.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TWO_TOWER = [
    "data.source.num_users=40",
    "data.source.num_items=30",
    "data.source.interactions_per_user=6",
    "data.block_size=16",
    "train.batch_size=32",
    "eval.batch_size=64",
    "model.embedding_dim=8",
    "model.two_tower.layers=[16,8]",
    "eval.ks=[5,10]",
]
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
    spec = importlib.util.spec_from_file_location(
        "recsys_pipeline", REPO / "pipelines" / "recsys_pipeline.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("recsys_pipeline", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Launchers write scratch files relative to the working directory; keep them out of the repo.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.slow
def test_pipeline_runs_locally_and_records_both_models(in_tmp: Path) -> None:
    import mlflow

    from recsys.tracking import JOB_TAG

    result = _pipeline_module().run_local(
        in_tmp / "kfp",
        {"overrides": COMMON, "two_tower_overrides": TWO_TOWER, "dlrm_overrides": DLRM, "procs_per_node": 1},
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
    # The train step's error names the job and carries the trainer's reason.
    assert "(local) failed with exit status" in logs
    failure = next(ln for ln in logs.splitlines() if "(local) failed with exit status" in ln)
    assert "DLRM needs dense features" in failure, failure
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


def test_cluster_train_step_goes_through_the_kube_launcher(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """backend=pytorchjob: the step renders and validates the PyTorchJob through `recsys launch`, then,
    with no cluster here, fails with the launcher's one-line reason (a cluster run is not claimed)."""
    from kfp import local

    monkeypatch.setenv("KUBECONFIG", str(in_tmp / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    module = _pipeline_module()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(in_tmp / "kfp"))
    with pytest.raises(RuntimeError, match="FAILURE"):
        module.train_model(
            config="dlrm_synth",
            overrides=[],
            model_overrides=[],
            prepared_dir="/data/pipelines/run-1/dlrm-synth",
            backend="pytorchjob",
            image="registry.example/recsys/trainer:1.2.3",
            nodes=2,
            gpus_per_node=4,
            procs_per_node=1,
            job_node_selector={"nvidia.com/gpu.present": "true"},
            job_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            mlflow_tracking_uri="http://mlflow.recsys.svc:5000",
            data_pvc="team-data",
            checkpoint_pvc="team-ckpt",
            mlflow_secret="team-mlflow",
            pipeline_job_name="Nightly run (v2)",
            pipeline_task_id="1234",
        )
    logs = capfd.readouterr()
    text = logs.out + logs.err
    cmd = next(ln for ln in text.splitlines() if "recsys launch --backend pytorchjob" in ln)
    for part in (
        "--wait",
        "--logs",
        "--set job.nodes=2",
        "--set job.procs_per_node=4",
        "--set job.gpus_per_node=4",
    ):
        assert part in cmd, part
    # The job the launcher renders from exactly these arguments mounts the run's PVCs and secret.
    import shlex

    from recsys.config import load_config
    from recsys.launch.kube import render_objects

    argv = shlex.split(cmd[cmd.index("recsys launch") :])
    # (the printed line is not shell-quoted: leave out the JSON-valued placement settings)
    placement = ("job.node_selector=", "job.tolerations=")
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set" and not argv[i + 1].startswith(placement)]
    _, job = render_objects(load_config("dlrm_synth", sets), "pytorchjob")
    for rep in job["spec"]["pytorchReplicaSpecs"].values():
        pod = rep["template"]["spec"]
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert claims == {"team-data", "team-ckpt"}, claims
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "team-mlflow", "optional": True}}]
    failure = next(ln for ln in text.splitlines() if "(pytorchjob) failed with exit status" in ln)
    # A DNS-1123 job name from the display name, unique per run and task, within the launcher's 40 chars.
    assert "training job dlrm-nightly-run-v2-" in failure
    assert "no Kubernetes cluster configured" in failure, failure
