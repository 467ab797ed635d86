"""Chaos scenario: the MLflow server is down for a while in the middle of a training run.

A real `mlflow server` (SQLite store and artifacts under the work folder) on 127.0.0.1 receives a
small Two-Tower training started as `python -m recsys train` (log every step). Once the run has
metrics, the server is killed (SIGKILL, as a crashed pod), stays down for `outage_s` seconds, and is
started again on the same port and store. Survived means: training finished (exit 0), the run is
FINISHED and holds train/loss at every step 1..N (points of the outage buffered and sent after it),
the console shows exactly one warning line and no traceback. `lost` counts metric points that did
not arrive; `recover_s` is the time from the restart to the tracker's first delivery after it.

Run: `python -m recsys.chaos.mlflow_down [WORKDIR] [--outage-s 60]` (prints the result as JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

SCENARIO = "mlflow-down"
#: Default outage (`make chaos`); tests pass a shorter one.
OUTAGE_S = 60.0
EXPERIMENT = "chaos-mlflow-down"
# A small Two-Tower that logs every step (1187 steps an epoch; ~1.5-20 steps/s on 2 shared cores, by
# load), so steps are trained while the server is down. Sizes only; the model is two_tower_synth's.
TRAIN_SETS = [
    "data.source.num_users=2000",
    "data.source.num_items=500",
    "data.source.interactions_per_user=40",
    "data.block_size=32",
    "train.batch_size=64",
    "train.log_every_steps=1",
    "train.val_every_steps=0",
    "eval.ks=[10]",
    "tracking.log_model=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1:`port` with its store under `root`; start, kill, start again."""

    def __init__(self, root: Path, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.port = port or _free_port()
        self.extra_args = extra_args
        self.uri = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> float:
        """Start the server and wait until /health answers; the seconds it took."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server", *self.extra_args,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        # No background job runner (a third process for GenAI jobs): tracking is all this needs.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        t0 = time.monotonic()
        with open(self.root / "server.log", "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        while time.monotonic() - t0 < timeout:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self._proc.returncode}; see {self.root / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer in {timeout:.0f} s; see {self.root / 'server.log'}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (its gunicorn/uvicorn workers too) and reap it."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=30)
        self._proc = None


def _prepare(workdir: Path) -> list[str]:
    """Prepare the scenario's data once; the `--set` list of its training."""
    from recsys.config import load_config
    from recsys.data.prepare import prepare

    data = workdir / "data"
    sets = [*TRAIN_SETS, f"data.prepared_dir={data}"]
    if not (data / "metadata.json").exists():
        prepare(load_config("two_tower_synth", sets), overwrite=False)
    return sets


def _wait_for_metrics(client: Any, min_points: int, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The run id once the running run has `min_points` train/loss points."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"training exited ({proc.returncode}) before any metrics arrived")
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= min_points:
            return str(runs[0].info.run_id)
        time.sleep(0.5)
    raise RuntimeError(f"no train/loss metrics in {timeout:.0f} s")


def _console_faults(text: str) -> tuple[list[str], bool]:
    """Warning lines (ours and libraries') and whether a traceback was printed."""
    # tqdm redraws its bar with \r, so a line printed during training follows a bar on the same line.
    lines = re.split(r"[\r\n]", text)
    warnings = [
        ln[ln.find("recsys:") :] if "recsys:" in ln else ln for ln in lines if "warning" in ln.lower()
    ]
    return warnings, "Traceback (most recent call last)" in text


def run(workdir: Path, outage_s: float = OUTAGE_S, max_steps: int = 1200) -> dict[str, Any]:
    """Kill MLflow for `outage_s` s during a training of `max_steps` steps; the scenario's result."""
    import mlflow

    workdir.mkdir(parents=True, exist_ok=True)
    sets = _prepare(workdir)
    server = MlflowServer(workdir / "mlflow")
    server.start()
    console = workdir / "train-console.log"
    cmd = [
        sys.executable, "-m", "recsys", "train", "--config", "two_tower_synth", "--resume", "never",
        *[a for s in [*sets, "train.epochs=3", f"train.max_steps={max_steps}", f"train.checkpoint.dir={workdir / 'ckpt'}",
                      f"tracking.uri={server.uri}", f"tracking.experiment={EXPERIMENT}"] for a in ("--set", s)],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    client = mlflow.MlflowClient(server.uri)
    try:
        with open(console, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            run_id = _wait_for_metrics(client, 5, proc, timeout=600)
            server.kill()
            killed_at = time.time()
            time.sleep(outage_s)
            server.start()
            restarted_at = time.time()
            rc = proc.wait(timeout=1800)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return _failed(outage_s, f"{e}; console: {console}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return _verdict(
            client, run_id, rc, console.read_text(errors="replace"), killed_at, restarted_at, outage_s
        )
    finally:
        server.kill()


def _failed(outage_s: float, detail: str) -> dict[str, Any]:
    """The result of a scenario that could not get as far as the verdict."""
    return {
        "scenario": SCENARIO,
        "injected": _injected(outage_s),
        "survived": False,
        "lost": "unknown",
        "recover_s": None,
        "detail": detail,
    }


def _injected(outage_s: float) -> str:
    return (
        f"mlflow server SIGKILLed mid-training, down {outage_s:.0f} s, restarted on the same port and store"
    )


def _verdict(
    client: Any, run_id: str, rc: int, console: str, killed_at: float, restarted_at: float, outage_s: float
) -> dict[str, Any]:
    """Compare what reached the restarted server with what training logged."""
    run = client.get_run(run_id)
    total = _last_step(client, run_id) if "train/seconds" in run.data.metrics else 0
    history = client.get_metric_history(run_id, "train/loss")
    steps = sorted({m.step for m in history})
    during = sum(1 for m in history if killed_at * 1000 <= m.timestamp <= restarted_at * 1000)
    missing = sorted(set(range(1, total + 1)) - set(steps)) if total else []
    warnings, traceback = _console_faults(console)
    tags = run.data.tags
    lost = int(tags.get("recsys.metric_points_lost", "0"))
    recovered = float(tags["recsys.mlflow_recovered_at"]) if "recsys.mlflow_recovered_at" in tags else None
    survived = (
        rc == 0
        and run.info.status == "FINISHED"
        and total > 0
        and not missing
        and len(warnings) == 1
        and not traceback
    )
    detail = (
        f"exit {rc}; run {run_id} {run.info.status}; train/loss at {len(steps)} of {total} steps "
        f"({during} logged during the outage; missing: {missing[:10]}{'…' if len(missing) > 10 else ''}); "
        f"tracker saw {tags.get('recsys.mlflow_outages', '0')} outage(s), {tags.get('recsys.mlflow_outage_s', '0')} s; "
        f"{len(warnings)} warning line(s){': ' + warnings[0].strip() if warnings else ''}; "
        f"traceback: {'yes' if traceback else 'no'}"
    )
    return {
        "scenario": SCENARIO,
        "injected": _injected(outage_s),
        "survived": survived,
        "lost": f"{lost} metric points reported lost; {len(missing)} train/loss steps missing",
        "recover_s": None if recovered is None else round(recovered - restarted_at, 2),
        "detail": detail,
    }


def _last_step(client: Any, run_id: str) -> int:
    """The run's last training step: the step of train/seconds, logged once at the end."""
    (m,) = client.get_metric_history(run_id, "train/seconds")
    return int(m.step)


def main(argv: list[str] | None = None) -> int:
    """`python -m recsys.chaos.mlflow_down [WORKDIR]`: run the scenario and print its result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="work folder (default: a new temporary one)")
    parser.add_argument("--outage-s", type=float, default=OUTAGE_S, help="seconds the server stays down")
    parser.add_argument("--max-steps", type=int, default=1200, help="training steps (to outlast the outage)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chaos-mlflow-"))
    result = run(workdir, args.outage_s, args.max_steps)
    print(json.dumps(result, indent=2))
    return 0 if result["survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
