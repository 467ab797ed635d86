"""The Kubernetes backends of the launcher contract (`submit(cfg, "pytorchjob"|"trainjob")` → KubeJob) and
`recsys launch`: the real kubernetes client against a local HTTP server that answers as the API server
does (201 / 403 / 404 / 409 with Status bodies, job status, pod logs, deletes).

No Kubernetes cluster runs here, so this checks the client calls, the error mapping, the handle's
status / wait / logs / delete and the result values (run id from a real MLflow store, failure reason
from the job's condition), not a cluster's behaviour.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from recsys.config import load_config
from recsys.errors import UserError
from recsys.launch.contract import submit
from tests.conftest import free_port


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


class FakeApi:
    """Scripted answers keyed by (method, path prefix); records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.answers: dict[tuple[str, str], Any] = {}
        self.job_states: list[list[dict[str, Any]]] = []

    def answer(self, method: str, path: str) -> tuple[int, Any]:
        for (m, prefix), value in self.answers.items():
            if m == method and path.startswith(prefix):
                return value
        return 404, "404 page not found"


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    fake = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            path = urlparse(self.path).path
            fake.requests.append((self.command, self.path, body))
            code, payload = fake.answer(self.command, path)
            if callable(payload):
                payload = payload(body)
            if isinstance(payload, str):
                data, ctype = payload.encode(), "text/plain"
            else:
                data, ctype = json.dumps(payload).encode(), "application/json"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _reply

        def log_message(self, *args: Any) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "me", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    server.shutdown()


CM = "/api/v1/namespaces/recsys/configmaps"
V1 = "/apis/kubeflow.org/v1/namespaces/recsys/pytorchjobs"
V2 = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/recsys/trainjobs"
PODS = "/api/v1/namespaces/recsys/pods"


def _created(body: Any) -> Any:
    return {**body, "metadata": {**body["metadata"], "uid": "1234-uid"}}


def _cfg() -> Any:
    return load_config("dlrm_synth", ["job.nodes=2"])


def test_crd_not_installed_is_one_clear_line_and_cleans_up(api: FakeApi) -> None:
    api.answers[("POST", CM)] = (201, _created)
    api.answers[("DELETE", CM)] = (200, _status(200, "", ""))  # a real server answers with the object
    # An API group the server does not serve: plain-text 404, as kube-apiserver answers.
    with pytest.raises(UserError, match=r"PyTorchJob API \(kubeflow.org/v1\) is not installed") as e:
        submit(_cfg(), "pytorchjob")
    assert "\n" not in str(e.value)
    assert ("DELETE", f"{CM}/dlrm-config") in [(m, urlparse(p).path) for m, p, _ in api.requests]


def test_trainjob_crd_not_installed(api: FakeApi) -> None:
    api.answers[("POST", CM)] = (201, _created)
    api.answers[("DELETE", CM)] = (200, {})
    with pytest.raises(UserError, match=r"TrainJob API \(trainer.kubeflow.org/v1alpha1\) is not installed"):
        submit(_cfg(), "trainjob")


def test_access_denied(api: FakeApi) -> None:
    msg = 'configmaps is forbidden: User "me" cannot create resource "configmaps" in the namespace "recsys"'
    api.answers[("POST", CM)] = (403, _status(403, "Forbidden", msg))
    with pytest.raises(UserError, match="access denied") as e:
        submit(_cfg(), "pytorchjob")
    assert "cannot create resource" in str(e.value)


def test_job_exists(api: FakeApi) -> None:
    api.answers[("POST", CM)] = (201, _created)
    api.answers[("DELETE", CM)] = (200, {})
    api.answers[("POST", V1)] = (
        409,
        _status(409, "AlreadyExists", 'pytorchjobs.kubeflow.org "dlrm" already exists'),
    )
    with pytest.raises(UserError, match="pytorchjob dlrm already exists in namespace 'recsys'"):
        submit(_cfg(), "pytorchjob")


def test_namespace_missing(api: FakeApi) -> None:
    api.answers[("POST", CM)] = (404, _status(404, "NotFound", 'namespaces "recsys" not found'))
    with pytest.raises(UserError, match="namespace 'recsys' not found"):
        submit(_cfg(), "pytorchjob")


def test_no_cluster_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(UserError, match="no Kubernetes cluster configured"):
        submit(_cfg(), "pytorchjob")


def test_unreachable_api_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens there
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(UserError, match=f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}"):
        submit(_cfg(), "pytorchjob")


def test_cli_prints_one_line_and_exits_2(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import main

    api.answers[("POST", CM)] = (403, _status(403, "Forbidden", "configmaps is forbidden"))
    assert main(["launch", "--backend", "pytorchjob", "--config", "dlrm_synth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recsys: access denied")


def _job_with(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "dlrm"},
            "status": {"conditions": conditions}}  # fmt: skip


def _script_job(api: FakeApi, backend: str, final: dict[str, Any]) -> str:
    """Answers for a job that is created, runs for one poll, then ends with `final`; the jobs path."""
    jobs = V1 if backend == "pytorchjob" else V2
    polls = iter([[{"type": "Running", "status": "True"}], [final]])
    api.answers[("POST", CM)] = (201, _created)
    api.answers[("PATCH", CM)] = (200, _created)
    api.answers[("POST", jobs)] = (201, _created)
    api.answers[("GET", f"{jobs}/dlrm")] = (200, lambda _: _job_with(next(polls, [final])))
    api.answers[("GET", f"{PODS}/dlrm-master-0/log")] = (200, "epoch 1 step 10 loss 0.5\ntraining done\n")
    api.answers[("GET", PODS)] = (
        200,
        {"kind": "PodList", "apiVersion": "v1", "metadata": {},
         "items": [{"metadata": {"name": "dlrm-master-0"}, "status": {"phase": "Running"}}]},
    )  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real SQLite MLflow store holding a run tagged with the job name, as the trainer in the job's
    pods would have left it (one store per module: creating one takes seconds); (uri, run id)."""
    import mlflow

    from recsys.tracking import JOB_TAG

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    cfg = _cfg()
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp, tags={JOB_TAG: cfg.job.name})
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


def _tracked_cfg(tracked: tuple[str, str]) -> tuple[Any, str, str]:
    """The job config with its tracking URI at the `tracked` store; (cfg, uri, run id)."""
    uri, run_id = tracked
    return load_config("dlrm_synth", ["job.nodes=2", f"job.mlflow_tracking_uri={uri}"]), uri, run_id


SUCCEEDED = {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}
FAILED = {
    "type": "Failed",
    "status": "True",
    "reason": "PyTorchJobFailed",
    "message": "PyTorchJob dlrm is failed because 1 Master replica(s) failed.",
}


@pytest.mark.parametrize(
    ("backend", "final", "state", "reason"),
    [
        ("pytorchjob", SUCCEEDED, "Succeeded", ""),
        ("pytorchjob", FAILED, "Failed", "PyTorchJobFailed: PyTorchJob dlrm is failed because 1 Master replica(s) failed."),
        ("trainjob", {"type": "Complete", "status": "True", "reason": "JobSetCompleted"}, "Succeeded", ""),
    ],
)  # fmt: skip
def test_handle_status_logs_wait(
    api: FakeApi, tracked: tuple[str, str], backend: str, final: dict[str, Any], state: str, reason: str
) -> None:
    """submit → status Running → the master's log lines → wait: the state, the reason from the job's
    Failed condition, the run id of the MLflow run tagged with the job name — all values."""
    cfg, _, run_id = _tracked_cfg(tracked)
    jobs = _script_job(api, backend, final)
    handle = submit(cfg, backend)
    handle.poll_s = 0.05  # type: ignore[attr-defined]
    assert handle.status() == "Running"
    assert list(handle.logs(follow=True)) == ["epoch 1 step 10 loss 0.5", "training done"]
    result = handle.wait(30)
    assert (result.backend, result.job_name, result.state, result.reason) == (backend, "dlrm", state, reason)
    assert result.run_id == (run_id if state == "Succeeded" else None)
    assert handle.status() == state
    sent = {(m, urlparse(p).path): b for m, p, b in api.requests}
    assert sent[("POST", CM)]["data"]["config.yaml"].startswith("name: dlrm-synth")
    assert sent[("POST", jobs)]["kind"] == ("PyTorchJob" if backend == "pytorchjob" else "TrainJob")
    owner = sent[("PATCH", f"{CM}/dlrm-config")]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "1234-uid" and owner["name"] == "dlrm"
    selector = next(p for m, p, _ in api.requests if m == "GET" and urlparse(p).path == PODS)
    assert ("job-role%3Dmaster" in selector) == (backend == "pytorchjob")


def test_wait_timeout_is_a_value(api: FakeApi, tracked: tuple[str, str]) -> None:
    cfg, _, _ = _tracked_cfg(tracked)
    _script_job(api, "pytorchjob", {"type": "Running", "status": "True"})
    handle = submit(cfg, "pytorchjob")
    handle.poll_s = 0.05  # type: ignore[attr-defined]
    result = handle.wait(0.2)
    assert (result.state, result.run_id) == ("Running", None) and "still running" in result.reason


def test_delete_removes_job_and_config_map(api: FakeApi, tracked: tuple[str, str]) -> None:
    cfg, _, _ = _tracked_cfg(tracked)
    _script_job(api, "trainjob", SUCCEEDED)
    api.answers[("DELETE", V2)] = (200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
    api.answers[("DELETE", CM)] = (404, _status(404, "NotFound", "already gone"))  # owner GC was first
    submit(cfg, "trainjob").delete()
    deletes = {urlparse(p).path: b for m, p, b in api.requests if m == "DELETE"}
    assert deletes[f"{V2}/dlrm"]["propagationPolicy"] == "Background"
    assert f"{CM}/dlrm-config" in deletes


@pytest.mark.parametrize(("final", "rc"), [(SUCCEEDED, 0), (FAILED, 1)])
def test_cli_wait_logs(
    api: FakeApi, tracked: tuple[str, str], capsys: pytest.CaptureFixture[str], final: dict[str, Any], rc: int
) -> None:
    from recsys.cli import main

    _, uri, run_id = _tracked_cfg(tracked)
    _script_job(api, "pytorchjob", final)
    argv = ["launch", "--backend", "pytorchjob", "--config", "dlrm_synth", "--set", "job.nodes=2"]
    argv += ["--set", f"job.mlflow_tracking_uri={uri}", "--wait", "--logs"]
    import recsys.launch.kubeclient as kc

    real = kc.KubeJob.__init__

    def fast(self: Any, *a: Any, **k: Any) -> None:
        real(self, *a, **k)
        self.poll_s = 0.05

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kc.KubeJob, "__init__", fast)
        assert main(argv) == rc
    out = capsys.readouterr()
    assert "training done" in out.out
    if rc == 0:
        assert f"pytorchjob job dlrm succeeded, MLflow run {run_id}" in out.out
    else:
        assert "recsys: pytorchjob job dlrm failed: PyTorchJobFailed: " in out.err
