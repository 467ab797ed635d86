"""The one launcher contract: job size read once with one meaning, and the local backend's handle
(status, logs, wait with run id / failure reason as values, delete) on a real torchrun + trainer + MLflow.

The Kubernetes handles are checked against a scripted API server in test_kube_launch.py, Spark's in
test_spark.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import TINY_TWO_TOWER

from recsys.config import Config, load_config
from recsys.errors import UserError
from recsys.launch.contract import JobSize, job_size, submit
from recsys.launch.jobspec import job_spec
from recsys.launch.kube import render_objects

TINY = [*TINY_TWO_TOWER, "train.epochs=1", "train.max_steps=3", "tracking.log_model=false"]


@pytest.mark.parametrize(
    ("sets", "size"),
    [
        ([], JobSize(1, 1, 0)),
        (["job.nodes=3", "job.procs_per_node=2"], JobSize(3, 2, 0)),
        # One process per GPU; procs_per_node 1 reads as "one per GPU".
        (["job.nodes=2", "job.gpus_per_node=4"], JobSize(2, 4, 1)),
        (["job.gpus_per_node=4", "job.procs_per_node=4"], JobSize(1, 4, 1)),
    ],
)
def test_job_size_has_one_meaning(sets: list[str], size: JobSize) -> None:
    """The size every backend reads is the size both Kubernetes renderings carry."""
    cfg = load_config("dlrm_synth", sets)
    assert job_size(cfg.job) == size
    spec = job_spec(cfg)
    assert (spec.nodes, spec.nproc_per_node, spec.gpus_per_node) == (
        size.nodes,
        size.procs_per_node,
        size.gpus_per_node,
    )
    _, pj = render_objects(cfg, "pytorchjob")
    _, tj = render_objects(cfg, "trainjob")
    assert pj["spec"]["nprocPerNode"] == str(size.procs_per_node)
    assert tj["spec"]["trainer"]["numNodes"] == size.nodes
    assert tj["spec"]["trainer"]["numProcPerNode"] == size.procs_per_node
    gpus = tj["spec"]["trainer"]["resourcesPerNode"]["limits"].get("nvidia.com/gpu")
    assert gpus == (str(size.gpus_per_node) if size.gpus_per_proc else None)
    assert size.world_size == size.nodes * size.procs_per_node


def test_inconsistent_gpu_size_is_one_line() -> None:
    with pytest.raises(UserError, match=r"job.procs_per_node \(2\) must equal job.gpus_per_node \(4\)"):
        job_size(load_config("dlrm_synth", ["job.gpus_per_node=4", "job.procs_per_node=2"]).job)


def test_local_refuses_what_it_cannot_run() -> None:
    with pytest.raises(UserError, match="job.nodes=2: the local backend trains on one node"):
        submit(load_config("two_tower_synth", ["job.nodes=2"]), "local")
    import torch

    if torch.cuda.device_count() < 8:
        with pytest.raises(UserError, match="job.gpus_per_node=8 but this machine has"):
            submit(load_config("two_tower_synth", ["job.gpus_per_node=8"]), "local")
    with pytest.raises(UserError, match="expected one of local, pytorchjob, trainjob, spark"):
        submit(load_config("two_tower_synth"), "slurm")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Tiny synthetic Two-Tower data, prepared once; tracking into a SQLite store beside it."""
    from recsys.data.prepare import prepare

    root = tmp_path_factory.mktemp("contract")
    cfg = load_config(
        "two_tower_synth",
        [
            *TINY,
            f"data.raw_dir={root / 'raw'}",
            f"data.prepared_dir={root / 'prepared'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            f"train.checkpoint.dir={root / 'ckpt'}",
        ],
    )
    prepare(cfg, overwrite=False)
    return cfg


def _with(cfg: Config, *sets: str) -> Config:
    from recsys.config import apply_override, config_from_dict

    data = cfg.model_dump(mode="json")
    for s in sets:
        apply_override(data, s)
    return config_from_dict(data, origin="test")


@pytest.mark.slow
def test_local_handle_success_gives_the_run_id(tiny: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from recsys.tracking import JOB_TAG

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    handle = submit(_with(tiny, "job.name=contract-ok"), "local")
    assert handle.status() == "Running"
    lines = list(handle.logs(follow=True))  # returns once torchrun exits
    assert any("recsys" in ln for ln in lines), lines[-20:]
    result = handle.wait(300)
    assert (result.state, result.reason) == ("Succeeded", ""), result
    assert handle.status() == "Succeeded"
    run = mlflow.MlflowClient(tiny.tracking.uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[JOB_TAG] == "contract-ok"
    assert "train/loss" in run.data.metrics


@pytest.mark.slow
def test_local_handle_failure_gives_the_reason(tiny: Config, tmp_path: Path) -> None:
    """The trainer's one-line reason comes back as the result's value, not from the log."""
    handle = submit(
        _with(tiny, f"data.prepared_dir={tmp_path / 'nothing'}", "job.name=contract-bad"), "local"
    )
    result = handle.wait(300)
    assert result.state == "Failed" and result.run_id is None
    assert str(tmp_path / "nothing") in result.reason and "\n" not in result.reason.strip(), result.reason
    assert result.summary().startswith("local job contract-bad failed: ")


def test_local_handle_delete_stops_the_job(tiny: Config) -> None:
    handle = submit(_with(tiny, "job.name=contract-del"), "local")
    # Right after fork, before exec, the child's /proc environ can read empty: wait for the exec'd one.
    deadline = time.monotonic() + 10
    while not (env := Path(f"/proc/{handle.proc.pid}/environ").read_bytes().split(b"\0"))[0]:
        assert time.monotonic() < deadline, "the launched process never showed an environment"
        time.sleep(0.05)
    # job.gpus_per_node=0 is a CPU job here as in a pod: the GPUs are hidden from it.
    assert b"CUDA_VISIBLE_DEVICES=" in env and b"RECSYS_JOB_NAME=contract-del" in env
    handle.delete()
    result = handle.wait(60)
    assert (result.state, result.reason) == ("Failed", "deleted")
    assert handle.proc.poll() is not None
