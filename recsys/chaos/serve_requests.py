"""Chaos: the served model under malformed and oversized requests.

A tiny Two-Tower is trained and built with `recsys serve build`'s code, a real `mlflow models serve`
starts on 127.0.0.1, and a bounded set of bad requests (random JSON, 10^5 rows, huge k, wrong types,
missing fields, empty and non-JSON bodies) is sent one at a time. Survived means: every answer is a
4xx carrying a message, the server process is alive, and a valid request then answers exactly as it
did before the faults. Load goes to 127.0.0.1 only; count and time are bounded (REQUEST_TIMEOUT_S,
DEADLINE_S).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIO = "serve_requests"
#: Seconds one request may take before it counts as a hang.
REQUEST_TIMEOUT_S = 60.0
#: Seconds for the whole fault phase; requests not sent by then are reported as not sent.
DEADLINE_S = 300.0
#: Random JSON bodies sent (seeded: the same bodies every run).
RANDOM_BODIES = 12
#: Rows of the oversized request.
OVERSIZED_ROWS = 100_000
#: The tiny model's data and training: small enough to train in well under a minute on 2 cores.
TINY_RUN = [
    "data.source.num_users=300",
    "data.source.num_items=200",
    "data.source.interactions_per_user=20",
    "train.batch_size=256",
    "train.epochs=1",
    "train.log_every_steps=5",
    "train.val_every_steps=1000",
    "eval.ks=[10]",
]
TINY = [*TINY_RUN, "tracking.experiment=chaos-serve-requests"]


@dataclass
class TinyModel:
    """A served model on disk and user ids it knows."""

    path: Path  # the model folder (MLmodel, code/, artifacts/)
    known_users: list[str]


def build_tiny_model(workdir: Path) -> TinyModel:
    """Prepare, train and `serve build` a tiny Two-Tower (SQLite store under `workdir`); download it."""
    import mlflow

    from recsys.config import load_config
    from recsys.data.prepare import prepare
    from recsys.retrieval.serve import build_model
    from recsys.train import train

    uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    cfg = load_config(
        "two_tower_synth", [*TINY, f"data.prepared_dir={workdir / 'data'}", f"tracking.uri={uri}"]
    )
    prepare(cfg, overwrite=False)
    built = build_model(train(cfg).run_id, uri, register="")
    mlflow.set_tracking_uri(uri)
    path = Path(mlflow.artifacts.download_artifacts(built.model_uri, dst_path=str(workdir / "model")))
    from recsys.data.metadata import read_vocab_file  # ids split on "\n" only, as the trainer reads them

    users = read_vocab_file(Path(cfg.data.prepared_dir) / "vocab" / "user_id.txt")
    return TinyModel(path, users[1:4])  # row 0 of a vocabulary is the unknown-id row


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    """(HTTP status, body text) of one POST; status 0 when no answer came within REQUEST_TIMEOUT_S."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        return 0, f"no answer: {e}"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Wait until GET `url` answers 200; RuntimeError with the server's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready at {url} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running(
    cmd: list[str], ready_url: str, log: Path, env: dict[str, str], timeout: float = 120
) -> Iterator[Any]:
    """Run a server command in its own process group until the block ends; yields the process."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_ready(proc, ready_url, log, timeout)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def scoring_server_cmd(model: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """`mlflow models serve` on 127.0.0.1 in this environment → (argv, env)."""
    # mlflow execs `uvicorn` by name: this interpreter's bin folder must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model),
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1",
    ]  # fmt: skip
    return cmd, {**os.environ, "PATH": path}


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: scalars, strings, and (up to depth 3) lists and objects."""
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] * 2 if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, 10**30, rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-300, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return rng.choice(["", "user_id", "k", "dataframe_records", "\u00e9\u4e2d\U0001f600", "x" * 1000])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    n = rng.randint(0, 4)
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(n)]
    keys = ["user_id", "k", "dataframe_records", "dataframe_split", "inputs", "columns", "data", "z"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(n)}


def bad_requests(user: str, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """The injected requests: (what, body, content type), a fixed list plus RANDOM_BODIES seeded ones.

    Not here: a column outside the model's signature. MLflow's schema step drops it (a warning in the
    server log) and the request is answered from user_id and k: a 200 by MLflow's design.
    """

    def records(rows: Any) -> bytes:
        return json.dumps({"dataframe_records": rows}).encode()

    fixed = [
        ("empty body", b"", "application/json"),
        ("not JSON", b"{'user_id': 1,", "application/json"),
        ("not UTF-8", b"\xff\xfe\x00{", "application/json"),
        ("JSON list", b"[1, 2, 3]", "application/json"),
        ("no input key", b"{}", "application/json"),
        ("wrong content type", records([{"user_id": user}]), "text/plain"),
        (f"{OVERSIZED_ROWS:,} rows", records([{"user_id": user, "k": 5}] * OVERSIZED_ROWS), "application/json"),
        ("k = 10^6", records([{"user_id": user, "k": 10**6}]), "application/json"),
        ("k = 10^400", records([{"user_id": user, "k": 10**400}]), "application/json"),
        ("k = 1e308", records([{"user_id": user, "k": 1e308}]), "application/json"),
        ("k = -1", records([{"user_id": user, "k": -1}]), "application/json"),
        ("k a string", records([{"user_id": user, "k": "ten"}]), "application/json"),
        ("k a list", records([{"user_id": user, "k": [5]}]), "application/json"),
        ("user_id a number", records([{"user_id": 42, "k": 5}]), "application/json"),
        ("user_id an object", records([{"user_id": {"id": user}, "k": 5}]), "application/json"),
        ("user_id null", records([{"user_id": None, "k": 5}]), "application/json"),
        ("missing user_id", records([{"k": 5}]), "application/json"),
        ("empty record", records([{}]), "application/json"),
        ("records not a list", records("user_id"), "application/json"),
        ("split without data", json.dumps({"dataframe_split": {"columns": ["user_id"]}}).encode(), "application/json"),
        ("ragged split", json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[user, 5, 1]]}}).encode(), "application/json"),
        ("two input keys", json.dumps({"dataframe_records": [], "inputs": []}).encode(), "application/json"),
    ]  # fmt: skip
    rng = random.Random(seed)
    wrappers = ["dataframe_records", "dataframe_split", "inputs", "instances", None]
    randoms = []
    for i in range(RANDOM_BODIES):
        value, key = _random_json(rng), wrappers[i % len(wrappers)]
        randoms.append(
            (
                f"random JSON #{i}",
                json.dumps(value if key is None else {key: value}).encode(),
                "application/json",
            )
        )
    return fixed + randoms


def _has_message(text: str) -> bool:
    """A 4xx body says what is wrong: MLflow's JSON {"message": ...}, MLServer's {"error": ...} or plain text."""
    try:
        body = json.loads(text)
    except ValueError:
        return bool(text.strip())
    if isinstance(body, dict):
        return bool(str(body.get("message") or body.get("error") or body.get("detail") or "").strip())
    return False


def inject(url: str, requests: list[tuple[str, bytes, str]], deadline: float) -> list[str]:
    """Send each bad request in turn → the failures (not a 4xx with a message, or not sent in time)."""
    failures = []
    for what, body, content_type in requests:
        if time.monotonic() > deadline:
            failures.append(f"{what}: not sent (deadline {DEADLINE_S:.0f} s)")
            continue
        status, text = post(url, body, content_type)
        if not (400 <= status < 500 and _has_message(text)):
            failures.append(f"{what}: HTTP {status} {text[:200]!r}")
    return failures


def _largest_valid(url: str, users: list[str]) -> tuple[float, list[str]]:
    """(seconds, failures) of the largest request the model accepts (MAX_ROWS rows at MAX_K): a 200."""
    from recsys.retrieval.serve import MAX_K, MAX_ROWS

    rows = [{"user_id": users[i % len(users)], "k": MAX_K} for i in range(MAX_ROWS)]
    start = time.monotonic()
    status, text = post(url, json.dumps({"dataframe_records": rows}).encode())
    failed = [] if status == 200 else [f"the largest valid request: HTTP {status} {text[:200]!r}"]
    return time.monotonic() - start, failed


def run(workdir: Path) -> dict[str, Any]:
    """Serve a tiny model, send the bad requests, then check a valid one answers as before."""
    from recsys.retrieval.serve import MAX_K, MAX_ROWS

    workdir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(workdir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = scoring_server_cmd(model.path, port)
    valid = json.dumps(
        {"dataframe_records": [{"user_id": u, "k": 5} for u in [*model.known_users, "nobody"]]}
    )
    requests = bad_requests(model.known_users[0])
    with running(cmd, f"{url}/ping", workdir / "serve.log", env) as proc:
        status, before = post(f"{url}/invocations", valid.encode())
        if status != 200:
            raise RuntimeError(f"the valid request failed before any fault: HTTP {status} {before[:300]}")
        largest_s, largest_failed = _largest_valid(f"{url}/invocations", model.known_users)
        start = time.monotonic()
        failures = inject(f"{url}/invocations", requests, start + DEADLINE_S)
        done = time.monotonic()
        alive = proc.poll() is None
        status, after = post(f"{url}/invocations", valid.encode())
        recover_s = time.monotonic() - done if status == 200 else None
    same = status == 200 and json.loads(after) == json.loads(before)
    lost = "; ".join(
        [*largest_failed, *failures, *([] if alive else ["the server process died"]),
         *([] if same else [f"the valid request after the faults: HTTP {status} {after[:200]!r}"])]
    )  # fmt: skip
    return {
        "scenario": SCENARIO,
        "injected": f"{len(requests)} bad requests to mlflow models serve on 127.0.0.1 "
        f"(random JSON ×{RANDOM_BODIES}, {OVERSIZED_ROWS:,} rows, huge k, wrong types, missing fields, empty body)",
        "survived": not lost,
        "lost": lost or "nothing",
        "recover_s": None if recover_s is None else round(recover_s, 3),
        "detail": f"{len(requests) - len(failures)}/{len(requests)} answered 4xx with a message in "
        f"{done - start:.1f} s; server alive: {alive}; valid answer unchanged after: {same}; the largest "
        f"valid request ({MAX_ROWS:,} rows, k={MAX_K:,}) took {largest_s:.2f} s",
    }
