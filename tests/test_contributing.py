"""Contributor habits are real: pre-commit accepts .pre-commit-config.yaml and its hooks pass on a
clean clone of the committed tree (ruff, and the manifests/pipeline/reference freshness checks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRE_COMMIT = Path(sys.prefix) / "bin" / "pre-commit"


def test_pre_commit_config_is_valid() -> None:
    """pre-commit itself reads the config (a typo in a hook key fails here)."""
    proc = subprocess.run(
        [str(PRE_COMMIT), "validate-config", ".pre-commit-config.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_pre_commit_hooks_pass_on_a_clean_clone(tmp_path: Path) -> None:
    """Every hook runs (`pre-commit run --all-files`) and passes on the committed tree."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(Path(sys.prefix))
    proc = subprocess.run(
        [str(PRE_COMMIT), "run", "--all-files", "--show-diff-on-failure"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=900,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PRE_COMMIT_HOME": str(tmp_path / "pc")},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for hook in ("ruff check", "manifests", "pipeline", "reference pages"):
        assert hook in proc.stdout, f"hook {hook!r} did not run:\n{proc.stdout}"
