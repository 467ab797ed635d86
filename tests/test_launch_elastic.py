"""recsys.launch.elastic: torchrun whose exit status after SIGTERM is 143 (Kubernetes retries 128-255
under restartPolicy ExitCode), where torchrun itself exits 1 (a permanent failure there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys.errors import PREEMPTED_EXIT

# A worker like the trainer's: SIGTERM → (checkpoint) → exit 143; it says when it is ready.
WORKER = """
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
Path(os.environ["READY_DIR"], os.environ["RANK"]).write_text("up")
time.sleep(120)
"""


@pytest.mark.dist
def test_sigterm_to_the_launcher_exits_143_after_the_workers_stop(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    ready = tmp_path / "ready"
    ready.mkdir()
    cmd = [sys.executable, "-m", "recsys.launch.elastic", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "READY_DIR": str(ready), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, str(tmp_path / "worker.py")], env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(ready.iterdir())) < 2:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    assert f"torchrun stopped by preemption (SignalException); exiting {PREEMPTED_EXIT}" in err


def test_only_preemption_exits_map_to_143() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from recsys.launch.elastic import exit_code

    def failed(*codes: int) -> ChildFailedError:
        failures = {
            r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=c, error_file="")
            for r, c in enumerate(codes)
        }
        return ChildFailedError("recsys", failures)

    assert exit_code(SignalException("x", signal.SIGTERM)) == 143
    assert exit_code(SignalException("x", signal.SIGINT)) == 130
    assert exit_code(failed(143, 143)) == exit_code(failed(143, -15)) == PREEMPTED_EXIT
    assert exit_code(failed(143, 1)) is None  # a real failure beside a preempted rank stays a failure
    assert exit_code(failed(2)) is None and exit_code(RuntimeError("x")) is None
