"""The rendered ConfigMap + PyTorchJob / TrainJob carry what the issue asks, from the config alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from recsys.config import load_config
from recsys.errors import UserError
from recsys.launch.elastic import TORCHRUN
from recsys.launch.jobspec import CONFIG_PATH, RESERVED_ENV, cluster_config, job_spec
from recsys.launch.kube import render_objects, render_text

REPO = Path(__file__).resolve().parents[1]
GPU = ["job.nodes=3", "job.gpus_per_node=4", "job.procs_per_node=4"]
PLACEMENT = [
    "job.node_selector={pool: gpu}",
    "job.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
]


def _docs(config: str, backend: str, sets: list[str]) -> tuple[dict, dict]:
    cm, job = render_objects(load_config(config, sets), backend)  # type: ignore[arg-type]
    return cm, job


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_pytorchjob_gpu_shape_and_pod_settings() -> None:
    cm, job = _docs("dlrm_synth", "pytorchjob", GPU + PLACEMENT)
    spec = job["spec"]
    assert spec["nprocPerNode"] == "4"
    # job.backoff_limit 2 failures × 3 pods restarted by each + 1 (the operator sums pod restarts)
    assert spec["runPolicy"] == {"backoffLimit": 7, "ttlSecondsAfterFinished": 86400}
    reps = spec["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 2
    for rep in reps.values():
        assert rep["restartPolicy"] == "OnFailure"
        tmpl = rep["template"]
        assert tmpl["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        pod = tmpl["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["nodeSelector"] == {"pool": "gpu"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"
        # torchrun as recsys.launch.elastic: a preempted pod exits 143 (retryable), not torchrun's 1.
        assert c["command"] == [*TORCHRUN, "-m", "recsys", "train", "--config", CONFIG_PATH]
        assert TORCHRUN == ["python", "-m", "recsys.launch.elastic"]
        assert "args" not in c  # no topology flags: torchrun reads the operator's PET_* env
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert c["resources"]["requests"]["cpu"] == "4" and c["resources"]["requests"]["memory"] == "16Gi"
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        }
        tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
        (vol,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
        assert vol["emptyDir"] == {"sizeLimit": "10Gi"}  # the only writable place besides mounts
        assert c["envFrom"] == [{"secretRef": {"name": "mlflow-credentials", "optional": True}}]
        env = _env(c)
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.recsys.svc:5000"
        assert env["RECSYS_JOB_NAME"] == "dlrm" and env["RECSYS_IMAGE"] == c["image"]
        assert env["NCCL_DEBUG"] == "WARN"
        assert not RESERVED_ENV & set(env)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "recsys-data"
        assert vols[mounts["/checkpoints"]]["persistentVolumeClaim"]["claimName"] == "recsys-checkpoints"
        assert vols[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
        assert vols[mounts["/etc/recsys"]]["configMap"]["name"] == cm["metadata"]["name"]
        assert c["ports"][0]["name"] == "pytorchjob-port"


def test_cpu_job_single_node_has_no_worker_and_no_gpu() -> None:
    _, job = _docs("two_tower_synth", "pytorchjob", ["job.procs_per_node=2"])
    assert job["spec"]["nprocPerNode"] == "2"
    assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(job)


def test_configmap_holds_resolved_config_with_cluster_paths() -> None:
    cfg = load_config("dlrm_synth", GPU)
    cm, _ = render_objects(cfg, "pytorchjob")
    inner = yaml.safe_load(cm["data"]["config.yaml"])
    assert inner == cluster_config(cfg).model_dump(mode="json")
    assert inner["data"]["prepared_dir"] == "/data/dlrm-synth"
    assert inner["tracking"]["uri"] == "http://mlflow.recsys.svc:5000"
    # Training settings are the user's, untouched.
    local_train = cfg.model_dump(mode="json")["train"]
    for d in (inner["train"], local_train):
        d["checkpoint"].pop("dir")  # the one train path that moves onto the checkpoint PVC
    assert inner["train"] == local_train
    assert inner["model"] == cfg.model_dump(mode="json")["model"]


@pytest.mark.parametrize(
    ("prepared_dir", "expected"),
    [
        ("data/dlrm-synth", "/data/dlrm-synth"),  # local relative → onto the data PVC
        ("/data/pipelines/run-1/dlrm-synth", "/data/pipelines/run-1/dlrm-synth"),  # absolute: kept
        ("prepared/x", "/data/dlrm-synth"),  # another relative folder → the config's own PVC folder
    ],
)
def test_cluster_config_maps_relative_and_keeps_absolute_prepared_dir(
    prepared_dir: str, expected: str
) -> None:
    cfg = load_config("dlrm_synth", [f"data.prepared_dir={prepared_dir}"])
    assert cluster_config(cfg).data.prepared_dir == expected


def test_trainjob_twin_same_content() -> None:
    cm_v1, v1 = _docs("dlrm_synth", "pytorchjob", GPU + PLACEMENT)
    cm_v2, v2 = _docs("dlrm_synth", "trainjob", GPU + PLACEMENT)
    assert cm_v1 == cm_v2
    t = v2["spec"]["trainer"]
    master = v1["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (c1,) = master["containers"]
    assert v2["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert t["numNodes"] == 3 and t["numProcPerNode"] == 4
    assert t["command"] == c1["command"] and t["image"] == c1["image"]
    assert t["resourcesPerNode"] == c1["resources"]
    plain = {e["name"]: e["value"] for e in t["env"] if "value" in e}
    assert plain == _env(c1)
    secret_refs = [e["valueFrom"]["secretKeyRef"] for e in t["env"] if "valueFrom" in e]
    assert secret_refs and all(r["name"] == "mlflow-credentials" and r["optional"] for r in secret_refs)
    (patch,) = v2["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rj["template"]["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert pod["spec"]["volumes"] == master["volumes"]
    assert pod["spec"]["nodeSelector"] == master["nodeSelector"]
    assert pod["spec"]["tolerations"] == master["tolerations"]
    assert pod["spec"]["securityContext"] == master["securityContext"]
    (cp,) = pod["spec"]["containers"]
    assert cp["name"] == "node" and cp["volumeMounts"] == c1["volumeMounts"]


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        (["job.name=Bad_Name"], "job.name"),
        (["job.env={MASTER_ADDR: x}"], "job.env"),
        (["job.env={RECSYS_JOB_NAME: x}"], "job.env"),
        (["job.gpus_per_node=8", "job.procs_per_node=3"], "job.procs_per_node"),
    ],
)
def test_bad_job_section_is_a_clear_error(sets: list[str], field: str) -> None:
    with pytest.raises(UserError, match=re.escape(field)):
        job_spec(load_config("dlrm_synth", sets))


def test_header_names_command_and_four_commands() -> None:
    cfg = load_config("two_tower_synth", [])
    text = render_text(cfg, "trainjob", "recsys render --backend trainjob --config two_tower_synth", "x.yaml")
    first = text.splitlines()[0]
    assert first.startswith("# generated by recsys render --backend trainjob") and "do not edit" in first
    header = text.split("\n---\n", 1)[0]
    for key in ("Apply:", "Check:", "Logs:", "Clean:"):
        assert f"# {key}" in header
    assert "kubectl apply -f x.yaml" in header


def _header_commands(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*(Apply|Check|Logs|Clean):\s+(.*?)(\s{3}\(.*\))?$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


ALL_YAML = sorted(p for p in (REPO / "manifests").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_manifest_opens_with_what_it_is_and_four_commands(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 20, f"{path}: first line must say what it is"
    assert set(_header_commands(path)) == {"Apply", "Check", "Logs", "Clean"}, path


def test_data_prep_job_prepares_what_the_jobs_read() -> None:
    """The data-prep Jobs (flagship: base/, synthetic: synth/) write exactly the prepared_dir each
    generated job's ConfigMap reads."""
    from recsys.launch.manifests import TARGETS

    containers = []
    for path in ("manifests/base/data-prep-job.yaml", "manifests/synth/data-prep-job.yaml"):
        pod = yaml.safe_load((REPO / path).read_text())["spec"]["template"]["spec"]
        containers += pod["initContainers"] + pod["containers"]
    prepared = {}
    for c in containers:
        argv = c["command"]
        assert argv[:3] == ["recsys", "data", "prepare"]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = load_config(argv[argv.index("--config") + 1], sets)
        prepared[cfg.data.prepared_dir] = cfg.model_dump(mode="json")["data"]
    for t in TARGETS:
        cm = next(d for d in yaml.safe_load_all((REPO / t.path).read_text()) if d["kind"] == "ConfigMap")
        data = yaml.safe_load(cm["data"]["config.yaml"])["data"]
        assert prepared.get(data["prepared_dir"]) == data, (
            f"{t.path}: no data-prep step writes {data['prepared_dir']}"
        )


def _kubernetes_guide() -> str:
    """The Kubernetes guide of the documentation (it was the README's Kubernetes section)."""
    return (REPO / "docs" / "guides" / "kubernetes.md").read_text()


def test_kubernetes_guide_commands_match_the_headers() -> None:
    section = _kubernetes_guide()
    for name in ("dlrm-job.yaml", "two-tower-trainjob.yaml", "base/kustomization.yaml"):
        cmds = _header_commands(REPO / "manifests" / name)
        for key in ("Apply", "Check", "Logs"):
            assert cmds[key] in section, (
                f"docs/guides/kubernetes.md lacks the {key} command of manifests/{name}: {cmds[key]}"
            )
    assert _header_commands(REPO / "manifests/overlays/cpu/kustomization.yaml")["Apply"] in section


@pytest.mark.parametrize("path", ["manifests/dlrm-job.yaml", "manifests/two-tower-trainjob.yaml"])
def test_committed_jobs_checkpoint_to_their_pvc(path: str) -> None:
    """The trainer's checkpoint root (in the ConfigMap) lies on the volume that claims job.checkpoint_pvc."""
    docs = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = yaml.safe_load(next(iter(cm["data"].values())))
    root = cfg["train"]["checkpoint"]["dir"]
    assert root == f"/checkpoints/{cfg['job']['name']}"
    job = next(d for d in docs if d["kind"] != "ConfigMap")
    text = yaml.safe_dump(job)
    # Every pod (Master/Worker, or the TrainJob's trainer node) mounts the PVC at /checkpoints.
    assert f"claimName: {cfg['job']['checkpoint_pvc']}" in text
    assert "mountPath: /checkpoints" in text
    if job["kind"] == "PyTorchJob":
        for rep in job["spec"]["pytorchReplicaSpecs"].values():
            pod = rep["template"]["spec"]
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
            (c,) = pod["containers"]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims[mounts["/checkpoints"]] == cfg["job"]["checkpoint_pvc"]


def test_relative_checkpoint_dir_maps_to_the_pvc_and_absolute_is_kept() -> None:
    assert cluster_config(load_config("dlrm_synth")).train.checkpoint.dir == "/checkpoints/dlrm"
    cfg = load_config("dlrm_synth", ["train.checkpoint.dir=/checkpoints/mine"])
    assert cluster_config(cfg).train.checkpoint.dir == "/checkpoints/mine"
