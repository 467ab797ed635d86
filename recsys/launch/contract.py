"""The one launcher contract: `submit(cfg, backend) -> JobHandle`, and the job size every backend reads.

Every backend (local torchrun, PyTorchJob, TrainJob, Spark TorchDistributor) returns a handle with
`status()`, `wait(timeout)`, `logs()` and `delete()`; `wait` hands back a `JobResult` whose run id and
failure reason are values, never text to parse. The size of a job (nodes × processes per node, GPUs per
process) is resolved once, here, from the `job` section, and means the same on every backend: a job with
`job.gpus_per_node: 0` is a CPU job everywhere (local and Spark hide the GPUs from it, as a pod without
an nvidia.com/gpu request has none).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config, JobConfig

Backend = Literal["local", "pytorchjob", "trainjob", "spark"]
BACKENDS: tuple[str, ...] = get_args(Backend)
State = Literal["Pending", "Running", "Succeeded", "Failed"]


@dataclass(frozen=True)
class JobSize:
    """How big a job is: the one reading of job.nodes / procs_per_node / gpus_per_node."""

    nodes: int  # pods (Kubernetes), torchrun nodes (Spark executors); 1 for local
    procs_per_node: int  # torchrun processes per node
    gpus_per_proc: int  # 0 (CPU job) or 1 (one GPU per process)

    @property
    def world_size(self) -> int:
        """Processes in the whole job."""
        return self.nodes * self.procs_per_node

    @property
    def gpus_per_node(self) -> int:
        """GPUs each node (pod) requests."""
        return self.procs_per_node * self.gpus_per_proc

    def describe(self) -> str:
        """'2 node(s) × 4 process(es), 1 GPU per process' — for headers and log lines."""
        gpus = "1 GPU per process" if self.gpus_per_proc else "CPU only"
        return f"{self.nodes} node(s) × {self.procs_per_node} process(es), {gpus}"


def job_size(job: JobConfig) -> JobSize:
    """Resolve the job size from the `job` section (UserError naming the field when inconsistent)."""
    if job.gpus_per_node and job.procs_per_node not in (1, job.gpus_per_node):
        raise UserError(
            f"job.procs_per_node ({job.procs_per_node}) must equal job.gpus_per_node ({job.gpus_per_node}) "
            "on a GPU job: one process per GPU"
        )
    # On GPUs torchrun starts one process per GPU (procs_per_node 1 is the default, read as "per GPU").
    nproc = job.gpus_per_node or job.procs_per_node
    return JobSize(nodes=job.nodes, procs_per_node=nproc, gpus_per_proc=1 if job.gpus_per_node else 0)


@dataclass(frozen=True)
class JobResult:
    """How a job ended (or that it had not ended when `wait` gave up): values, not log lines."""

    backend: str
    job_name: str
    state: State
    run_id: str | None = None  # the MLflow run the job trained (found by its recsys.job_name tag)
    reason: str = ""  # why it failed, or why no run id was found; '' on a clean success

    @property
    def succeeded(self) -> bool:
        """The job finished successfully."""
        return self.state == "Succeeded"

    def summary(self) -> str:
        """One line for the console."""
        run = f", MLflow run {self.run_id}" if self.run_id else ""
        why = f": {self.reason}" if self.reason else ""
        verb = {"Succeeded": "succeeded", "Failed": "failed"}.get(self.state, f"still {self.state.lower()}")
        return f"{self.backend} job {self.job_name} {verb}{run}{why}"


class JobHandle(Protocol):
    """A submitted job, whatever runs it."""

    backend: str
    name: str

    def status(self) -> State:
        """The job's state now (no waiting)."""
        ...

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends or `timeout` seconds pass; the result (state Running on timeout)."""
        ...

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The rank-0 (master) log lines; with `follow`, until the job ends."""
        ...

    def delete(self) -> None:
        """Stop the job and remove what submit created."""
        ...


def submit(cfg: Config, backend: str, *, spark_local_mode: bool | None = None) -> JobHandle:
    """Start training `cfg` on `backend`; returns at once with the job's handle.

    `spark_local_mode` (Spark only): run the torchrun on the driver (default when job.nodes is 1)
    rather than one torchrun node per executor.
    """
    size = job_size(cfg.job)
    if backend == "local":
        from recsys.launch.local import submit_local

        return submit_local(cfg, size)
    if backend in ("pytorchjob", "trainjob"):
        from recsys.launch.kubeclient import submit_kube

        return submit_kube(cfg, backend)  # type: ignore[arg-type]
    if backend == "spark":
        from recsys.launch.spark import submit_spark

        return submit_spark(cfg, size, local_mode=spark_local_mode)
    raise UserError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
