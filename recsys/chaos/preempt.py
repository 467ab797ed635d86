"""Pod preemption: SIGTERM to torchrun mid-epoch (it forwards SIGTERM to both ranks, as the kubelet's
SIGTERM to a pod's torchrun does); the ranks checkpoint the step reached and exit within the grace,
and a restart with --resume auto continues from that very step."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from recsys.chaos.common import Run, checkpoint_steps, tail, tiny_config, wait_until
from recsys.errors import PREEMPTED_EXIT

SCENARIO = "SIGTERM to every rank mid-epoch"


def run(workdir: Path) -> dict[str, Any]:
    """Train on 2 ranks, SIGTERM torchrun after the first periodic checkpoint, restart, compare steps."""
    cfg, cfg_path = tiny_config(workdir, "train.checkpoint.every_steps=10")
    grace = cfg.train.checkpoint.preempt_grace_s
    ckpt = Path(cfg.train.checkpoint.dir or "")
    first = Run(workdir, cfg_path, "attempt-0")
    wait_until(lambda: checkpoint_steps(ckpt), 300, "the first periodic checkpoint", first)
    time.sleep(0.3)  # a few steps past it: mid-segment, mid-epoch
    t_kill = time.monotonic()
    os.kill(first.proc.pid, signal.SIGTERM)
    rc = first.wait(timeout=grace + 30)
    exit_s = time.monotonic() - t_kill
    log = first.text()
    m = re.search(r"preempted at step (\d+): checkpoint written(?:, ([\d.]+) s after SIGTERM)?", log)
    stopped = int(m.group(1)) if m else None
    saved = checkpoint_steps(ckpt)
    second = Run(workdir, cfg_path, "attempt-1")
    resumed = wait_until(
        lambda: re.search(r"resumed from \S+step-(\d+) ", second.text()), 120, "the restart's resume", second
    )
    recover_s = time.monotonic() - t_kill
    rc2 = second.wait(timeout=300)
    resumed_step = int(resumed.group(1))
    # 143 (128 + SIGTERM): a pod's status; Kubernetes' restartPolicy ExitCode retries 128-255 and gives
    # up on 1-127 (torchrun itself exits 1 here: recsys.launch.elastic maps it).
    survived = (
        stopped is not None
        and rc == PREEMPTED_EXIT
        and exit_s <= grace
        and resumed_step == stopped
        and rc2 == 0
        and "Traceback" not in second.text()
    )
    lost = "nothing" if resumed_step == stopped else f"steps {resumed_step + 1}..{stopped} (retrained)"
    if stopped is None:
        lost = "unknown: no preemption checkpoint"
    detail = (
        f"SIGTERM at step ≥ {saved[0] if saved else '?'}; ranks stopped at step {stopped}, checkpoint "
        f"written {m.group(2) if m and m.group(2) else '?'} s after SIGTERM; torchrun exited {rc} (want {PREEMPTED_EXIT}) after "
        f"{exit_s:.1f} s (grace {grace:g} s); restart resumed from step {resumed_step}, exited {rc2}"
    )
    if not survived:
        detail += f"\n--- attempt 0 ---\n{tail(log)}\n--- attempt 1 ---\n{tail(second.text())}"
    return {
        "scenario": SCENARIO,
        "injected": "SIGTERM to torchrun (forwarded to 2 ranks)",
        "survived": survived,
        "lost": lost,
        "recover_s": recover_s,
        "detail": detail,
    }
