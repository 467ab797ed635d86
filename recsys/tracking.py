"""MLflow tracking on rank 0, a null tracker with the same methods everywhere else.

`make_tracker(cfg, rank)` picks one. The MLflow tracker logs params in batches (MLflow takes 100
per call and 6000 characters per value; longer values are stored whole as artifacts under
`params/`, never truncated), metrics by step, text/dict/file artifacts and the final model, and
ends the run FAILED when an exception escapes its `with` block.

Where runs go: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store
`./runs/mlflow.db` with artifacts in `./runs/artifacts` (MLflow 3.17 refuses the old `./mlruns`
file store unless MLFLOW_ALLOW_FILE_STORE=true; SQLite is its recommended server-less default).
Open a local store with the command `local_ui_command(cfg)` prints:
`mlflow ui --backend-store-uri sqlite:///…/runs/mlflow.db`.

Outages: against an http(s) server, metric points go through a `MetricSender` thread with a bounded
buffer, so training never waits on MLflow; while the server does not answer they are kept and retried
with backoff (one warning line per outage), and sent when it is back. Everything else (params, tags,
artifacts, the model, ending the run) first waits for the buffer to drain, then uses MLflow's client
and its own retries; a server still down after that stops with one line (`TrackingUnavailable`).
A resumed run that is gone from the store (RESOURCE_DOES_NOT_EXIST) is continued in a new run;
any other error looking it up is not taken for "gone".

mlflow is imported inside functions only: `import recsys.tracking` stays light.
"""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from recsys.errors import Preempted, UserError

if TYPE_CHECKING:
    import torch

    from recsys.config import Config

#: Local store used when neither tracking.uri nor $MLFLOW_TRACKING_URI is set.
LOCAL_DIR = "runs"
#: Tag that ties a run to the launcher's job (from $RECSYS_JOB_NAME), see `find_run_by_job`.
JOB_TAG = "recsys.job_name"
#: Tag of a run that continues a resumed checkpoint whose own run is gone from the store: the old id.
CONTINUES_TAG = "recsys.continues_run"

# MLflow's limits (mlflow.utils.validation in 3.x): params/tags per log_batch call, metrics per
# call, characters per param value, characters per tag value, characters per key.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250


# ------------------------------------------------------------------------------------------ helpers
def resolve_tracking_uri(cfg: Config) -> str:
    """The tracking URI a run of `cfg` uses: tracking.uri, else $MLFLOW_TRACKING_URI, else the local store."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str((Path.cwd() / LOCAL_DIR / "mlflow.db").resolve())


def _check_not_file_store(uri: str) -> None:
    """Refuse a plain path / file: URI up front: MLflow 3.x only opens the file store when opted in."""
    bare_schemes = ("databricks", "databricks-uc", "uc")
    is_path = "://" not in uri and ":" not in uri.split("/")[0] and uri not in bare_schemes
    if (is_path or uri.startswith("file:")) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in (
        "true",
        "1",
    ):
        raise UserError(
            f"tracking.uri {uri!r}: MLflow 3.x no longer opens file stores (./mlruns) by default; use "
            f"sqlite:///{Path(uri.removeprefix('file:')).as_posix().rstrip('/')}/mlflow.db, leave tracking.uri "
            "unset for ./runs/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true"
        )


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other URIs)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def local_ui_command(cfg: Config) -> str:
    """How to look at the runs of `cfg`: an `mlflow ui …` command for a local store, else the server URL."""
    uri = resolve_tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (experiment {cfg.tracking.experiment!r})"
    if uri.startswith("databricks"):
        return f"open the Databricks workspace of {uri} (experiment {cfg.tracking.experiment!r})"
    return f"mlflow ui --backend-store-uri {uri}"


def git_sha() -> str | None:
    """Commit of the recsys source tree: $RECSYS_GIT_SHA (set in images), else `git rev-parse HEAD`, else None."""
    if os.environ.get("RECSYS_GIT_SHA"):
        return os.environ["RECSYS_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def run_tags(cfg: Config, world_size: int) -> dict[str, str]:
    """The standard tags of a training run: model, dataset, world_size, git_sha, image, job name."""
    model = cfg.model.kind
    if model == "dlrm" and cfg.model.dlrm.interaction == "dcn":
        model = "dlrm_dcn"
    tags = {
        "model": model,
        "dataset": f"{cfg.data.source.kind}:{cfg.name}",
        "world_size": str(world_size),
        "config": cfg.name,
    }
    sha = git_sha()
    if sha:
        tags["git_sha"] = sha
        tags["mlflow.source.git.commit"] = sha  # what the MLflow UI shows as the source version
    if os.environ.get("RECSYS_IMAGE"):
        tags["image"] = os.environ["RECSYS_IMAGE"]
    if os.environ.get("RECSYS_JOB_NAME"):
        tags[JOB_TAG] = os.environ["RECSYS_JOB_NAME"]
    return tags


def _check_key(kind: str, key: str) -> None:
    # MLflow treats keys as file-like names; refuse what it would reject, naming the key, before
    # anything of the batch is sent.
    norm = posixpath.normpath(key)
    if not key or len(key) > MAX_KEY or norm != key or norm == "." or norm.startswith(("..", "/")):
        raise ValueError(f"{kind} key {key!r}: must be 1-{MAX_KEY} characters and a normalised relative name")


def _default_pip_requirements() -> list[str]:
    """Pinned requirements of a logged model, from what is installed (MLflow's own inference
    reloads the model in a subprocess, which is slow and misses torchrec's --no-deps install)."""
    reqs = []
    for dist in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "numpy", "recsys"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


@contextmanager
def _refused_as_user_error(uri: str) -> Iterator[None]:
    """Turn the server's 401/403 (MLflow's basic-auth app, a proxy) into one line saying what to set."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        code = e.get_http_status_code()
        if code not in (401, 403):
            raise
        what = "refused these credentials" if code == 403 or _has_credentials() else "needs credentials"
        raise UserError(
            f"tracking.uri {uri}: the MLflow server {what} (HTTP {code}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account with write access "
            "(in a cluster: the Secret named by job.mlflow_secret, default mlflow-credentials)"
        ) from None


def _has_credentials() -> bool:
    return any(os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN"))


# ------------------------------------------------------------------------------------------ outages
class TrackingUnavailable(UserError):
    """The tracking server did not answer within the time allowed; the message says what to do."""


def is_transient(e: BaseException) -> bool:
    """True for errors that may pass by themselves: no connection, a timeout, HTTP 429 or 5xx."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, requests.RequestException | ConnectionError | TimeoutError):
        return True
    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return code == 429 or code >= 500
    return False


def is_gone(e: BaseException) -> bool:
    """True when MLflow says the thing asked for does not exist (RESOURCE_DOES_NOT_EXIST)."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST"


def short_error(e: BaseException) -> str:
    """The last line of an error, cut to 160 characters (MLflow wraps whole urllib3 reprs)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    text = lines[-1]
    for marker in ("Connection refused", "Name or service not known", "timed out", "Max retries exceeded"):
        if marker in str(e):
            text = marker
            break
    return text if len(text) <= 160 else text[:157] + "..."


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _http_call(uri: str, endpoint: str, method: str, timeout: float, **kwargs: Any) -> Any:
    """One request to an MLflow server without MLflow's own retries (they wait minutes)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(
        get_default_host_creds(uri), endpoint, method, max_retries=0, timeout=timeout, **kwargs
    )


def wait_for_server(uri: str, timeout_s: float) -> None:
    """Return once the http(s) server at `uri` answers /health (at once for other stores);
    retry with backoff for up to `timeout_s`, then raise TrackingUnavailable (one line)."""
    if not _is_http(uri):
        return
    deadline = time.monotonic() + timeout_s
    delay = 1.0
    # Silent while waiting (a pod may start before the server): the console gets one line, at the end.
    while True:
        try:
            resp = _http_call(uri, "/health", "GET", timeout=10, raise_on_status=False)
            if resp.status_code < 500:
                return
            last = f"HTTP {resp.status_code}"
        except Exception as e:  # MLflow wraps every connection failure in an MlflowException
            last = short_error(e)
        if time.monotonic() + delay > deadline:
            raise TrackingUnavailable(
                f"tracking URI {uri}: no MLflow server answers ({last}) after {timeout_s:.0f} s; start it or fix "
                "tracking.uri / $MLFLOW_TRACKING_URI (in a cluster: job.mlflow_tracking_uri and the mlflow "
                "NetworkPolicy), wait longer with --set tracking.connect_timeout_s=N, or train without "
                "MLflow with --set tracking.enabled=false"
            )
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


class MetricSender:
    """Sends metric points from a background thread, so an MLflow outage never stalls training.

    Points wait in a bounded buffer: beyond `capacity` the oldest are dropped and counted. A batch
    the server does not take for a transient reason (no connection, 429, 5xx) goes back to the front
    of the buffer and is retried with backoff (1 s doubling to 5 s: a refused connection costs
    nothing); the first failure of each outage prints one warning line. A batch refused for good
    (400, 404: the run is gone) is counted as lost, not retried.
    """

    batch_size = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, send: Callable[[list[Any]], None], capacity: int, where: str) -> None:
        self._send = send
        self.capacity = capacity
        self.where = where
        self._buf: deque[Any] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self.put_count = 0
        self.sent = 0
        self.dropped = 0
        self.refused = 0
        self.refused_reason = ""
        self.outages = 0
        self.outage_s = 0.0
        self.recovered_at: float | None = None  # wall-clock time of the last recovery

    @property
    def pending(self) -> int:
        """Points buffered or being sent."""
        with self._cv:
            return len(self._buf) + self._in_flight

    @property
    def lost(self) -> int:
        """Points that will not reach the server: dropped on overflow, refused, or left at close."""
        return self.put_count - self.sent

    def put(self, points: Sequence[Any]) -> None:
        """Queue points (never blocks on the server)."""
        with self._cv:
            if self._closing:
                raise RuntimeError("MetricSender: put after close")
            self._buf.extend(points)
            self.put_count += len(points)
            self._trim()
            self._cv.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="recsys-mlflow-metrics", daemon=True)
            self._thread.start()

    def _trim(self) -> None:
        over = len(self._buf) - self.capacity
        for _ in range(max(over, 0)):
            self._buf.popleft()
        self.dropped += max(over, 0)

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until every queued point was sent or refused; True if so."""
        deadline = time.monotonic() + timeout
        with self._cv:
            return self._cv.wait_for(
                lambda: not self._buf and not self._in_flight, timeout=max(deadline - time.monotonic(), 0)
            )

    def close(self, timeout: float) -> int:
        """Flush for up to `timeout` s, stop the thread; the number of points that were lost."""
        self.flush(timeout)
        with self._cv:
            self._closing = True
            self._abort = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a send in progress ends by its own HTTP timeout
        return self.lost

    def _loop(self) -> None:
        delay, down_since = 1.0, None
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._buf or self._abort)
                if self._abort:
                    return
                batch = [self._buf.popleft() for _ in range(min(len(self._buf), self.batch_size))]
                self._in_flight = len(batch)
            try:
                self._send(batch)
            except Exception as e:
                if not is_transient(e):
                    with self._cv:
                        self.refused += len(batch)
                        self.refused_reason = self.refused_reason or short_error(e)
                        self._in_flight = 0
                        self._cv.notify_all()
                    continue
                with self._cv:
                    self._buf.extendleft(reversed(batch))
                    self._trim()
                    self._in_flight = 0
                    self._cv.notify_all()
                if down_since is None:
                    down_since = time.monotonic()
                    self.outages += 1
                    print(
                        f"recsys: warning: MLflow at {self.where} does not answer ({short_error(e)}); training "
                        f"goes on, metrics are kept in memory (up to {self.capacity} points) and sent when it is back",
                        file=sys.stderr,
                        flush=True,
                    )
                with self._cv:
                    self._cv.wait_for(lambda: self._abort, timeout=delay)
                delay = min(delay * 2, 5.0)
                continue
            with self._cv:
                self.sent += len(batch)
                self._in_flight = 0
                self._cv.notify_all()
            if down_since is not None:
                self.outage_s += time.monotonic() - down_since
                self.recovered_at = time.time()
                down_since, delay = None, 1.0


def _rest_log_batch(uri: str) -> Callable[[str, list[Any]], None]:
    """log_batch of metrics over REST without MLflow's client retries (MetricSender retries)."""
    import json

    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.proto_json_utils import message_to_json
    from mlflow.utils.rest_utils import verify_rest_response

    endpoint = "/api/2.0/mlflow/runs/log-batch"

    def send(run_id: str, metrics: list[Any]) -> None:
        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics]))
        resp = _http_call(uri, endpoint, "POST", timeout=30, json=json.loads(body))
        verify_rest_response(resp, endpoint)

    return send


# ------------------------------------------------------------------------------------------ trackers
class Tracker:
    """What the trainer logs through. This base is the null tracker: every method does nothing."""

    enabled = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None when nothing is tracked)."""
        return None

    def start(
        self, run_name: str, tags: Mapping[str, str] | None = None, resume_run_id: str | None = None
    ) -> Tracker:
        """Start a run named `run_name` with `tags` (or continue `resume_run_id`); returns self."""
        return self

    @property
    def resumed(self) -> bool:
        """True when start() continued an existing run."""
        return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (flat key → value, e.g. `config.flatten(cfg)`)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metric values at `step`."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file` (e.g. config.yaml, plan.txt)."""

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store `obj` as a JSON or YAML artifact (by the file's extension)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file (or a whole directory) under `artifact_path`."""

    def log_model(
        self,
        module: torch.nn.Module,
        name: str = "model",
        *,
        save_state_dict: bool = True,
        serialization_format: str = "pickle",
        pip_requirements: list[str] | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Log a plain (unsharded) module with mlflow.pytorch; returns its model URI."""
        return None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) run tags."""

    def end(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt | Preempted):
            self.end("KILLED")
        else:
            self.end("FAILED")


class NullTracker(Tracker):
    """Tracker of ranks other than 0, and of runs with tracking.enabled=false: logs nothing."""


class MlflowTracker(Tracker):
    """Logs one MLflow run. Run lifecycle goes through the fluent API (so mlflow.pytorch.log_model
    attaches the model to the run); params, metrics and artifacts through an MlflowClient."""

    enabled = True

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        connect_timeout_s: float = 120.0,
        buffer_points: int = 100_000,
        flush_timeout_s: float = 300.0,
    ) -> None:
        import mlflow

        _check_not_file_store(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.connect_timeout_s = connect_timeout_s
        self.flush_timeout_s = flush_timeout_s
        self._client = mlflow.MlflowClient(tracking_uri)
        self._run_id: str | None = None
        self._ended = False
        self._resumed = False
        #: The checkpoint's run id when it was gone from the store and a new run replaced it.
        self.replaced_run_id: str | None = None
        # Only a server has outages; local stores are written in-process.
        self._sender: MetricSender | None = None
        if _is_http(tracking_uri):
            send = _rest_log_batch(tracking_uri)
            self._sender = MetricSender(
                lambda batch: send(self._need_run(), batch), buffer_points, tracking_uri
            )

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once started (kept after `end`, for reporting)."""
        return self._run_id

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise UserError(
                    f"tracking.experiment: experiment {self.experiment!r} is deleted in {self.tracking_uri}; "
                    f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) or pick another name"
                )
            return exp.experiment_id
        db = _sqlite_path(self.tracking_uri)
        # Without a server, keep artifacts beside the database instead of MLflow's ./mlruns default.
        location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
        try:
            return self._client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:
            # Another process created it between our look-up and create.
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @property
    def resumed(self) -> bool:
        """True when start() continued an existing run (a resumed training job)."""
        return self._resumed

    def _existing_run(self, run_id: str) -> str | None:
        """`run_id` if this store has it (a resumed job continues it); None with one line why when
        the store says it does not exist or is deleted. Any other error is raised, not taken for gone."""
        try:
            run = self._client.get_run(run_id)
            why = "is deleted in" if run.info.lifecycle_stage == "deleted" else ""
        except Exception as e:
            if not is_gone(e):
                raise
            why = "is not in"
        if not why:
            return run_id
        print(
            f"recsys: MLflow run {run_id} of the checkpoint {why} {self.tracking_uri}; the resumed training "
            f"goes to a new run with the config, params and vocabularies again (tag {CONTINUES_TAG}={run_id}); "
            "metrics of the steps before the checkpoint stay with the old run",
            flush=True,
        )
        self.replaced_run_id = run_id
        return None

    def start(
        self, run_name: str, tags: Mapping[str, str] | None = None, resume_run_id: str | None = None
    ) -> MlflowTracker:
        """Start the run (creating the experiment if missing) with `tags`, or continue `resume_run_id`."""
        import mlflow

        if self._run_id is not None:
            raise RuntimeError(f"tracker already started run {self._run_id}")
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        for k, v in tags.items():
            _check_key("tag", k)
            if len(v) > MAX_TAG_VALUE:
                raise ValueError(f"tag {k!r}: value of {len(v)} characters exceeds MLflow's {MAX_TAG_VALUE}")
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        if mlflow.active_run() is not None:
            raise RuntimeError(
                f"an MLflow run ({mlflow.active_run().info.run_id}) is already active in this process"
            )
        wait_for_server(self.tracking_uri, self.connect_timeout_s)
        with _refused_as_user_error(self.tracking_uri), self._unavailable_as_user_error("the run's start"):
            existing = self._existing_run(resume_run_id) if resume_run_id else None
            if existing:
                run = mlflow.start_run(run_id=existing, tags=tags)
                self._resumed = True
            else:
                if self.replaced_run_id:
                    tags[CONTINUES_TAG] = self.replaced_run_id
                run = mlflow.start_run(experiment_id=self._experiment_id(), run_name=run_name, tags=tags)
        self._run_id = run.info.run_id
        return self

    @contextmanager
    def _unavailable_as_user_error(self, what: str) -> Iterator[None]:
        """Wait for buffered metrics first (they go before what follows); a server that still does not
        answer after that and MLflow's own retries stops with one line (TrackingUnavailable)."""
        if self._sender is not None and not self._sender.flush(self.flush_timeout_s):
            self._raise_unavailable(what, f"{self._sender.pending} metric points not sent")
        try:
            yield
        except Exception as e:
            if not is_transient(e):
                raise
            self._raise_unavailable(what, short_error(e))

    def _raise_unavailable(self, what: str, why: str) -> None:
        resume = (
            f"; the checkpoints are kept: run the same command again to resume into run {self._run_id}"
            if self._run_id
            else ""
        )
        raise TrackingUnavailable(
            f"tracking URI {self.tracking_uri}: the MLflow server did not answer for {what} ({why}){resume}"
        ) from None

    def _need_run(self) -> str:
        if self._run_id is None or self._ended:
            raise RuntimeError("MlflowTracker: log between start() and end()")
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches of 100; values over 6000 characters go whole to `params/<key>.txt`."""
        from mlflow.entities import Param

        run_id = self._need_run()
        items = [(str(k), str(v)) for k, v in params.items()]
        for k, _ in items:
            _check_key("param", k)
        batch: list[Param] = []
        for k, v in items:
            if len(v) > MAX_PARAM_VALUE:
                artifact = f"params/{k}.txt"
                with self._unavailable_as_user_error(artifact):
                    self._client.log_text(run_id, v, artifact)
                v = f"[{len(v)} characters; full value in artifact {artifact}]"
            batch.append(Param(k, v))
        with self._unavailable_as_user_error("params"):
            for i in range(0, len(batch), MAX_PARAMS_PER_BATCH):
                self._client.log_batch(run_id, params=batch[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metric values at `step` (batches of 1000); to a server through the MetricSender,
        which never blocks on it."""
        from mlflow.entities import Metric

        run_id = self._need_run()
        now = int(time.time() * 1000)
        entries = []
        for k, v in metrics.items():
            _check_key("metric", str(k))
            # MLflow's stores keep NaN and map ±inf to ±float max themselves.
            entries.append(Metric(str(k), float(v), now, 0 if step is None else int(step)))
        if self._sender is not None:
            self._sender.put(entries)
            return
        for i in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=entries[i : i + MAX_METRICS_PER_BATCH])

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file`."""
        with self._unavailable_as_user_error(artifact_file):
            self._client.log_text(self._need_run(), text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store `obj` as JSON (.json) or YAML (.yaml/.yml) artifact."""
        with self._unavailable_as_user_error(artifact_file):
            self._client.log_dict(self._need_run(), obj, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file, or every file of a directory, under `artifact_path`."""
        run_id = self._need_run()
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"log_artifact: {p} does not exist")
        with self._unavailable_as_user_error(f"artifact {p.name}"):
            if p.is_dir():
                self._client.log_artifacts(run_id, str(p), artifact_path)
            else:
                self._client.log_artifact(run_id, str(p), artifact_path)

    def log_model(
        self,
        module: torch.nn.Module,
        name: str = "model",
        *,
        save_state_dict: bool = True,
        serialization_format: str = "pickle",
        pip_requirements: list[str] | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Log `module` with mlflow.pytorch.log_model (pickle format: TorchRec inputs do not
        torch.export) and, when `save_state_dict`, its state dict as `state_dict/<name>.pt`.
        Extra kwargs go to mlflow.pytorch.log_model. Returns the model URI (models:/…)."""
        import mlflow.pytorch
        import torch

        run_id = self._need_run()
        with self._unavailable_as_user_error(f"model {name}"):
            info = mlflow.pytorch.log_model(
                module,
                name=name,
                serialization_format=serialization_format,
                pip_requirements=pip_requirements
                if pip_requirements is not None
                else _default_pip_requirements(),
                **kwargs,
            )
            if save_state_dict:
                with tempfile.TemporaryDirectory() as tmp:
                    f = Path(tmp) / f"{name}.pt"
                    torch.save(module.state_dict(), f)
                    self._client.log_artifact(run_id, str(f), "state_dict")
        return info.model_uri

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (values up to 8000 characters)."""
        from mlflow.entities import RunTag

        run_id = self._need_run()
        entries = []
        for k, v in tags.items():
            _check_key("tag", str(k))
            if len(str(v)) > MAX_TAG_VALUE:
                raise ValueError(
                    f"tag {k!r}: value of {len(str(v))} characters exceeds MLflow's {MAX_TAG_VALUE}"
                )
            entries.append(RunTag(str(k), str(v)))
        with self._unavailable_as_user_error("tags"):
            for i in range(0, len(entries), MAX_PARAMS_PER_BATCH):
                self._client.log_batch(run_id, tags=entries[i : i + MAX_PARAMS_PER_BATCH])

    def end(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED, KILLED); a second call does nothing."""
        import mlflow

        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"end(status={status!r}): expected FINISHED, FAILED or KILLED")
        if self._run_id is None or self._ended:
            return
        # A failing run waits less for an absent server: its error is what the user needs to see.
        finished = status == "FINISHED"
        try:
            reachable = self._close_sender(
                self.flush_timeout_s if finished else min(self.flush_timeout_s, 30.0), finished
            )
        except TrackingUnavailable:
            self._abandon()
            raise
        if not reachable:
            self._abandon()  # the run stays RUNNING there; the error that ended it is what matters
            return
        active = mlflow.active_run()
        with self._unavailable_as_user_error("the run's end"):
            if active is not None and active.info.run_id == self._run_id:
                mlflow.end_run(status)
            else:
                self._client.set_terminated(self._run_id, status)
        self._ended = True

    def _abandon(self) -> None:
        """Give up the run without the server: this process may start another (tuning trials do)."""
        import mlflow

        self._ended = True
        active = mlflow.active_run()
        if active is None or active.info.run_id != self._run_id:
            return
        saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # end_run pops the run, then calls the server
        try:
            mlflow.end_run("FAILED")
        except Exception:
            pass  # the server is away: that is why we abandon the run
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
            else:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved

    def _close_sender(self, timeout: float, finished: bool) -> bool:
        """Deliver what is buffered (up to `timeout` s) and record outages and losses on the run;
        False when the server is still away (a finished run then raises TrackingUnavailable)."""
        sender = self._sender
        if sender is None:
            return True
        self._sender = None  # later calls go straight to the client
        lost = sender.close(timeout)
        unsent = lost - sender.dropped - sender.refused
        if unsent and finished:
            self._raise_unavailable("the run's end", f"{unsent} metric points not sent in {timeout:.0f} s")
        if lost:
            why = f"; refused: {sender.refused_reason}" if sender.refused else ""
            print(
                f"recsys: warning: {lost} metric points did not reach MLflow at {self.tracking_uri} "
                f"({sender.dropped} dropped from a full buffer, {sender.refused} refused, {unsent} not sent{why})",
                file=sys.stderr,
                flush=True,
            )
        if unsent:
            return False
        if sender.outages or lost:
            tags = {
                "recsys.mlflow_outages": str(sender.outages),
                "recsys.mlflow_outage_s": f"{sender.outage_s:.1f}",
                "recsys.metric_points_lost": str(lost),
            }
            if sender.recovered_at is not None:
                tags["recsys.mlflow_recovered_at"] = f"{sender.recovered_at:.3f}"
            self.set_tags(tags)
        return True


def make_tracker(cfg: Config, rank: int) -> Tracker:
    """An MLflow tracker on rank 0 when cfg.tracking.enabled, else a NullTracker."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    t = cfg.tracking
    return MlflowTracker(
        resolve_tracking_uri(cfg),
        t.experiment,
        connect_timeout_s=t.connect_timeout_s,
        buffer_points=t.buffer_points,
        flush_timeout_s=t.flush_timeout_s,
    )


def mlflow_metrics(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """`prefix/name` keys MLflow accepts: it forbids '@', so recall@10 is logged as recall_at_10."""
    return {f"{prefix}/{k.replace('@', '_at_')}": float(v) for k, v in metrics.items()}


def load_logged_state(cfg: Config, run_id: str) -> dict[str, torch.Tensor]:
    """The gathered state dict logged with an MLflow run (artifact state_dict/model.pt)."""
    import mlflow
    import torch

    uri = resolve_tracking_uri(cfg)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="state_dict/model.pt", tracking_uri=uri
        )
    except Exception as e:
        raise UserError(
            f"run {run_id} in {uri}: no state_dict/model.pt artifact ({type(e).__name__}: {e}); was it "
            "trained with tracking.log_model=true against this tracking URI?"
        ) from None
    return torch.load(local, map_location="cpu", weights_only=True)


def find_run_by_job(tracking_uri: str, experiment: str, job_name: str) -> str | None:
    """The id of the newest run of `experiment` tagged recsys.job_name=`job_name` (None if none)."""
    import mlflow

    if not job_name or "'" in job_name or "\\" in job_name:
        raise ValueError(f"job name {job_name!r}: must be non-empty without quotes or backslashes")
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = '{job_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None
