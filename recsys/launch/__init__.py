"""Launchers decide where and how big; they never re-derive training settings.

Each backend receives the one resolved Config and starts the same trainer entry
(`torchrun -m recsys train --config <resolved.yaml>` or its in-process twin under Spark).
"""

from __future__ import annotations

import argparse

from recsys.config import Config
from recsys.errors import UserError


def launch(cfg: Config, args: argparse.Namespace) -> int:
    """Dispatch `recsys launch --backend …` to the backend's module; returns the exit status."""
    if args.backend == "local":
        from recsys.launch.local import launch_local

        return launch_local(cfg, nproc=args.num_processes or cfg.job.procs_per_node)
    if args.backend in ("pytorchjob", "trainjob"):
        from recsys.launch.kube import launch_kube

        return launch_kube(cfg, backend=args.backend, wait=args.wait, logs=args.logs)
    if args.backend == "spark":
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise UserError(
                "--backend spark needs pyspark: `pip install 'recsys[spark]'` (pyspark 4.3.0) and Java 17+ on PATH"
            ) from None
        from recsys.launch.spark import launch_spark

        return launch_spark(
            cfg,
            num_processes=args.num_processes or cfg.job.procs_per_node,
            local_mode=args.local_mode,
            use_gpu=args.use_gpu,
        )
    raise UserError(f"unknown backend {args.backend!r}")
