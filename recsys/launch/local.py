"""Local launcher: the resolved config to a file, then `torchrun -m recsys train --config <file>`.

The same trainer entry the Kubernetes pods run; only the topology flags differ (here one node with
`nproc` processes and a standalone rendezvous, there the operator's PET_* env).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from recsys.config import Config, dump_config
from recsys.errors import UserError


def torchrun_command(config_file: str | Path, nproc: int, max_restarts: int = 0) -> list[str]:
    """The local torchrun command line for `nproc` processes; a failed worker restarts the group up to
    `max_restarts` times, and the trainer resumes from its last checkpoint."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "recsys",
        "train",
        "--config",
        str(config_file),
    ]


def launch_local(cfg: Config, nproc: int) -> int:
    """Train `cfg` with `nproc` local processes; returns torchrun's exit status."""
    if nproc < 1:
        raise UserError(f"--num-processes must be at least 1, got {nproc}")
    runs = Path(tempfile.gettempdir()) / "recsys-launch"
    runs.mkdir(parents=True, exist_ok=True)
    # A fresh file per launch: concurrent launches never overwrite each other's config.
    fd, name = tempfile.mkstemp(prefix=f"{cfg.name}-", suffix=".yaml", dir=runs)
    with os.fdopen(fd, "w") as f:
        f.write(dump_config(cfg))
    cmd = torchrun_command(name, nproc, max_restarts=cfg.job.backoff_limit)
    print(f"recsys: resolved config → {name}\nrecsys: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)
