"""Kubeflow Pipelines v2: prepare data (MDS) → train Two-Tower and DLRM → evaluate → summary.

Every step is a lightweight Python component that runs in the trainer image (the `image` parameter;
the compiled default is JobConfig.image) and calls the same code as the `recsys` command: training goes
through `recsys launch`, so a cluster run creates a PyTorchJob or TrainJob exactly like the CLI does, and
`backend=local` runs torchrun inside the step. Per-run names come from the pipeline-job placeholders at
run time; nothing per-run is computed here, because this module's body runs once, at compile time.

    python pipelines/recsys_pipeline.py --compile     # writes pipelines/recsys_pipeline.yaml
    python pipelines/recsys_pipeline.py --local       # the whole pipeline on this machine (kfp.local)
"""

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Input, Markdown, Metrics, Output
from kfp.dsl.pipeline_channel import PipelineChannel

from recsys.config import JobConfig

PIPELINE_NAME = "recsys-pipeline"
PIPELINE_YAML = Path(__file__).with_suffix(".yaml")
# The compiled defaults follow the job section's defaults, so the pipeline and `recsys render` agree.
_JOB = JobConfig()
TRAINER_IMAGE = _JOB.image
DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
# Keys copied from the Secrets into the step's environment (optional: a missing key or Secret is skipped).
MLFLOW_SECRET_KEYS = ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"]
OBJECT_STORE_SECRET_KEYS = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "S3_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
]


# ------------------------------------------------------------------------------------------ components
# Component bodies are shipped as source into the YAML and run in the trainer image: they import only
# what the image has (recsys, kfp) and must be self-contained (no module-level helpers).


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def prepare_data(
    config: str,
    overrides: list,
    model_overrides: list,
    data_root: str,
    pipeline_job_name: str,
    pipeline_task_id: str,
) -> str:
    """Prepare one config's data as MDS shards in a fresh folder under data_root; returns that folder."""
    import hashlib
    import re

    from recsys.config import load_config
    from recsys.data.prepare import prepare

    if "://" in data_root:
        # recsys.data.prepare writes through the local filesystem; a URI would become a local folder.
        raise ValueError(
            f"data_root {data_root!r}: object-store roots are not supported by `recsys data prepare` yet; "
            "use a folder on the data PVC (default /data/pipelines)"
        )
    # A fresh folder per run: prepare never overwrites, and display names repeat across runs.
    slug = re.sub(r"[^a-z0-9]+", "-", pipeline_job_name.lower()).strip("-")[:40].strip("-") or "run"
    digest = hashlib.sha1(f"{pipeline_job_name}/{pipeline_task_id}".encode()).hexdigest()[:8]
    probe = load_config(config, [*overrides, *model_overrides])
    prepared_dir = f"{data_root.rstrip('/')}/{slug}-{digest}/{probe.name}"
    cfg = load_config(config, [*overrides, *model_overrides, f"data.prepared_dir={prepared_dir}"])
    print(f"prepare-data: {config} → {prepared_dir}", flush=True)
    prepare(cfg, overwrite=False)
    return prepared_dir


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train_model(
    config: str,
    overrides: list,
    model_overrides: list,
    prepared_dir: str,
    backend: str,
    image: str,
    nodes: int,
    gpus_per_node: int,
    procs_per_node: int,
    job_node_selector: dict,
    job_tolerations: list,
    mlflow_tracking_uri: str,
    data_pvc: str,
    checkpoint_pvc: str,
    mlflow_secret: str,
    pipeline_job_name: str,
    pipeline_task_id: str,
) -> NamedTuple("TrainOutputs", [("job_name", str), ("run_id", str)]):
    """Train through `recsys launch` (PyTorchJob, TrainJob or local torchrun), wait, return job name + run id."""
    import collections
    import hashlib
    import json
    import os
    import re
    import subprocess
    import sys

    from recsys.config import load_config
    from recsys.tracking import find_run_by_job, resolve_tracking_uri

    if backend not in ("pytorchjob", "trainjob", "local"):
        raise ValueError(f"backend: expected pytorchjob, trainjob or local, got {backend!r}")
    if backend == "local" and nodes > 1:
        raise ValueError(
            f"nodes={nodes} needs backend pytorchjob or trainjob; backend=local trains on one node"
        )
    sets = [
        f"data.prepared_dir={prepared_dir}",
        f"job.image={image}",
        f"job.nodes={nodes}",
        f"job.gpus_per_node={gpus_per_node}",
        # On GPUs torchrun starts one process per GPU; on CPU procs_per_node decides.
        f"job.procs_per_node={gpus_per_node if gpus_per_node > 0 else procs_per_node}",
        f"job.node_selector={json.dumps(job_node_selector)}",
        f"job.tolerations={json.dumps(job_tolerations)}",
        # The run's volumes and secret reach the job pods, not only this step's pod.
        f"job.data_pvc={data_pvc}",
        f"job.checkpoint_pvc={checkpoint_pvc}",
        f"job.mlflow_secret={mlflow_secret}",
    ]
    if mlflow_tracking_uri:
        sets += [f"tracking.uri={mlflow_tracking_uri}", f"job.mlflow_tracking_uri={mlflow_tracking_uri}"]
    # User overrides come last so they can refine anything the parameters set.
    sets += [*overrides, *model_overrides]
    cfg = load_config(config, sets)

    # Unique per run and task (display names repeat across runs); at most 40 characters, the limit
    # `recsys launch` enforces so that the operators' pod and service names stay valid.
    base = cfg.job.name[:14].strip("-")
    digest = hashlib.sha1(f"{pipeline_job_name}/{pipeline_task_id}".encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", pipeline_job_name.lower()).strip("-")
    slug = slug[: 40 - len(base) - len(digest) - 2].strip("-")
    job_name = "-".join(p for p in (base, slug, digest) if p)
    sets.append(f"job.name={job_name}")

    cmd = [sys.executable, "-m", "recsys", "launch", "--backend", backend, "--config", config]
    for s in sets:
        cmd += ["--set", s]
    if backend == "local":
        cmd += ["--num-processes", str(cfg.job.procs_per_node)]
    else:
        cmd += ["--wait", "--logs"]
    print(f"train: {job_name}: {' '.join(cmd[2:])}", flush=True)
    # The trainer tags its MLflow run with RECSYS_JOB_NAME; the run is found by that tag afterwards.
    env = dict(os.environ, RECSYS_JOB_NAME=job_name)
    # The reason of a failure is the last line that states one: the launcher's or trainer's
    # `recsys: …` line (e.g. "PyTorchJob x failed: BackoffLimitExceeded: …") or an exception's message.
    stated = re.compile(r"(^|[\s:\]])recsys: |\b\w*(Error|Exception): ")
    tail: collections.deque[str] = collections.deque(maxlen=5)
    reason = ""
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                tail.append(line.strip())
            if stated.search(line) and "ChildFailedError" not in line:
                reason = line.strip()
    if proc.returncode != 0:
        raise RuntimeError(
            f"training job {job_name} ({backend}) failed with exit status {proc.returncode}: "
            + (reason or " | ".join(tail))
        )

    uri = resolve_tracking_uri(cfg)
    run_id = find_run_by_job(uri, cfg.tracking.experiment, job_name)
    if run_id is None:
        raise RuntimeError(
            f"training job {job_name} succeeded but no MLflow run tagged with it is in experiment "
            f"{cfg.tracking.experiment!r} at {uri}"
        )
    print(f"train: {job_name} done, MLflow run {run_id}", flush=True)
    return job_name, run_id


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate_model(
    config: str,
    overrides: list,
    model_overrides: list,
    prepared_dir: str,
    run_id: str,
    mlflow_tracking_uri: str,
    metrics: Output[Metrics],
) -> None:
    """Evaluate a trained run on the test split; the metrics go to the MLflow run and to a KFP artifact."""
    import math

    import mlflow

    from recsys.config import load_config
    from recsys.evaluate import evaluate_run
    from recsys.tracking import resolve_tracking_uri

    sets = [f"data.prepared_dir={prepared_dir}"]
    if mlflow_tracking_uri:
        sets.append(f"tracking.uri={mlflow_tracking_uri}")
    cfg = load_config(config, [*sets, *overrides, *model_overrides])
    evaluate_run(cfg, run_id=run_id)
    # Read back what evaluate_run logged, so the KFP metrics are exactly the MLflow run's eval/ metrics.
    logged = mlflow.MlflowClient(resolve_tracking_uri(cfg)).get_run(run_id).data.metrics
    values = {k.removeprefix("eval/"): v for k, v in sorted(logged.items()) if k.startswith("eval/")}
    if not values:
        raise RuntimeError(f"evaluation of run {run_id} logged no eval/ metrics to MLflow")
    for name, value in values.items():
        if math.isfinite(value):
            metrics.log_metric(name, value)
    print(f"evaluate: run {run_id}: {values}", flush=True)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def summarize(
    two_tower_job_name: str,
    two_tower_run_id: str,
    two_tower_metrics: Input[Metrics],
    dlrm_job_name: str,
    dlrm_run_id: str,
    dlrm_metrics: Input[Metrics],
    mlflow_tracking_uri: str,
    summary: Output[Markdown],
) -> str:
    """Gather both models' jobs, MLflow runs and test metrics into a Markdown table and a JSON string."""
    import json

    models = {
        "two_tower": (two_tower_job_name, two_tower_run_id, two_tower_metrics),
        "dlrm": (dlrm_job_name, dlrm_run_id, dlrm_metrics),
    }
    result: dict[str, dict] = {}
    lines = [f"# recsys pipeline summary\n\nMLflow: `{mlflow_tracking_uri}`\n"]
    for model, (job_name, run_id, artifact) in models.items():
        values = {k: v for k, v in artifact.metadata.items() if isinstance(v, (int, float))}
        result[model] = {"job_name": job_name, "run_id": run_id, "metrics": values}
        lines += [
            f"## {model}\n",
            f"job `{job_name}`, MLflow run `{run_id}`\n",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(values.items())]
        lines.append("")
    with open(summary.path, "w") as f:
        f.write("\n".join(lines))
    text = json.dumps(result, sort_keys=True)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------ pipeline
class PipelineOutputs(NamedTuple):
    """What a pipeline run returns (kfp.local hands these back; the UI shows them as run outputs)."""

    summary: str
    two_tower_metrics: Metrics
    dlrm_metrics: Metrics


def _cluster_step(
    task: dsl.PipelineTask,
    *,
    image: PipelineChannel,
    data_pvc: PipelineChannel,
    mlflow_secret: PipelineChannel,
    object_store_secret: PipelineChannel,
    node_selector: PipelineChannel,
    tolerations: PipelineChannel,
    name: str,
) -> dsl.PipelineTask:
    """What every step pod needs in a cluster: the image, the data PVC, credentials and placement.

    kfp.local ignores the Kubernetes platform settings (and the image: SubprocessRunner runs the
    component in this Python), so the same pipeline runs locally unchanged.
    """
    task.set_display_name(name)
    task.set_container_image(image)
    # Every run must train and evaluate anew; a cached training step would hide a broken job.
    task.set_caching_options(False)
    kubernetes.mount_pvc(task, pvc_name=data_pvc, mount_path=DATA_MOUNT)
    kubernetes.use_secret_as_env(
        task, secret_name=mlflow_secret, secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS}, optional=True
    )
    kubernetes.use_secret_as_env(
        task,
        secret_name=object_store_secret,
        secret_key_to_env={k: k for k in OBJECT_STORE_SECRET_KEYS},
        optional=True,
    )
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return task


def _with_shm(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """/dev/shm as a memory emptyDir: StreamingDataset and DataLoader workers share memory through it."""
    return kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=_JOB.shm_size
    )


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Prepare MDS data, train Two-Tower and DLRM as PyTorchJobs/TrainJobs (or locally), "
    "evaluate both and record everything in MLflow.",
)
def recsys_pipeline(
    two_tower_config: str = "two_tower_synth",
    dlrm_config: str = "dlrm_synth",
    overrides: list = [],  # noqa: B006 (KFP reads parameter defaults from the signature)
    two_tower_overrides: list = [],  # noqa: B006
    dlrm_overrides: list = [],  # noqa: B006
    image: str = TRAINER_IMAGE,
    backend: str = "pytorchjob",
    nodes: int = 1,
    gpus_per_node: int = 0,
    procs_per_node: int = 1,
    mlflow_tracking_uri: str = _JOB.mlflow_tracking_uri,
    data_root: str = f"{DATA_MOUNT}/pipelines",
    data_pvc: str = _JOB.data_pvc,
    checkpoint_pvc: str = _JOB.checkpoint_pvc,
    mlflow_secret: str = _JOB.mlflow_secret or "mlflow-credentials",
    object_store_secret: str = "recsys-object-store",
    job_node_selector: dict = {},  # noqa: B006
    job_tolerations: list = [],  # noqa: B006
    step_node_selector: dict = {},  # noqa: B006
    step_tolerations: list = [],  # noqa: B006
) -> PipelineOutputs:
    """The recsys pipeline; every argument is a run parameter in the Kubeflow UI.

    Args:
        two_tower_config: Shipped config name or a YAML path (readable in the step pod) of the Two-Tower run.
        dlrm_config: Shipped config name or YAML path of the DLRM run.
        overrides: `a.b=v` config overrides applied to both models, e.g. ["train.epochs=1"].
        two_tower_overrides: Overrides for the Two-Tower config only (after `overrides`).
        dlrm_overrides: Overrides for the DLRM config only (after `overrides`).
        image: Trainer image of the pipeline steps and the training jobs.
        backend: pytorchjob | trainjob (a distributed job per model) | local (torchrun inside the step).
        nodes: Pods per training job (Master ×1 + Worker ×(nodes−1)).
        gpus_per_node: GPUs per training pod (0: CPU); torchrun starts one process per GPU.
        procs_per_node: torchrun processes per pod when gpus_per_node is 0.
        mlflow_tracking_uri: MLflow tracking URI seen by the steps and the jobs ('' keeps the config's).
        data_root: Folder on the data PVC under which each run prepares its MDS data.
        data_pvc: PVC mounted at /data in the steps and in the training job pods.
        checkpoint_pvc: PVC mounted at /checkpoints in the training job pods (and the step, backend=local).
        mlflow_secret: Secret with MLflow credentials (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), optional;
            the steps and the training job pods read it.
        object_store_secret: Secret with object-store credentials (AWS_*, S3_ENDPOINT_URL), optional.
        job_node_selector: nodeSelector of the training job pods, e.g. {"nvidia.com/gpu.present": "true"}.
        job_tolerations: Tolerations of the training job pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists"}].
        step_node_selector: nodeSelector of the pipeline's own step pods.
        step_tolerations: Tolerations of the pipeline's own step pods.
    """
    cluster = dict(
        image=image,
        data_pvc=data_pvc,
        mlflow_secret=mlflow_secret,
        object_store_secret=object_store_secret,
        node_selector=step_node_selector,
        tolerations=step_tolerations,
    )
    trained = {}
    for model, config, model_overrides in (
        ("two-tower", two_tower_config, two_tower_overrides),
        ("dlrm", dlrm_config, dlrm_overrides),
    ):
        data = prepare_data(
            config=config,
            overrides=overrides,
            model_overrides=model_overrides,
            data_root=data_root,
            pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            pipeline_task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER,
        )
        _cluster_step(data, name=f"prepare-data-{model}", **cluster)
        train = train_model(
            config=config,
            overrides=overrides,
            model_overrides=model_overrides,
            prepared_dir=data.output,
            backend=backend,
            image=image,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            procs_per_node=procs_per_node,
            job_node_selector=job_node_selector,
            job_tolerations=job_tolerations,
            mlflow_tracking_uri=mlflow_tracking_uri,
            data_pvc=data_pvc,
            checkpoint_pvc=checkpoint_pvc,
            mlflow_secret=mlflow_secret,
            pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            pipeline_task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER,
        )
        _with_shm(_cluster_step(train, name=f"train-{model}", **cluster))
        # backend=local trains inside this pod and checkpoints beside the job pods' checkpoints.
        kubernetes.mount_pvc(train, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
        evaluate = evaluate_model(
            config=config,
            overrides=overrides,
            model_overrides=model_overrides,
            prepared_dir=data.output,
            run_id=train.outputs["run_id"],
            mlflow_tracking_uri=mlflow_tracking_uri,
        )
        _with_shm(_cluster_step(evaluate, name=f"evaluate-{model}", **cluster))
        trained[model] = (train, evaluate)

    (tt_train, tt_eval), (dlrm_train, dlrm_eval) = trained["two-tower"], trained["dlrm"]
    summary = summarize(
        two_tower_job_name=tt_train.outputs["job_name"],
        two_tower_run_id=tt_train.outputs["run_id"],
        two_tower_metrics=tt_eval.outputs["metrics"],
        dlrm_job_name=dlrm_train.outputs["job_name"],
        dlrm_run_id=dlrm_train.outputs["run_id"],
        dlrm_metrics=dlrm_eval.outputs["metrics"],
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    summary.set_display_name("summary")
    summary.set_container_image(image)
    summary.set_caching_options(False)
    return PipelineOutputs(
        summary.outputs["Output"], tt_eval.outputs["metrics"], dlrm_eval.outputs["metrics"]
    )


# ------------------------------------------------------------------------------------------ commands
def compile_pipeline(path: Path = PIPELINE_YAML) -> Path:
    """Compile the pipeline to its IR YAML (what the Kubeflow UI uploads)."""
    compiler.Compiler().compile(recsys_pipeline, package_path=str(path))
    return path


def run_local(workdir: Path, arguments: dict) -> dict:
    """Run the whole pipeline with kfp.local's SubprocessRunner in this Python.

    Steps run as subprocesses of this interpreter (use_venv=False: the venv already has recsys); the
    Kubernetes settings and the step image are ignored there. A failing step raises RuntimeError.
    Returns {"summary": summary dict, "metrics": {model: KFP Metrics artifact}, "mlflow_tracking_uri": …}.
    """
    from kfp import local

    workdir.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "outputs"),
        raise_on_error=True,
    )
    args = {
        "backend": "local",
        "data_root": str((workdir / "data").resolve()),
        "mlflow_tracking_uri": f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
        **arguments,
    }
    with warnings.catch_warnings():
        # kfp.local warns for every step that display names and the step image do not apply locally;
        # that is expected here (README), and the warnings would bury the step logs.
        warnings.filterwarnings("ignore", message=r"Task '.*': settings .* have no effect")
        warnings.filterwarnings("ignore", message=r"You may be attemping to run a task that uses custom")
        run = recsys_pipeline(**args)
    return {
        "summary": json.loads(run.outputs["summary"]),
        "metrics": {"two_tower": run.outputs["two_tower_metrics"], "dlrm": run.outputs["dlrm_metrics"]},
        "mlflow_tracking_uri": args["mlflow_tracking_uri"],
    }


def main(argv: list[str] | None = None) -> int:
    """`python pipelines/recsys_pipeline.py --compile | --local [--set a.b=v …]`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compile", action="store_true", help=f"write {PIPELINE_YAML.name}")
    mode.add_argument("--local", action="store_true", help="run the pipeline locally with kfp.local")
    p.add_argument("-o", "--output", type=Path, default=PIPELINE_YAML, help="compiled YAML path (--compile)")
    p.add_argument("--workdir", type=Path, default=Path("runs/pipeline-local"), help="outputs, data, MLflow")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="a.b=v", help="both models"
    )
    p.add_argument("--two-tower-set", action="append", default=[], metavar="a.b=v", help="Two-Tower only")
    p.add_argument("--dlrm-set", action="append", default=[], metavar="a.b=v", help="DLRM only")
    p.add_argument("--procs-per-node", type=int, default=1, help="torchrun processes per training step")
    p.add_argument("--mlflow-tracking-uri", default=None, help="default: sqlite under --workdir")
    args = p.parse_args(argv)

    if args.compile:
        print(f"wrote {compile_pipeline(args.output)}")
        return 0
    arguments: dict = {
        "overrides": args.overrides,
        "two_tower_overrides": args.two_tower_set,
        "dlrm_overrides": args.dlrm_set,
        "procs_per_node": args.procs_per_node,
    }
    if args.mlflow_tracking_uri:
        arguments["mlflow_tracking_uri"] = args.mlflow_tracking_uri
    result = run_local(args.workdir, arguments)
    print(f"\nrecsys pipeline (kfp.local) finished; MLflow: {result['mlflow_tracking_uri']}")
    for model in ("two_tower", "dlrm"):
        s, artifact = result["summary"][model], result["metrics"][model]
        print(f"\n{model}: job {s['job_name']}  MLflow run {s['run_id']}  (KFP metrics: {artifact.uri})")
        for name, value in sorted(artifact.metadata.items()):
            print(f"  {name:<28} {value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
