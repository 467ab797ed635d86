"""The one launcher contract: `submit(cfg, backend) -> JobHandle`, and the job size every backend reads.

Every backend (local torchrun, PyTorchJob, TrainJob, Spark TorchDistributor) returns a handle with
`status()`, `wait(timeout)`, `logs()` and `delete()`; `wait` hands back a `JobResult` whose run id and
failure reason are values, never text to parse. The size of a job (nodes × processes per node, GPUs per
process) is resolved once, here, from the `job` section, and means the same on every backend: a job with
`job.gpus_per_node: 0` is a CPU job everywhere (local and Spark hide the GPUs from it, as a pod without
an nvidia.com/gpu request has none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys.errors import UserError
from recsys.launch.types import BACKENDS, Backend, JobHandle, JobResult, JobSize, State, job_size

if TYPE_CHECKING:
    from recsys.config import Config

__all__ = ["BACKENDS", "Backend", "JobHandle", "JobResult", "JobSize", "State", "job_size", "submit"]


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
