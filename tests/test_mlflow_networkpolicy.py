"""The committed NetworkPolicies, evaluated against every rendered pod that talks to MLflow.

No cluster runs here, so the selectors are evaluated as Kubernetes does (podSelector/namespaceSelector
with matchLabels and matchExpressions; a `from` peer without namespaceSelector means the policy's own
namespace): the MLflow server pod must be selected, and each client pod — committed PyTorchJobs and
TrainJobs, data-prep Jobs, batch-recommend jobs, Kubeflow Pipelines steps — must be admitted on the
server's port, while other pods of the namespace are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys.config import load_config
from recsys.retrieval.batch import BatchJob, render_batch_job

REPO = Path(__file__).resolve().parents[1]
MLFLOW_PORT = 5000
# What the KFP v2 backend labels every step (executor) pod with at run time, in the run's namespace
# (`kubeflow` on a single-user install): the compiled YAML cannot carry it.
KFP_STEP_LABELS = {"pipelines.kubeflow.org/v2_component": "true"}
KFP_NAMESPACE = "kubeflow"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def _all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted((REPO / "manifests").rglob("*.yaml")) for d in _docs(p)]


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """True when a LabelSelector matches `labels` ({} selects everything, as in Kubernetes)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def admits(policy: dict[str, Any], labels: dict[str, str], namespace: str, port: int) -> bool:
    """True when one ingress rule of `policy` lets a pod (`labels` in `namespace`) reach `port`."""
    own_ns = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            return True  # no `from`: every source
        for peer in peers:
            if "ipBlock" in peer:
                continue
            ns_ok = (
                selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
                if "namespaceSelector" in peer
                else namespace == own_ns
            )
            if ns_ok and selects(peer.get("podSelector"), labels):
                return True
    return False


def _mlflow_policies() -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The MLflow server pod's labels and the NetworkPolicies that select it."""
    (server,) = [
        d for p, d in _all_docs() if d.get("kind") == "Deployment" and d["metadata"]["name"] == "mlflow"
    ]
    server_labels = server["spec"]["template"]["metadata"]["labels"]
    policies = [
        d
        for _, d in _all_docs()
        if d.get("kind") == "NetworkPolicy"
        and d["metadata"]["namespace"] == server["metadata"]["namespace"]
        and selects(d["spec"]["podSelector"], server_labels)
    ]
    assert policies, "no NetworkPolicy selects the MLflow server pod"
    return server_labels, policies


def _pod_templates(doc: dict[str, Any]) -> list[tuple[dict[str, str], str]]:
    """(labels, namespace) of each pod a job object creates."""
    kind = doc.get("kind")
    if kind not in ("PyTorchJob", "TrainJob", "Job"):
        return []
    ns = doc["metadata"].get("namespace", "default")
    if kind == "PyTorchJob":
        return [
            (r["template"]["metadata"]["labels"], ns) for r in doc["spec"]["pytorchReplicaSpecs"].values()
        ]
    if kind == "TrainJob":
        out = []
        for patch in doc["spec"].get("runtimePatches", []):
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                out.append((job["template"]["spec"]["template"]["metadata"]["labels"], ns))
        return out
    return [(doc["spec"]["template"]["metadata"]["labels"], ns)]


def _client_pods() -> list[tuple[str, dict[str, str], str]]:
    """(what, labels, namespace) of every rendered pod that talks to MLflow."""
    pods = []
    for path, doc in _all_docs():
        for labels, ns in _pod_templates(doc):
            pods.append((f"{path.relative_to(REPO)} {doc['kind']}/{doc['metadata']['name']}", labels, ns))
    cfg = load_config("two_tower_synth", ["job.nodes=2"])
    for backend in ("pytorchjob", "trainjob"):
        docs = render_batch_job(cfg, BatchJob("abc123", "http://x", k=10), backend, "/data/recs/abc123")
        pods += [(f"batch recommend {backend}", labels, ns) for d in docs for labels, ns in _pod_templates(d)]
    compiled = _docs(REPO / "pipelines/recsys_pipeline.yaml")
    executors = compiled[0]["deploymentSpec"]["executors"]
    pods += [(f"pipeline step {name}", dict(KFP_STEP_LABELS), KFP_NAMESPACE) for name in executors]
    return pods


def test_every_pod_that_talks_to_mlflow_is_admitted() -> None:
    _, policies = _mlflow_policies()
    pods = _client_pods()
    kinds = {what.split(" ")[0] for what, _, _ in pods}
    assert {"batch", "pipeline"} <= kinds and any("TrainJob" in w for w, _, _ in pods)
    assert any("data-prep" in w for w, _, _ in pods) and any("PyTorchJob" in w for w, _, _ in pods)
    denied = [
        what for what, labels, ns in pods if not any(admits(p, labels, ns, MLFLOW_PORT) for p in policies)
    ]
    assert not denied, f"the MLflow NetworkPolicy does not admit: {denied}"


@pytest.mark.parametrize(
    ("labels", "namespace"),
    [
        ({"app.kubernetes.io/name": "recsys", "app.kubernetes.io/component": "serving"}, "recsys"),
        ({"app": "something-else"}, "recsys"),
        ({"app.kubernetes.io/component": "trainer"}, "default"),  # a trainer label, another namespace
        (dict(KFP_STEP_LABELS), "recsys-other"),
    ],
)
def test_other_pods_are_not_admitted(labels: dict[str, str], namespace: str) -> None:
    _, policies = _mlflow_policies()
    assert not any(admits(p, labels, namespace, MLFLOW_PORT) for p in policies)


def test_serving_pods_need_no_mlflow() -> None:
    """KServe serving loads the model's files from storageUri, so its pods are not MLflow clients
    (and stay outside the policy): the InferenceService carries no tracking URI or credentials."""
    from recsys.launch.kserve import inference_service

    doc = inference_service(load_config("two_tower_synth"), "pvc://recsys-models/tt/1")
    model = doc["spec"]["predictor"]["model"]
    assert "env" not in model and "envFrom" not in model and model["storageUri"] == "pvc://recsys-models/tt/1"
    assert "mlflow-credentials" not in yaml.safe_dump(doc) and ":5000" not in yaml.safe_dump(doc)
