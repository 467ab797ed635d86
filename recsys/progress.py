"""TrainJob progress: rank 0 reports progress and metrics to Kubeflow Trainer's status server.

Kubeflow Trainer ≥ 2.2 with the `TrainJobStatus` feature gate injects into every TrainJob pod
(KEP-2779, kubeflow/trainer docs/proposals/2779-trainjob-progress; the Trainer docs' "TrainJob
Progress and Training Metrics" guide):

- KUBEFLOW_TRAINER_SERVER_URL: `https://…:8082/apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/<name>/status`
- KUBEFLOW_TRAINER_SERVER_CA_CERT: path of the CA bundle that signs the server's certificate
- KUBEFLOW_TRAINER_SERVER_TOKEN: path of a projected ServiceAccount token (audience trainer.kubeflow.org);
  it rotates, so it is re-read for every request

The pod POSTs `{"trainerStatus": {progressPercentage, estimatedRemainingSeconds, metrics: [{name,
value}], lastUpdatedTime}}` with `Authorization: Bearer <token>`; the controller copies it into
`TrainJob.status.trainerStatus` (`kubectl get trainjob` shows the progress). The payload is built with
the request model of kubeflow-trainer-api (TrainerV1alpha1UpdateTrainJobStatusRequest), so it follows
the API we pin. Without the variables (PyTorchJob, local, Spark) nothing happens.

Reporting never slows or stops training: requests go out from a daemon thread (the newest status
replaces one not yet sent), at most one every MIN_INTERVAL_S seconds (the Trainer docs ask for ≥ 5 s);
the first failure is printed as one line, later ones are counted silently. The final 100 % is always
sent, by recsys.train after test evaluation and export (a TrainJob at 100 % is done), with the test
metrics. We do not use the Kubeflow SDK's `update_trainjob_status` (kubeflow 0.5.0): its throttle
drops a call made within 5 s of the previous one with no way to force it (the final 100 % of a short
run would be lost), it warns on every failure and it sends on the training thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_CA_CERT = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"
#: Seconds between two reports (the final one is always sent).
MIN_INTERVAL_S = 5.0
#: Seconds one request may take before it counts as failed.
TIMEOUT_S = 5.0


def status_payload(
    step: int, total: int, eta_s: float | None, metrics: Mapping[str, float], done: bool = False
) -> dict[str, Any]:
    """The JSON body of one report, validated by kubeflow-trainer-api's request model."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_update_train_job_status_request import (
        TrainerV1alpha1UpdateTrainJobStatusRequest as Request,
    )

    # 100 means finished: a running job stays at ≤ 99 even on its last step.
    percent = 100 if done else min(int(100 * step / max(total, 1)), 99)
    values = {"step": float(step), "total_steps": float(total), **metrics}
    status: dict[str, Any] = {
        "progressPercentage": percent,
        "metrics": [{"name": k, "value": f"{v:.6g}"} for k, v in values.items()],
        "lastUpdatedTime": datetime.now(UTC),
    }
    if done:
        status["estimatedRemainingSeconds"] = 0
    elif eta_s is not None:
        status["estimatedRemainingSeconds"] = max(int(round(eta_s)), 0)
    request = Request.model_validate({"trainerStatus": status})
    return request.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusReporter:
    """Sends the newest status of this run to the TrainJob status server from a daemon thread."""

    def __init__(
        self, url: str, ca_cert: str | None, token_path: str | None, min_interval_s: float = MIN_INTERVAL_S
    ) -> None:
        self.url, self.ca_cert, self.token_path = url, ca_cert, token_path
        self.min_interval_s = min_interval_s
        self.sent = 0
        self.failures = 0
        self._metrics: dict[str, float] = {}
        self._start: tuple[int, float] | None = None  # (step, time) of the first update: the ETA's base
        self._last_queued = -float("inf")
        self._pending: dict[str, Any] | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="trainjob-status", daemon=True)
        self._thread.start()

    def update(self, step: int, total: int, metrics: Mapping[str, float]) -> None:
        """Remember `metrics` (latest value per name); queue a report unless one went out < min_interval_s ago."""
        now = time.monotonic()
        self._metrics.update({k: float(v) for k, v in metrics.items()})
        if self._start is None:
            self._start = (step, now)
        if now - self._last_queued < self.min_interval_s:
            return
        eta = None
        first_step, t0 = self._start
        if step > first_step:
            eta = (total - step) * (now - t0) / (step - first_step)
        self._queue(status_payload(step, total, eta, self._metrics))
        self._last_queued = now

    def finish(self, step: int, total: int, timeout_s: float = TIMEOUT_S + 1) -> None:
        """Report 100 % with the last metrics, wait up to `timeout_s` for it to go out, stop the thread."""
        self._queue(status_payload(step, total, 0.0, self._metrics, done=True))
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _queue(self, payload: dict[str, Any]) -> None:
        with self._wake:
            self._pending = payload  # a report not yet sent is stale: replace it
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                payload, self._pending = self._pending, None
                closing = self._closed
            if payload is not None:
                self._send(payload)
            if closing:  # finish() queued the last report before closing: it was just sent
                return

    def _send(self, payload: dict[str, Any]) -> None:
        import requests

        try:
            with open(self.token_path or "", encoding="utf-8") as f:
                token = f.read().strip()
            r = requests.post(
                self.url,
                json=payload,
                headers={"Authorization": f"Bearer {token}"},
                verify=self.ca_cert or True,
                timeout=TIMEOUT_S,
            )
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text.strip()[:200]}")
            self.sent += 1
        except Exception as e:  # noqa: BLE001 -- any failure to report must leave training running
            self.failures += 1
            if self.failures == 1:
                print(
                    f"recsys: could not report progress to the TrainJob status ({ENV_URL}={self.url}): "
                    f"{type(e).__name__}: {e}; training goes on, further failures are not shown",
                    file=sys.stderr,
                    flush=True,
                )


class NullReporter:
    """Reporter of ranks other than 0 and of runs outside a TrainJob with status reporting: does nothing."""

    def update(self, step: int, total: int, metrics: Mapping[str, float]) -> None:
        """Do nothing."""

    def finish(self, step: int, total: int, timeout_s: float = 0.0) -> None:
        """Do nothing."""


def make_reporter(is_main: bool) -> StatusReporter | NullReporter:
    """A StatusReporter on rank 0 when Kubeflow Trainer's status server is configured, else a NullReporter."""
    url = os.environ.get(ENV_URL)
    if not (is_main and url):
        return NullReporter()
    return StatusReporter(url, os.environ.get(ENV_CA_CERT), os.environ.get(ENV_TOKEN))
