"""Kubernetes: render a ConfigMap + PyTorchJob (kubeflow.org/v1) or TrainJob (trainer.kubeflow.org/v1alpha1)
from the one neutral JobSpec and validate it against the API models.

Rendering is pure (Config → dicts → YAML text); submitting and following a job is
recsys/launch/kubeclient.py (the API client). Both kinds run the same
`torchrun -m recsys train --config /etc/recsys/config.yaml`: the operator injects the rendezvous env
(PET_*), so nothing here assembles a topology.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Literal

import yaml

from recsys.config import Config
from recsys.errors import UserError
from recsys.launch.jobspec import JobSpec, Volume, job_spec

Backend = Literal["pytorchjob", "trainjob"]
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
# The v1 operator reads the rendezvous port from the container port of this name (training-operator
# pkg/controller.v1/pytorch/envvar.go getPortFromPyTorchJob); 23456 is its default.
PYTORCHJOB_PORT_NAME = "pytorchjob-port"
PYTORCHJOB_PORT = 23456
PYTORCHJOB_CONTAINER = "pytorch"
# Trainer v2's torch-distributed runtime: its trainer container is `node` in the replicated job `node`.
TRAINJOB_RUNTIME = "torch-distributed"
TRAINJOB_CONTAINER = "node"
TRAINJOB_REPLICATED_JOB = "node"
PATCH_MANAGER = "recsys"


# ------------------------------------------------------------------------------------------- render
def _volumes(spec: JobSpec) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for v in spec.volumes:
        if v.kind == "pvc":
            out.append({"name": v.name, "persistentVolumeClaim": {"claimName": v.source}})
        elif v.kind == "configmap":
            out.append({"name": v.name, "configMap": {"name": v.source}})
        elif v.kind == "scratch":
            out.append({"name": v.name, "emptyDir": {"sizeLimit": v.source}})
        else:
            out.append({"name": v.name, "emptyDir": {"medium": "Memory", "sizeLimit": v.source}})
    return out


def _mounts(volumes: list[Volume]) -> list[dict[str, Any]]:
    return [
        {"name": v.name, "mountPath": v.mount_path, **({"readOnly": True} if v.read_only else {})}
        for v in volumes
    ]


def _pod_security() -> dict[str, Any]:
    from recsys.launch.jobspec import RUN_AS_USER

    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in spec.env]


def _resources(spec: JobSpec) -> dict[str, Any]:
    return {"requests": dict(spec.requests), "limits": dict(spec.limits)}


def _metadata(spec: JobSpec, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.namespace, "labels": dict(spec.labels)}


def config_map(spec: JobSpec) -> dict[str, Any]:
    """The ConfigMap holding the resolved config, mounted at /etc/recsys/config.yaml."""
    from recsys.launch.jobspec import CONFIG_FILE

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec, spec.config_map),
        "data": {CONFIG_FILE: spec.config_yaml},
    }


def _pod_spec_common(spec: JobSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "serviceAccountName": spec.service_account,
        # The trainer never talks to the API server.
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        # SIGTERM → checkpoint → exit 143 within train.checkpoint.preempt_grace_s; then torchrun's and
        # the kubelet's SIGKILL, each 5 s later (jobspec.preemption_grace).
        "terminationGracePeriodSeconds": spec.termination_grace_s,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    return pod


def pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """The PyTorchJob: Master ×1 + Worker ×(nodes−1), so the v1 operator injects MASTER_* and PET_*."""
    container: dict[str, Any] = {
        "name": PYTORCHJOB_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(spec.command),
        "env": _env(spec),
        "ports": [{"name": PYTORCHJOB_PORT_NAME, "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}],
        "resources": _resources(spec),
        "volumeMounts": _mounts(spec.volumes),
        "securityContext": _container_security(),
    }
    if spec.secrets():
        container["envFrom"] = [{"secretRef": {"name": name, "optional": True}} for name, _ in spec.secrets()]
    template = {
        "metadata": {"labels": dict(spec.labels), "annotations": dict(spec.annotations)},
        "spec": {**_pod_spec_common(spec), "containers": [container], "volumes": _volumes(spec)},
    }
    # OnFailure, not ExitCode: the operator's ExitCode retries (exit >= 128) escape runPolicy.backoffLimit
    # and never stop (docs/guides/reliability.md, "Preemption").
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "OnFailure", "template": template}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "nprocPerNode": str(spec.nproc_per_node),
            "runPolicy": {
                "backoffLimit": spec.backoff_limit,
                "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


def trainjob(spec: JobSpec) -> dict[str, Any]:
    """The TrainJob twin on the `torch-distributed` runtime; pod settings go through runtimePatches."""
    env = _env(spec)
    # TrainJob env has no envFrom: pass the credential keys one by one, each optional.
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key, "optional": True}}}
        for name, keys in spec.secrets()
        for key in keys
    ]
    pod_patch = {
        **_pod_spec_common(spec),
        "volumes": _volumes(spec),
        "containers": [
            {
                "name": TRAINJOB_CONTAINER,
                "volumeMounts": _mounts(spec.volumes),
                "securityContext": _container_security(),
            }
        ],
    }
    # Not a field of PodSpecPatch: TrainJob pods take the token setting from their ServiceAccount
    # (recsys-trainer in manifests/base/rbac.yaml turns it off; tests/test_hardening.py checks).
    pod_patch.pop("automountServiceAccountToken")
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
                "name": TRAINJOB_RUNTIME,
            },
            "trainer": {
                "image": spec.image,
                "command": list(spec.command),
                "numNodes": spec.nodes,
                "numProcPerNode": spec.nproc_per_node,
                "resourcesPerNode": _resources(spec),
                "env": env,
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {
                                        "name": TRAINJOB_REPLICATED_JOB,
                                        "template": {
                                            "spec": {
                                                "template": {
                                                    "metadata": {
                                                        "labels": dict(spec.labels),
                                                        "annotations": dict(spec.annotations),
                                                    },
                                                    "spec": pod_patch,
                                                }
                                            }
                                        },
                                    }
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def render_objects(cfg: Config, backend: Backend) -> list[dict[str, Any]]:
    """The documents to apply for `cfg`: the ConfigMap, then the PyTorchJob or TrainJob."""
    spec = job_spec(cfg)
    if backend == "pytorchjob":
        return [config_map(spec), pytorchjob(spec)]
    if backend == "trainjob":
        return [config_map(spec), trainjob(spec)]
    raise UserError(f"--backend {backend!r}: expected pytorchjob or trainjob")


def commands(spec: JobSpec, backend: Backend, path: str) -> dict[str, str]:
    """The Apply / Check / Logs / Clean commands for a rendered file at `path`."""
    ns = spec.namespace
    if backend == "pytorchjob":
        check = f"kubectl -n {ns} get pytorchjob {spec.name} -w"
        logs = f"kubectl -n {ns} logs -f {spec.name}-master-0"
    else:
        check = f"kubectl -n {ns} get trainjob {spec.name} -w"
        logs = f"kubectl -n {ns} logs -f -l {master_selector(spec.name, backend)}"
    return {
        "Apply": f"kubectl apply -f {path}",
        "Check": check,
        "Logs": logs,
        "Clean": f"kubectl delete -f {path}",
    }


def master_selector(name: str, backend: Backend) -> str:
    """Label selector of the master (rank-0) pod of a job."""
    if backend == "pytorchjob":
        return f"training.kubeflow.org/job-name={name},training.kubeflow.org/job-role=master"
    return f"jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0"


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the embedded config) as `|` blocks, so the ConfigMap reads like the config."""

    def ignore_aliases(self, data: Any) -> bool:
        """Write shared sub-trees (Master and Worker templates) out in full: no YAML anchors."""
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """YAML stream of `docs`, keys in the order written."""
    return "---\n".join(
        yaml.dump(d, Dumper=_LiteralDumper, sort_keys=False, width=110, default_flow_style=False)
        for d in docs
    )


def render_text(cfg: Config, backend: Backend, generated_by: str, path: str) -> str:
    """The whole file: the generated-by line, a header with Apply/Check/Logs/Clean, then the documents.

    The documents are validated against the API models first; an invalid manifest is never written.
    """
    from recsys.launch.kubeschema import validate_documents

    docs = render_objects(cfg, backend)
    validate_documents(docs, origin=f"render of {cfg.name} ({backend})")
    spec = job_spec(cfg)
    kind = (
        "PyTorchJob (kubeflow.org/v1)"
        if backend == "pytorchjob"
        else "TrainJob (trainer.kubeflow.org/v1alpha1)"
    )
    size = f"{spec.nodes} node(s) × {spec.nproc_per_node} process(es)"
    size += f", {spec.gpus_per_node} GPU(s) per node" if spec.gpus_per_node else ", CPU only"
    needs = (
        "the Kubeflow Training Operator (v1.9+: PyTorchJob CRD)"
        if backend == "pytorchjob"
        else f"Kubeflow Trainer v2 with the ClusterTrainingRuntime {TRAINJOB_RUNTIME}"
    )
    lines = [
        f"# generated by {generated_by} — do not edit (regenerate: make manifests)",
        f"# {kind} training {cfg.model.kind} from config {cfg.name!r}: {size}.",
        f"# ConfigMap {spec.config_map} holds the resolved config, mounted at /etc/recsys/config.yaml;",
        f"# data is read from PVC {cfg.job.data_pvc} at /data/{cfg.name}, checkpoints go to PVC {cfg.job.checkpoint_pvc},",
        f"# runs are tracked at {cfg.job.mlflow_tracking_uri} (experiment {cfg.tracking.experiment!r}, tag recsys.job_name={spec.name}).",
        f"# Needs {needs}, and manifests/base applied (namespace, PVCs, MLflow, data prep).",
    ]
    if backend == "trainjob":
        lines.append(
            "# Restart limit and TTL come from the runtime (TrainJob has no backoffLimit/ttl fields)."
        )
    width = max(len(k) for k in ("Apply", "Check", "Logs", "Clean")) + 1
    lines += [f"# {k + ':':<{width}} {v}" for k, v in commands(spec, backend, path).items()]
    return "\n".join(lines) + "\n---\n" + to_yaml(docs)


def render_command(config: str, backend: str, overrides: list[str], out: str) -> str:
    """The `recsys render` command line that reproduces a file (written into its first line)."""
    return command_line(["--backend", backend], config, overrides, out)


def command_line(target: list[str], config: str, overrides: list[str], out: str) -> str:
    """`recsys render TARGET --config C [--set …] [-o OUT]`: the line a generated file starts with."""
    argv = ["recsys", "render", *target, "--config", config]
    for o in overrides:
        argv += ["--set", o]
    if out != "-":
        argv += ["-o", out]
    return shlex.join(argv)


def write_rendered(text: str, out: str, what: str) -> None:
    """Write a rendered file to `out` ('-': stdout) and say on stderr what was written."""
    if out == "-":
        sys.stdout.write(text)
        return
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {out}: {what}", file=sys.stderr)


def render_to_file(cfg: Config, backend: Backend, out: str, generated_by: str | None = None) -> None:
    """Render `cfg` for `backend` to `out` ('-' for stdout), validated, with its header."""
    path = out if out != "-" else "<file>"
    text = render_text(cfg, backend, generated_by or f"recsys render --backend {backend}", path)
    write_rendered(text, out, f"ConfigMap + {backend} {cfg.job.name} ({cfg.job.nodes} node(s))")
