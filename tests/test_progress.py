"""TrainJob progress (recsys/progress.py) against a local HTTPS status server that behaves like Kubeflow
Trainer's: TLS with its own CA, a bearer token read from a file, the UpdateTrainJobStatusRequest schema
(kubeflow-trainer-api's model, strict), 401/422 otherwise. A real `recsys train` reports to it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_dlrm_args

from recsys.progress import ENV_CA_CERT, ENV_TOKEN, ENV_URL, StatusReporter

STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/recsys/trainjobs/tiny/status"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-token"
STATUS_KEYS = {"progressPercentage", "estimatedRemainingSeconds", "metrics", "lastUpdatedTime"}


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A CA-flagged self-signed certificate for 127.0.0.1 (it is its own CA bundle) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeflow-trainer-controller-manager")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "ca.crt", folder / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def _problem(body: bytes) -> str | None:
    """Why the status server would reject `body` (None: accepted)."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_update_train_job_status_request import (
        TrainerV1alpha1UpdateTrainJobStatusRequest as Request,
    )

    doc = json.loads(body)
    if set(doc) != {"trainerStatus"} or not set(doc["trainerStatus"]) <= STATUS_KEYS:
        return f"unknown fields: {doc}"
    status = doc["trainerStatus"]
    Request.model_validate(doc, strict=False)  # raises on a wrong type (StrictInt percent, str values)
    if not 0 <= status["progressPercentage"] <= 100:
        return "progressPercentage out of range"
    if status.get("estimatedRemainingSeconds", 0) < 0:
        return "negative estimatedRemainingSeconds"
    if not all(isinstance(m["value"], str) for m in status.get("metrics", [])):
        return "metric values must be strings"
    dt.datetime.fromisoformat(status["lastUpdatedTime"])  # RFC 3339
    return None


@dataclass
class StatusServer:
    """What the test server saw."""

    url: str
    ca_cert: Path
    token_file: Path
    reports: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    # Called on each accepted report; what it returns is kept beside the report (in `seen`).
    on_report: Any = None
    seen: list[Any] = field(default_factory=list)


@pytest.fixture
def status_server(tmp_path: Path) -> Iterator[StatusServer]:
    """A local HTTPS server checking token and payload like the Trainer's status endpoint."""
    cert, key = _self_signed(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != STATUS_PATH:
                return self._answer(404, f"no route {self.path}")
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._answer(401, "invalid bearer token")
            if self.headers.get("Content-Type") != "application/json":
                return self._answer(415, "want application/json")
            try:
                problem = _problem(body)
            except Exception as e:  # noqa: BLE001 -- any parse/validation error is a 422
                problem = f"{type(e).__name__}: {e}"
            if problem:
                return self._answer(422, problem)
            srv.reports.append(json.loads(body)["trainerStatus"])
            srv.seen.append(srv.on_report() if srv.on_report else None)
            self._answer(200, body.decode())

        def _answer(self, code: int, text: str) -> None:
            if code != 200:
                srv.rejected.append(f"{code} {text}")
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    srv = StatusServer(f"https://127.0.0.1:{httpd.server_address[1]}{STATUS_PATH}", cert, token_file)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        httpd.shutdown()
        httpd.server_close()


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_reporter_sends_valid_reports_rate_limited_and_a_final_100(status_server: StatusServer) -> None:
    rep = StatusReporter(status_server.url, str(status_server.ca_cert), str(status_server.token_file), 60.0)
    rep.update(1, 10, {"train/loss": 0.7})
    _wait_for(lambda: status_server.reports)
    rep.update(2, 10, {"train/loss": 0.6})  # within the interval: only remembered
    rep.finish(10, 10)
    assert status_server.rejected == []
    first, last = status_server.reports
    assert first["progressPercentage"] == 10
    metrics = {m["name"]: m["value"] for m in last["metrics"]}
    assert (last["progressPercentage"], last["estimatedRemainingSeconds"]) == (100, 0)
    assert metrics["train/loss"] == "0.6" and metrics["step"] == "10"


def test_reporter_failures_print_one_line_and_never_raise(
    status_server: StatusServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    rep = StatusReporter(status_server.url, str(status_server.ca_cert), str(wrong), 0.0)
    for step in range(1, 6):
        rep.update(step, 5, {"train/loss": 1.0})
        time.sleep(0.05)
    rep.finish(5, 5)
    assert status_server.reports == [] and status_server.rejected
    assert rep.failures >= 2 and rep.sent == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 401" in err[0] and "training goes on" in err[0], err
    # An unknown CA fails TLS verification: reported the same way, not trusted silently.
    untrusted = StatusReporter(status_server.url, None, str(status_server.token_file), 0.0)
    untrusted.update(1, 2, {})
    untrusted.finish(2, 2)
    assert untrusted.sent == 0 and "SSLError" in capsys.readouterr().err


def test_unreachable_server_does_not_block_training_thread(status_server: StatusServer) -> None:
    # A port nobody listens on behind a non-routable address: connects hang until the timeout.
    rep = StatusReporter("https://10.255.255.1:8082/status", None, str(status_server.token_file), 0.0)
    t0 = time.perf_counter()
    for step in range(1, 50):
        rep.update(step, 50, {"train/loss": 0.5})
    assert time.perf_counter() - t0 < 1.0  # the posts happen on the reporter's thread
    rep.finish(50, 50, timeout_s=0.1)


def test_recsys_train_reports_to_the_trainjob_status(
    status_server: StatusServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `recsys train` (tiny DLRM, world size 1) with the Trainer's env: progress, ETA and metrics."""
    from recsys.cli import main

    args = tiny_dlrm_args(tmp_path, "train.max_steps=4", "train.log_every_steps=1", "tracking.enabled=false")
    assert main(["data", "prepare", *args]) == 0
    monkeypatch.setenv(ENV_URL, status_server.url)
    monkeypatch.setenv(ENV_CA_CERT, str(status_server.ca_cert))
    monkeypatch.setenv(ENV_TOKEN, str(status_server.token_file))
    assert main(["train", *args]) == 0
    assert status_server.rejected == []
    reports = status_server.reports
    assert len(reports) >= 2, reports
    percents = [r["progressPercentage"] for r in reports]
    assert percents == sorted(percents) and percents[0] < 100 and percents[-1] == 100
    last = {m["name"]: float(m["value"]) for m in reports[-1]["metrics"]}
    assert last["step"] == last["total_steps"] == 4
    assert {"train/loss", "val/auc", "val/logloss"} <= set(last), last
    assert reports[-1]["estimatedRemainingSeconds"] == 0


def test_trainjob_reports_100_percent_only_after_test_evaluation_and_export(
    status_server: StatusServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 100 % report carries the test metrics and arrives after the model and results.json are logged."""
    from recsys.cli import main

    monkeypatch.chdir(tmp_path)  # tracking.uri unset: the local store ./runs/mlflow.db and its artifacts
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = tiny_dlrm_args(tmp_path, "train.max_steps=4", "train.val_every_steps=2")
    assert main(["data", "prepare", *args]) == 0
    monkeypatch.setenv(ENV_URL, status_server.url)
    monkeypatch.setenv(ENV_CA_CERT, str(status_server.ca_cert))
    monkeypatch.setenv(ENV_TOKEN, str(status_server.token_file))
    status_server.on_report = lambda: {
        "results": any(tmp_path.rglob("results.json")),
        "model": any(tmp_path.rglob("MLmodel")),
    }
    assert main(["train", *args]) == 0
    assert status_server.rejected == []
    done = [i for i, r in enumerate(status_server.reports) if r["progressPercentage"] == 100]
    assert done == [len(status_server.reports) - 1], status_server.reports
    assert status_server.seen[-1] == {"results": True, "model": True}
    last = {m["name"]: float(m["value"]) for m in status_server.reports[-1]["metrics"]}
    assert {"test/auc", "test/logloss"} <= set(last), last
