"""`recsys launch --backend pytorchjob|trainjob`: the real kubernetes client against a local HTTP server
that answers as the API server does (201 / 403 / 404 / 409 with Status bodies, job status, pod logs).

No Kubernetes cluster runs here, so this checks the client calls, the error mapping and the wait/logs
loop, not a cluster's behaviour.
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
from recsys.launch.kube import launch_kube
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
        launch_kube(_cfg(), "pytorchjob", wait=False, logs=False)
    assert "\n" not in str(e.value)
    assert ("DELETE", f"{CM}/dlrm-config") in [(m, urlparse(p).path) for m, p, _ in api.requests]


def test_trainjob_crd_not_installed(api: FakeApi) -> None:
    api.answers[("POST", CM)] = (201, _created)
    api.answers[("DELETE", CM)] = (200, {})
    with pytest.raises(UserError, match=r"TrainJob API \(trainer.kubeflow.org/v1alpha1\) is not installed"):
        launch_kube(_cfg(), "trainjob", wait=False, logs=False)


def test_access_denied(api: FakeApi) -> None:
    msg = 'configmaps is forbidden: User "me" cannot create resource "configmaps" in the namespace "recsys"'
    api.answers[("POST", CM)] = (403, _status(403, "Forbidden", msg))
    with pytest.raises(UserError, match="access denied") as e:
        launch_kube(_cfg(), "pytorchjob", wait=False, logs=False)
    assert "cannot create resource" in str(e.value)


def test_job_exists(api: FakeApi) -> None:
    api.answers[("POST", CM)] = (201, _created)
    api.answers[("DELETE", CM)] = (200, {})
    api.answers[("POST", V1)] = (
        409,
        _status(409, "AlreadyExists", 'pytorchjobs.kubeflow.org "dlrm" already exists'),
    )
    with pytest.raises(UserError, match="pytorchjob dlrm already exists in namespace 'recsys'"):
        launch_kube(_cfg(), "pytorchjob", wait=False, logs=False)


def test_namespace_missing(api: FakeApi) -> None:
    api.answers[("POST", CM)] = (404, _status(404, "NotFound", 'namespaces "recsys" not found'))
    with pytest.raises(UserError, match="namespace 'recsys' not found"):
        launch_kube(_cfg(), "pytorchjob", wait=False, logs=False)


def test_no_cluster_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(UserError, match="no Kubernetes cluster configured"):
        launch_kube(_cfg(), "pytorchjob", wait=False, logs=False)


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
        launch_kube(_cfg(), "pytorchjob", wait=False, logs=False)


def test_cli_prints_one_line_and_exits_2(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import main

    api.answers[("POST", CM)] = (403, _status(403, "Forbidden", "configmaps is forbidden"))
    assert main(["launch", "--backend", "pytorchjob", "--config", "dlrm_synth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recsys: access denied")


def _job_with(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "dlrm"},
            "status": {"conditions": conditions}}  # fmt: skip


@pytest.mark.parametrize(
    ("backend", "final", "rc", "expect"),
    [
        (
            "pytorchjob",
            {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"},
            0,
            "succeeded",
        ),
        (
            "pytorchjob",
            {
                "type": "Failed",
                "status": "True",
                "reason": "PyTorchJobFailed",
                "message": "PyTorchJob dlrm is failed because 1 Master replica(s) failed.",
            },
            1,
            "1 Master replica(s) failed",
        ),  # fmt: skip
        ("trainjob", {"type": "Complete", "status": "True", "reason": "JobSetCompleted"}, 0, "succeeded"),
    ],
)
def test_wait_and_logs(
    api: FakeApi,
    capsys: pytest.CaptureFixture[str],
    backend: str,
    final: dict[str, Any],
    rc: int,
    expect: str,
) -> None:
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
    assert launch_kube(_cfg(), backend, wait=True, logs=True, poll_s=0.05, timeout_s=30) == rc  # type: ignore[arg-type]
    out = capsys.readouterr()
    assert "training done" in out.out
    assert expect in (out.out + out.err)
    sent = {(m, urlparse(p).path): b for m, p, b in api.requests}
    assert sent[("POST", CM)]["data"]["config.yaml"].startswith("name: dlrm-synth")
    assert sent[("POST", jobs)]["kind"] == ("PyTorchJob" if backend == "pytorchjob" else "TrainJob")
    owner = sent[("PATCH", f"{CM}/dlrm-config")]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "1234-uid" and owner["name"] == "dlrm"
    selector = next(p for m, p, _ in api.requests if m == "GET" and urlparse(p).path == PODS)
    assert ("job-role%3Dmaster" in selector) == (backend == "pytorchjob")
