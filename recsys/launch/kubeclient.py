"""Kubernetes backend: submit the rendered ConfigMap + PyTorchJob/TrainJob with the kubernetes client and
follow the job through a `KubeJob` handle (status, wait, logs, delete).

Rendering lives in recsys/launch/kube.py and stays pure; this module only talks to the API server. The
job's failure reason is the operator's Failed condition; the run id is the MLflow run tagged
recsys.job_name=<job> (the pods set RECSYS_JOB_NAME), looked up at the job's tracking URI.

Why not the Kubeflow SDK (`kubeflow` 0.5.0, TrainerClient) for TrainJobs: it installs against
requirements/cpu.txt, but (1) `TrainerClient.train()` reads the ClusterTrainingRuntime from the cluster
and builds the TrainJob itself, so what is submitted would no longer be the pure, validated rendering that
`recsys render` writes and manifests/ commits; (2) CustomTrainerContainer has no processes-per-node
field and no option sets `numProcPerNode` (it comes from the runtime), so `job.procs_per_node` /
`job.gpus_per_node` could not keep one meaning; (3) `resources_per_node` sets limits equal to requests
(our pods request CPU without a CPU limit); (4) create errors come back as a bare RuntimeError, and the
403/404/409 answers users act on would need unwrapping; (5) its regular-package `kubeflow/__init__.py`
overwrites the file that kubeflow-training and kubeflow-katib (both pinned) share. Status, logs and
delete are a few calls of the kubernetes client that the PyTorchJob path needs anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from recsys.config import Config
from recsys.errors import UserError
from recsys.launch.jobspec import JobSpec, job_spec
from recsys.launch.kube import (
    PYTORCHJOB,
    PYTORCHJOB_CONTAINER,
    TRAINJOB,
    TRAINJOB_CONTAINER,
    Backend,
    commands,
    master_selector,
    render_objects,
)
from recsys.launch.types import JobResult, State


def load_cluster_config() -> Any:
    """An ApiClient from the in-cluster service account, else the kube config; UserError when neither."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            # The client reads $KUBECONFIG once, at import; read it now so the current value counts.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except (config.ConfigException, FileNotFoundError, TypeError) as e:
            raise UserError(
                "no Kubernetes cluster configured: not in a pod and no usable kube config "
                f"({e}); set KUBECONFIG or `kubectl config use-context`"
            ) from None
    return client.ApiClient()


def api_error(e: Any, what: str, backend: Backend, spec: JobSpec) -> UserError:
    """One clear line for the API errors a user can act on."""
    group, version, _, kind = PYTORCHJOB if backend == "pytorchjob" else TRAINJOB
    try:
        message = json.loads(e.body or "{}").get("message") or e.reason
    except (ValueError, AttributeError):
        message = e.reason
    ns = spec.namespace
    if e.status == 404 and what == "job":
        install = (
            "install the Kubeflow Training Operator"
            if backend == "pytorchjob"
            else "install Kubeflow Trainer v2 and its runtimes"
        )
        return UserError(
            f"the {kind} API ({group}/{version}) is not installed on this cluster ({message}): {install}, "
            f"or use --backend {'trainjob' if backend == 'pytorchjob' else 'pytorchjob'}"
        )
    if e.status == 404:
        return UserError(
            f"namespace {ns!r} not found ({message}): kubectl apply -k manifests/base, or set job.namespace"
        )
    if e.status == 403:
        return UserError(
            f"access denied creating the {what} in namespace {ns!r}: {message}; "
            "ask for the recsys-launcher Role (manifests/base/rbac.yaml) or use a context that has it"
        )
    if e.status == 409:
        obj = f"{kind.lower()} {spec.name}" if what == "job" else f"configmap {spec.config_map}"
        return UserError(
            f"{obj} already exists in namespace {ns!r}: delete it "
            f"(kubectl -n {ns} delete {kind.lower()} {spec.name}; kubectl -n {ns} delete configmap "
            f"{spec.config_map}) or choose another --set job.name=…"
        )
    return UserError(f"creating the {what} failed: HTTP {e.status} {message}")


def job_outcome(obj: dict[str, Any], backend: Backend) -> tuple[str, str] | None:
    """('Succeeded'|'Failed', 'reason: message') once the job has finished, else None."""
    done = {"Succeeded": "Succeeded", "Complete": "Succeeded", "Failed": "Failed"}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        outcome = done.get(cond.get("type", ""))
        if outcome and str(cond.get("status")) == "True":
            return outcome, ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
    return None


class KubeJob:
    """A submitted PyTorchJob or TrainJob (and its ConfigMap)."""

    def __init__(self, api: Any, spec: JobSpec, backend: Backend, tracking: tuple[str, str]) -> None:
        from kubernetes import client

        self.backend: str = backend
        self.name = spec.name
        self.spec = spec
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.host = api.configuration.host
        self.group, self.version, self.plural, self.kind = PYTORCHJOB if backend == "pytorchjob" else TRAINJOB
        self.tracking_uri, self.experiment = tracking
        self.poll_s = 5.0

    def _get(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            self.group, self.version, self.spec.namespace, self.plural, self.name
        )

    def status(self) -> State:
        """From the job's conditions: Succeeded/Failed once finished, Running once a pod runs, else Pending."""
        obj = self._get()
        outcome = job_outcome(obj, self.backend)  # type: ignore[arg-type]
        if outcome is not None:
            return "Succeeded" if outcome[0] == "Succeeded" else "Failed"
        conds = (obj.get("status") or {}).get("conditions") or []
        running = any(c.get("type") == "Running" and str(c.get("status")) == "True" for c in conds)
        return "Running" if running else "Pending"

    def _run_id(self) -> tuple[str | None, str]:
        from recsys.tracking import find_run_by_job

        try:
            run_id = find_run_by_job(self.tracking_uri, self.experiment, self.name)
        except Exception as e:  # an unreachable tracking server must not hide the job's outcome
            return None, f"MLflow run lookup at {self.tracking_uri} failed: {type(e).__name__}: {e}"
        if run_id is None:
            return None, f"no MLflow run tagged recsys.job_name={self.name} in {self.experiment!r}"
        return run_id, ""

    def wait(self, timeout: float | None = None) -> JobResult:
        """Poll the job until it finishes (or `timeout`); the reason is the Failed condition's."""
        from urllib3.exceptions import HTTPError

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                outcome = job_outcome(self._get(), self.backend)  # type: ignore[arg-type]
                if outcome is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    return JobResult(
                        self.backend, self.name, "Running", reason=f"still running after {timeout:.0f}s"
                    )
                time.sleep(self.poll_s)
        except HTTPError as e:
            raise UserError(f"cannot reach the Kubernetes API server at {self.host}: {e}") from None
        state, detail = outcome
        if state == "Failed":
            return JobResult(self.backend, self.name, "Failed", reason=detail or "no reason given")
        run_id, note = self._run_id()
        return JobResult(self.backend, self.name, "Succeeded", run_id, note)

    def _master_pod(self, timeout_s: float) -> str | None:
        selector = master_selector(self.name, self.backend)  # type: ignore[arg-type]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pods = self.core.list_namespaced_pod(self.spec.namespace, label_selector=selector).items
            started = [p for p in pods if p.status and p.status.phase in ("Running", "Succeeded", "Failed")]
            if started:
                return started[0].metadata.name
            time.sleep(min(2.0, self.poll_s))
        return None

    def logs(self, follow: bool = False, start_timeout_s: float = 900) -> Iterator[str]:
        """The master (rank-0) pod's log lines, once it has started; with `follow`, streamed to its end."""
        from kubernetes.client.exceptions import ApiException

        pod = self._master_pod(start_timeout_s)
        if pod is None:
            yield f"recsys: the master pod of {self.name} did not start within {start_timeout_s:.0f}s"
            return
        container = PYTORCHJOB_CONTAINER if self.backend == "pytorchjob" else TRAINJOB_CONTAINER
        try:
            resp = self.core.read_namespaced_pod_log(
                pod, self.spec.namespace, container=container, follow=follow, _preload_content=False
            )
            pending = ""
            for chunk in resp.stream(4096):
                *lines, pending = (pending + chunk.decode(errors="replace")).split("\n")
                yield from lines
            if pending:
                yield pending
        except ApiException as e:
            yield f"recsys: cannot read the logs of {pod}: HTTP {e.status} {e.reason}"

    def delete(self) -> None:
        """Delete the job (its pods go with it) and its ConfigMap; already gone is fine."""
        from kubernetes.client.exceptions import ApiException

        body = {"propagationPolicy": "Background"}
        for call in (
            lambda: self.custom.delete_namespaced_custom_object(
                self.group, self.version, self.spec.namespace, self.plural, self.name, body=body
            ),
            lambda: self.core.delete_namespaced_config_map(self.spec.config_map, self.spec.namespace),
        ):
            try:
                call()
            except ApiException as e:
                if e.status != 404:
                    raise UserError(f"deleting {self.kind} {self.name}: HTTP {e.status} {e.reason}") from None


def _link_config_map(job: KubeJob, created: dict[str, Any]) -> None:
    """Make the job own its ConfigMap, so deleting the job deletes the ConfigMap too."""
    from kubernetes.client.exceptions import ApiException

    uid = (created.get("metadata") or {}).get("uid", "")
    if not uid:
        return
    owner = {"apiVersion": f"{job.group}/{job.version}", "kind": job.kind, "name": job.name, "uid": uid,
             "controller": False, "blockOwnerDeletion": False}  # fmt: skip
    try:
        job.core.patch_namespaced_config_map(
            job.spec.config_map, job.spec.namespace, {"metadata": {"ownerReferences": [owner]}}
        )
    except ApiException as e:
        print(f"recsys: note: could not link the ConfigMap to the job (HTTP {e.status})", file=sys.stderr)


def submit_kube(cfg: Config, backend: Backend) -> KubeJob:
    """Create the ConfigMap and the job exactly as `recsys render` writes them (validated first)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from recsys.launch.kubeschema import validate_documents

    spec = job_spec(cfg)
    cm, obj = render_objects(cfg, backend)
    validate_documents([cm, obj], origin=f"launch of {cfg.name} ({backend})")
    api = load_cluster_config()
    job = KubeJob(api, spec, backend, (cfg.job.mlflow_tracking_uri, cfg.tracking.experiment))
    try:
        try:
            job.core.create_namespaced_config_map(spec.namespace, cm)
        except ApiException as e:
            raise api_error(e, "configmap", backend, spec) from None
        try:
            created = job.custom.create_namespaced_custom_object(
                job.group, job.version, spec.namespace, job.plural, obj
            )
        except ApiException as e:
            # Leave nothing half-made behind: the ConfigMap belongs to the job that could not be created.
            with contextlib.suppress(ApiException):
                job.core.delete_namespaced_config_map(spec.config_map, spec.namespace)
            raise api_error(e, "job", backend, spec) from None
        _link_config_map(job, created)
    except HTTPError as e:
        raise UserError(f"cannot reach the Kubernetes API server at {job.host}: {e}") from None
    print(
        f"created {job.kind} {spec.namespace}/{spec.name} ({spec.nodes} node(s) × {spec.nproc_per_node}) "
        f"and ConfigMap {spec.config_map}; watch: {commands(spec, backend, '-')['Check']}",
        file=sys.stderr,
    )
    return job
