"""The launcher contract's types, shared by the contract and every backend: the job size every backend
reads, the result a job hands back, and the handle protocol.

They live apart from `recsys.launch.contract` (which imports the backends to dispatch `submit`) so that
no backend imports the module that imports it: the import graph has no cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import JobConfig

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
