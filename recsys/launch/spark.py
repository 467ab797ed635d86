"""Spark backend: the same trainer under `pyspark.ml.torch.distributor.TorchDistributor`.

TorchDistributor starts `torchrun` itself (on the driver with local_mode=True, or one torchrun per
barrier task on the executors with local_mode=False) and, in every process it starts, calls a
cloudpickled function. Ours is `spark_train_entry`: it rebuilds the one resolved config from a plain
dict and calls `recsys.train.train`, exactly what `torchrun -m recsys train --config <resolved.yaml>`
does. Nothing about training is re-derived here; the launcher only decides where and how many.

TorchDistributor hands back the value the function returned in the torchrun of partition 0, but
every process of that torchrun writes the same output file, so whichever finishes last wins (seen
on local[2]: rank 1's value came back). `train()` returns the same TrainResult on every rank (run id
and metrics are broadcast from rank 0), which makes that race harmless: the value is rank 0's.

`submit_spark` (through `recsys.launch.contract.submit`) sizes the run from the job section like every
backend: job.nodes × procs_per_node processes, one GPU each when job.gpus_per_node > 0; it runs the
distributor in a driver thread and returns a handle (status, wait, logs, delete).

Typical uses:
    recsys launch --backend spark --config two_tower_synth --set job.procs_per_node=2   # CLI
    run_on_spark("two_tower_synth", num_processes=8, local_mode=False, use_gpu=True)   # notebook
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import UserError
from recsys.launch.types import JobResult, JobSize, State

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from recsys.config import Config

MIN_JAVA = 17
# Passed from the driver into every training process: with local_mode=False the processes run on
# executors, which do not inherit the driver's environment (MLflow on Databricks needs host and
# token there; set them from a secret scope, never in code).
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_EXPERIMENT_NAME",
    "DATABRICKS_HOST",
    "DATABRICKS_TOKEN",
    "OMP_WAIT_POLICY",
)
INSTALL_HINT = "pip install 'recsys[spark]' (pyspark 4.3.0) and put Java 17+ on PATH (or set JAVA_HOME)"


def java_version() -> int | None:
    """Major version of the `java` Spark would start ($JAVA_HOME/bin/java, else PATH); None if absent."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home, "bin", "java")) if home else shutil.which("java")
    if not java or not Path(java).exists():
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0_392" is Java 8


def spark_unavailable_reason() -> str | None:
    """Why a local SparkSession cannot start here (pyspark or Java 17+ missing), or None if it can."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return f"pyspark is not installed: {INSTALL_HINT}"
    v = java_version()
    if v is None:
        return f"no Java found (JAVA_HOME or PATH): Spark needs Java {MIN_JAVA}+; {INSTALL_HINT}"
    if v < MIN_JAVA:
        return f"Java {v} found, Spark 4 needs Java {MIN_JAVA}+: install it and set JAVA_HOME"
    return None


def get_spark(spark: SparkSession | None = None, master: str | None = None) -> SparkSession:
    """The given or active SparkSession (a notebook's `spark`), else a new local one.

    A new session uses `master` (default local[2]) and this interpreter for Python workers, so
    executors import the same recsys, torch and streaming as the driver.
    """
    if spark is not None:
        return spark
    reason = spark_unavailable_reason()
    if reason and "pyspark" in reason:
        raise UserError(reason)
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if reason:
        raise UserError(reason)
    # Python workers are started from PYSPARK_PYTHON (the spark.pyspark.python setting alone did not
    # reach them in local mode): default it to this interpreter, whose venv holds recsys.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Under spark-submit (or a Databricks cluster) the master comes from the submit configuration.
    builder = SparkSession.builder.appName("recsys")
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        builder = builder.master(master or os.environ.get("SPARK_MASTER") or "local[2]")
    return (
        builder.config("spark.pyspark.python", sys.executable)
        .config("spark.pyspark.driver.python", sys.executable)
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )


def spark_train_entry(
    cfg_dict: dict[str, Any], env: dict[str, str], use_gpu: bool, result_dir: str | None = None
) -> dict[str, Any]:
    """Runs in every process TorchDistributor starts (torchrun has set RANK, WORLD_SIZE, …):
    rebuild the resolved config and call the one trainer. Returns the TrainResult as a dict; with
    `result_dir` each rank also records its run id or failure reason there (recsys.launch.worker)."""
    os.environ.update(env)
    if not use_gpu:
        # The launcher decides placement: a CPU job stays on CPU even on a GPU host.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from recsys.config import config_from_dict
    from recsys.train import train

    cfg = config_from_dict(cfg_dict, origin="spark launcher (resolved config)")
    if result_dir is None:
        return asdict(train(cfg))
    from recsys.launch.worker import run_worker

    return asdict(run_worker(cfg, result_dir))


def _resolve(cfg_or_name: Config | str | Path, overrides: list[str] | None) -> Config:
    from recsys.config import Config, apply_override, config_from_dict, load_config

    if isinstance(cfg_or_name, Config):
        if not overrides:
            return cfg_or_name
        data = cfg_or_name.model_dump(mode="json")
        for assignment in overrides:
            apply_override(data, assignment)
        return config_from_dict(data, origin=f"{cfg_or_name.name} with overrides")
    return load_config(cfg_or_name, overrides)


def _check_one_node_per_host(session: SparkSession, num_processes: int, use_gpu: bool) -> None:
    """With local_mode=False every barrier task runs its own torchrun, i.e. is a "node". The MDS
    loader (mosaicml-streaming) keeps per-node state in the host's shared memory, so two nodes on one
    host collide (seen on local[2]: FileExistsError '/000082_locals'): one task per host only."""
    master = session.conf.get("spark.master", "") or ""
    if master.startswith("local") and num_processes > 1:
        raise UserError(
            f"local_mode=False on master {master!r} puts {num_processes} single-process torchrun nodes on "
            "one host, which the MDS loader cannot share; use --local-mode (one torchrun, same processes)"
        )
    task = session.conf.get("spark.task.resource.gpu.amount", "") or ""
    executor = session.conf.get("spark.executor.resource.gpu.amount", "") or ""
    if use_gpu and task and executor and float(task) < float(executor):
        print(
            f"recsys: warning: spark.task.resource.gpu.amount={task} < spark.executor.resource.gpu.amount="
            f"{executor}: several tasks (torchrun nodes) share a host and the MDS loader's shared memory; "
            "set the task amount to the GPUs per executor (one task per host)",
            file=sys.stderr,
        )


def _distributor(
    cfg: Config, num_processes: int, local_mode: bool, use_gpu: bool, spark: SparkSession | None
) -> tuple[Any, dict[str, str]]:
    """The checked TorchDistributor for this placement and the env its processes need."""
    if num_processes < 1:
        raise UserError(f"num_processes must be at least 1, got {num_processes}")
    if use_gpu and cfg.train.device == "cpu":
        raise UserError("use_gpu=True contradicts train.device=cpu: drop --use-gpu or set train.device")
    if not use_gpu and cfg.train.device == "cuda":
        raise UserError("train.device=cuda needs GPUs: set job.gpus_per_node (use_gpu=True in notebooks)")
    session = get_spark(spark)  # TorchDistributor uses the active session
    if not local_mode:
        _check_one_node_per_host(session, num_processes, use_gpu)
    from pyspark.ml.torch.distributor import TorchDistributor

    # Local-mode processes inherit the driver's environment; executors need it passed.
    env = {} if local_mode else {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    if not local_mode and cfg.tracking.enabled and not (cfg.tracking.uri or env.get("MLFLOW_TRACKING_URI")):
        # The default local store would be written on an executor's disk and lost with it.
        print(
            "recsys: warning: tracking.uri and MLFLOW_TRACKING_URI are unset; with local_mode=False "
            "the run goes to a local store on rank 0's executor (use 'databricks' or a server URI)",
            file=sys.stderr,
        )
    try:
        distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu)
    except RuntimeError as e:  # GPU resources not configured on the cluster
        raise UserError(f"TorchDistributor: {e}") from None
    return distributor, env


def run_on_spark(
    cfg_or_name: Config | str | Path,
    overrides: list[str] | None = None,
    num_processes: int = 2,
    local_mode: bool = True,
    use_gpu: bool = False,
    spark: SparkSession | None = None,
) -> dict[str, Any]:
    """Train under TorchDistributor from a notebook; returns rank 0's result as a dict
    (run_id, metrics, baselines, steps, world_size, global_batch_size, samples_per_s, …).

    Modes: one GPU: num_processes=1, local_mode=True, use_gpu=True; one node with G GPUs:
    num_processes=G, local_mode=True; several nodes: local_mode=False, num_processes=all GPUs, with
    spark.task.resource.gpu.amount = GPUs per executor (one task, one torchrun, per host).
    The job-section equivalent is `submit(cfg, "spark")` (recsys.launch.contract).
    """
    cfg = _resolve(cfg_or_name, overrides)
    distributor, env = _distributor(cfg, num_processes, local_mode, use_gpu, spark)
    result = distributor.run(spark_train_entry, cfg.model_dump(mode="json"), env, use_gpu)
    if not isinstance(result, dict):
        raise RuntimeError(
            f"TorchDistributor returned {type(result).__name__}, expected the trainer's result"
        )
    return result


class SparkJob:
    """A TorchDistributor run in a driver thread (TorchDistributor.run blocks until training ends)."""

    backend = "spark"

    def __init__(self, name: str, result_dir: Path, local_mode: bool) -> None:
        self.name = name
        self.result_dir = result_dir
        self.local_mode = local_mode
        self.group = f"recsys-{name}-{result_dir.name}"
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._deleted = False
        self.thread: threading.Thread | None = None

    def start(self, distributor: Any, cfg: Config, env: dict[str, str], use_gpu: bool) -> None:
        """Run the distributor in a daemon thread under this job's Spark job group."""

        def target() -> None:
            from pyspark import SparkContext

            sc = SparkContext._active_spark_context
            if sc is not None:  # executors' barrier tasks (local_mode=False) run in this group
                sc.setJobGroup(self.group, f"recsys training {self.name}", interruptOnCancel=True)
            try:
                self.result = distributor.run(
                    spark_train_entry, cfg.model_dump(mode="json"), env, use_gpu, str(self.result_dir)
                )
            except BaseException as e:  # noqa: BLE001 (reported as the job's failure by wait())
                self.error = e

        self.thread = threading.Thread(target=target, name=f"spark-{self.name}", daemon=True)
        self.thread.start()

    def status(self) -> State:
        """Running while TorchDistributor runs; then Succeeded or Failed."""
        assert self.thread is not None
        if self.thread.is_alive():
            return "Running"
        return "Succeeded" if self.error is None and isinstance(self.result, dict) else "Failed"

    def wait(self, timeout: float | None = None) -> JobResult:
        """Join the driver thread; the run id is rank 0's result, the reason the failing rank's."""
        from recsys.launch.worker import read_results

        assert self.thread is not None
        self.thread.join(timeout)
        if self.thread.is_alive():
            return JobResult(self.backend, self.name, "Running", reason=f"still running after {timeout:.0f}s")
        if self.error is None and isinstance(self.result, dict):
            return JobResult(self.backend, self.name, "Succeeded", self.result.get("run_id"))
        # Result files exist on this host in local mode; from executors only TorchDistributor's error.
        _, reason = read_results(self.result_dir)
        if self._deleted:
            reason = "deleted"
        if not reason:
            text = str(self.error or f"TorchDistributor returned {type(self.result).__name__}")
            reason = f"{type(self.error).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
        return JobResult(self.backend, self.name, "Failed", None, reason)

    def logs(self, follow: bool = False) -> Iterator[str]:
        """TorchDistributor streams the processes' output to the driver's console (local mode) or the
        executors' logs (Spark UI); it keeps no copy to hand back, so this yields where to look."""
        where = "the driver's console" if self.local_mode else "the executors' stderr in the Spark UI"
        yield f"recsys: the training output of {self.name} is in {where}"

    def delete(self) -> None:
        """Cancel the Spark job group (executors) and stop this host's training processes (driver)."""
        from pyspark import SparkContext

        self._deleted = True
        sc = SparkContext._active_spark_context
        if sc is not None:
            sc.cancelJobGroup(self.group)
        for pid_file in self.result_dir.glob("rank-*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        if self.thread is not None:
            self.thread.join(30)


def submit_spark(cfg: Config, size: JobSize, local_mode: bool | None = None) -> SparkJob:
    """Train `cfg` under TorchDistributor: job.nodes × procs_per_node processes, one GPU each on a GPU
    job; on the driver (local mode, the default for one node) or in executor tasks."""
    local = size.nodes == 1 if local_mode is None else local_mode
    if local and size.nodes > 1:
        raise UserError(
            f"job.nodes={size.nodes} with --local-mode: the driver is one node; use --no-local-mode "
            "(one torchrun per executor) or --set job.nodes=1"
        )
    # TorchDistributor takes the total: on executors it groups them into one torchrun per task by
    # spark.task.resource.gpu.amount, so nodes × processes per node is the one number it needs.
    distributor, env = _distributor(cfg, size.world_size, local, size.gpus_per_proc > 0, None)
    root = Path(tempfile.gettempdir()) / "recsys-launch"
    root.mkdir(parents=True, exist_ok=True)
    job = SparkJob(cfg.job.name, Path(tempfile.mkdtemp(prefix=f"{cfg.job.name}-spark-", dir=root)), local)
    env = {**env, "RECSYS_JOB_NAME": cfg.job.name}
    job.start(distributor, cfg, env, size.gpus_per_proc > 0)
    return job
