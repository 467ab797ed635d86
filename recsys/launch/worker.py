"""The training entry the local and Spark backends start in every process: `recsys.train.train` plus a
result file per rank, so the launcher reads the run id and the failure reason as values.

    torchrun … -m recsys.launch.worker --config resolved.yaml --result-dir DIR

Rank r writes DIR/rank-r.json: {"run_id": …} when training returned, {"reason": …} when it raised. The
Kubernetes pods run `torchrun -m recsys train` instead: there the operator's job conditions carry the
failure and the run is found by its recsys.job_name tag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.trainer import TrainResult


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _write(result_dir: Path, payload: dict[str, Any]) -> None:
    # Write-then-rename: a reader never sees half a file.
    path = result_dir / f"rank-{_rank()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def run_worker(cfg: Config, result_dir: str | Path) -> TrainResult:
    """Train `cfg` in this process (one rank of a torchrun) and record the outcome in `result_dir`."""
    from recsys.config import ConfigError
    from recsys.errors import UserError
    from recsys.train import train

    out = Path(result_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{_rank()}.pid").write_text(str(os.getpid()))
    try:
        result = train(cfg)
    except (UserError, ConfigError) as e:
        _write(out, {"reason": str(e)})
        raise
    except Exception as e:
        _write(out, {"reason": f"{type(e).__name__}: {e}"})
        raise
    _write(out, {"run_id": result.run_id})
    return result


def read_results(result_dir: str | Path) -> tuple[str | None, str]:
    """(rank 0's run id, the first stated failure reason in rank order) from a result folder."""
    run_id, reasons = None, []
    files = sorted(Path(result_dir).glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    for path in files:
        data = json.loads(path.read_text())
        if path.stem == "rank-0" and data.get("run_id"):
            run_id = data["run_id"]
        if data.get("reason"):
            reasons.append(data["reason"])
    return run_id, (reasons[0] if reasons else "")


def main(argv: list[str] | None = None) -> int:
    """`python -m recsys.launch.worker --config FILE --result-dir DIR` (under torchrun)."""
    from recsys.config import load_config
    from recsys.console import quiet_libraries
    from recsys.errors import exit_status

    p = argparse.ArgumentParser(prog="recsys.launch.worker")
    p.add_argument("--config", required=True)
    p.add_argument("--result-dir", required=True)
    args = p.parse_args(argv)
    quiet_libraries()

    def work() -> None:
        run_worker(load_config(args.config), args.result_dir)  # the outcome is in rank-N.json

    return exit_status(work)


if __name__ == "__main__":
    sys.exit(main())
