"""MLflow faults: a server that goes away and comes back, one that never answers, 5xx answers, and a
resumed checkpoint whose run is gone. Real `mlflow server` processes on 127.0.0.1 (killed with SIGKILL
and restarted on the same port and store), a real SQLite store for the resume case."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from mlflow import MlflowClient

from recsys.chaos.mlflow_down import MlflowServer
from recsys.config import load_config
from recsys.tracking import CONTINUES_TAG, MlflowTracker, TrackingUnavailable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A real mlflow server that the test may kill and start again on the same port."""
    srv = MlflowServer(tmp_path / "mlflow")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def _steps(uri: str, run_id: str, key: str = "m") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_an_outage_is_buffered_and_flushed_with_one_warning(
    server: MlflowServer, capfd: pytest.CaptureFixture[str]
) -> None:
    tracker = MlflowTracker(server.uri, "exp-" + uuid.uuid4().hex[:8])
    with tracker.start("outage", {}):
        for step in range(5):
            tracker.log_metrics({"m": float(step)}, step=step)
        assert tracker._sender is not None and tracker._sender.flush(30)
        server.kill()
        slowest = 0.0
        for step in range(5, 40):
            t0 = time.perf_counter()
            tracker.log_metrics({"m": float(step)}, step=step)
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.05)
        assert slowest < 0.5  # training never waits on the absent server
        server.start()
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if "warning" in ln.lower()]
    assert len(warnings) == 1 and "does not answer" in warnings[0], err
    assert "Traceback" not in err
    run = MlflowClient(server.uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert _steps(server.uri, tracker.run_id) == list(range(40))
    assert run.data.tags["recsys.mlflow_outages"] == "1" and run.data.tags["recsys.metric_points_lost"] == "0"


def test_a_full_buffer_drops_the_oldest_points_and_says_how_many(
    server: MlflowServer, capfd: pytest.CaptureFixture[str]
) -> None:
    tracker = MlflowTracker(server.uri, "exp-" + uuid.uuid4().hex[:8], buffer_points=5)
    with tracker.start("overflow", {}):
        server.kill()
        for step in range(20):
            tracker.log_metrics({"m": float(step)}, step=step)
        server.start()
    err = capfd.readouterr().err
    assert "15 metric points did not reach MLflow" in err and "15 dropped from a full buffer" in err, err
    assert _steps(server.uri, tracker.run_id) == list(range(15, 20))
    assert MlflowClient(server.uri).get_run(tracker.run_id).data.tags["recsys.metric_points_lost"] == "15"


def test_a_server_still_away_at_the_end_stops_with_one_line(server: MlflowServer) -> None:
    tracker = MlflowTracker(server.uri, "exp-" + uuid.uuid4().hex[:8], flush_timeout_s=2)
    with (
        pytest.raises(
            TrackingUnavailable, match=r"did not answer for the run's end \(3 metric points not sent"
        ) as e,
        tracker.start("away", {}),
    ):
        server.kill()
        tracker.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0}, step=1)
    assert f"run the same command again to resume into run {tracker.run_id}" in str(e.value)


def test_an_unreachable_server_at_start_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        TrackingUnavailable, match=rf"tracking URI {uri}: no MLflow server answers \(Connection refused\)"
    ):
        MlflowTracker(uri, "x", connect_timeout_s=1).start("r")
    sets = [
        "data.source.num_users=100",
        "data.source.num_items=50",
        "data.source.interactions_per_user=10",
        f"data.prepared_dir={tmp_path / 'data'}",
        f"train.checkpoint.dir={tmp_path / 'ckpt'}",
        f"tracking.uri={uri}",
        "tracking.connect_timeout_s=2",
    ]
    from recsys.data.prepare import prepare

    prepare(load_config("two_tower_synth", sets), overwrite=False)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys",
            "train",
            "--config",
            "two_tower_synth",
            *[a for s in sets for a in ("--set", s)],
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    errors = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith(
        f"recsys: tracking URI {uri}: no MLflow server answers"
    ), out.stderr
    assert "tracking.enabled=false" in errors[0]
    assert not out.stdout.strip(), out.stdout  # nothing else on the console


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """A server in front of MLflow that is up (/health) but answers 503 to every API call."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path.endswith("/health") else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_transient_error_is_not_taken_for_a_gone_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would wait minutes
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{httpd.server_address[1]}"
        tracker = MlflowTracker(uri, "x", connect_timeout_s=5)
        with pytest.raises(TrackingUnavailable, match=r"did not answer for the run's start"):
            tracker.start("r", resume_run_id="0123456789abcdef")
        assert tracker.replaced_run_id is None and tracker.run_id is None
        assert "new run" not in capsys.readouterr().out
    finally:
        httpd.shutdown()


TT = [
    "data.source.num_users=300",
    "data.source.num_items=100",
    "data.source.interactions_per_user=12",
    "data.block_size=32",
    "train.batch_size=64",
    "train.epochs=1",
    "train.checkpoint.every_steps=10",
    "train.val_every_steps=0",
    "eval.ks=[10]",
    "tracking.experiment=gone",
]


@pytest.mark.slow
def test_a_resumed_job_whose_run_is_gone_continues_in_a_complete_new_run(tmp_path: Path) -> None:
    """The checkpoint names a run the store does not have (the store was replaced): the new run gets
    params, config and vocabularies again (index/recommend/serve need them) and a link to the old id."""
    from recsys.data.prepare import prepare
    from recsys.retrieval.runs import open_run
    from recsys.train import train

    base = [*TT, f"data.prepared_dir={tmp_path / 'data'}", f"train.checkpoint.dir={tmp_path / 'ckpt'}"]
    prepare(load_config("two_tower_synth", base), overwrite=False)
    first = train(
        load_config(
            "two_tower_synth", [*base, "train.max_steps=20", f"tracking.uri=sqlite:///{tmp_path}/a.db"]
        )
    )
    assert first.steps == 20
    (run_dir,) = (tmp_path / "ckpt").glob("run-*")
    uri = f"sqlite:///{tmp_path}/b.db"
    # The first run finished, so resume its step-20 checkpoint by path (as a restarted pod resumes).
    resumed = train(
        load_config("two_tower_synth", [*base, f"tracking.uri={uri}"]), resume=str(run_dir / "step-00000020")
    )
    assert resumed.resumed_from == 20 and resumed.run_id != first.run_id
    run = MlflowClient(uri).get_run(resumed.run_id)
    assert run.data.tags[CONTINUES_TAG] == first.run_id and run.data.tags["recsys.resumed_from_step"] == "20"
    assert run.data.params["model.kind"] == "two_tower"
    files = {f.path for f in MlflowClient(uri).list_artifacts(resumed.run_id, "vocab")}
    assert files == {"vocab/user_id.txt", "vocab/item_id.txt"}
    assert MlflowClient(uri).list_artifacts(resumed.run_id, "config")
    open_run(resumed.run_id, uri)  # what index/recommend/serve open: it must accept the run


def test_recommend_against_an_absent_server_is_one_line(tmp_path: Path) -> None:
    """index/recommend/serve open runs the same way: an absent server is named, not a "run not found"."""
    uri = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys",
            "recommend",
            "--run-id",
            "abc",
            "--tracking-uri",
            uri,
            "-o",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith(
        f"recsys: tracking URI {uri}: no MLflow server answers"
    ), out.stderr
