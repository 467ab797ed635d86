"""`recsys train` shows progress and results, not library warnings; `--verbose` shows them again."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SETS = [
    "data.source.num_users=200",
    "data.source.num_items=100",
    "data.source.interactions_per_user=10",
    "train.max_steps=3",
    "tracking.enabled=false",
]
NOISE = re.compile(r"Warning|WARNING|warnings\.warn|is_fx_tracing")


def _recsys(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("RECSYS_VERBOSE", None)
    cmd = [sys.executable, "-m", "recsys", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_console_is_free_of_library_warnings(tmp_path: Path) -> None:
    sets = [a for s in [*SETS, f"data.prepared_dir={tmp_path / 'tt'}"] for a in ("--set", s)]
    prep = _recsys(tmp_path, "data", "prepare", "--config", "two_tower_synth", *sets)
    assert prep.returncode == 0, prep.stderr[-3000:]
    quiet = _recsys(tmp_path, "train", "--config", "two_tower_synth", *sets)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    out = quiet.stdout + quiet.stderr
    assert "sharding plan" in out and "recall@10" in out  # progress and results are still there
    assert not NOISE.findall(out), [line for line in out.splitlines() if NOISE.search(line)]
    loud = _recsys(tmp_path, "--verbose", "train", "--config", "two_tower_synth", *sets, "--resume", "never")
    assert loud.returncode == 0 and NOISE.search(loud.stdout + loud.stderr)


def test_new_sqlite_tracking_store_is_created_quietly(tmp_path: Path) -> None:
    """A first run against a fresh sqlite store prints no MLflow INFO lines about creating its tables."""
    code = (
        "import recsys.console as c; c.quiet_libraries(); import mlflow; "
        "mlflow.set_tracking_uri('sqlite:///mlruns.db'); mlflow.MlflowClient().search_experiments()"
    )
    env = {**os.environ}
    env.pop("RECSYS_VERBOSE", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mlruns.db").exists()
    assert "INFO mlflow" not in done.stdout + done.stderr, done.stderr
