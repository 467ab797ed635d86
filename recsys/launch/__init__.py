"""Launchers decide where and how big; they never re-derive training settings.

Every backend sits behind one contract (recsys/launch/contract.py): `submit(cfg, backend)` returns a
handle with status / wait / logs / delete, and `wait` returns a JobResult with the MLflow run id and
the failure reason as values. Each backend starts the same trainer entry on the one resolved Config.
"""

from __future__ import annotations

import argparse
import sys

from recsys.config import Config
from recsys.errors import UserError
from recsys.launch.contract import JobHandle, JobResult, JobSize, job_size, submit

__all__ = ["JobHandle", "JobResult", "JobSize", "job_size", "launch", "submit"]


def launch(cfg: Config, args: argparse.Namespace) -> int:
    """`recsys launch --backend …`: submit, then (local, Spark, or Kubernetes with --wait/--logs) follow
    the job to its end; returns 0 when it succeeded, 1 when it failed or is still running."""
    if args.backend == "spark":
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise UserError(
                "--backend spark needs pyspark: `pip install 'recsys[spark]'` (pyspark 4.3.0) and Java 17+ on PATH"
            ) from None
    handle = submit(cfg, args.backend, spark_local_mode=args.local_mode)
    kube = args.backend in ("pytorchjob", "trainjob")
    if kube and not (args.wait or args.logs):
        return 0  # submitted; kubectl (the Check line above) follows it
    try:
        if args.logs or not kube:
            for line in handle.logs(follow=True):
                print(line, flush=True)
        if kube and not args.wait:
            return 0  # --logs alone: the log ended; the job's outcome is kubectl's to show
        result = handle.wait(args.timeout)
    except KeyboardInterrupt:
        if not kube:  # a local/Spark job dies with this process anyway: stop it cleanly
            handle.delete()
        raise
    return _report(result)


def _report(result: JobResult) -> int:
    """Print the result line (stdout on success, stderr otherwise); the exit status."""
    if result.succeeded:
        print(result.summary())
        return 0
    print(f"recsys: {result.summary()}", file=sys.stderr)
    return 1
