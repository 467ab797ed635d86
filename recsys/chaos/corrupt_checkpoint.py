"""The newest checkpoint is damaged after it was written (a shard truncated, as a storage fault or a
bad copy leaves it): resume says so in one line, falls back to the previous complete checkpoint,
moves the damaged one to retired/ and trains the lost steps again."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from recsys.chaos.common import Run, tail, tiny_config, wait_until

SCENARIO = "newest checkpoint truncated"


def run(workdir: Path) -> dict[str, Any]:
    """Train 30 steps (checkpoints 10, 20, 30), truncate step 30's largest shard, resume the run."""
    from recsys.checkpoint import complete_checkpoints

    sets = ["train.max_steps=30", "train.checkpoint.every_steps=10", "train.checkpoint.keep_last=3"]
    _, cfg_path = tiny_config(workdir, *sets)
    first = Run(workdir, cfg_path, "train", nproc=1)
    rc1 = first.wait(timeout=300)
    (run_dir,) = (workdir / "ckpt").glob("run-*")
    steps = [c.step for c in complete_checkpoints(run_dir)]
    newest = run_dir / f"step-{steps[-1]:08d}"
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    t0 = time.monotonic()
    again = Run(workdir, cfg_path, "resume", nproc=1, resume=str(run_dir))
    try:
        wait_until(lambda: "resumed from" in again.text(), 180, "the resume", again)
        recover_s: float | None = time.monotonic() - t0  # restart → training again
    except RuntimeError:
        recover_s = None
    rc2 = again.wait(timeout=300)
    log = again.text()
    resumed = re.search(r"resumed from \S+step-(\d+) ", log)
    said = [ln for ln in log.splitlines() if "is damaged" in ln]
    retired = sorted(p.name for p in (run_dir / "retired").glob("*/step-*"))
    resumed_step = int(resumed.group(1)) if resumed else None
    survived = (
        rc1 == 0
        and rc2 == 0
        and steps == [10, 20, 30]
        and resumed_step == 20
        and bool(said)
        and retired == [newest.name]
        and [c.step for c in complete_checkpoints(run_dir)][-1] == 30
    )
    detail = (
        f"checkpoints {steps}; truncated {newest.name}/{shard.name} to half; resume said: "
        f"{said[0] if said else '(nothing)'}; resumed from step {resumed_step}; damaged one moved to "
        f"retired/ ({retired}); the resumed run exited {rc2}"
    )
    if not survived:
        detail += f"\n{tail(first.text())}\n---\n{tail(log)}"
    return {
        "scenario": SCENARIO,
        "injected": "truncated a shard of the newest checkpoint",
        "survived": survived,
        "lost": "10 steps (retrained from step 20)" if resumed_step == 20 else "?",
        "recover_s": recover_s,
        "detail": detail,
    }
