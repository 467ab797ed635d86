"""Every manifest passes the API models field by field; an unknown field or a wrong type anywhere fails.

Models: the kubernetes client's (core kinds, plus kubernetes-validate's offline schemas), kubeflow-training
1.9.4's KubeflowOrgV1PyTorchJob, kubeflow-trainer-api 2.3.0's TrainerV1alpha1TrainJob. The CPU overlay is
built (JSON6902 patches applied with the jsonpatch library, and with `kubectl kustomize` where installed)
and validated the same way.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from recsys.config import load_config
from recsys.launch.kube import render_objects
from recsys.launch.kubeschema import validation_errors

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


APPLIED = sorted(
    p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml" and "overlays" not in p.parts
)


@pytest.mark.parametrize("path", APPLIED, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_manifest_is_valid(path: Path) -> None:
    docs = _load(path)
    assert docs
    for doc in docs:
        assert validation_errors(doc) == []


# ------------------------------------------------------------------------ injected faults must fail
def _job(backend: str) -> dict[str, Any]:
    return render_objects(load_config("dlrm_synth", ["job.nodes=2", "job.gpus_per_node=1"]), backend)[1]  # type: ignore[arg-type]


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]
    node = doc
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return doc


V1_POD = "spec/pytorchReplicaSpecs/Master/template/spec"
V1_C = f"{V1_POD}/containers/0"
V2_POD = (
    "spec/runtimePatches/0/trainingRuntimeSpec/template/spec/replicatedJobs/0/template/spec/template/spec"
)

FAULTS = [
    # (backend, path, bad value, text the error must contain)
    ("pytorchjob", "spec/nprocPerNodes", "1", "spec.nprocPerNodes: unknown field"),
    ("pytorchjob", "spec/runPolicy/backoffLimits", 2, "runPolicy.backoffLimits: unknown field"),
    ("pytorchjob", f"{V1_POD}/nodeSelectors", {}, "nodeSelectors: unknown field"),
    ("pytorchjob", f"{V1_C}/envFromm", [], "envFromm: unknown field"),
    ("pytorchjob", f"{V1_C}/volumeMounts/0/mountpath", "/x", "mountpath: unknown field"),
    ("pytorchjob", f"{V1_POD}/volumes/3/emptyDir/sizelimit", "1Gi", "sizelimit: unknown field"),
    ("pytorchjob", "spec/nprocPerNode", 1, "nprocPerNode: expected str"),
    ("pytorchjob", "spec/pytorchReplicaSpecs/Worker/replicas", "1", "replicas: expected int"),
    ("pytorchjob", "spec/runPolicy/backoffLimit", True, "backoffLimit: expected int"),
    ("pytorchjob", f"{V1_C}/ports/0/containerPort", "23456", "containerPort: expected int"),
    ("pytorchjob", f"{V1_C}/securityContext/allowPrivilegeEscalation", "false", "expected bool"),
    ("pytorchjob", f"{V1_C}/command", "torchrun", "command: expected a list"),
    ("pytorchjob", f"{V1_C}/env/0/value", 5, "value: expected str"),
    ("pytorchjob", f"{V1_C}/name", None, "name"),  # required field missing
    ("trainjob", "spec/trainer/numNode", 2, "trainer.numNode: unknown field"),
    ("trainjob", "spec/runtimeRef/namespace", "x", "runtimeRef.namespace: unknown field"),
    (
        "trainjob",
        f"{V2_POD}/automountServiceAccountToken",
        False,
        "automountServiceAccountToken: unknown field",
    ),
    ("trainjob", f"{V2_POD}/containers/0/image", "x", "image: unknown field"),
    ("trainjob", f"{V2_POD}/volumes/0/configMap/nam", "x", "nam: unknown field"),
    ("trainjob", "spec/trainer/numNodes", "2", "numNodes"),
    ("trainjob", "spec/trainer/command", "torchrun", "command"),
    ("trainjob", "spec/trainer/env/0/value", 5, "value"),
    ("trainjob", "spec/runtimeRef/name", None, "name"),
]


@pytest.mark.parametrize(
    ("backend", "path", "value", "expect"), FAULTS, ids=[f[1] + "=" + repr(f[2]) for f in FAULTS]
)
def test_injected_fault_is_rejected(backend: str, path: str, value: Any, expect: str) -> None:
    good = _job(backend)
    assert validation_errors(good) == []
    errors = validation_errors(_set(good, path, value))
    assert errors, f"{path}={value!r} was accepted"
    assert any(expect in e for e in errors), errors


@pytest.mark.parametrize(
    ("doc", "expect"),
    [
        (
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": 1}},
            "expected str",
        ),
        (
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "label": {}}},
            "metadata.label: unknown",
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"ports": [{"port": "80"}]},
            },
            "port: expected int",
        ),
        ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {}}, "selector"),
        ({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "x"}}, "no API model"),
    ],
)
def test_core_kind_faults_are_rejected(doc: dict[str, Any], expect: str) -> None:
    errors = validation_errors(doc)
    assert any(expect in e for e in errors), errors


def test_kubernetes_validate_is_consulted_for_core_kinds() -> None:
    """targetPort is int-or-string: the client models type it `object` and accept a list; only
    kubernetes-validate's schema rejects it, so this fails unless kubernetes-validate runs."""
    doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "targetPort": [1]}]},
    }
    errors = validation_errors(doc)
    assert errors and all("kubernetes-validate" in e for e in errors), errors


# ---------------------------------------------------------------------------------- the CPU overlay
def build_overlay(root: Path) -> list[dict[str, Any]]:
    """A minimal `kustomize build` for what our overlays use: resources (files or dirs) + JSON6902 patches."""
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "resources", "patches"}, (
        f"unsupported kustomize fields: {set(kust)}"
    )
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        p = (root / res).resolve()
        docs += build_overlay(p) if p.is_dir() else _load(p)
    for patch in kust.get("patches", []):
        ops = jsonpatch.JsonPatch(yaml.safe_load((root / patch["path"]).read_text()))
        target = patch["target"]
        for i, d in enumerate(docs):
            group, _, version = d["apiVersion"].rpartition("/")
            if (
                d["kind"] == target.get("kind", d["kind"])
                and group == target.get("group", group)
                and version == target.get("version", version)
                and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])
            ):
                docs[i] = ops.apply(d)  # raises when a path is missing or a test op fails
    return docs


def test_cpu_overlay_builds_valid_cpu_jobs() -> None:
    docs = build_overlay(MANIFESTS / "overlays/cpu")
    jobs = [d for d in docs if d["kind"] == "PyTorchJob"]
    assert {j["metadata"]["name"] for j in jobs} == {"dlrm", "two-tower"}
    for d in docs:
        assert validation_errors(d) == []
    text = yaml.safe_dump(docs)
    assert "nvidia.com/gpu" not in text
    for j in jobs:
        for rep in j["spec"]["pytorchReplicaSpecs"].values():
            (c,) = rep["template"]["spec"]["containers"]
            assert c["image"].endswith("-cpu")
            assert {e["name"]: e.get("value") for e in c["env"]}["RECSYS_IMAGE"] == c["image"]
    if shutil.which("kubectl"):
        out = subprocess.run(
            [
                "kubectl",
                "kustomize",
                "--load-restrictor",
                "LoadRestrictionsNone",
                str(MANIFESTS / "overlays/cpu"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        assert sorted(_strip(list(yaml.safe_load_all(out))), key=key) == sorted(docs, key=key)


def _strip(docs: list[Any]) -> list[dict[str, Any]]:
    return [d for d in docs if d]


def test_base_kustomization_lists_every_base_file() -> None:
    kust = yaml.safe_load((MANIFESTS / "base/kustomization.yaml").read_text())
    files = {p.name for p in (MANIFESTS / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) <= files
    assert {"namespace.yaml", "rbac.yaml", "pvc.yaml", "mlflow.yaml", "data-prep-job.yaml"} <= set(
        kust["resources"]
    )
    kinds = {d["kind"] for d in build_overlay(MANIFESTS / "base")}
    assert {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "Job",
    } <= kinds
