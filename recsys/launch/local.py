"""Local backend: the resolved config to a file, then `torchrun -m recsys.launch.worker` on this machine.

The same trainer the Kubernetes pods run; only the topology flags differ (here one node with the job's
processes per node and a standalone rendezvous, there the operator's PET_* env). The job's output goes
to a log file (`logs()` reads it); each rank records its run id or failure reason in a result file
(recsys.launch.worker), which `wait()` turns into the JobResult.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from recsys.config import Config, dump_config
from recsys.errors import UserError
from recsys.launch.types import JobResult, JobSize, State
from recsys.launch.worker import read_results


def torchrun_command(
    config_file: str | Path, nproc: int, max_restarts: int = 0, result_dir: str | Path | None = None
) -> list[str]:
    """The local torchrun command line for `nproc` processes; a failed worker restarts the group up to
    `max_restarts` times, and the trainer resumes from its last checkpoint. With `result_dir` the
    processes run recsys.launch.worker (result files), else `recsys train`."""
    entry = ["recsys.launch.worker"] if result_dir is not None else ["recsys", "train"]
    extra = ["--result-dir", str(result_dir)] if result_dir is not None else []
    return [
        sys.executable,
        "-m",
        "recsys.launch.elastic",  # torchrun, exiting 143 (not 1) when SIGTERM stops it
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "-m",
        *entry,
        "--config",
        str(config_file),
        *extra,
    ]


def _check_gpus(size: JobSize) -> None:
    """A GPU job needs that many GPUs here; say so in one line before torchrun starts."""
    if not size.gpus_per_proc:
        return
    import torch

    have = torch.cuda.device_count()
    if have < size.gpus_per_node:
        raise UserError(
            f"job.gpus_per_node={size.gpus_per_node} but this machine has {have} GPU(s): "
            "lower job.gpus_per_node (0 trains on CPU)"
        )


class LocalHandle:
    """A torchrun process group on this machine."""

    backend = "local"

    def __init__(self, name: str, proc: subprocess.Popen[bytes], workdir: Path) -> None:
        self.name = name
        self.proc = proc
        self.workdir = workdir
        self.log_path = workdir / "torchrun.log"
        self.result_dir = workdir / "results"
        self._deleted = False

    def status(self) -> State:
        """Running while torchrun runs; then Succeeded (exit 0) or Failed."""
        rc = self.proc.poll()
        if rc is None:
            return "Running"
        return "Succeeded" if rc == 0 else "Failed"

    def wait(self, timeout: float | None = None) -> JobResult:
        """Wait for torchrun; the run id and reason come from the ranks' result files."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return JobResult(self.backend, self.name, "Running", reason=f"still running after {timeout:.0f}s")
        run_id, reason = read_results(self.result_dir)
        if rc == 0:
            return JobResult(
                self.backend, self.name, "Succeeded", run_id, "" if run_id else "no run id recorded"
            )
        if self._deleted:
            reason = "deleted"
        if not reason:
            reason = f"torchrun exited with status {rc} and no rank stated a reason (log: {self.log_path})"
        return JobResult(self.backend, self.name, "Failed", run_id, reason)

    def logs(self, follow: bool = False) -> Iterator[str]:
        """torchrun's output (all ranks, as torchrun prints it); with `follow`, until it exits."""
        with open(self.log_path, errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    yield line.rstrip("\n")
                elif follow and self.proc.poll() is None:
                    time.sleep(0.2)
                elif follow and (rest := f.read()):
                    yield from rest.splitlines()
                else:
                    return

    def delete(self) -> None:
        """Terminate the whole process group (torchrun and its workers)."""
        if self.proc.poll() is not None:
            return
        self._deleted = True
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def submit_local(cfg: Config, size: JobSize) -> LocalHandle:
    """Start training `cfg` with torchrun here (one node of `size`); returns at once."""
    if size.nodes != 1:
        raise UserError(
            f"job.nodes={size.nodes}: the local backend trains on one node; use --backend pytorchjob, "
            "trainjob or spark for more, or --set job.nodes=1"
        )
    if cfg.train.device == "cuda" and not size.gpus_per_proc:
        raise UserError("train.device=cuda needs job.gpus_per_node ≥ 1 (a CPU job has no GPU)")
    _check_gpus(size)
    root = Path(tempfile.gettempdir()) / "recsys-launch"
    root.mkdir(parents=True, exist_ok=True)
    # A fresh folder per launch: concurrent launches never overwrite each other's config or results.
    workdir = Path(tempfile.mkdtemp(prefix=f"{cfg.job.name}-", dir=root))
    config_file = workdir / "config.yaml"
    config_file.write_text(dump_config(cfg))
    cmd = torchrun_command(config_file, size.procs_per_node, cfg.job.backoff_limit, workdir / "results")
    env = dict(os.environ, RECSYS_JOB_NAME=cfg.job.name)
    from recsys.launch.jobspec import preemption_grace

    # As in the rendered pods: after SIGTERM torchrun gives its workers the trainer's grace + 5 s.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(preemption_grace(cfg)["torchrun_shutdown_s"]))
    if not size.gpus_per_proc:
        # job.gpus_per_node=0 is a CPU job, as a pod without a GPU request is: hide the GPUs.
        env["CUDA_VISIBLE_DEVICES"] = ""
    print(f"recsys: resolved config → {config_file}\nrecsys: {' '.join(cmd)}", file=sys.stderr)
    with open(workdir / "torchrun.log", "wb") as log:
        # Own session: delete() stops torchrun and every worker, nothing else.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return LocalHandle(cfg.job.name, proc, workdir)
