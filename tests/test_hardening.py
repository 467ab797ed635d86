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
SERVER_SECRET = "mlflow-server"  # the MLflow server's own Secret (admin account, Flask key)
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
def test_mlflow_auth_overlay_keeps_server_secrets_from_the_jobs() -> None:
    docs = _kustomize("overlays/hardened")
    for doc in docs:
        assert validation_errors(doc) == [], doc["metadata"]["name"]
    deploy = _one(docs, "Deployment", "mlflow")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in c["command"]
    env = {e["name"]: e for e in c["env"]}
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        # The admin account and the Flask key come from the server's own Secret, not the jobs'.
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (SERVER_SECRET, key)
        assert "optional" not in ref  # no Secret, no server: fail closed
    # Only the server and the job-account setup read the server's Secret.
    readers = {
        d["metadata"]["name"]
        for d in docs
        for n in _walk(d)
        if n.get("secretKeyRef", {}).get("name") == SERVER_SECRET
        or n.get("secretRef", {}).get("name") == SERVER_SECRET
    }
    assert readers == {"mlflow", "mlflow-job-user"}
    # The setup Job signs in as the admin and creates the account named in the jobs' Secret.
    setup = _one(docs, "Job", "mlflow-job-user")["spec"]["template"]["spec"]
    (sc,) = setup["containers"]
    senv = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in sc["env"] if "valueFrom" in e}
    job = JobConfig()
    assert (senv["RECSYS_JOB_MLFLOW_USERNAME"]["name"], senv["RECSYS_JOB_MLFLOW_USERNAME"]["key"]) == (
        job.mlflow_secret,
        "MLFLOW_TRACKING_USERNAME",
    )
    assert senv["MLFLOW_TRACKING_USERNAME"]["name"] == SERVER_SECRET
    assert sc["command"][:3] == ["python", "-m", "recsys.launch.mlflow_users"]
    assert setup["automountServiceAccountToken"] is False
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
    # The committed jobs take the credentials from the jobs' Secret only (envFrom or per-key secretKeyRef).
    for path in ("dlrm-job.yaml", "two-tower-trainjob.yaml"):
        refs = {
            n.get("secretRef", {}).get("name") or n.get("secretKeyRef", {}).get("name")
            for n in _walk(_docs(MANIFESTS / path))
            if "secretRef" in n or "secretKeyRef" in n
        }
        assert refs == {job.mlflow_secret}, path


def test_trainjob_pods_get_no_service_account_token() -> None:
    """PodSpecPatch has no automountServiceAccountToken, so TrainJob pods take it from their
    ServiceAccount: every committed job must run as one that turns the token off."""
    accounts = {
        d["metadata"]["name"]: d
        for p in (MANIFESTS / "base").glob("*.yaml")
        for d in _docs(p)
        if d.get("kind") == "ServiceAccount" and d["metadata"].get("namespace") == "recsys"
    }
    jobs = [
        d
        for p in MANIFESTS.rglob("*.yaml")
        for d in _docs(p)
        if isinstance(d, dict) and d.get("kind") in ("TrainJob", "PyTorchJob")
    ]
    assert any(d["kind"] == "TrainJob" for d in jobs)
    for doc in jobs:
        for pod in _walk(doc):
            if "serviceAccountName" not in pod:
                continue
            account = accounts[pod["serviceAccountName"]]
            assert (
                account.get("automountServiceAccountToken") is False
                or pod.get("automountServiceAccountToken") is False
            ), doc["metadata"]["name"]
            if doc["kind"] == "PyTorchJob":
                assert pod["automountServiceAccountToken"] is False
    assert accounts[JobConfig().service_account]["automountServiceAccountToken"] is False


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


@pytest.mark.slow  # shares the basic-auth server above
def test_the_job_account_logs_but_cannot_administer(
    auth_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from recsys.launch.mlflow_users import main

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    admin_client = mlflow.MlflowClient(auth_server)
    admins = admin_client.create_experiment("made-by-admin")
    monkeypatch.setenv("RECSYS_JOB_MLFLOW_USERNAME", "recsys-jobs")
    monkeypatch.setenv("RECSYS_JOB_MLFLOW_PASSWORD", "job-password-1")
    assert main(["--tracking-uri", auth_server]) == 0
    monkeypatch.setenv("RECSYS_JOB_MLFLOW_PASSWORD", "job-password-2")
    assert main(["--tracking-uri", auth_server]) == 0  # again: the password is rotated, grants kept
    assert AuthServiceClient(auth_server).get_user("recsys-jobs").is_admin is False

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "recsys-jobs")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "job-password-2")
    client = mlflow.MlflowClient(auth_server)
    for exp in (admins, client.create_experiment("made-by-job")):
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "m", 1.0, step=1)
        client.set_terminated(run.info.run_id)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    auth = AuthServiceClient(auth_server)
    with pytest.raises(MlflowException, match="403|PERMISSION_DENIED|Permission denied"):
        auth.create_user("intruder", "pw-123456")
    with pytest.raises(MlflowException, match="403|PERMISSION_DENIED|Permission denied"):
        auth.update_user_admin("recsys-jobs", True)
    with pytest.raises(MlflowException, match="403|PERMISSION_DENIED|Permission denied"):
        auth.delete_user(ADMIN)
    # The job account is not the admin: the setup refuses to hand the admin to the jobs.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("RECSYS_JOB_MLFLOW_USERNAME", ADMIN)
    assert main(["--tracking-uri", auth_server]) == 2
