"""One neutral description of a distributed training job, built from the resolved Config.

Both Kubernetes renderers (PyTorchJob v1 and TrainJob v2, in recsys/launch/kube.py) read only this,
so the two kinds cannot drift apart: same image, command, size, env, volumes and pod settings.
The config the pods read is the resolved config with cluster paths (`cluster_config`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from recsys.config import Config, dump_config
from recsys.errors import UserError
from recsys.launch.elastic import TORCHRUN
from recsys.launch.types import job_size

CONFIG_DIR = "/etc/recsys"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
TMP_MOUNT = "/tmp"
TMP_SIZE = "10Gi"
SHM_MOUNT = "/dev/shm"
# The one command every replica runs: torchrun (recsys.launch.elastic: it exits 143 when preempted, where
# torchrun exits 1) reads its topology from the PET_* env the operator injects.
TRAIN_COMMAND = [*TORCHRUN, "-m", "recsys", "train", "--config", CONFIG_PATH]
# UID/GID of the non-root user baked into images/trainer/Dockerfile.
RUN_AS_USER = 1000
# torchrun's own variables, which the operators set; a user env must not shadow them.
RESERVED_ENV = {
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_NPROC_PER_NODE",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
}
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Volume:
    """A pod volume and where the trainer container mounts it."""

    name: str
    mount_path: str
    kind: Literal["pvc", "configmap", "shm", "scratch"]
    source: str  # claim name, ConfigMap name, or emptyDir sizeLimit (shm: memory, scratch: disk)
    read_only: bool = False


@dataclass(frozen=True)
class JobSpec:
    """Everything a Kubernetes training job needs, independent of the job kind."""

    name: str
    namespace: str
    image: str
    command: list[str]
    nodes: int
    nproc_per_node: int
    gpus_per_node: int
    requests: dict[str, str]
    limits: dict[str, str]
    env: list[tuple[str, str]]
    secret: str | None
    secret_keys: list[str]
    config_map: str
    config_yaml: str
    volumes: list[Volume]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    service_account: str
    backoff_limit: int
    ttl_seconds_after_finished: int
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    model_kind: str = ""
    config_name: str = ""
    extra_secrets: dict[str, list[str]] = field(default_factory=dict)  # name → keys, after `secret`
    termination_grace_s: int = 30  # pod terminationGracePeriodSeconds (preemption checkpoint + exit)

    def secrets(self) -> list[tuple[str, list[str]]]:
        """Every Secret whose keys become optional env of the trainer: (name, keys), credentials first."""
        first = [(self.secret, list(self.secret_keys))] if self.secret else []
        return first + [(name, list(keys)) for name, keys in self.extra_secrets.items()]


def _cluster_path(path: str) -> str:
    """Local `data/…` paths live under the data PVC in the cluster; other paths are kept as given."""
    if path.startswith("data/"):
        return f"{DATA_MOUNT}/{path.removeprefix('data/')}"
    return path


def _rewrite_source(source: dict[str, Any]) -> dict[str, Any]:
    out = dict(source)
    # Every file field of the source kinds: the ratings/interactions file and the side-feature files.
    for key in ("path", "users", "items", "inter", "user", "item"):
        if isinstance(out.get(key), str):
            out[key] = _cluster_path(out[key])
    if isinstance(out.get("paths"), list):
        out["paths"] = [_cluster_path(p) for p in out["paths"]]
    for split in ("train", "val", "test"):
        if out.get("kind") == "presplit" and isinstance(out.get(split), dict):
            out[split] = _rewrite_source(out[split])
    return out


def cluster_config(cfg: Config) -> Config:
    """The config as the pods read it: relative data paths under /data, checkpoints under /checkpoints/<job>,
    tracking at the in-cluster MLflow. Every training setting is unchanged."""
    from recsys.config import config_from_dict

    data = cfg.model_dump(mode="json")
    # An absolute path is the caller's choice (a pipeline run's own folder on the PVC); a local relative
    # one is mapped onto the data PVC.
    prepared = cfg.data.prepared_dir
    if not prepared.startswith("/"):
        prepared = _cluster_path(prepared) if prepared.startswith("data/") else f"{DATA_MOUNT}/{cfg.name}"
    data["data"]["prepared_dir"] = prepared
    if data["data"].get("raw_dir"):
        data["data"]["raw_dir"] = _cluster_path(data["data"]["raw_dir"])
    data["data"]["source"] = _rewrite_source(data["data"]["source"])
    # One checkpoint root per job on the checkpoint PVC: a restarted pod resumes this job's run. An
    # absolute directory is the caller's choice and kept.
    ckpt = cfg.train.checkpoint.dir
    if not (ckpt and ckpt.startswith("/")):
        data["train"]["checkpoint"]["dir"] = f"{CHECKPOINT_MOUNT}/{cfg.job.name}"
    data["tracking"]["uri"] = cfg.job.mlflow_tracking_uri
    return config_from_dict(data, origin=f"{cfg.name} (cluster paths)")


def _check_name(value: str, where: str, max_len: int = 63) -> None:
    if not _DNS1123.match(value) or len(value) > max_len:
        raise UserError(
            f"{where}: {value!r} is not a valid Kubernetes name (lower-case letters, digits and '-', "
            f"at most {max_len} characters, starting and ending alphanumeric); set it with --set {where}=NAME"
        )


def job_spec(cfg: Config) -> JobSpec:
    """Build the neutral job description of `cfg` (validates names, sizes and env first)."""
    job = cfg.job
    # The TrainJob's JobSet prefixes pod names with `<name>-node-0-`; keep room for it.
    _check_name(job.name, "job.name", max_len=40)
    _check_name(job.namespace, "job.namespace")
    _check_name(job.service_account, "job.service_account", max_len=253)
    _check_name(job.data_pvc, "job.data_pvc", max_len=253)
    _check_name(job.checkpoint_pvc, "job.checkpoint_pvc", max_len=253)
    if job.mlflow_secret is not None:
        _check_name(job.mlflow_secret, "job.mlflow_secret", max_len=253)
    for secret in job.extra_secrets:
        _check_name(secret, f"job.extra_secrets.{secret}", max_len=253)
    clash = sorted(RESERVED_ENV & set(job.env))
    if clash:
        raise UserError(
            f"job.env: {', '.join(clash)} are set by the training operator for torchrun; remove them"
        )
    for key in ("RECSYS_JOB_NAME", "RECSYS_IMAGE", "MLFLOW_TRACKING_URI", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        if key in job.env:
            raise UserError(f"job.env: {key} is set by recsys from the job section; remove it")
    size = job_size(job)  # the one reading of nodes × processes × GPUs, shared with every backend
    requests = {"cpu": job.cpu, "memory": job.memory}
    limits = {"memory": job.memory}
    if size.gpus_per_node:
        requests["nvidia.com/gpu"] = str(size.gpus_per_node)
        limits["nvidia.com/gpu"] = str(size.gpus_per_node)
    grace = preemption_grace(cfg)
    env = [
        ("MLFLOW_TRACKING_URI", job.mlflow_tracking_uri),
        ("RECSYS_JOB_NAME", job.name),
        ("RECSYS_IMAGE", job.image),
        # torchrun waits this long for its workers after forwarding SIGTERM, then SIGKILLs them.
        ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace["torchrun_shutdown_s"])),
        *sorted(job.env.items()),
    ]
    config_map = f"{job.name}-config"
    volumes = [
        Volume("config", CONFIG_DIR, "configmap", config_map, read_only=True),
        Volume("data", DATA_MOUNT, "pvc", job.data_pvc),
        Volume("checkpoints", CHECKPOINT_MOUNT, "pvc", job.checkpoint_pvc),
        Volume("dshm", SHM_MOUNT, "shm", job.shm_size),
        # The root filesystem is read-only; the trainer and its libraries write temp files here only.
        Volume("tmp", TMP_MOUNT, "scratch", TMP_SIZE),
    ]
    tolerations = [t.model_dump(exclude_none=True) for t in job.tolerations]
    labels = {
        "app.kubernetes.io/name": "recsys",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/instance": job.name,
    }
    return JobSpec(
        name=job.name,
        namespace=job.namespace,
        image=job.image,
        command=list(TRAIN_COMMAND),
        nodes=size.nodes,
        nproc_per_node=size.procs_per_node,
        gpus_per_node=size.gpus_per_node,
        requests=requests,
        limits=limits,
        env=env,
        secret=job.mlflow_secret,
        secret_keys=list(job.mlflow_secret_keys),
        config_map=config_map,
        config_yaml=dump_config(cluster_config(cfg)),
        volumes=volumes,
        node_selector=dict(job.node_selector),
        tolerations=tolerations,
        service_account=job.service_account,
        # The operator fails the job once its pods' restarts add up to backoffLimit, and with static
        # rendezvous one failed pod takes every pod down: count restarts per tolerated failure.
        backoff_limit=job.backoff_limit * job.nodes + 1 if job.backoff_limit else 0,
        ttl_seconds_after_finished=job.ttl_seconds_after_finished,
        labels=labels,
        # Istio sidecars keep pods from completing and intercept the rendezvous port.
        annotations={"sidecar.istio.io/inject": "false"},
        model_kind=cfg.model.kind,
        config_name=cfg.name,
        extra_secrets={k: list(v) for k, v in job.extra_secrets.items()},
        termination_grace_s=grace["pod_s"],
    )


#: Seconds between the trainer's own deadline and torchrun's SIGKILL, and between that and the pod's.
GRACE_MARGIN_S = 5


def preemption_grace(cfg: Config) -> dict[str, int]:
    """The shutdown chain after SIGTERM: the trainer checkpoints and exits within preempt_grace_s,
    torchrun SIGKILLs its workers 5 s later, the kubelet SIGKILLs the pod 5 s after that."""
    trainer = math.ceil(cfg.train.checkpoint.preempt_grace_s)
    return {
        "trainer_s": trainer,
        "torchrun_shutdown_s": trainer + GRACE_MARGIN_S,
        "pod_s": trainer + 2 * GRACE_MARGIN_S,
    }
