"""`recsys bench train` / `make bench-train`: training throughput, printed (never asserted).

For DLRM (13 dense, 26 sparse tables, dim 64, batch 2048 per rank) and the Two-Tower (dim 64, batch
2048 per rank), on 1 and 2 CPU ranks under torchrun, samples/s of

- bare: a TorchRec loop over pre-built in-memory Batches (rows of the same prepared train split, so
  ids follow the same distribution): DMP with the planner's plan, the fused sparse optimizer, the
  dense optimizer, the LR schedule and — as the config says — TrainPipelineSparseDist. No loader,
  no metrics, no MLflow.
- full: `recsys.train.train` itself over the prepared MDS data — streaming loader, pipeline, the
  windowed loss all-reduce, tqdm, MLflow logging to a local SQLite store.

Both modes run in the same torchrun workers, interleaved (bare, full, full, bare, …) for `reps`
repetitions so machine load hits both alike. Each is timed identically: wall time from the end of
step WARMUP to the end of step WARMUP+steps (per-step timestamps; the full path's come from its
progress-bar update, which runs once per step on every rank), the slowest rank's time counts.
Printed: median samples/s over repetitions, the median of the per-repetition full/bare ratios, the
full path's extras measured directly on rank 0's training thread (loader, progress bar, loss
all-reduce, the per-batch SIGTERM agreement, MLflow, extra GC) as a share of its step time — the
figure machine load cannot swamp — peak RSS per rank (VmHWM, reset before each run) and CPU-seconds
per rank of the timed steps (the per-step table shows rank 0's beside its wall ms: CPU time of every
thread, less exposed to load than wall time, though contention inflates it too).
OMP_WAIT_POLICY=PASSIVE: OpenMP spin-waits cost up to 20x on a loaded machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recsys.bench.peak_rss import reset_peak, status_kb

BENCH_DIR = Path(".bench/train")
WARMUP = 5
BATCH = 2048
PARTS = ("loader", "progress", "allreduce", "preempt", "mlflow", "gc")
_CONFIG_NAME = {"dlrm": "dlrm_synth", "two_tower": "two_tower_synth"}


def _rows_needed(steps: int, max_ranks: int) -> int:
    """Train rows for WARMUP+steps steps of every rank within one epoch (an epoch end validates)."""
    return (steps + WARMUP) * BATCH * max_ranks


def _configs(root: Path, steps: int, max_ranks: int) -> dict[str, list[str]]:
    """--set overrides of the two benchmarked configs: everything that shapes the work is pinned here,
    so edits to the shipped configs do not move the benchmark."""
    need = _rows_needed(steps, max_ranks)
    # DLRM: a random split with small val/test keeps the (untimed) end-of-run evaluation short.
    dlrm_rows = 50_000 * math.ceil(need / 0.96 * 1.05 / 50_000)
    # Two-Tower: leave-last-1 split; 40 interactions per user on average, 38 of them train rows.
    users = 1000 * math.ceil(need / 38 * 1.2 / 1000)
    common = [
        f"train.batch_size={BATCH}",
        "train.epochs=1",
        f"train.max_steps={steps + WARMUP}",
        "train.val_every_steps=0",
        "train.log_every_steps=10",
        "train.pipeline=true",
        "train.warmup_steps=0",
        "train.device=cpu",
        "train.dense_optimizer.name=adam",
        "train.dense_optimizer.lr=0.001",
        "train.sparse_optimizer.name=rowwise_adagrad",
        "train.sparse_optimizer.lr=0.05",
        "data.block_size=256",
        "data.num_workers=0",
        "tracking.enabled=true",
        "tracking.log_model=false",
        f"tracking.uri=sqlite:///{(root / 'mlflow.db').resolve()}",
        "tracking.experiment=bench-train",
        "eval.batch_size=8192",
    ]
    return {
        "dlrm": [
            f"name=bench-dlrm-{dlrm_rows}",
            f"data.source.rows={dlrm_rows}",
            "data.source.num_dense=13",
            "data.source.num_sparse=26",
            "data.source.cardinality=100000",
            "data.source.days=1",
            "data.split.mode=random",
            "data.split.val_fraction=0.02",
            "data.split.test_fraction=0.02",
            f"data.prepared_dir={root / 'dlrm'}",
            f"data.raw_dir={root / f'dlrm-raw-{dlrm_rows}'}",  # synth reuses a raw dir's files
            "model.embedding_dim=64",
            "model.dlrm.interaction=dot",
            "model.dlrm.dense_arch_layers=[512,256,64]",
            "model.dlrm.over_arch_layers=[512,512,256,1]",
            *common,
        ],
        "two_tower": [
            f"name=bench-two-tower-{users}",
            f"data.source.num_users={users}",
            "data.source.num_items=5000",
            "data.source.interactions_per_user=40",
            f"data.prepared_dir={root / 'two_tower'}",
            f"data.raw_dir={root / f'two_tower-raw-{users}'}",
            "model.embedding_dim=64",
            "model.two_tower.layers=[128,64]",
            "model.two_tower.loss=softmax",
            *common,
            "eval.ks=[10,50,100]",
        ],
    }


# ------------------------------------------------------------------------------------- per process
def _bare_batches(cfg: Any, rank: int, world: int, n: int) -> list[Any]:
    """`n` distinct in-memory Batches of this rank: consecutive slices of the prepared train split
    (same shape, layout and id distribution as the loader's; nothing is reused across steps, since
    the pipeline's input dist may hold on to a batch's buffers)."""
    import numpy as np

    from recsys.data.loader import read_split_arrays, to_batch
    from recsys.data.metadata import read_metadata

    meta = read_metadata(cfg.data.prepared_dir)
    arrays = read_split_arrays(cfg.data.prepared_dir, "train", meta)
    b = cfg.train.batch_size
    if len(arrays["label"]) < n * b * world:
        raise RuntimeError(f"{cfg.data.prepared_dir}: train split too small for {n} bare steps")
    keys = [f.name for f in meta.sparse_features]
    out = []
    for i in range(n):
        lo = (i * world + rank) * b
        sl = slice(lo, lo + b)
        # to_batch wants the sparse ids key-major [S, B] (KJT values are grouped by key).
        sparse_t = np.ascontiguousarray(arrays["sparse"][sl].T)
        out.append(to_batch(arrays["label"][sl].copy(), arrays["dense"][sl].copy(), sparse_t, keys))
    return out


def _bare(cfg: Any, batches: list[Any]) -> list[tuple[float, float]]:
    """The bare TorchRec loop; returns (wall, CPU) timestamps after each step."""
    from recsys.data.metadata import read_metadata
    from recsys.distributed import init_distributed, make_optimizer, shard_model
    from recsys.models.task import build_task, log_q_from_train
    from recsys.trainer import seed_everything

    env = init_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    meta = read_metadata(cfg.data.prepared_dir)
    task = build_task(cfg, meta, "meta", log_q_from_train(cfg, meta), dense_device=env.device)
    model, _ = shard_model(task, cfg, env)
    optimizer, schedule = make_optimizer(model, cfg, len(batches))
    pipeline = None
    if cfg.train.pipeline:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(model, optimizer, env.device, execute_all_batches=True)
    model.train()
    it = iter(batches)
    stamps = []
    for step in range(len(batches)):
        schedule.set(step)
        if pipeline is not None:
            loss, _, _ = pipeline.progress(it)
        else:
            batch = next(it).to(env.device)
            optimizer.zero_grad()
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()
        float(loss)  # the full path reads the loss every step too
        stamps.append((time.perf_counter(), time.process_time()))
    return stamps


def _full(cfg: Any) -> tuple[list[tuple[float, float]], list[tuple[str, float, float]]]:
    """`recsys.train.train(cfg)`; returns (wall, CPU) timestamps per step, taken at its progress-bar
    update (after the step, before that step's logging: logging lands in the next step's interval),
    and (part, end, seconds) events of the parts the bare loop lacks: loader, progress bar, the loss
    all-reduce and MLflow metric logging."""
    from recsys import distributed, stop_vote, tracking
    from recsys import train as train_mod
    from recsys import trainer as trainer_mod
    from recsys.data import loader as loader_mod

    stamps: list[tuple[float, float]] = []
    events: list[tuple[str, float, float]] = []

    def timed(part: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                e = time.perf_counter()
                events.append((part, e, e - t))

        return wrapper

    orig_iter = loader_mod.BatchLoader.__iter__

    def timed_iter(self: Any) -> Any:
        inner = orig_iter(self)
        while True:
            t = time.perf_counter()
            try:
                batch = next(inner)
            except StopIteration:
                return
            e = time.perf_counter()
            events.append(("loader", e, e - t))
            yield batch

    orig_update = trainer_mod._Progress.update

    def update(self: Any, loss: float, samples_per_s: float) -> None:
        timed("progress", orig_update)(self, loss, samples_per_s)
        stamps.append((time.perf_counter(), time.process_time()))

    patches = [
        (trainer_mod._Progress, "update", update),
        (loader_mod.BatchLoader, "__iter__", timed_iter),
        (distributed, "all_reduce_sum", timed("allreduce", distributed.all_reduce_sum)),
        # the per-batch "did any rank get SIGTERM?" agreement (a gloo all-reduce from 2 ranks on)
        (stop_vote.StopVote, "cast", timed("preempt", stop_vote.StopVote.cast)),
        (stop_vote.StopVote, "settle", timed("preempt", stop_vote.StopVote.settle)),
        (tracking.MlflowTracker, "log_metrics", timed("mlflow", tracking.MlflowTracker.log_metrics)),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    try:
        # No checkpoints in the timed runs: `make bench-checkpoint` measures those.
        cfg = cfg.model_copy(deep=True)
        cfg.train.checkpoint.every_epoch = False
        train_mod.train(cfg, resume="never")
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    return stamps, events


def _worker(model: str, steps: int, reps: int, overrides: list[str]) -> None:
    """One rank: `reps` interleaved bare/full runs; rank 0 prints a JSON line `BENCH {...}`."""
    import torch.distributed as dist

    from recsys.config import load_config
    from recsys.distributed import barrier, init_distributed

    cfg = load_config(_CONFIG_NAME[model], overrides)
    env = init_distributed(cfg.train.device)  # held across runs: train() then leaves it open
    n = steps + WARMUP
    # An untimed bare run first: one-off process costs (thread pools, allocator growth, lazy kernel
    # init) must not land on whichever mode happens to run first.
    _bare(cfg, _bare_batches(cfg, env.rank, env.world_size, WARMUP))
    records = []
    gc_events: list[tuple[str, float, float]] = []
    gc_start = [0.0]

    def gc_timer(phase: str, info: dict) -> None:
        # Python's cyclic GC pauses the training thread; the full path allocates far more objects.
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            e = time.perf_counter()
            gc_events.append(("gc", e, e - gc_start[0]))

    gc.callbacks.append(gc_timer)
    for rep in range(reps):
        # bare, full | full, bare | …: a drift in machine load favours neither mode.
        for mode in ("bare", "full") if rep % 2 == 0 else ("full", "bare"):
            batches = _bare_batches(cfg, env.rank, env.world_size, n) if mode == "bare" else None
            gc.collect()
            barrier()
            reset_peak()
            start = time.perf_counter()
            gc_events.clear()
            stamps, events = (_bare(cfg, batches), []) if batches is not None else _full(cfg)
            events = events + gc_events
            if len(stamps) != n:
                raise RuntimeError(f"{mode}: {len(stamps)} steps ran, expected {n}")
            (t0, c0), (t1, c1) = stamps[WARMUP - 1], stamps[-1]
            records.append(
                {
                    "rep": rep,
                    "mode": mode,
                    "rank": env.rank,
                    "seconds": t1 - t0,
                    "cpu_s": c1 - c0,
                    "run_s": time.perf_counter() - start,
                    "parts": {p: sum(d for q, e, d in events if q == p and t0 < e <= t1) for p in PARTS},
                    "peak_mib": status_kb("VmHWM") / 1024,
                }
            )
            del batches
    gathered: list[Any] = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(gathered, records)
    else:
        gathered = [records]
    if env.is_main:
        recs = [r for per_rank in gathered for r in per_rank]
        print("BENCH " + json.dumps({"model": model, "world": env.world_size, "records": recs}), flush=True)
    barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------- orchestrator
def run_workers(module: str, nproc: int, args: list[str]) -> dict:
    """`python -m <module> --worker ARGS` under torchrun on `nproc` ranks; rank 0's `BENCH {...}` line."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", module, "--worker", *args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc))),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(
        f"{module} {' '.join(args[:2])} on {nproc} ranks failed (rc {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    )


def _run(model: str, nproc: int, steps: int, reps: int, overrides: list[str]) -> dict:
    return run_workers("recsys.bench.train", nproc, [model, str(steps), str(reps), *overrides])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(result: dict, steps: int) -> dict[str, dict[str, Any]]:
    """Per mode: median samples/s over repetitions (each from the slowest rank's window), every
    repetition's rate, and per rank the max peak RSS and the median CPU-seconds of the timed steps."""
    world = result["world"]
    out: dict[str, dict[str, Any]] = {}
    for mode in ("bare", "full"):
        recs = [r for r in result["records"] if r["mode"] == mode]
        reps = sorted({r["rep"] for r in recs})
        rates = [steps * BATCH * world / max(r["seconds"] for r in recs if r["rep"] == rep) for rep in reps]
        out[mode] = {
            "rate": statistics.median(rates),
            "rates": rates,
            "peak_mib": [max(r["peak_mib"] for r in recs if r["rank"] == k) for k in range(world)],
            "cpu_s": [statistics.median(r["cpu_s"] for r in recs if r["rank"] == k) for k in range(world)],
            "run_s": statistics.median(r["run_s"] for r in recs if r["rank"] == 0),
            "step_ms": 1000 * statistics.median(r["seconds"] for r in recs if r["rank"] == 0) / steps,
            # process CPU (every thread) per step: less exposed to machine load than wall time
            "cpu_ms": 1000 * statistics.median(r["cpu_s"] for r in recs if r["rank"] == 0) / steps,
            "parts_ms": {
                p: 1000 * statistics.median(r["parts"][p] for r in recs if r["rank"] == 0) / steps
                for p in PARTS
            },
        }
    # Bare and full of one repetition ran back to back, so their ratio is far less exposed to the
    # machine's load drifting than the ratio of the two medians.
    out["full"]["paired"] = [f / b for f, b in zip(out["full"]["rates"], out["bare"]["rates"], strict=True)]
    out["full"]["ratio"] = statistics.median(out["full"]["paired"])
    return out


def bench_train(
    steps: int = 20,
    reps: int = 3,
    models: tuple[str, ...] = ("dlrm", "two_tower"),
    ranks: tuple[int, ...] = (1, 2),
) -> list[dict]:
    """Prepare the data once (under .bench/train/), measure every (model, ranks), print a table."""
    from recsys.config import load_config
    from recsys.demo import ensure_prepared

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    # Data sized for at least 2 ranks, so `--ranks 1` and the default share one prepared copy.
    max_ranks = max(*ranks, 2)
    cfgs = _configs(BENCH_DIR, steps, max_ranks)
    print(
        f"bench-train: {steps} timed steps after {WARMUP} warm-up steps, {reps} interleaved repetitions, "
        f"batch {BATCH} per rank, {os.cpu_count()} CPUs, OMP_WAIT_POLICY=PASSIVE",
        flush=True,
    )
    rows = []
    for model in models:
        t = time.perf_counter()
        cfg = load_config(_CONFIG_NAME[model], cfgs[model])
        msg = ensure_prepared(cfg)
        print(f"{msg} ({time.perf_counter() - t:.0f} s)", flush=True)
        for nproc in ranks:
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            s = summarize(_run(model, nproc, steps, reps, cfgs[model]), steps)
            row = {"model": model, "ranks": nproc, "load": (load0 + os.getloadavg()[0]) / 2, **s}
            rows.append(row)
            print(
                f"{model} ranks={nproc}: bare {_fmt_rates(s['bare']['rates'])}  full "
                f"{_fmt_rates(s['full']['rates'])} samples/s (full/bare "
                + "/".join(f"{x:.2f}" for x in s["full"]["paired"])
                + f"); a whole run {s['bare']['run_s']:.0f} s bare, "
                f"{s['full']['run_s']:.0f} s full (with setup and final evaluation); "
                f"{time.perf_counter() - t:.0f} s in all, load {row['load']:.1f}",
                flush=True,
            )
    print()
    print(_table(rows, steps))
    print()
    print(_parts_table(rows))
    return rows


def _fmt_rates(rates: list[float]) -> str:
    return "/".join(f"{r:,.0f}" for r in rates)


def extras_fraction(row: dict) -> float:
    """Time the full path spends on what the bare loop lacks (loader, progress bar, loss all-reduce,
    MLflow, extra GC), measured on rank 0's training thread, as a fraction of its step time: the
    overhead figure that machine load does not swamp."""
    full, bare = row["full"]["parts_ms"], row["bare"]["parts_ms"]
    extra = sum(full[p] for p in PARTS if p != "gc") + max(full["gc"] - bare["gc"], 0.0)
    return extra / row["full"]["step_ms"]


def _table(rows: list[dict], steps: int) -> str:
    """Markdown table: median samples/s (wall clock, all ranks), the median of the per-repetition
    full/bare ratios, the directly measured extras, peak RSS and CPU-seconds per rank."""
    head = (
        "| model | ranks | bare samples/s | full samples/s | full/bare | full-path extras | "
        "peak RSS/rank MiB bare | peak RSS/rank MiB full | CPU-s/rank bare | CPU-s/rank full | load |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        b, f = r["bare"], r["full"]

        def per_rank(xs: list[float]) -> str:
            return " / ".join(f"{x:,.0f}" for x in xs)

        def cpu(xs: list[float]) -> str:
            return " / ".join(f"{x:.1f}" for x in xs)

        lines.append(
            f"| {r['model']} | {r['ranks']} | {b['rate']:,.0f} | {f['rate']:,.0f} | "
            f"{f['ratio']:.2f} | {extras_fraction(r):.1%} | {per_rank(b['peak_mib'])} | {per_rank(f['peak_mib'])} | "
            f"{cpu(b['cpu_s'])} | {cpu(f['cpu_s'])} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def _parts_table(rows: list[dict]) -> str:
    """Markdown table: rank 0's median wall and CPU ms per timed step, bare vs full, and the full
    path's extras (wall ms on the training thread)."""
    lines = [
        "| model | ranks | step ms bare | step ms full | CPU ms bare | CPU ms full | "
        + " | ".join(f"{p} ms" for p in PARTS)
        + " |",
        "|" + "---|" * (6 + len(PARTS)),
    ]
    for r in rows:
        parts = " | ".join(
            f"{r['full']['parts_ms'][p]:.1f}"
            + (f" (bare {r['bare']['parts_ms'][p]:.1f})" if p == "gc" else "")
            for p in PARTS
        )
        lines.append(
            f"| {r['model']} | {r['ranks']} | {r['bare']['step_ms']:.0f} | {r['full']['step_ms']:.0f} | "
            f"{r['bare']['cpu_ms']:.0f} | {r['full']['cpu_ms']:.0f} | {parts} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m recsys.bench.train [--steps N] [--reps R]`, or a torchrun worker (`--worker …`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        model, steps, reps, *overrides = argv[1:]
        _worker(model, int(steps), int(reps), overrides)
        return 0
    p = argparse.ArgumentParser(description="training throughput, bare TorchRec loop vs the full trainer")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (after the warm-up)")
    p.add_argument("--reps", type=int, default=3, help="interleaved bare/full repetitions")
    p.add_argument("--models", nargs="+", default=["dlrm", "two_tower"], choices=list(_CONFIG_NAME))
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    a = p.parse_args(argv)
    bench_train(a.steps, a.reps, tuple(a.models), tuple(a.ranks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
