"""Two trainings started at the same moment on one host: mosaicml-streaming names its shared memory
by a host-wide counter (000000_locals, …) and its stale-memory cleaner unlinks every such name, live or
not. Both jobs here reach their loader at the same instant (a file barrier in a wrapper), several
rounds; each must train to the end with its own shared memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recsys.chaos.common import tail, tiny_config

SCENARIO = "two trainings start at once on one host"
ROUNDS = 3
JOBS = 2

# Test-side instrumentation, not product code: every job waits at a file barrier right before it
# builds its streaming loader, so the jobs' shared-memory set-up really overlaps.
WRAPPER = r"""
import os, sys, time
from pathlib import Path
from recsys.data import loader

barrier, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
orig = loader.make_train_loader

def make_train_loader(*a, **k):
    (barrier / me).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.0005)
    return orig(*a, **k)

loader.make_train_loader = make_train_loader
from recsys.cli import main
sys.exit(main(sys.argv[4:]))
"""


def run(workdir: Path) -> dict[str, Any]:
    """ROUNDS rounds of JOBS simultaneous single-process trainings on their own data and checkpoints."""
    (workdir / "wrapper.py").write_text(WRAPPER)
    cfgs = []
    for j in range(JOBS):  # separate jobs: own config, checkpoints and prepared copy of the same data
        (workdir / f"job-{j}").mkdir()
        cfgs.append(tiny_config(workdir / f"job-{j}", "train.max_steps=4")[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    failures: list[str] = []
    t0 = time.monotonic()
    for r in range(ROUNDS):
        barrier = workdir / f"barrier-{r}"
        barrier.mkdir()
        procs = []
        for j, cfg in enumerate(cfgs):
            log = open(workdir / f"round-{r}-job-{j}.log", "wb")  # noqa: SIM115 (closed below)
            cmd = [
                sys.executable, str(workdir / "wrapper.py"), str(barrier), str(j), str(JOBS),
                "train", "--config", str(cfg), "--resume", "never",
            ]  # fmt: skip
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, j))
        for p, log, j in procs:
            try:
                rc = p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            log.close()
            if rc != 0:
                text = (workdir / f"round-{r}-job-{j}.log").read_text(errors="replace")
                failures.append(f"round {r} job {j} exited {rc}:\n{tail(text, 1200)}")
    seconds = time.monotonic() - t0
    runs = ROUNDS * JOBS
    return {
        "scenario": SCENARIO,
        "injected": f"{JOBS} trainings at one instant, {ROUNDS} rounds",
        "survived": not failures,
        "lost": "nothing" if not failures else f"{len(failures)} of {runs} trainings failed",
        "recover_s": None,
        "detail": f"{runs - len(failures)}/{runs} trainings finished ({seconds:.0f} s)"
        + ("".join(f"\n{f}" for f in failures)),
    }
