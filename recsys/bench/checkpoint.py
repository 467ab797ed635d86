"""`recsys bench checkpoint` / `make bench-checkpoint`: checkpoint cost, printed (never asserted).

The DLRM of `make bench-train` (13 dense, 26 tables × up to 100k rows, dim 64, batch 2048 per rank) on
1 and 2 CPU ranks under torchrun. In the same workers, one after another:
- none:  `recsys.train.train` without checkpoints;
- sync:  a checkpoint every EVERY steps with dcp.save;
- async: the same with dcp.async_save (the loop waits for the copy of the state only);
- resume: a fresh process resumed from the last sync checkpoint (max_steps a few steps beyond it),
  beside a fresh process's cold start (`cold`); an untimed warm-up run precedes the throughput runs.
Printed per rank count: checkpoint size, time the loop was blocked per save (slowest rank), that as
a share of the interval between saves, samples/s of the three runs, DCP load time, and the time from
`train()` to the first finished step for a cold start and for the resume.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from recsys.bench.train import BENCH_DIR, _configs, run_workers

STEPS = 60
EVERY = 20


def _patched_run(cfg: Any, resume: str) -> dict[str, Any]:
    """train(cfg) with timers on Checkpointer.save/load and the first finished step."""
    from recsys import checkpoint, trainer
    from recsys.train import train

    out: dict[str, Any] = {"save": [], "load": [], "first_step": None}
    orig_save, orig_load, orig_step = (
        checkpoint.Checkpointer.save,
        checkpoint.Checkpointer.load,
        trainer.Trainer.train_step,
    )
    start = time.perf_counter()

    def save(self: Any, state: Any, meta: Any) -> None:
        t = time.perf_counter()
        orig_save(self, state, meta)
        out["save"].append(time.perf_counter() - t)

    def load(self: Any, info: Any, state: Any) -> None:
        t = time.perf_counter()
        orig_load(self, info, state)
        out["load"].append(time.perf_counter() - t)

    def train_step(self: Any, it: Any) -> float:
        loss = orig_step(self, it)
        if out["first_step"] is None:
            out["first_step"] = time.perf_counter() - start
        return loss

    checkpoint.Checkpointer.save, checkpoint.Checkpointer.load = save, load
    trainer.Trainer.train_step = train_step
    try:
        result = train(cfg, resume=resume)
    finally:
        checkpoint.Checkpointer.save, checkpoint.Checkpointer.load = orig_save, orig_load
        trainer.Trainer.train_step = orig_step
    out["samples_per_s"] = result.samples_per_s
    out["seconds"] = result.train_seconds
    return out


def _worker(phase: str, overrides: list[str]) -> None:
    """One rank of one phase (train, cold or resume); rank 0 prints `BENCH {...}` with every rank's timings."""
    import torch.distributed as dist

    from recsys.config import load_config
    from recsys.distributed import barrier, init_distributed

    base = load_config("dlrm_synth", overrides)
    env = init_distributed(base.train.device)
    root = Path(base.train.checkpoint.dir or ".") / f"w{env.world_size}"

    def cfg(mode: str, *sets: str) -> Any:
        return load_config("dlrm_synth", [*overrides, f"train.checkpoint.dir={root / mode}", *sets])

    runs: dict[str, Any] = {}
    every = [f"train.checkpoint.every_steps={EVERY}", "train.checkpoint.keep_last=10"]
    no_ckpt = "train.checkpoint.every_epoch=false"
    size = 0
    if phase == "cold":  # a fresh process: the first train() pays every one-off cost, like a restart
        runs["cold"] = _patched_run(cfg("cold", no_ckpt, "train.max_steps=5"), "never")
    elif phase == "resume":  # a fresh process resuming from the last sync checkpoint
        last = sorted((root / "sync").glob("run-*/step-*"))[-1]
        runs["resume"] = _patched_run(cfg("sync", *every, f"train.max_steps={STEPS + 5}"), str(last))
    else:
        _patched_run(cfg("warmup", no_ckpt, "train.max_steps=5"), "never")  # one-off costs, untimed
        runs["none"] = _patched_run(cfg("none", no_ckpt), "never")
        runs["sync"] = _patched_run(cfg("sync", *every, "train.checkpoint.async_save=false"), "never")
        runs["async"] = _patched_run(cfg("async", *every, "train.checkpoint.async_save=true"), "never")
        barrier()
        last = sorted((root / "sync").glob("run-*/step-*"))[-1]
        size = sum(f.stat().st_size for f in last.iterdir()) if env.is_main else 0
    gathered: list[Any] = [runs]
    if env.world_size > 1:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, runs)
    if env.is_main:
        print("BENCH " + json.dumps({"world": env.world_size, "size": size, "ranks": gathered}), flush=True)
    barrier()
    dist.destroy_process_group()


def _run(nproc: int, phase: str, overrides: list[str]) -> dict[str, Any]:
    return run_workers("recsys.bench.checkpoint", nproc, [phase, *overrides])


def _row(result: dict[str, Any]) -> str:
    ranks = result["ranks"]
    slowest = {
        mode: [max(r[mode]["save"][i] for r in ranks) for i in range(len(ranks[0][mode]["save"]))]
        for mode in ("sync", "async")
    }
    none = ranks[0]["none"]
    step_s = none["seconds"] / STEPS
    cells = [f"{result['world']:>5}", f"{result['size'] / 2**20:>8.1f}"]
    for mode in ("sync", "async"):
        blocked = statistics.median(slowest[mode])
        cells += [f"{blocked * 1000:>8.0f}", f"{100 * blocked / (EVERY * step_s):>6.1f}%"]
    cells += [f"{ranks[0][m]['samples_per_s']:>9,.0f}" for m in ("none", "sync", "async")]
    load = max(r["resume"]["load"][0] for r in ranks)
    cold = max(r["cold"]["first_step"] for r in ranks)
    warm = max(r["resume"]["first_step"] for r in ranks)
    cells += [f"{load:>7.2f}", f"{cold:>7.1f}", f"{warm:>7.1f}", f"{warm / cold:>5.2f}"]
    return " ".join(cells)


def bench_checkpoint(ranks: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    """Prepare the bench-train DLRM data once, measure each rank count, print one table."""
    from recsys.config import load_config
    from recsys.demo import ensure_prepared

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    overrides = _configs(BENCH_DIR, STEPS, 2)["dlrm"]
    overrides = [o for o in overrides if not o.startswith("train.max_steps")]
    ckpt_root = (BENCH_DIR / "checkpoints" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    overrides += [f"train.max_steps={STEPS}", "tracking.enabled=false", f"train.checkpoint.dir={ckpt_root}"]
    print(ensure_prepared(load_config("dlrm_synth", overrides)), flush=True)
    print(
        f"bench-checkpoint: DLRM of bench-train, {STEPS} steps, a checkpoint every {EVERY} steps, "
        f"{os.cpu_count()} CPUs; blocked = slowest rank's time inside save(), median over saves",
        flush=True,
    )
    results = []
    for n in ranks:
        r = _run(n, "train", overrides)
        for phase in ("cold", "resume"):
            extra = _run(n, phase, overrides)
            for mine, theirs in zip(r["ranks"], extra["ranks"], strict=True):
                mine.update(theirs)
        results.append(r)
    print(
        "ranks ckpt MiB  sync ms blocked%  async ms blocked%  none s/s   sync s/s  async s/s "
        "load s  cold s  resume s ratio"
    )
    for r in results:
        print(_row(r))
    print("(cold/resume s: from train() to the first finished step; ratio = resume / cold)")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3:])
