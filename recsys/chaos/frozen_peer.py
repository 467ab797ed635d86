"""A rank's peer stops answering (SIGSTOP: frozen, as a hung host or a network partition looks from
the other side): the waiting rank fails after train.collective_timeout_s instead of hanging, torchrun
restarts the group and the restart resumes from the newest checkpoint."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from recsys.chaos.common import Run, checkpoint_steps, tail, tiny_config, wait_until

SCENARIO = "a rank's peer frozen (SIGSTOP)"
TIMEOUT_S = 10


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def run(workdir: Path) -> dict[str, Any]:
    """2 ranks, collective timeout 10 s, torchrun --max-restarts 1; freeze rank 1 after a checkpoint."""
    sets = ["train.checkpoint.every_steps=10", f"train.collective_timeout_s={TIMEOUT_S}"]
    _, cfg_path = tiny_config(workdir, *sets)
    # torchrun SIGTERMs the frozen worker (it stays stopped) and SIGKILLs it after this many seconds.
    job = Run(workdir, cfg_path, "train", max_restarts=1, env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"})
    try:
        wait_until(lambda: checkpoint_steps(workdir / "ckpt"), 300, "the first checkpoint", job)
        time.sleep(0.3)
        ranks = {_rank_of(pid): pid for pid in job.worker_pids()}
        frozen, survivor = ranks[1], ranks[0]
        t0 = time.monotonic()
        os.kill(frozen, signal.SIGSTOP)
        wait_until(
            lambda: not Path(f"/proc/{survivor}").exists() or _zombie(survivor), 120, "rank 0 fails", job
        )
        detect_s = time.monotonic() - t0
        resumed = wait_until(
            lambda: re.search(r"resumed from \S+step-(\d+) ", job.text()), 180, "the restart's resume", job
        )
        recover_s = time.monotonic() - t0
        rc = job.wait(timeout=300)
    finally:
        job.kill()
    log = job.text()
    timed_out = "Timed out" in log or "timeout" in log.lower()
    survived = rc == 0 and detect_s <= TIMEOUT_S + 15 and timed_out
    step = int(resumed.group(1))
    failed = re.search(r"rank 0: training failed after (\d+) complete steps \((.*)\)", log)
    done = int(failed.group(1)) if failed else None
    lost = f"steps {step + 1}..{done} (retrained)" if done and done > step else "nothing"
    if done is None:
        lost = f"the steps after {step} (retrained; rank 0 did not say where it failed)"
    detail = (
        f"rank 1 frozen; rank 0 failed after {detect_s:.1f} s (collective timeout {TIMEOUT_S} s: "
        f"{failed.group(2) if failed else '?'}) with {done} steps complete; torchrun "
        f"restarted both, resumed from step {step}, exited {rc}"
    )
    if not survived:
        detail += f"\n{tail(log)}"
    return {
        "scenario": SCENARIO,
        "injected": "SIGSTOP to rank 1 (2 ranks, timeout 10 s)",
        "survived": survived,
        "lost": lost,
        "recover_s": recover_s,
        "detail": detail,
    }


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
