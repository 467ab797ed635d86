"""Operator contract: run the committed jobs' pods as local processes, the way the operator and kubelet would.

For every replica of the rendered job this does what the control plane does, from the manifest alone:
- the container's exact `command` (+ `args`), argv[0] looked up on PATH as the kubelet's runtime does;
- the container's `env`, plus the env the operator injects, and nothing from the developer's shell:
  * PyTorchJob (kubeflow.org/v1), per kubeflow/training-operator v1.9
    `pkg/controller.v1/pytorch/envvar.go` (setPodEnv: PYTHONUNBUFFERED, WORLD_SIZE = replicas × nprocPerNode,
    RANK = node index (Worker i → i+1), PET_NPROC_PER_NODE, PET_NODE_RANK, PET_NNODES) and
    `pkg/controller.v1/pytorch/master.go` (MASTER_PORT, PET_MASTER_PORT from the `pytorchjob-port`
    container port; MASTER_ADDR, PET_MASTER_ADDR = `<job>-master-0`, the master's Service);
  * TrainJob (trainer.kubeflow.org/v1alpha1), per kubeflow/trainer
    `pkg/runtime/framework/plugins/torch/torch.go` (EnforceMLPolicy: only PET_NNODES, PET_NPROC_PER_NODE,
    PET_NODE_RANK from the Job completion index, PET_MASTER_ADDR = `<name>-node-0-0.<name>`,
    PET_MASTER_PORT = 29400), the pod settings coming from `runtimePatches`;
- the ConfigMap written as the file the volume mount makes (/etc/recsys/config.yaml → a temp folder);
- PVC mounts (/data, /checkpoints) mapped to temp folders: paths are rewritten only under a mounted path;
- Service names mapped to 127.0.0.1 (the master's Service and the in-cluster MLflow), every mapping recorded.
2 nodes × 1 process, gloo on CPU, to completion, and the run is found in a real MLflow server by the
`recsys.job_name` tag the trainer sets from RECSYS_JOB_NAME. No cluster is involved.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from recsys.config import load_config
from recsys.launch.kube import render_text
from recsys.launch.manifests import TARGETS, Target

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CPU_SIZE = ["job.nodes=2", "job.gpus_per_node=0", "job.procs_per_node=1"]
# Tiny data and a few steps: the contract is about how the pods start, not about learning.
TINY = {
    "dlrm_synth": [
        "data.source.rows=6000",
        "data.source.cardinality=50",
        "train.batch_size=256",
        "eval.batch_size=256",
        "train.max_steps=3",
        "tracking.log_model=false",
    ],
    "two_tower_synth": [
        "data.source.num_users=200",
        "data.source.num_items=100",
        "data.source.interactions_per_user=10",
        "train.batch_size=64",
        "eval.batch_size=64",
        "eval.ks=[10]",
        "train.max_steps=3",
        "tracking.log_model=false",
    ],
}


@dataclass
class Pod:
    """One replica as the kubelet would start it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    mapped: dict[str, str] = field(default_factory=dict)
    shm_size: str | None = None  # the pod's memory emptyDir at /dev/shm, if it declares one


def _target(path: str) -> Target:
    return next(t for t in TARGETS if t.path == path)


def _render(target: Target, extra: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    sets = list(target.overrides) + CPU_SIZE + TINY[target.config] + extra
    cfg = load_config(target.config, sets)
    text = render_text(cfg, target.backend, "test", target.path)  # type: ignore[arg-type]
    return [d for d in yaml.safe_load_all(text) if d], sets


def _port_or_free(port: int, mapped: dict[str, str]) -> int:
    """The manifest's port when free on 127.0.0.1 (as in a pod), else a free one — recorded."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mapped[f"port {port}"] = f"port {free} (busy here)"
    return free


def _mount_map(
    mounts: list[dict[str, Any]], volumes: list[dict[str, Any]], root: Path, pod_dir: Path
) -> dict[str, Path]:
    """mountPath → local folder: PVCs are shared between pods (root/<claim>), the rest is per pod."""
    by_name = {v["name"]: v for v in volumes}
    out = {}
    for m in mounts:
        vol = by_name[m["name"]]
        if "persistentVolumeClaim" in vol:
            local = root / "pvc" / vol["persistentVolumeClaim"]["claimName"]
        else:
            local = pod_dir / m["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        out[m["mountPath"]] = local
    return out


def _rewrite(value: Any, mounts: dict[str, Path], services: dict[str, str]) -> Any:
    """Rewrite strings under a mounted path, and Service URLs, the way the cluster makes them resolve."""
    if isinstance(value, dict):
        return {k: _rewrite(v, mounts, services) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, mounts, services) for v in value]
    if isinstance(value, str):
        for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == mount or value.startswith(mount + "/"):
                return str(local) + value[len(mount) :]
        for svc, local in services.items():
            if value == svc:
                return local
    return value


def _base_env(home: Path) -> dict[str, str]:
    """What a container starts with before the pod spec's env: PATH and HOME, nothing from this shell."""
    return {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        # Not part of the contract: keeps 2 CPU processes from oversubscribing the 2 shared cores.
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def _materialise(
    docs: list[dict[str, Any]], pod_spec: dict[str, Any], container: dict[str, Any], root: Path, pod_dir: Path,
    services: dict[str, str], mapped: dict[str, str],
) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """Mount the volumes (ConfigMap → file) and return the container's argv and env (pod spec part)."""
    mounts = _mount_map(container["volumeMounts"], pod_spec["volumes"], root, pod_dir)
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for vol in pod_spec["volumes"]:
        if "configMap" in vol:
            mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == vol["name"])
            for key, text in cms[vol["configMap"]["name"]]["data"].items():
                # The trainer sees the ConfigMap's config with only mounted paths and Service names mapped.
                rewritten = _rewrite(yaml.safe_load(text), mounts, services)
                (mounts[mount] / key).write_text(yaml.safe_dump(rewritten, sort_keys=False))
    for mount, local in mounts.items():
        # /dev/shm is a private tmpfs per process (see _with_private_shm), not this folder.
        mapped[mount] = "private tmpfs (unshare --mount)" if mount == "/dev/shm" else str(local)
    argv = _rewrite(list(container["command"]) + list(container.get("args", [])), mounts, services)
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = _rewrite(e["value"], mounts, services)
        else:
            # secretKeyRef with optional: true and no such Secret here → the kubelet leaves it unset.
            assert e["valueFrom"]["secretKeyRef"]["optional"] is True
    for ref in container.get("envFrom", []):
        assert ref["secretRef"]["optional"] is True  # an absent optional Secret adds nothing
    argv[0] = _which(argv[0], env.get("PATH") or _base_env(pod_dir)["PATH"])
    return argv, env


def _shm_size(pod_spec: dict[str, Any], container: dict[str, Any]) -> str | None:
    """sizeLimit of the memory emptyDir the container mounts at /dev/shm (None if it mounts none)."""
    vols = {v["name"]: v for v in pod_spec["volumes"]}
    for m in container["volumeMounts"]:
        empty = vols[m["name"]].get("emptyDir")
        if m["mountPath"] == "/dev/shm" and empty and empty.get("medium") == "Memory":
            return empty.get("sizeLimit", "64Mi")
    return None


def _with_private_shm(argv: list[str], size: str) -> list[str]:
    """Give the process its own /dev/shm, as each pod has: a new mount namespace with a tmpfs there.

    Without it the two local "pods" share the host's /dev/shm, which no two pods do; mosaicml-streaming
    keys its shared memory by local rank and collides (FileExistsError '/000030_locals').
    """
    k8s_to_tmpfs = size.replace("Gi", "g").replace("Mi", "m").replace("Ki", "k")
    script = f'mount -t tmpfs -o size={k8s_to_tmpfs} tmpfs /dev/shm && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *argv]


def _private_shm_works() -> bool:
    r = subprocess.run(_with_private_shm(["true"], "1Mi"), capture_output=True, check=False)
    return r.returncode == 0


def _which(exe: str, path: str) -> str:
    for d in path.split(":"):
        if (Path(d) / exe).is_file():
            return str(Path(d) / exe)
    pytest.fail(f"{exe}: not on the container PATH {path}")


def pytorchjob_pods(docs: list[dict[str, Any]], root: Path, mlflow_uri: str) -> list[Pod]:
    """The pods the v1 operator creates, with the env it injects (envvar.go / master.go)."""
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    name, spec = job["metadata"]["name"], job["spec"]
    reps = spec["pytorchReplicaSpecs"]
    total = sum(r["replicas"] for r in reps.values())
    nproc = spec["nprocPerNode"]
    master_c = reps["Master"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in master_c["ports"] if p["name"] == "pytorchjob-port")
    master_svc = f"{name}-master-0"
    pods = []
    for rtype in ("Master", "Worker"):
        for index in range(reps.get(rtype, {}).get("replicas", 0)):
            pod_name = f"{name}-{rtype.lower()}-{index}"
            pod_dir = root / "pods" / pod_name
            pod_spec = reps[rtype]["template"]["spec"]
            (container,) = pod_spec["containers"]
            assert container["name"] == "pytorch"
            mapped: dict[str, str] = {}
            services = _services(job, mlflow_uri, mapped)
            argv, env = _materialise(docs, pod_spec, container, root, pod_dir, services, mapped)
            rank = index + 1 if rtype == "Worker" else index
            local_port = _port_or_free(port, mapped) if not pods else int(pods[0].env["MASTER_PORT"])
            mapped[master_svc] = "127.0.0.1"
            injected = {
                "PYTHONUNBUFFERED": "0",
                "MASTER_PORT": str(local_port),
                "PET_MASTER_PORT": str(local_port),
                "MASTER_ADDR": "127.0.0.1",  # = master_svc
                "PET_MASTER_ADDR": "127.0.0.1",  # = master_svc
                "WORLD_SIZE": str(total * int(nproc)),
                "RANK": str(rank),
                "PET_NPROC_PER_NODE": nproc,
                "PET_NODE_RANK": str(rank),
                "PET_NNODES": str(total),
            }
            shm = _shm_size(pod_spec, container)
            pods.append(Pod(pod_name, argv, {**_base_env(pod_dir), **env, **injected}, pod_dir, mapped, shm))
    return pods


def trainjob_pods(docs: list[dict[str, Any]], root: Path, mlflow_uri: str) -> list[Pod]:
    """The pods Trainer v2 creates on torch-distributed: only PET_* injected (torch.go)."""
    job = next(d for d in docs if d["kind"] == "TrainJob")
    name, spec = job["metadata"]["name"], job["spec"]
    trainer = spec["trainer"]
    (patch,) = spec["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"
    pod_patch = rj["template"]["spec"]["template"]["spec"]
    (cpatch,) = pod_patch["containers"]
    assert cpatch["name"] == "node"
    container = {"command": trainer["command"], "env": trainer["env"], "volumeMounts": cpatch["volumeMounts"]}
    pods: list[Pod] = []
    for index in range(trainer["numNodes"]):
        pod_name = f"{name}-node-0-{index}"
        pod_dir = root / "pods" / pod_name
        mapped: dict[str, str] = {}
        services = _services(job, mlflow_uri, mapped)
        argv, env = _materialise(docs, pod_patch, container, root, pod_dir, services, mapped)
        port = _port_or_free(29400, mapped) if not pods else int(pods[0].env["PET_MASTER_PORT"])
        mapped[f"{name}-node-0-0.{name}"] = "127.0.0.1"
        injected = {
            "PET_NNODES": str(trainer["numNodes"]),
            "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(index),  # from batch.kubernetes.io/job-completion-index
            "PET_MASTER_ADDR": "127.0.0.1",  # = <name>-node-0-0.<name>
            "PET_MASTER_PORT": str(port),
        }
        shm = _shm_size(pod_patch, container)
        pods.append(Pod(pod_name, argv, {**_base_env(pod_dir), **env, **injected}, pod_dir, mapped, shm))
    return pods


def _services(job: dict[str, Any], mlflow_uri: str, mapped: dict[str, str]) -> dict[str, str]:
    """In-cluster Service URLs → this machine (the MLflow Service → the test's mlflow server)."""
    cm_uri = "http://mlflow.recsys.svc:5000"
    mapped[urlparse(cm_uri).netloc] = urlparse(mlflow_uri).netloc
    return {cm_uri: mlflow_uri}


def run_pods(pods: list[Pod], timeout: float = 240) -> None:
    """Start every pod at once (as the scheduler would) and require all to exit 0."""
    if not _private_shm_works():
        pytest.skip("needs `unshare --mount` (root) to give each local pod its own /dev/shm as pods have")
    procs = []
    for pod in pods:
        assert pod.shm_size, f"{pod.name}: the pod spec mounts no memory emptyDir at /dev/shm"
        pod.cwd.mkdir(parents=True, exist_ok=True)
        log = open(pod.cwd / "log.txt", "w")  # noqa: SIM115
        argv = _with_private_shm(pod.argv, pod.shm_size)
        procs.append(
            (pod, log, subprocess.Popen(argv, env=pod.env, cwd=pod.cwd, stdout=log, stderr=subprocess.STDOUT))
        )
    failed = []
    try:
        for pod, log, p in procs:
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = "timeout"
            log.close()
            if rc != 0:
                failed.append(f"{pod.name}: exit {rc}\n{(pod.cwd / 'log.txt').read_text()[-4000:]}")
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
    assert not failed, "\n".join(failed)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data-prep Job's work, done once: tiny prepared data on the 'recsys-data PVC' folder."""
    from recsys.data.prepare import prepare

    root = tmp_path_factory.mktemp("cluster")
    prep = yaml.safe_load((REPO / "manifests/base/data-prep-job.yaml").read_text())["spec"]["template"][
        "spec"
    ]
    for c in prep["initContainers"] + prep["containers"]:
        argv = c["command"]
        config = argv[argv.index("--config") + 1]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"] + TINY[config]
        cfg = load_config(config, sets)
        cfg.data.prepared_dir = str(
            root / "pvc" / "recsys-data" / cfg.data.prepared_dir.removeprefix("/data/")
        )
        prepare(cfg, overwrite=False)
    return root


def _committed_container(path: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]
    job = docs[-1]
    if job["kind"] == "PyTorchJob":
        return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return job["spec"]["trainer"]


def _check_run(mlflow_uri: str, experiment: str, job_name: str) -> None:
    import mlflow

    from recsys.tracking import find_run_by_job

    run_id = find_run_by_job(mlflow_uri, experiment, job_name)
    assert run_id, f"no run tagged recsys.job_name={job_name} in {experiment}"
    run = mlflow.MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics, "the run logged no metrics"


@pytest.mark.parametrize("path", ["manifests/dlrm-job.yaml", "manifests/two-tower-job.yaml"])
def test_pytorchjob_pods_train_to_completion(
    path: str, cluster: Path, mlflow_server: str, tmp_path: Path
) -> None:
    docs, _ = _render(_target(path), [])
    job = docs[-1]
    # The committed (GPU-sized) file runs this exact command; only the size differs here.
    committed = _committed_container(path)
    rendered = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert rendered["command"] == committed["command"] and "args" not in committed
    pods = pytorchjob_pods(docs, cluster, mlflow_server)
    assert [p.name for p in pods] == [
        f"{job['metadata']['name']}-master-0",
        f"{job['metadata']['name']}-worker-0",
    ]
    for p in pods:
        print(p.name, "mapped:", p.mapped)
    run_pods(pods)
    inner = yaml.safe_load(docs[0]["data"]["config.yaml"])
    _check_run(mlflow_server, inner["tracking"]["experiment"], job["metadata"]["name"])


def test_trainjob_twin_pods_train_with_only_pet_env(cluster: Path, mlflow_server: str) -> None:
    target = _target("manifests/two-tower-trainjob.yaml")
    docs, _ = _render(target, ["job.name=two-tower-v2"])
    assert docs[-1]["spec"]["trainer"]["command"] == _committed_container(target.path)["command"]
    pods = trainjob_pods(docs, cluster, mlflow_server)
    for p in pods:
        assert not {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"} & set(p.env)
        print(p.name, "mapped:", p.mapped)
    run_pods(pods)
    inner = yaml.safe_load(docs[0]["data"]["config.yaml"])
    _check_run(mlflow_server, inner["tracking"]["experiment"], "two-tower-v2")


def test_contract_env_matches_operator_source() -> None:
    """The injected env above, checked on its own (fast): a Master+Worker job of 2 nodes × 1 process."""
    docs, _ = _render(_target("manifests/dlrm-job.yaml"), [])
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"recsys-contract-{os.getpid()}"
    pods = pytorchjob_pods(docs, root, "http://127.0.0.1:1")
    master, worker = (p.env for p in pods)
    assert (
        (master["RANK"], worker["RANK"]) == ("0", "1") == (master["PET_NODE_RANK"], worker["PET_NODE_RANK"])
    )
    assert master["WORLD_SIZE"] == worker["WORLD_SIZE"] == "2" == master["PET_NNODES"]
    assert master["PET_NPROC_PER_NODE"] == "1"
    assert master["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1" and master["RECSYS_JOB_NAME"] == "dlrm"
    assert pods[0].argv[1:] == [
        "-m",
        "recsys",
        "train",
        "--config",
        str(root / "pods/dlrm-master-0/etc/recsys/config.yaml"),
    ]
