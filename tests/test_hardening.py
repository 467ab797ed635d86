"""Hardening options: the pipeline's own ServiceAccount and MLflow's basic-auth.

The overlays are built with the real `kubectl kustomize` and every object is validated against the API
models; MLflow's auth is exercised with a real `mlflow server --app-name basic-auth` using the shipped
basic_auth.ini, and a real `recsys train` logs to it with the credentials and is refused without them.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import running_mlflow_server, tiny_dlrm_args

from recsys.config import JobConfig
from recsys.launch.kubeschema import validation_errors

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
AUTH_INI = MANIFESTS / "overlays/mlflow-auth/basic_auth.ini"
ADMIN, PASSWORD = "admin", "test-password-8f3e"
# What the launcher's steps do in the job namespace (pipeline-rbac.yaml's header): nothing else.
LAUNCHER_RESOURCES = {"pytorchjobs", "trainjobs", "configmaps", "pods", "pods/log"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomize(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay (the real kustomize: components and generators included)."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed: the kustomize components cannot be built here")
    out = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


# ------------------------------------------------------------------------------- pipeline identity
def test_pipeline_rbac_is_bound_to_the_dedicated_service_account() -> None:
    role, binding = _docs(MANIFESTS / "base/pipeline-rbac.yaml")
    (sa,) = _docs(MANIFESTS / "overlays/pipeline-sa/serviceaccount.yaml")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]
    assert sa["metadata"]["name"] == "recsys-pipeline" != "pipeline-runner"
    # The steps call the Kubernetes API: the token must be mounted.
    assert sa.get("automountServiceAccountToken", True) is True
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == JobConfig().namespace
    for rule in role["rules"]:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
        assert set(rule["resources"]) <= LAUNCHER_RESOURCES, rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
    # The hardened overlay really contains the ServiceAccount, and the binding still points at it.
    docs = _kustomize("overlays/hardened")
    built = _one(docs, "ServiceAccount", "recsys-pipeline")
    assert built["metadata"]["namespace"] == "kubeflow"
    assert _one(docs, "RoleBinding", "recsys-pipeline-launcher")["subjects"] == binding["subjects"]


# ----------------------------------------------------------------------------------- MLflow's auth
def test_mlflow_auth_overlay_uses_the_jobs_credentials_secret() -> None:
    docs = _kustomize("overlays/hardened")
    for doc in docs:
        assert validation_errors(doc) == [], doc["metadata"]["name"]
    deploy = _one(docs, "Deployment", "mlflow")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in c["command"]
    env = {e["name"]: e for e in c["env"]}
    job = JobConfig()
    for server_key, secret_key in [
        ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
    ]:
        # The admin account is the one the rendered jobs read: same Secret, same key.
        ref = env[server_key]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (job.mlflow_secret, secret_key)
        assert secret_key in job.mlflow_secret_keys
        assert "optional" not in ref  # no Secret, no server: fail closed
    # The settings file is mounted where MLFLOW_AUTH_CONFIG_PATH points, from the generated ConfigMap.
    ini_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(ini_path.parent)]
    (vol,) = [v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    cm = _one(docs, "ConfigMap", vol["configMap"]["name"])
    ini = configparser.ConfigParser()
    ini.read_string(cm["data"][ini_path.name])
    assert "admin_password" not in ini["mlflow"]  # the password lives in the Secret only
    store = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "store")
    assert ini["mlflow"]["database_uri"].startswith(f"sqlite:///{store}/")  # survives restarts (PVC)
    # The committed jobs take the credentials from that Secret (envFrom or per-key secretKeyRef).
    for path in ("dlrm-job.yaml", "two-tower-trainjob.yaml"):
        refs = {
            n.get("secretRef", {}).get("name") or n.get("secretKeyRef", {}).get("name")
            for n in _walk(_docs(MANIFESTS / path))
            if "secretRef" in n or "secretKeyRef" in n
        }
        assert refs == {job.mlflow_secret}, path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server --app-name basic-auth` with the overlay's basic_auth.ini (user store in tmp)."""
    root = tmp_path_factory.mktemp("mlflow_auth")
    ini = configparser.ConfigParser()
    ini.read(AUTH_INI)
    ini["mlflow"]["database_uri"] = f"sqlite:///{root / 'basic_auth.db'}"
    with open(root / "basic_auth.ini", "w") as f:
        ini.write(f)
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-flask-secret",
    }
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        env.pop(key, None)
    with running_mlflow_server(root, ("--app-name", "basic-auth"), env, timeout=180) as uri:
        yield uri


@pytest.mark.slow  # a second MLflow server (~30 s to start) and a short training run
def test_train_logs_with_credentials_and_is_refused_without(
    auth_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    from recsys.cli import main

    args = tiny_dlrm_args(
        tmp_path,
        "train.max_steps=2",
        "tracking.log_model=false",
        f"tracking.uri={auth_server}",
        "tracking.experiment=test-auth",
    )
    assert main(["data", "prepare", *args]) == 0
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    capsys.readouterr()

    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "needs credentials (HTTP 401)" in err[0] and "MLFLOW_TRACKING_USERNAME" in err[0]
    ), err

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused these credentials (HTTP 401)" in err[0], err

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert main(["train", *args, "--resume", "never"]) == 0
    client = mlflow.MlflowClient(auth_server)
    (run,) = client.search_runs([client.get_experiment_by_name("test-auth").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"train/loss", "val/auc", "test/auc"} <= set(run.data.metrics)
