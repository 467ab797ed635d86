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
- Service names mapped to 127.0.0.1 (the master's Service and the in-cluster MLflow), every mapping recorded;
- each pod in PID and mount namespaces of its own (its /dev/shm; killing it kills all its processes);
- restarts as the kubelet and the operator do them: restartPolicy OnFailure with the kubelet's crash
  back-off, and runPolicy.backoffLimit counted over the pods' restarts (see PodSet).
2 nodes × 1 process, gloo on CPU, to completion, and the run is found in a real MLflow server by the
`recsys.job_name` tag the trainer sets from RECSYS_JOB_NAME. No cluster is involved. One test kills a
pod mid-training (kill -9 of the container) and checks that the restarted pods resume the same run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import pytest
import yaml
from conftest import port_or_free
from pod_containers import pytorchjob_env, trainjob_env, trainjob_pod

from recsys.config import load_config
from recsys.launch.kube import render_text
from recsys.launch.manifests import TARGETS, Target

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# The jobs run here: the synthetic variants of the flagship files (same pod specs, data made by
# manifests/synth/data-prep-job.yaml instead of raw files on the PVC).
SYNTH_DLRM = "manifests/synth/dlrm-job.yaml"
SYNTH_TWO_TOWER = "manifests/synth/two-tower-job.yaml"
SYNTH_TWO_TOWER_TRAINJOB = "manifests/synth/two-tower-trainjob.yaml"
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
    restart_policy: str = "Never"  # the pod's restartPolicy (PyTorchJob: the replica spec's)


def _target(path: str) -> Target:
    return next(t for t in TARGETS if t.path == path)


def _render(target: Target, extra: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    sets = list(target.overrides) + CPU_SIZE + TINY[target.config] + extra
    cfg = load_config(target.config, sets)
    text = render_text(cfg, target.backend, "test", target.path)  # type: ignore[arg-type]
    return [d for d in yaml.safe_load_all(text) if d], sets


def _port_or_free(port: int, mapped: dict[str, str]) -> int:
    """The manifest's port when free on 127.0.0.1 (as in a pod), else a free one — recorded."""
    free = port_or_free(port)
    if free != port:
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


def _in_pod_namespaces(argv: list[str], size: str) -> list[str]:
    """Run argv as a pod's container: in PID and mount namespaces of its own, with a tmpfs at /dev/shm.

    - /dev/shm: without a private one the two local "pods" share the host's, which no two pods do;
      mosaicml-streaming keys its shared memory by local rank and collides (FileExistsError '/000030_locals').
    - PID namespace (the command is its PID 1, /proc remounted): killing the returned process (`unshare`,
      whose --kill-child SIGKILLs that PID 1) ends every process of the pod, as a container's death does.
      A process group would not: torchrun starts each worker in a session of its own.
    """
    k8s_to_tmpfs = size.replace("Gi", "g").replace("Mi", "m").replace("Ki", "k")
    script = f'mount -t tmpfs -o size={k8s_to_tmpfs} tmpfs /dev/shm && exec "$@"'
    namespaces = ["--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc"]
    return ["unshare", *namespaces, "--", "sh", "-c", script, "sh", *argv]


def _pod_namespaces_work() -> bool:
    r = subprocess.run(_in_pod_namespaces(["true"], "1Mi"), capture_output=True, check=False)
    return r.returncode == 0


def _which(exe: str, path: str) -> str:
    for d in path.split(":"):
        if (Path(d) / exe).is_file():
            return str(Path(d) / exe)
    pytest.fail(f"{exe}: not on the container PATH {path}")


def pytorchjob_pods(docs: list[dict[str, Any]], root: Path, mlflow_uri: str) -> list[Pod]:
    """The pods the v1 operator creates, with the env it injects (pod_containers.pytorchjob_env)."""
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    name, reps = job["metadata"]["name"], job["spec"]["pytorchReplicaSpecs"]
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
            injected = pytorchjob_env(job, rtype, index)
            port = int(injected["MASTER_PORT"])
            local_port = _port_or_free(port, mapped) if not pods else int(pods[0].env["MASTER_PORT"])
            mapped[master_svc] = "127.0.0.1"
            # One machine: the master's Service is the loopback, its port one that is free here.
            injected |= {"MASTER_ADDR": "127.0.0.1", "PET_MASTER_ADDR": "127.0.0.1"}
            injected |= {"MASTER_PORT": str(local_port), "PET_MASTER_PORT": str(local_port)}
            shm = _shm_size(pod_spec, container)
            pod_env = {**_base_env(pod_dir), **env, **injected}
            restart = reps[rtype]["restartPolicy"]  # the operator copies it into the pod spec
            pods.append(Pod(pod_name, argv, pod_env, pod_dir, mapped, shm, restart))
    return pods


def trainjob_pods(docs: list[dict[str, Any]], root: Path, mlflow_uri: str) -> list[Pod]:
    """The pods Trainer v2 creates on torch-distributed: only PET_* injected (pod_containers.trainjob_env)."""
    job = next(d for d in docs if d["kind"] == "TrainJob")
    name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
    pod_patch, container = trainjob_pod(job)
    pods: list[Pod] = []
    for index in range(trainer["numNodes"]):
        pod_name = f"{name}-node-0-{index}"
        pod_dir = root / "pods" / pod_name
        mapped: dict[str, str] = {}
        services = _services(job, mlflow_uri, mapped)
        argv, env = _materialise(docs, pod_patch, container, root, pod_dir, services, mapped)
        injected = trainjob_env(job, index)
        port = int(injected["PET_MASTER_PORT"])
        port = _port_or_free(port, mapped) if not pods else int(pods[0].env["PET_MASTER_PORT"])
        mapped[injected["PET_MASTER_ADDR"]] = "127.0.0.1"
        injected |= {"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
        shm = _shm_size(pod_patch, container)
        pods.append(Pod(pod_name, argv, {**_base_env(pod_dir), **env, **injected}, pod_dir, mapped, shm))
    return pods


def _services(job: dict[str, Any], mlflow_uri: str, mapped: dict[str, str]) -> dict[str, str]:
    """In-cluster Service URLs → this machine (the MLflow Service → the test's mlflow server)."""
    cm_uri = "http://mlflow.recsys.svc:5000"
    mapped[urlparse(cm_uri).netloc] = urlparse(mlflow_uri).netloc
    return {cm_uri: mlflow_uri}


# kubelet: a container that exited is restarted after a crash back-off of 10 s, doubled on each restart
# of that container, at most 5 min (kubelet backOffPeriod and MaxContainerBackOff).
KUBELET_BACKOFF_S = 10.0
KUBELET_MAX_BACKOFF_S = 300.0
_T = TypeVar("_T")


class PodSet:
    """The pods of one job as local processes: what the kubelets and the operator do with them.

    Every pod starts at once (as the scheduler would). A container that exits non-zero is started again
    with the same command and env when its restartPolicy is OnFailure, after the kubelet's back-off
    (the pod keeps its name, env and PVCs; the /dev/shm tmpfs is a new one); restartPolicy Never fails
    the job. The operator fails the job once the pods' restart counts add up to runPolicy.backoffLimit
    (kubeflow/training-operator pkg/core/job.go PastBackoffLimit: `sum >= backoffLimit`, any restart when
    it is 0); a restart that would reach it fails the job here, without waiting for the back-off.
    Leaving the `with` block kills whatever still runs, pod by pod (nothing is left behind).
    """

    def __init__(self, pods: list[Pod], backoff_limit: int | None = 0) -> None:
        for pod in pods:
            assert pod.shm_size, f"{pod.name}: the pod spec mounts no memory emptyDir at /dev/shm"
            assert pod.restart_policy in ("Never", "OnFailure"), (
                f"{pod.name}: {pod.restart_policy} not emulated"
            )
        self.pods = {p.name: p for p in pods}
        self.backoff_limit = backoff_limit
        self.restarts = {p.name: 0 for p in pods}  # the containers' restartCount
        self.exits: dict[str, list[int]] = {p.name: [] for p in pods}  # exit code of each start
        self.logs: dict[str, list[Path]] = {p.name: [] for p in pods}  # log of each start
        self.succeeded: set[str] = set()
        self._running: dict[str, subprocess.Popen[bytes]] = {}
        self._restart_at: dict[str, float] = {}
        self._files: list[IO[bytes]] = []

    def _require(self) -> None:
        """Skip unless this host can run the pods (here: local processes in their own namespaces)."""
        if not _pod_namespaces_work():
            pytest.skip(
                "needs `unshare --mount --pid` (root) to give each local pod its namespaces as pods have"
            )

    def __enter__(self) -> PodSet:
        self._require()
        try:
            for pod in self.pods.values():
                self._start(pod)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, pod: Pod) -> None:
        pod.cwd.mkdir(parents=True, exist_ok=True)
        n = len(self.logs[pod.name])
        path = pod.cwd / ("log.txt" if n == 0 else f"log.restart-{n}.txt")
        log = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._files.append(log)
        self.logs[pod.name].append(path)
        self._running[pod.name] = self._spawn(pod, log, restart=n > 0)

    def _spawn(self, pod: Pod, log: Any, restart: bool) -> subprocess.Popen:
        """Start (or restart) the pod's container writing to `log`: here a process in its own namespaces."""
        argv = _in_pod_namespaces(pod.argv, pod.shm_size or "64Mi")
        return subprocess.Popen(argv, env=pod.env, cwd=pod.cwd, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, name: str) -> None:
        """SIGKILL the pod's container (torchrun and its workers), as a node failure or OOM kill would."""
        proc = self._running[name]
        proc.kill()
        proc.wait()  # reaped: its PID 1 has been sent SIGKILL, and with it every process of the pod

    def close(self) -> None:
        """Kill every pod still running and wait for it; close the logs."""
        for proc in self._running.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self._running.values():
            proc.wait()
        self._running.clear()
        self._restart_at.clear()
        for f in self._files:
            f.close()

    def _fail(self, why: str) -> None:
        self.close()
        pytest.fail(f"{why}\n{self.log_tails()}")

    def log_tails(self, chars: int = 4000) -> str:
        out = []
        for name, paths in self.logs.items():
            for i, path in enumerate(paths):
                rc = self.exits[name][i] if i < len(self.exits[name]) else "running"
                out.append(
                    f"--- {name} start {i} (exit {rc}): {path}\n{path.read_text(errors='replace')[-chars:]}"
                )
        return "\n".join(out)

    def _tick(self) -> None:
        now = time.monotonic()
        for name, proc in list(self._running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self._running[name]
            self.exits[name].append(rc)
            if rc == 0:
                self.succeeded.add(name)
                continue
            if self.pods[name].restart_policy == "Never":
                self._fail(f"{name}: exit {rc} and restartPolicy Never: the job failed")
            # restartCount of every pod not Succeeded, with the restarts already due and this one.
            counted = sum(n for p, n in self.restarts.items() if p not in self.succeeded)
            would = counted + len(self._restart_at) + 1
            limit = self.backoff_limit
            if limit is not None and (would > 0 if limit == 0 else would >= limit):
                self._fail(
                    f"{name}: exit {rc}; its restart would bring the pods' restarts to {would}, and the "
                    f"operator fails the job at runPolicy.backoffLimit {limit} (pkg/core/job.go PastBackoffLimit)"
                )
            backoff = min(KUBELET_BACKOFF_S * 2 ** self.restarts[name], KUBELET_MAX_BACKOFF_S)
            self._restart_at[name] = now + backoff
        for name, at in list(self._restart_at.items()):
            if now >= at:
                del self._restart_at[name]
                self.restarts[name] += 1
                self._start(self.pods[name])

    def wait_until(self, found: Callable[[], _T | None], timeout: float, what: str) -> _T:
        """Run the pods until found() returns something, and return it; fail if they end first."""
        deadline = time.monotonic() + timeout
        while True:
            self._tick()
            value = found()
            if value is not None:
                return value
            if not self._running and not self._restart_at:
                self._fail(f"every pod ended before {what}")
            if time.monotonic() > deadline:
                self._fail(f"no {what} after {timeout:.0f} s")
            time.sleep(0.2)

    def run_to_completion(self, timeout: float) -> None:
        """Run the pods until every one has exited 0 (restarting them as above)."""
        done = lambda: True if self.succeeded == set(self.pods) else None  # noqa: E731
        self.wait_until(done, timeout, "success of every pod")


def run_pods(pods: list[Pod], timeout: float = 240, backoff_limit: int | None = 0) -> None:
    """Start every pod at once and require all to exit 0 (by default a failed pod fails the job)."""
    with PodSet(pods, backoff_limit) as ps:
        ps.run_to_completion(timeout)


def prepare_pvc(root: Path) -> None:
    """The data-prep Job's work (manifests/synth/data-prep-job.yaml), tiny, onto root/pvc/recsys-data."""
    from recsys.data.prepare import prepare

    prep = yaml.safe_load((REPO / "manifests/synth/data-prep-job.yaml").read_text())["spec"]["template"][
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data-prep Job's work, done once: tiny prepared data on the 'recsys-data PVC' folder."""
    root = tmp_path_factory.mktemp("cluster")
    prepare_pvc(root)
    return root


def _committed_job(path: str) -> dict[str, Any]:
    return [d for d in yaml.safe_load_all((REPO / path).read_text()) if d][-1]


def _committed_container(path: str) -> dict[str, Any]:
    job = _committed_job(path)
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


@pytest.mark.parametrize("path", [SYNTH_DLRM, SYNTH_TWO_TOWER])
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


# Long enough to be killed mid-training (the tiny train split is 4 steps an epoch at 2 × 256 rows), with
# checkpoints early enough that one is complete before the kill.
KILLED_RUN = [
    "train.epochs=20",
    "train.max_steps=60",
    "train.checkpoint.every_steps=8",
    "train.checkpoint.every_epoch=false",
    "train.log_every_steps=2",
]
_RESUMED = re.compile(r"recsys: resumed from (\S+) \(step (\d+)")


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root's run folders (step-* without .tmp, holding recsys.json), by step."""
    found = root.glob("run-*/step-*")
    return sorted(
        (p for p in found if not p.name.endswith(".tmp") and (p / "recsys.json").is_file()),
        key=lambda p: p.name,
    )


def test_pytorchjob_pod_killed_restarts_and_resumes(cluster: Path, mlflow_server: str) -> None:
    """kill -9 of the master pod mid-training; both pods restart per the manifest's restartPolicy and
    backoffLimit, resume from the last checkpoint on the PVC and finish the same MLflow run."""
    path, name = SYNTH_DLRM, "dlrm-killed"  # own checkpoint folder and MLflow run
    docs, _ = _render(_target(path), [f"job.name={name}", *KILLED_RUN])
    spec, committed = docs[-1]["spec"], _committed_job(path)["spec"]
    # The committed file's restart settings: restartPolicy per replica, backoffLimit of the job.
    backoff_limit = committed["runPolicy"]["backoffLimit"]
    assert spec["runPolicy"]["backoffLimit"] == backoff_limit
    for rtype, rep in committed["pytorchReplicaSpecs"].items():
        assert spec["pytorchReplicaSpecs"][rtype]["restartPolicy"] == rep["restartPolicy"]
    master_container = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert master_container["command"] == _committed_container(path)["command"]
    pods = pytorchjob_pods(docs, cluster, mlflow_server)
    master, worker = pods
    config = Path(master.argv[master.argv.index("--config") + 1])
    inner = yaml.safe_load(config.read_text())
    ckpt_root = Path(inner["train"]["checkpoint"]["dir"])  # /checkpoints/<job> on the checkpoint PVC
    assert ckpt_root == cluster / "pvc/recsys-checkpoints" / name

    with PodSet(pods, backoff_limit) as ps:
        first = ps.wait_until(lambda: _complete_checkpoints(ckpt_root) or None, 150, "complete checkpoint")
        ps.kill(master.name)
        at_kill = _complete_checkpoints(ckpt_root)
        run_id = json.loads((at_kill[-1] / "recsys.json").read_text())["run_id"]  # before it is pruned
        print(
            f"killed {master.name} with complete checkpoints {[p.name for p in at_kill]} (first {first[-1]})"
        )
        ps.run_to_completion(240)

    # Both pods failed once (the master killed, the worker's torchrun on its peer's death) and restarted.
    assert ps.restarts == {master.name: 1, worker.name: 1}, ps.log_tails()
    assert ps.exits[master.name][0] == -9 and ps.exits[worker.name][0] != 0
    restarted = ps.logs[master.name][1].read_text(errors="replace")
    resumed = _RESUMED.search(restarted)
    assert resumed, f"the restarted master did not resume:\n{restarted[-4000:]}"
    assert Path(resumed.group(1)) == at_kill[-1], (resumed.group(0), at_kill)

    import mlflow

    from recsys.tracking import JOB_TAG

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(inner["tracking"]["experiment"])
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == run_id  # the run the checkpoint recorded
    total, every = inner["train"]["max_steps"], inner["train"]["log_every_steps"]
    test_auc = client.get_metric_history(run.info.run_id, "test/auc")
    assert [m.step for m in test_auc] == [total], test_auc  # tested once, at the run's last step
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    steps = sorted({m.step for m in losses})
    # No gaps: every logged step from the first to the last (steps re-run after the kill may repeat).
    assert steps == sorted({*range(every, total + 1, every), total}), steps
    print(f"train/loss: {len(losses)} values at {len(steps)} steps; resumed at step {resumed.group(2)}")


def test_trainjob_twin_pods_train_with_only_pet_env(cluster: Path, mlflow_server: str) -> None:
    target = _target(SYNTH_TWO_TOWER_TRAINJOB)
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
    docs, _ = _render(_target(SYNTH_DLRM), [])
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
        "recsys.launch.elastic",  # torchrun with the pod's exit status (143 after a preemption)
        "-m",
        "recsys",
        "train",
        "--config",
        str(root / "pods/dlrm-master-0/etc/recsys/config.yaml"),
    ]
