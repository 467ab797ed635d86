"""What the training scenarios share: a tiny Two-Tower prepared in the workdir, torchrun in the
background with its log in a file, waiting for a condition, and reading checkpoints back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys.config import Config

#: A Two-Tower small enough to train in seconds on 2 CPU ranks, big enough that an epoch has ~100
#: steps to interrupt.
TINY = [
    "data.source.num_users=600",
    "data.source.num_items=300",
    "data.source.interactions_per_user=20",
    "data.block_size=16",
    "train.batch_size=64",
    "train.epochs=1",
    "train.log_every_steps=10",
    "eval.batch_size=512",
    "eval.ks=[10]",
    "model.embedding_dim=16",
    "model.two_tower.layers=[32,16]",
    "tracking.enabled=false",
]


def tiny_config(workdir: Path, *sets: str, data: Path | None = None) -> tuple[Config, Path]:
    """The tiny config (data prepared once under `data`, default workdir/data; checkpoints in
    workdir/ckpt; `sets` last) and the YAML file it was written to."""
    from recsys.config import dump_config, load_config
    from recsys.data.prepare import prepare

    data = data or workdir / "data"
    cfg = load_config(
        "two_tower_synth",
        [*TINY, f"data.prepared_dir={data}", f"train.checkpoint.dir={workdir / 'ckpt'}", *sets],
    )
    if not (data / "metadata.json").is_file():
        prepare(cfg, overwrite=False)
    path = workdir / "cfg.yaml"
    path.write_text(dump_config(cfg))
    return cfg, path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Run:
    """`torchrun … -m recsys train` (as recsys.launch.elastic, the pods' torchrun) in its own session,
    output in a log file."""

    def __init__(
        self,
        workdir: Path,
        cfg_path: Path,
        tag: str,
        nproc: int = 2,
        resume: str = "auto",
        max_restarts: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log = workdir / f"{tag}.log"
        cmd = [
            sys.executable, "-m", "recsys.launch.elastic", "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            "-m", "recsys", "train", "--config", str(cfg_path), "--resume", resume,
        ]  # fmt: skip
        full_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=workdir, start_new_session=True
            )
        self.started = time.monotonic()

    def text(self) -> str:
        """The log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        """The exit status; the whole session is killed when it runs longer than `timeout`."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        """SIGKILL the whole session (torchrun and its workers) and reap torchrun."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def worker_pids(self) -> list[int]:
        """The worker processes torchrun started (its children)."""
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        return [int(k) for k in kids]


def wait_until(cond: Callable[[], Any], timeout: float, what: str, run: Run | None = None) -> Any:
    """Poll `cond` until it returns something true; raise naming `what` (and the log tail) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if run is not None and run.proc.poll() is not None:
            raise RuntimeError(f"{what}: torchrun exited {run.proc.returncode} first:\n{run.text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout:.0f} s" + (f":\n{run.text()[-3000:]}" if run else ""))


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under a checkpoint root (every run folder)."""
    from recsys.checkpoint import complete_checkpoints

    return sorted(c.step for run_dir in root.glob("run-*") for c in complete_checkpoints(run_dir))


def tail(text: str, n: int = 1500) -> str:
    """The last `n` characters of a log, for a row's detail."""
    return text[-n:]
