"""`make bench-serving` / `recsys bench serving`: latency of the served models under a bounded load.

Prints figures; asserts nothing. Steps (building is not timed):
  data      generated interactions over a catalogue of `items` items (every item appears at least
            once, the rest Zipf-popular), USERS users with EVENTS events each, in time order;
  retriever a history-aware Two-Tower (mean pooling of the last HISTORY items) trained for STEPS steps:
            the latency is the point, not its quality;
  ranker    a DLRM on the same interactions with one uniform negative per positive (`data.negatives`),
            STEPS steps. Not the cross-fitted candidates ranker of `recsys data candidates`: its
            item-to-item feature is a dense items × items table (40 GB at 100k items);
  models    `recsys serve build` of the retriever, and `recsys serve build --ranker-run-id` at N
            CANDIDATES (one pyfunc each), downloaded;
  serving   each model behind a real `mlflow models serve --env-manager local --workers W` on
            127.0.0.1; `clients` threads, each waiting for its answer before sending the next
            (closed loop), WARMUP requests each for every case, then `requests` each timed, top-10:
              (a) retrieval, a known user id;  (b) retrieval from a history of HISTORY item ids;
              (c) two-stage, a known user id;  (d) two-stage from a history of HISTORY item ids.
            p50/p99 of the client-side latency and requests/s (timed requests / wall time) per worker
            count asked for, the median one-row predict of the model loaded in this process (its own
            cost, no server), with
            the machine's load average next to each row (other work on the machine inflates both).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

USERS = 10_000
EVENTS = 60
HISTORY = 50
STEPS = 100
CANDIDATES = 100
K = 10
WARMUP = 20


def write_interactions(path: Path, items: int, seed: int = 0) -> None:
    """USERS × EVENTS rows (user, item, ts): the first `items` events a permutation of the catalogue,
    the others Zipf-popular; each user's events in increasing time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n = USERS * EVENTS
    pop = 1.0 / np.arange(1, items + 1) ** 0.8
    rest = rng.choice(items, size=max(n - items, 0), p=pop / pop.sum())
    item = np.concatenate([rng.permutation(items), rest])[:n]
    user = np.repeat(np.arange(USERS), EVENTS)
    ts = np.tile(np.arange(EVENTS), USERS) * 1000 + user
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in user]),
            "item": pa.array([f"i{i}" for i in item]),
            "ts": pa.array(ts.astype(np.int64)),
        }
    )
    pq.write_table(table, path)


def _config(work: Path, name: str, model: dict[str, Any], data: dict[str, Any]) -> Any:
    """A config over the generated file: `model` and extra `data` settings, STEPS steps, tracked in work/."""
    from recsys.config import config_from_dict

    return config_from_dict(
        {
            "name": f"bench-serving-{name}",
            "data": {
                "source": {
                    "kind": "table",
                    "path": str(work / "interactions.parquet"),
                    "user": "user",
                    "item": "item",
                    "sparse": ["user", "item"],
                    "timestamp": "ts",
                },
                "prepared_dir": str(work / name),
                "label": {"mode": "all_positive"},
                "split": {"mode": "leave_last_n", "n": 1},
                "block_size": 1024,
                **data,
            },
            "model": {"embedding_dim": 32, **model},
            "train": {
                "batch_size": 1024,
                "epochs": 1,
                "max_steps": STEPS,
                "pipeline": False,
                "val_every_steps": 10 * STEPS,
                "early_stopping": {"metric": None},
                "checkpoint": {"dir": str(work / f"ckpt-{name}")},
            },
            "eval": {"ks": [10], "batch_size": 4096, "val_retrieval": False},
            "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-serving"},
        }  # fmt: skip
    )


def build_models(work: Path, items: int) -> tuple[Path, Path, list[str], list[list[str]]]:
    """Train retriever and ranker, build and download both served models → (retrieval model folder,
    two-stage model folder, known user ids, their last HISTORY items)."""
    import mlflow

    from recsys.bench.quiet import quiet
    from recsys.data.prepare import prepare
    from recsys.retrieval.serve import build_model
    from recsys.retrieval.serve_two_stage import build_two_stage
    from recsys.train import train

    write_interactions(work / "interactions.parquet", items)
    tower = {"user_features": ["user"], "item_features": ["item"], "layers": [32],
             "history_pooling": "mean", "temperature": 0.1}  # fmt: skip
    tt_cfg = _config(
        work, "retriever", {"kind": "two_tower", "two_tower": tower}, {"history": {"length": HISTORY}}
    )
    rk_model = {"kind": "dlrm", "embedding_dim": 16,
                "dlrm": {"dense_arch_layers": [16], "over_arch_layers": [64, 32, 1]}}  # fmt: skip
    rk_cfg = _config(work, "ranker", rk_model, {"negatives": {"per_positive": 1, "seed": 0}})
    uri = tt_cfg.tracking.uri
    with quiet(work / "train.log"):
        prepare(tt_cfg, overwrite=True)
        tt = train(tt_cfg, resume="never").run_id
        prepare(rk_cfg, overwrite=True)
        rk = train(rk_cfg, resume="never").run_id
        built = [build_model(tt, uri, register=""), build_two_stage(tt, rk, uri, "", CANDIDATES)]
    mlflow.set_tracking_uri(uri)
    paths = [
        Path(mlflow.artifacts.download_artifacts(b.model_uri, dst_path=str(work / f"model-{j}")))
        for j, b in enumerate(built)
    ]
    users, histories = _histories(work / "interactions.parquet")
    return paths[0], paths[1], users, histories


def _histories(path: Path, n: int = 200) -> tuple[list[str], list[list[str]]]:
    """`n` users and their last HISTORY items (most recent last) from the generated file."""
    import pyarrow.parquet as pq

    t = pq.read_table(path).slice(0, n * EVENTS).to_pydict()  # users come in blocks of EVENTS rows
    users = [t["user"][j * EVENTS] for j in range(n)]
    hist = [t["item"][j * EVENTS : (j + 1) * EVENTS][-HISTORY:] for j in range(n)]
    return users, hist


def fire(url: str, bodies: list[bytes], clients: int, requests: int) -> tuple[np.ndarray, float]:
    """`clients` threads, each sending WARMUP then `requests` bodies one at a time (closed loop) →
    (latencies of the timed requests in ms, wall seconds of the timed phase)."""
    from recsys.chaos.serve_requests import post

    lat: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    failed: list[str] = []

    def client(c: int) -> None:
        for j in range(WARMUP):
            post(url, bodies[(c * 7919 + j) % len(bodies)])
        start.wait()
        for j in range(requests):
            t0 = time.perf_counter()
            status, text = post(url, bodies[(c * 7919 + WARMUP + j) % len(bodies)])
            lat[c].append((time.perf_counter() - t0) * 1000)
            if status != 200:
                failed.append(f"{status}: {text[:200]}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    return np.concatenate([np.asarray(x) for x in lat]), wall


def _bodies(users: list[str], histories: list[list[str]], with_history: bool) -> list[bytes]:
    rows = [
        {"user_id": u, "k": K, **({"history": h} if with_history else {})}
        for u, h in zip(users, histories, strict=True)
    ]
    return [json.dumps({"dataframe_records": [r]}).encode() for r in rows]


def serve_and_fire(
    model: Path, work: Path, cases: list[tuple[str, list[bytes]]], clients: int, requests: int, workers: int
) -> list[tuple[str, np.ndarray, float, float]]:
    """Serve `model` with `workers` workers and fire each case → (name, latencies ms, wall s, load 1 min)."""
    from recsys.chaos.serve_requests import free_port, running, scoring_server_cmd

    port = free_port()
    cmd, env = scoring_server_cmd(model, port)
    cmd[cmd.index("--workers") + 1] = str(workers)
    out = []
    with running(cmd, f"http://127.0.0.1:{port}/ping", work / f"serve-{model.name}.log", env, timeout=300):
        for _, bodies in cases:  # every case warm in every worker before any is timed
            fire(f"http://127.0.0.1:{port}/invocations", bodies, clients, 0)
        for name, bodies in cases:
            lat, wall = fire(f"http://127.0.0.1:{port}/invocations", bodies, clients, requests)
            out.append((name, lat, wall, os.getloadavg()[0]))
    return out


def in_process(model: Path, cases: list[tuple[str, list[bytes]]], n: int = 50) -> dict[str, float]:
    """Median ms of one-row `predict` calls per case, the model loaded in this process (no HTTP, no
    server, no concurrency): what a request costs the model itself."""
    import mlflow
    import pandas as pd

    loaded = mlflow.pyfunc.load_model(str(model))
    out = {}
    for name, bodies in cases:
        frames = [pd.DataFrame(json.loads(b)["dataframe_records"]) for b in bodies[: n + 5]]
        for f in frames[:5]:
            loaded.predict(f)
        times = []
        for f in frames[5:]:
            t0 = time.perf_counter()
            loaded.predict(f)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = float(np.median(times))
    return out


def bench_serving(
    items: int = 100_000, clients: int = 4, requests: int = 100, workers: tuple[int, ...] = (1, 2)
) -> None:
    """Build the models, serve them (each worker count in turn) and print p50/p99 ms and requests/s per case."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    rows: list[tuple[int, str, np.ndarray, float, float]] = []
    try:
        retrieval, two_stage, users, hist = build_models(work, items)
        print(f"built in {time.perf_counter() - t0:.0f} s: {items:,} items, {USERS:,} users, "
              f"two-stage N={CANDIDATES}; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        by_id, by_hist = _bodies(users, hist, False), _bodies(users, hist, True)
        models = [
            (retrieval, [("(a) retrieval, user id", by_id), (f"(b) retrieval, history {HISTORY}", by_hist)]),
            (two_stage, [(f"(c) two-stage N={CANDIDATES}, user id", by_id),
                         (f"(d) two-stage N={CANDIDATES}, history {HISTORY}", by_hist)]),
        ]  # fmt: skip
        alone = {k: v for model, cases in models for k, v in in_process(model, cases).items()}
        for w in workers:
            for model, cases in models:
                rows += [(w, *r) for r in serve_and_fire(model, work, cases, clients, requests, w)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmlflow models serve --workers W, {clients} closed-loop clients, {requests} timed requests "
          f"each after {WARMUP} warm-up, top-{K}, {items:,} items (flat index), torch threads "
          f"{os.environ.get('RECSYS_SERVE_TORCH_THREADS', '1')} per worker; 'model ms': median one-row "
          "predict in this process, no server")  # fmt: skip
    print(f"  {'W':>2} {'case':<36} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'model ms':>9} {'load 1m':>8}")
    for w, name, lat, wall, load in rows:
        p50, p99 = np.percentile(lat, [50, 99])
        print(
            f"  {w:>2} {name:<36} {p50:>8.1f} {p99:>8.1f} {len(lat) / wall:>7.1f} {alone[name]:>9.1f} {load:>8.1f}"
        )
    print(f"done in {time.perf_counter() - t0:.0f} s")
