"""`recsys bench train-scale`: DLRM with big tables through the full path on this machine, printed.

26 tables × 1M rows × dim 64 (~6.6 GB of fp32 weights; row-wise Adagrad adds 1/64 of that), dense
512-256-64, over 512-512-256-1, batch 2048 per rank: `recsys train` (MDS loader, pipeline, MLflow)
beside bench-train's bare TorchRec loop over in-memory batches (the architecture of
facebookresearch/dlrm's `dlrm_main`), 1 and 2 CPU ranks (torchrun, gloo), table-wise and
column-wise (row-wise needs NCCL: the gpu tier); samples/s and peak RSS per rank. Then checkpoint
cost at that size: size on disk, the time the loop is blocked in an async save (staging the copy),
the time spent waiting for the background write, DCP load time in a fresh process, and that the
resumed run continues from the saved step to the end.

Tables are sized by vocabulary, not by rows: the data is written straight in the prepared-data
layout (recsys.data.metadata + MDS blocks, ids uniform over each table's rows) with a few hundred
thousand rows, so no prepare step has to hold a million distinct ids per feature.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from recsys.bench.train import BATCH, BENCH_DIR, WARMUP, _configs, _parts_table, run_workers, summarize

ROOT = BENCH_DIR.parent / "train_scale"
NUM_DENSE = 13
SHARDINGS = {
    "table_wise": ["train.sharding.types=[table_wise]"],
    # TorchRec's column-wise shards are ≥128 wide by default: dim 64 would stay one shard.
    "column_wise": ["train.sharding.types=[column_wise]", "train.sharding.min_partition=32"],
}
CKPT_EVERY = 5


# ------------------------------------------------------------------------------------------- data
def write_scale_data(
    out: Path, tables: int, table_rows: int, train_rows: int, eval_rows: int = 8192, seed: int = 0
) -> Path:
    """A prepared folder (metadata.json, vocab/, MDS train/val/test) with `tables` features of
    `table_rows` rows each; labels from a hidden logistic model of the dense features and a few ids.
    Written once per shape (reused when metadata.json says the same shape)."""
    from recsys.data.mds import write_split
    from recsys.data.metadata import (
        OOV_TOKEN,
        Metadata,
        SparseFeature,
        SplitInfo,
        metadata_path,
        write_metadata,
    )

    facts = {"generator": "bench train-scale", "tables": tables, "table_rows": table_rows, "seed": seed}
    sizes = {"train": train_rows, "val": eval_rows, "test": eval_rows}
    if metadata_path(out).is_file():
        meta = json.loads(metadata_path(out).read_text())
        if meta.get("synthetic") == facts and all(meta["splits"][s]["rows"] == n for s, n in sizes.items()):
            return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab").mkdir(exist_ok=True)
    names = [f"cat_{i}" for i in range(tables)]
    # line k = raw id of row k; these ids are their own raw values
    ids = "\n".join([OOV_TOKEN, *map(str, range(1, table_rows))]) + "\n"
    for name in names:
        (out / "vocab" / f"{name}.txt").write_text(ids)
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, NUM_DENSE)
    splits = {}
    for split, n in sizes.items():
        dense = rng.exponential(1.0, (n, NUM_DENSE)).astype(np.float32)
        sparse = rng.integers(1, table_rows, (n, tables), dtype=np.int64)
        logit = dense @ w - 1.0 + 0.5 * np.sin(sparse[:, :4].sum(axis=1))
        label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        blocks = write_split(out / split, label, np.log1p(dense), sparse, 256, None, 1 << 26)
        splits[split] = SplitInfo(rows=n, blocks=blocks, positives=int(label.sum()))
    meta = Metadata(
        name="bench-train-scale",
        kind="ctr",
        block_size=256,
        dense_features=[f"int_{i}" for i in range(NUM_DENSE)],
        sparse_features=[
            SparseFeature(name=n, num_embeddings=table_rows, vocab_file=f"vocab/{n}.txt") for n in names
        ],
        splits=splits,
        sources=[],
        label={"mode": "as_is"},
        synthetic=facts,
    )
    write_metadata(out, meta)
    return out


def scale_overrides(root: Path, prepared: Path, steps: int, sharding: str) -> list[str]:
    """bench-train's DLRM overrides (model, optimizers, batch, MLflow) on the scale data and sharding."""
    base = [o for o in _configs(root, steps, 2)["dlrm"] if not o.startswith(("name=", "data.prepared_dir="))]
    return [
        *base,
        "name=bench-train-scale",
        f"data.prepared_dir={prepared}",
        "eval.batch_size=4096",
        *SHARDINGS[sharding],
    ]


# ----------------------------------------------------------------------------------- checkpoints
def _complete(root: Path) -> list[Path]:
    """Complete checkpoint folders under a checkpoint root, oldest first."""
    return sorted(p for p in root.glob("run-*/step-*") if not p.name.endswith(".tmp"))


def _ckpt_worker(phase: str, overrides: list[str]) -> None:
    """One rank: `save` trains 2×CKPT_EVERY steps saving (async) every CKPT_EVERY; `resume` continues
    the newest checkpoint in a fresh process for 3 more steps. Rank 0 prints `BENCH {...}`."""
    import torch.distributed as dist

    from recsys import checkpoint
    from recsys.bench.checkpoint import _patched_run
    from recsys.bench.peak_rss import reset_peak, status_kb
    from recsys.config import load_config
    from recsys.distributed import barrier, init_distributed

    cfg = load_config("dlrm_synth", overrides)
    env = init_distributed(cfg.train.device)
    root = Path(cfg.train.checkpoint.dir or ".")
    waits: list[float] = []
    orig_wait = checkpoint.Checkpointer.wait

    def wait(self: Any) -> None:
        t = time.perf_counter()
        orig_wait(self)
        waits.append(time.perf_counter() - t)

    checkpoint.Checkpointer.wait = wait  # type: ignore[method-assign]
    reset_peak()
    try:
        if phase == "save":
            cfg = load_config("dlrm_synth", [*overrides, f"train.max_steps={2 * CKPT_EVERY}"])
            run = _patched_run(cfg, "never")
        else:
            last = _complete(root)[-1]
            cfg = load_config("dlrm_synth", [*overrides, f"train.max_steps={2 * CKPT_EVERY + 3}"])
            run = _patched_run(cfg, str(last))
            run["resumed_from"] = int(last.name.removeprefix("step-"))
    finally:
        checkpoint.Checkpointer.wait = orig_wait  # type: ignore[method-assign]
    run["waits"], run["peak_mib"] = waits, status_kb("VmHWM") / 1024
    barrier()
    if env.is_main:
        last = _complete(root)[-1]
        run["size"] = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
        run["steps_on_disk"] = [int(p.name.removeprefix("step-")) for p in _complete(root)]
    gathered: list[Any] = [run]
    if env.world_size > 1:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, run)
    if env.is_main:
        print("BENCH " + json.dumps({"world": env.world_size, "ranks": gathered}), flush=True)
    barrier()
    dist.destroy_process_group()


def bench_checkpoint_at_scale(
    nproc: int, overrides: list[str], ckpt_dir: Path, async_save: bool = True
) -> dict[str, Any]:
    """Save (async by default: the state is copied, then written in the background, so the process
    holds the state twice for a moment) then resume in a fresh process; the figures of both phases."""
    sets = [
        *[o for o in overrides if not o.startswith("train.max_steps")],
        "tracking.enabled=false",
        f"train.checkpoint.dir={ckpt_dir}",
        f"train.checkpoint.every_steps={CKPT_EVERY}",
        "train.checkpoint.keep_last=1",
        f"train.checkpoint.async_save={str(async_save).lower()}",
    ]
    saved = run_workers("recsys.bench.train_scale", nproc, ["save", *sets])
    resumed = run_workers("recsys.bench.train_scale", nproc, ["resume", *sets])
    ranks = saved["ranks"]
    # save() first waits for the previous background write: what is left is staging the copy.
    first = max(r["save"][0] for r in ranks)
    return {
        "ranks": nproc,
        "mode": "async" if async_save else "sync",
        "size_gib": ranks[0]["size"] / 2**30,
        "saved_steps": ranks[0]["steps_on_disk"],
        "blocked_first_s": first,
        "blocked_median_s": statistics.median(
            max(r["save"][i] for r in ranks) for i in range(len(ranks[0]["save"]))
        ),
        "write_wait_s": max(sum(r["waits"]) for r in ranks),
        # train() seconds include the blocking part of each save
        "train_s_per_step": (ranks[0]["seconds"] - sum(ranks[0]["save"])) / (2 * CKPT_EVERY),
        "load_s": max(r["load"][0] for r in resumed["ranks"]),
        "resumed_from": resumed["ranks"][0]["resumed_from"],
        "resume_first_step_s": max(r["first_step"] for r in resumed["ranks"]),
        "after_resume_steps": resumed["ranks"][0]["steps_on_disk"],
        "peak_mib_save": [r["peak_mib"] for r in ranks],
        "peak_mib_resume": [r["peak_mib"] for r in resumed["ranks"]],
    }


# ------------------------------------------------------------------------------------ orchestrator
def bench_train_scale(
    table_rows: int = 1_000_000,
    tables: int = 26,
    steps: int = 10,
    reps: int = 1,
    ranks: tuple[int, ...] = (1, 2),
    shardings: tuple[str, ...] = ("table_wise", "column_wise"),
    checkpoint: bool = True,
    root: Path = ROOT,
    async_save: bool = True,
) -> dict[str, Any]:
    """Write the data once, measure every (ranks, sharding), then checkpoint cost (with the first of
    `shardings`); print tables."""
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    root.mkdir(parents=True, exist_ok=True)
    train_rows = 256 * -(-(steps + WARMUP) * BATCH * max(*ranks, 2) * 105 // 100 // 256)
    train_rows = max(train_rows, 256 * -(-(2 * CKPT_EVERY + 3) * BATCH * max(ranks) // 256))
    t = time.perf_counter()
    prepared = write_scale_data(root / f"data-{tables}x{table_rows}", tables, table_rows, train_rows)
    gb = tables * table_rows * 64 * 4 / 1e9
    print(
        f"bench train-scale: {tables} tables × {table_rows:,} rows × dim 64 ({gb:.2f} GB fp32 weights), "
        f"{train_rows:,} train rows (data ready in {time.perf_counter() - t:.0f} s); {steps} timed steps after "
        f"{WARMUP} warm-up, {reps} repetition(s), batch {BATCH} per rank, {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = []
    for sharding in shardings:
        for nproc in ranks:
            t = time.perf_counter()
            sets = scale_overrides(root, prepared, steps, sharding)
            s = summarize(
                run_workers("recsys.bench.train", nproc, ["dlrm", str(steps), str(reps), *sets]), steps
            )
            row = {"sharding": sharding, "model": f"dlrm {sharding}", "ranks": nproc, **s}
            rows.append({**row, "load": os.getloadavg()[0]})
            print(
                f"{sharding} ranks={nproc}: bare {s['bare']['rate']:,.0f} full {s['full']['rate']:,.0f} samples/s "
                f"(full/bare {s['full']['ratio']:.2f}, per repetition {'/'.join(f'{x:.2f}' for x in s['full']['paired'])}); peak RSS/rank MiB bare {_mib(s['bare']['peak_mib'])} "
                f"full {_mib(s['full']['peak_mib'])}; {time.perf_counter() - t:.0f} s",
                flush=True,
            )
    if rows:
        # rank 0's ms per step in what the full path adds (loader, progress, all-reduce, MLflow, GC)
        print("\n" + throughput_table(rows) + "\n\n" + _parts_table(rows))
    ckpts = []
    if checkpoint:
        for nproc in ranks:
            sets = scale_overrides(root, prepared, steps, shardings[0] if shardings else "table_wise")
            ckpt_dir = (root / "checkpoints" / time.strftime("%Y%m%d-%H%M%S") / f"w{nproc}").resolve()
            ckpts.append(bench_checkpoint_at_scale(nproc, sets, ckpt_dir, async_save))
            # 6.3 GiB a checkpoint at full size, and every run writes new ones: measured, they go.
            shutil.rmtree(ckpt_dir.parent, ignore_errors=True)
            print(json.dumps(ckpts[-1]), flush=True)
        print("\n" + checkpoint_table(ckpts))
    return {"throughput": rows, "checkpoint": ckpts}


def _mib(xs: list[float]) -> str:
    return " / ".join(f"{x:,.0f}" for x in xs)


def throughput_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: samples/s bare vs full, their ratio, peak RSS per rank."""
    lines = [
        "| sharding | ranks | bare samples/s | full samples/s | full/bare | peak RSS/rank MiB bare | peak RSS/rank MiB full | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, f = r["bare"], r["full"]
        lines.append(
            f"| {r['sharding']} | {r['ranks']} | {b['rate']:,.0f} | {f['rate']:,.0f} | {f['ratio']:.2f} | "
            f"{_mib(b['peak_mib'])} | {_mib(f['peak_mib'])} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def checkpoint_table(ckpts: list[dict[str, Any]]) -> str:
    """Markdown: checkpoint size, blocked save, background write, load, resume."""
    lines = [
        "| ranks | checkpoint GiB | save blocked (first / median) | waiting for writes | load | resumed from → ran to | peak RSS/rank MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in ckpts:
        lines.append(
            f"| {c['ranks']} | {c['size_gib']:.2f} | {c['mode']} {c['blocked_first_s']:.1f} s / {c['blocked_median_s']:.1f} s | "
            f"{c['write_wait_s']:.1f} s | {c['load_s']:.1f} s | step {c['resumed_from']} → {max(c['after_resume_steps'])} | "
            f"save {_mib(c['peak_mib_save'])}; resume {_mib(c['peak_mib_resume'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _ckpt_worker(sys.argv[2], sys.argv[3:])
