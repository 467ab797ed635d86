"""The CPU trainer image, built for real and run the way a pod runs it (`make test-image`; marker `image`).

What this does, with the same scripts a user calls (images/README.md):
- images/engine.sh: a Docker engine answers, or is installed (apt-get install docker.io) and started;
- images/standin-base.sh: the Dockerfile's base, python:3.11-slim-bookworm, stood in by a debootstrapped
  Debian bookworm with Python 3.11 when no registry can be reached (kept once built);
- images/wheelhouse.sh + `OFFLINE=1 images/build.sh`: images/trainer/Dockerfile.cpu, unchanged, built by the
  classic builder with pip pointed (build args) at the wheels this machine's pip collected;
- then a tiny rendered PyTorchJob (1 node x 2 processes, CPU): its ConfigMap written as the mounted file, its
  PVCs as host folders, the container's exact command, env, user and capabilities, plus what the training
  operator injects; the data prepared first the way the data-prep Job does, in the same image. The root file
  system is read-only (a tmpfs at /tmp only): anything the trainer writes elsewhere fails the run. It must
  reach a real MLflow server and finish with test metrics.
It skips, in one line, only where an engine cannot be had at all (not root, no apt-get); everywhere else a
broken image, build or run fails it. Figures (per phase, image size) are printed at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import port_or_free

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("RECSYS_TEST_IMAGE", "recsys-test/trainer:cpu")
LABEL = "org.recsys.test=image-build"
RECSYS = [str(Path(sys.executable).with_name("recsys"))]
# A cold build (stand-in base, wheel collection, 8 GB pip layer) takes ~7 min here; allow for a slow machine.
pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(3600)]

# Tiny data: the point is that the image starts, reads, trains, checkpoints and logs, not what it learns.
TINY = [
    "data.source.num_users=200",
    "data.source.num_items=100",
    "data.source.interactions_per_user=10",
    "train.batch_size=64",
    "eval.batch_size=64",
    "eval.ks=[10]",
    "train.epochs=1",
    "train.checkpoint.every_epoch=true",
]
FIGURES: dict[str, str] = {}


def _docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])} … exited {r.returncode}:\n{(r.stdout + r.stderr)[-4000:]}")
    return r


def _script(
    name: str, log_dir: Path, env: dict[str, str] | None = None, timeout: float = 2400
) -> tuple[float, str]:
    """Run images/<name> (seconds, output); exit 3 (cannot work here) skips in its one line, other failures fail."""
    log = log_dir / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        r = subprocess.run(
            ["bash", str(REPO / "images" / name)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        )
    text = log.read_text()
    if r.returncode == 3:
        pytest.skip(text.strip().splitlines()[-1])
    if r.returncode != 0:
        pytest.fail(f"images/{name} exited {r.returncode}:\n{text[-6000:]}")
    return time.monotonic() - t0, text


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A Docker engine; one this fixture starts is stopped again at the end of the module."""
    logs = tmp_path_factory.mktemp("engine")
    took, text = _script("engine.sh", logs)
    FIGURES["engine"] = f"{took:.0f} s"
    # Stopped containers of an interrupted earlier run (running ones are left to finish).
    _docker("container", "prune", "-f", "--filter", f"label={LABEL}", check=False)
    started = re.search(r"started dockerd \(pid (\d+)", text)
    if started:
        pid = int(started.group(1))

        def stop() -> None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.2)

        request.addfinalizer(stop)


@pytest.fixture(scope="module")
def image(engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CPU image from the committed Dockerfile.cpu: cached base, wheels and layers are reused."""
    logs = tmp_path_factory.mktemp("build")
    cached = _docker("image", "inspect", IMAGE, check=False).returncode == 0
    FIGURES["stand-in base"] = f"{_script('standin-base.sh', logs)[0]:.0f} s"
    FIGURES["wheelhouse"] = f"{_script('wheelhouse.sh', logs)[0]:.0f} s"
    took, _ = _script("build.sh", logs, env={"OFFLINE": "1", "CPU_IMAGE": IMAGE})
    FIGURES["image build"] = f"{took:.0f} s ({'over a cached image' if cached else 'no image before'})"
    # Earlier builds of this tag, now untagged: only their own top layers, but they pile up.
    _docker("image", "prune", "-f", "--filter", "label=org.recsys.image=trainer-cpu", check=False)
    size = int(_docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    FIGURES["image size"] = f"{size / 1e9:.2f} GB"
    return IMAGE


@pytest.fixture(scope="module", autouse=True)
def _print_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    """The tier's cost, printed after the module (CI logs keep it)."""
    t0 = time.monotonic()
    yield
    if FIGURES:
        FIGURES["module total"] = f"{time.monotonic() - t0:.0f} s"
        line = "\nimage tier: " + ", ".join(f"{k} {v}" for k, v in FIGURES.items())
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if capture is None:
            print(line, flush=True)
            return
        with capture.global_and_fixture_disabled():
            print(line, flush=True)


def _run(
    image: str, opts: list[str], cmd: list[str], timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """`docker run OPTS IMAGE CMD` with a unique name, removed afterwards whatever happens (also on a timeout)."""
    name = f"recsys-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        args = ["run", "--rm", "--name", name, "--label", LABEL, *opts, image, *cmd]
        return _docker(*args, timeout=timeout, check=False)
    finally:
        _docker("rm", "-f", name, check=False)


def test_image_user_and_help(image: str) -> None:
    cfg = json.loads(_docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert cfg["User"] == "1000:1000"
    assert cfg["Cmd"] == ["recsys", "--help"]
    # The image records the commit it was built from (MLflow runs tag it as git_sha).
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert f"RECSYS_GIT_SHA={sha}" in cfg["Env"]
    # The default command, with no network and nothing writable: --help must not need either.
    r = _run(image, ["--read-only", "--network", "none"], [])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage: recsys" in r.stdout and "train" in r.stdout


def test_a_failing_command_fails_the_run(image: str) -> None:
    """The exit status comes through `docker run`, so a trainer that fails cannot pass the test below."""
    r = _run(
        image, ["--read-only", "--network", "none"], ["recsys", "train", "--config", "/nonexistent.yaml"]
    )
    assert r.returncode != 0
    assert "nonexistent" in (r.stdout + r.stderr)


def _render(tmp: Path, image: str, tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    out = tmp / "job.yaml"
    sets = [
        "job.nodes=1",
        "job.gpus_per_node=0",
        "job.procs_per_node=2",
        f"job.image={image}",
        f"job.mlflow_tracking_uri={tracking_uri}",
        f"tracking.uri={tracking_uri}",
        f"tracking.experiment={experiment}",
        *TINY,
    ]
    cmd = [*RECSYS, "render", "--backend", "pytorchjob", "--config", "two_tower_synth", "-o", str(out)]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    return [d for d in yaml.safe_load_all(out.read_text()) if d]


def _pod_args(docs: list[dict[str, Any]], tmp: Path) -> tuple[list[str], list[str], str]:
    """docker run options for the job's master pod (mounts, user, capabilities, env), its argv, its name."""
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}, "a 1-node job has the master only"
    (c,) = pod["containers"]
    sc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    opts = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}", "--network", "host"]
    if "ALL" in csc.get("capabilities", {}).get("drop", []):
        opts += ["--cap-drop", "ALL"]
    if csc.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    if csc.get("readOnlyRootFilesystem"):
        opts += ["--read-only"]
    vols = {v["name"]: v for v in pod["volumes"]}
    for m in c["volumeMounts"]:
        vol = vols[m["name"]]
        if "configMap" in vol:
            local = tmp / "configmap" / vol["configMap"]["name"]
            local.mkdir(parents=True)
            for key, text in cms[vol["configMap"]["name"]]["data"].items():
                (local / key).write_text(text)
            opts += ["-v", f"{local}:{m['mountPath']}:ro"]
        elif "persistentVolumeClaim" in vol:
            # fsGroup makes a PVC writable for the pod's group; a host folder owned by the uid does here.
            local = tmp / "pvc" / vol["persistentVolumeClaim"]["claimName"]
            local.mkdir(parents=True)
            os.chown(local, sc["runAsUser"], sc.get("fsGroup", sc["runAsGroup"]))
            opts += ["-v", f"{local}:{m['mountPath']}"]
        elif m["mountPath"] == "/dev/shm" and vol.get("emptyDir", {}).get("medium") == "Memory":
            limit = vol["emptyDir"].get("sizeLimit", "64Mi")
            opts += ["--shm-size", limit.replace("Gi", "g").replace("Mi", "m")]
        elif "emptyDir" in vol and "medium" not in vol["emptyDir"]:
            # A disk emptyDir (the pod's /tmp): a fresh tmpfs the pod's user may write.
            opts += ["--tmpfs", f"{m['mountPath']}:uid={sc['runAsUser']},gid={sc['runAsGroup']},mode=1777"]
        else:
            pytest.fail(f"no docker equivalent written for volume {vol}")
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    # What kubeflow/training-operator v1.9 injects into the master of a 1-node job (envvar.go, master.go);
    # the master's own Service name resolves to itself.
    name = job["metadata"]["name"]
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "pytorchjob-port")
    # The container shares this machine's network (to reach the MLflow server on the loopback), where
    # the pod's port may be taken by another test: a free one then, as a second pod IP would give.
    port = port_or_free(port)
    nproc = job["spec"]["nprocPerNode"]
    env |= {
        "PYTHONUNBUFFERED": "1",
        "WORLD_SIZE": nproc,
        "RANK": "0",
        "PET_NNODES": "1",
        "PET_NODE_RANK": "0",
        "PET_NPROC_PER_NODE": nproc,
        "MASTER_ADDR": f"{name}-master-0",
        "PET_MASTER_ADDR": f"{name}-master-0",
        "MASTER_PORT": str(port),
        "PET_MASTER_PORT": str(port),
    }
    opts += ["--add-host", f"{name}-master-0:127.0.0.1"]
    for k, v in env.items():
        opts += ["-e", f"{k}={v}"]
    return opts, list(c["command"]) + list(c.get("args", [])), name


def test_rendered_job_trains_in_a_read_only_container(image: str, tmp_path: Path, mlflow_server: str) -> None:
    import mlflow

    experiment = f"image-test-{uuid.uuid4().hex[:8]}"
    docs = _render(tmp_path, image, mlflow_server, experiment)
    opts, argv, job_name = _pod_args(docs, tmp_path)
    # The manifest's own read-only root and /tmp emptyDir: the trainer may write only to its mounts.
    assert "--read-only" in opts and any(o.startswith("/tmp:") for o in opts), opts

    # The data-prep Job's step (manifests/base/data-prep-job.yaml), on the job's own ConfigMap config.
    t0 = time.monotonic()
    prep = _run(image, opts, ["recsys", "data", "prepare", "--config", "/etc/recsys/config.yaml"])
    assert prep.returncode == 0, (prep.stdout + prep.stderr)[-4000:]
    FIGURES["prepare in container"] = f"{time.monotonic() - t0:.0f} s"

    t0 = time.monotonic()
    r = _run(image, opts, argv)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    FIGURES["train in container (2 processes)"] = f"{time.monotonic() - t0:.0f} s"
    assert "sharding plan (world size 2)" in out, out[-3000:]

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, out[-3000:]
    (run,) = client.search_runs([exp.experiment_id], f"tags.`recsys.job_name` = '{job_name}'")
    assert run.info.status == "FINISHED"
    test_metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    assert "test/recall_at_10" in test_metrics and 0.0 <= test_metrics["test/recall_at_10"] <= 1.0, (
        run.data.metrics
    )
    # uid 1000 wrote its checkpoint to the checkpoint PVC (train.checkpoint.dir=/checkpoints/<job> in jobs).
    ckpt = [p for p in (tmp_path / "pvc" / "recsys-checkpoints").rglob("*") if p.is_file()]
    assert ckpt, "no checkpoint written to the checkpoint PVC"
