"""Kubeflow Pipelines v2: prepare data (MDS) → train Two-Tower and DLRM → (Two-Tower: index → batch
recommend for every user) → evaluate → summary.

Every step is a lightweight Python component that runs in the trainer image (the `image` parameter;
the compiled default is JobConfig.image) and calls the library in-process (recsys.launch.steps):
training goes through the launcher contract (`recsys.launch.contract.submit`), so a cluster run creates
a PyTorchJob or TrainJob exactly like `recsys launch` does, `backend=local` runs torchrun inside the
step, and the run id and failure reason come back as values. The run's data PVC, checkpoint PVC and
secrets go into the job section, so they reach the job pods. Per-run names come from the pipeline-job
placeholders at run time; nothing per-run is computed here, because this module's body runs once, at
compile time.

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
from recsys.launch.steps import OBJECT_STORE_SECRET_KEYS

PIPELINE_NAME = "recsys-pipeline"
PIPELINE_YAML = Path(__file__).with_suffix(".yaml")
# The compiled defaults follow the job section's defaults, so the pipeline and `recsys render` agree.
_JOB = JobConfig()
TRAINER_IMAGE = _JOB.image
DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
# Keys copied from the Secrets into the step's environment (optional: a missing key or Secret is skipped).
MLFLOW_SECRET_KEYS = ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"]


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
    object_store_secret: str,
    pipeline_job_name: str,
    pipeline_task_id: str,
) -> NamedTuple("TrainOutputs", [("job_name", str), ("run_id", str)]):
    """Train through the launcher contract (PyTorchJob, TrainJob or local torchrun), wait; job name + run id."""
    from recsys.launch.contract import job_size
    from recsys.launch.steps import OBJECT_STORE_SECRET_KEYS, ClusterParams, train_config, train_step

    params = ClusterParams(
        image=image,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        procs_per_node=procs_per_node,
        node_selector=job_node_selector,
        tolerations=job_tolerations,
        mlflow_tracking_uri=mlflow_tracking_uri,
        data_pvc=data_pvc,
        checkpoint_pvc=checkpoint_pvc,
        mlflow_secret=mlflow_secret,
        object_store_secret=object_store_secret,
        object_store_keys=tuple(OBJECT_STORE_SECRET_KEYS),
    )
    cfg = train_config(
        config, [*overrides, *model_overrides], prepared_dir, params, pipeline_job_name, pipeline_task_id
    )
    print(f"train: {cfg.job.name} on {backend}: {job_size(cfg.job).describe()}", flush=True)
    result = train_step(cfg, backend, echo=lambda line: print(line, flush=True))
    print(f"train: {result.job_name} done, MLflow run {result.run_id}", flush=True)
    return result.job_name, result.run_id


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def build_index(run_id: str, mlflow_tracking_uri: str, index_kind: str) -> str:
    """Build the run's FAISS item index (recall@k against exact measured) and log it to the run; its facts."""
    import json

    from recsys.launch.steps import index_step

    facts = index_step(run_id, mlflow_tracking_uri, index_kind)
    print(f"index: run {run_id}: {facts}", flush=True)
    return json.dumps(facts, sort_keys=True)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def recommend_all(run_id: str, mlflow_tracking_uri: str, prepared_dir: str, k: int) -> str:
    """Top-k unseen items for every user of the run as Parquet on the data volume; returns its path."""
    from recsys.launch.steps import recommend_step, recommendations_path

    done = recommend_step(run_id, mlflow_tracking_uri, k, recommendations_path(prepared_dir, run_id, k))
    print(f"recommend: run {run_id}: {done}", flush=True)
    return done["path"]


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def rank_candidates(
    ranker_config: str, overrides: list, run_id: str, mlflow_tracking_uri: str, prepared_dir: str, top_n: int
) -> str:
    """Retrieve → rank: a ranker trained on the Two-Tower's cross-fitted top-N, scored on test beside
    retrieval alone (logged to the Two-Tower run as funnel/test/…); the metrics as JSON."""
    import json

    from recsys.launch.steps import rank_step

    out = rank_step(ranker_config, overrides, run_id, mlflow_tracking_uri, f"{prepared_dir}-ranker", top_n)
    print(f"rank: run {run_id}: {out}", flush=True)
    return json.dumps(out, sort_keys=True)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate_model(
    config: str,
    overrides: list,
    model_overrides: list,
    prepared_dir: str,
    run_id: str,
    mlflow_tracking_uri: str,
    recommendations: str,
    metrics: Output[Metrics],
) -> None:
    """Evaluate a trained run on the test split (and score its batch recommendations when given); the
    metrics go to the MLflow run and to a KFP artifact."""
    import math

    import mlflow

    from recsys.config import load_config
    from recsys.evaluate import evaluate_run
    from recsys.launch.steps import score_recommendations
    from recsys.tracking import resolve_tracking_uri

    sets = [f"data.prepared_dir={prepared_dir}"]
    if mlflow_tracking_uri:
        sets.append(f"tracking.uri={mlflow_tracking_uri}")
    cfg = load_config(config, [*sets, *overrides, *model_overrides])
    evaluate_run(cfg, run_id=run_id)
    client = mlflow.MlflowClient(resolve_tracking_uri(cfg))
    if recommendations:
        # The written top-K lists scored against the test positives: what a serving layer would show.
        scored = score_recommendations(recommendations, prepared_dir, list(cfg.eval.ks))
        for name, value in scored.items():
            client.log_metric(run_id, f"eval/recs_{name}", value)
    # Read back what was logged, so the KFP metrics are exactly the MLflow run's eval/ metrics.
    logged = client.get_run(run_id).data.metrics
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
    two_tower_recommendations: str,
    dlrm_job_name: str,
    dlrm_run_id: str,
    dlrm_metrics: Input[Metrics],
    mlflow_tracking_uri: str,
    summary: Output[Markdown],
) -> str:
    """Gather both models' jobs, MLflow runs and test metrics into a Markdown table and a JSON string."""
    import json

    outputs = {"two_tower": two_tower_recommendations, "dlrm": ""}
    models = {
        "two_tower": (two_tower_job_name, two_tower_run_id, two_tower_metrics),
        "dlrm": (dlrm_job_name, dlrm_run_id, dlrm_metrics),
    }
    result: dict[str, dict] = {}
    lines = [f"# recsys pipeline summary\n\nMLflow: `{mlflow_tracking_uri}`\n"]
    for model, (job_name, run_id, artifact) in models.items():
        values = {k: v for k, v in artifact.metadata.items() if isinstance(v, (int, float))}
        result[model] = {"job_name": job_name, "run_id": run_id, "metrics": values}
        if outputs[model]:
            result[model]["recommendations"] = outputs[model]
        lines += [
            f"## {model}\n",
            f"job `{job_name}`, MLflow run `{run_id}`"
            + (f", recommendations `{outputs[model]}`" if outputs[model] else "")
            + "\n",
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


# train_model's inputs that every pipeline passes straight from its run parameters of the same name.
_TRAIN_STEP_INPUTS = {
    "config",
    "overrides",
    "model_overrides",
    "prepared_dir",
    "pipeline_job_name",
    "pipeline_task_id",
}
TRAIN_RUN_PARAMS = tuple(n for n in train_model.component_spec.inputs if n not in _TRAIN_STEP_INPUTS)
# The pipelines' run parameters of each step pod, and the _cluster_step argument each becomes.
_STEP_RUN_PARAMS = {
    "image": "image",
    "data_pvc": "data_pvc",
    "mlflow_secret": "mlflow_secret",
    "object_store_secret": "object_store_secret",
    "step_node_selector": "node_selector",
    "step_tolerations": "tolerations",
}


def step_cluster(run_params: dict) -> dict:
    """_cluster_step's settings from a pipeline's run parameters (its `locals()`), for every step."""
    return {arg: run_params[param] for param, arg in _STEP_RUN_PARAMS.items()}


def train_task(
    *,
    config: PipelineChannel,
    overrides: PipelineChannel,
    model_overrides: PipelineChannel,
    prepared_dir: PipelineChannel,
    run_params: dict,
    name: str,
) -> dsl.PipelineTask:
    """The training step both pipelines run: train_model with the job's run parameters (picked by name
    from `run_params`, a pipeline's `locals()`), in a step pod with /dev/shm and the checkpoint PVC."""
    missing = [n for n in TRAIN_RUN_PARAMS if n not in run_params]
    if missing:
        # Compile time: a pipeline that lacks one of train_model's run parameters.
        raise TypeError(f"train_task({name!r}): the pipeline has no run parameter(s) {missing}")
    train = train_model(
        config=config,
        overrides=overrides,
        model_overrides=model_overrides,
        prepared_dir=prepared_dir,
        **{n: run_params[n] for n in TRAIN_RUN_PARAMS},
        pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        pipeline_task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER,
    )
    _with_shm(_cluster_step(train, name=name, **step_cluster(run_params)))
    # backend=local trains inside this pod and checkpoints beside the job pods' checkpoints.
    kubernetes.mount_pvc(train, pvc_name=run_params["checkpoint_pvc"], mount_path=CHECKPOINT_MOUNT)
    return train


def _recommendations(
    run_id: PipelineChannel,
    prepared_dir: PipelineChannel,
    mlflow_tracking_uri: PipelineChannel,
    index_kind: PipelineChannel,
    k: PipelineChannel,
    cluster: dict,
) -> PipelineChannel:
    """Two-Tower after training: index its items, then top-k for every user; the Parquet path.

    The retrieve → rank step (`rank_candidates`, when rank_top_n > 0) sits beside these, after training.
    """
    index = build_index(run_id=run_id, mlflow_tracking_uri=mlflow_tracking_uri, index_kind=index_kind)
    _cluster_step(index, name="index-two-tower", **cluster)
    recommend = recommend_all(
        run_id=run_id, mlflow_tracking_uri=mlflow_tracking_uri, prepared_dir=prepared_dir, k=k
    )
    _cluster_step(recommend.after(index), name="recommend-two-tower", **cluster)
    return recommend.output


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Prepare MDS data, train Two-Tower and DLRM as PyTorchJobs/TrainJobs (or locally), "
    "index the Two-Tower's items and recommend top-K for every user, evaluate both and record "
    "everything in MLflow.",
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
    index_kind: str = "flat",
    recommend_k: int = 100,
    step_node_selector: dict = {},  # noqa: B006
    step_tolerations: list = [],  # noqa: B006
    rank_top_n: int = 0,
    ranker_config: str = "movielens_100k_candidate_ranker",
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
        object_store_secret: Secret with object-store credentials (AWS_*, S3_ENDPOINT_URL), optional;
            the steps and the training job pods read it.
        job_node_selector: nodeSelector of the training job pods, e.g. {"nvidia.com/gpu.present": "true"}.
        job_tolerations: Tolerations of the training job pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists"}].
        index_kind: FAISS index of the Two-Tower's items: flat (exact), ivf or hnsw (recall@k vs exact logged).
        recommend_k: Items recommended per user (Parquet beside the run's data on the data PVC).
        step_node_selector: nodeSelector of the pipeline's own step pods.
        step_tolerations: Tolerations of the pipeline's own step pods.
        rank_top_n: Retrieve → rank step: a ranker trained on the Two-Tower's cross-fitted top-N (N items
            per user), scored on test beside retrieval alone; 50 with ML-100K's configs (+7.8% test nDCG@10 over
            retrieval alone, docs/guides/ranking.md). 0 (default) skips it: the default two_tower_config is
            synthetic, and a ranker config is written for its retriever's data (ranker_config: ML-100K's).
        ranker_config: Config of that ranker (data.candidates; its data comes from the Two-Tower run).
    """
    run_params = dict(locals())
    cluster = step_cluster(run_params)
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
        train = train_task(
            config=config,
            overrides=overrides,
            model_overrides=model_overrides,
            prepared_dir=data.output,
            run_params=run_params,
            name=f"train-{model}",
        )
        recommendations = ""
        if model == "two-tower":
            recommendations = _recommendations(
                train.outputs["run_id"], data.output, mlflow_tracking_uri, index_kind, recommend_k, cluster
            )
            with dsl.If(rank_top_n > 0, name="rank-step"):
                rank = rank_candidates(
                    ranker_config=ranker_config,
                    overrides=overrides,
                    run_id=train.outputs["run_id"],
                    mlflow_tracking_uri=mlflow_tracking_uri,
                    prepared_dir=data.output,
                    top_n=rank_top_n,
                )
                _with_shm(_cluster_step(rank, name="rank-two-tower", **cluster))
        evaluate = evaluate_model(
            config=config,
            overrides=overrides,
            model_overrides=model_overrides,
            prepared_dir=data.output,
            run_id=train.outputs["run_id"],
            mlflow_tracking_uri=mlflow_tracking_uri,
            recommendations=recommendations,
        )
        _with_shm(_cluster_step(evaluate, name=f"evaluate-{model}", **cluster))
        trained[model] = (train, evaluate, recommendations)

    (tt_train, tt_eval, tt_recs), (dlrm_train, dlrm_eval, _) = trained["two-tower"], trained["dlrm"]
    summary = summarize(
        two_tower_job_name=tt_train.outputs["job_name"],
        two_tower_run_id=tt_train.outputs["run_id"],
        two_tower_metrics=tt_eval.outputs["metrics"],
        two_tower_recommendations=tt_recs,
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
    mode.add_argument(
        "--check", action="store_true", help=f"exit 1 when {PIPELINE_YAML.name} differs from a fresh compile"
    )
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
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fresh = compile_pipeline(Path(tmp) / PIPELINE_YAML.name).read_text()
        if fresh != args.output.read_text():
            print(f"{args.output}: stale; run `make pipelines` and commit it", file=sys.stderr)
            return 1
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
        if s.get("recommendations"):
            print(f"  recommendations: {s['recommendations']}")
        for name, value in sorted(artifact.metadata.items()):
            print(f"  {name:<28} {value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
