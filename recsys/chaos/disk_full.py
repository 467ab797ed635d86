"""The checkpoint volume fills up during training (a real tmpfs mounted as the checkpoint root, filled
by another writer): the failed save is one clear line, the earlier checkpoints stay intact, training
continues (train.checkpoint.on_save_error=continue) and the next save after space is freed succeeds."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from recsys.chaos.common import Run, checkpoint_steps, tail, tiny_config, wait_until

SCENARIO = "checkpoint volume full (ENOSPC)"
VOLUME_MB = 16


def _fill(volume: Path) -> Path:
    """Write a file until the volume is full (ENOSPC); returns it."""
    filler = volume / "filler.bin"
    block = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
        with contextlib.suppress(OSError):  # the last partial block, byte by byte is not needed
            f.close()
    return filler


def run(workdir: Path) -> dict[str, Any]:
    """2 ranks checkpointing every 5 steps onto a 16 MB tmpfs; fill it, see the failure, free it."""
    volume = workdir / "ckpt"
    volume.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_MB}m", "tmpfs", str(volume)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        return {
            "scenario": SCENARIO,
            "injected": "not run",
            "survived": False,
            "lost": "unknown",
            "recover_s": None,
            "detail": f"cannot mount a {VOLUME_MB} MB tmpfs (needs root or CAP_SYS_ADMIN): {mount.stderr.strip()}",
        }
    try:
        return _scenario(workdir, volume)
    finally:
        subprocess.run(["umount", "-l", str(volume)], capture_output=True)


def _scenario(workdir: Path, volume: Path) -> dict[str, Any]:
    cfg, cfg_path = tiny_config(workdir, "train.checkpoint.every_steps=5")
    job = Run(workdir, cfg_path, "train")
    try:
        before = wait_until(lambda: checkpoint_steps(volume), 300, "the first checkpoint", job)
        filler = _fill(volume)
        failed = wait_until(
            lambda: re.findall(r"checkpoint of step (\d+) in \S+ failed: ([^;]+);", job.text()),
            120,
            "a failed save reported",
            job,
        )
        intact = [s for s in before if s in checkpoint_steps(volume)]
        filler.unlink()
        t_free = time.monotonic()
        first_failed = int(failed[0][0])
        after = wait_until(
            lambda: [s for s in checkpoint_steps(volume) if s > first_failed],
            120,
            "a save after freeing space",
            job,
        )
        recover_s = time.monotonic() - t_free  # space freed → the next complete checkpoint
        rc = job.wait(timeout=300)
    finally:
        job.kill()
    log = job.text()
    failures = re.findall(r"checkpoint of step (\d+) in \S+ failed: ([^;]+);", log)
    lines = re.findall(r"recsys: checkpoint of step \d+ .*ENOSPC.*", log)  # tqdm may share the line
    survived = (
        rc == 0
        and intact == before
        and bool(failures)
        and all("ENOSPC" in why for _, why in failures)
        and "Traceback" not in log
    )
    steps = ", ".join(s for s, _ in failures)
    detail = (
        f"checkpoints {before} intact while full; saves of step(s) {steps} failed "
        f"({failures[0][1] if failures else '?'}), one line each; after freeing space step {after[0]} "
        f"was saved; training exited {rc}. The line: {lines[0] if lines else '?'}"
    )
    if not survived:
        detail += f"\n{tail(log)}"
    return {
        "scenario": SCENARIO,
        "injected": f"filled the {VOLUME_MB} MB checkpoint tmpfs mid-run",
        "survived": survived,
        "lost": f"checkpoints of step {steps} (not written)" if failures else "?",
        "recover_s": recover_s,
        "detail": detail,
    }
