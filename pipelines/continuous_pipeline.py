"""Kubeflow Pipelines v2, continuous training: one turn of the daily loop per run (recsys.promotion.daily)

    prepare the newest window → warm-start train on the window before it (from the champion) →
    gate on the newest window (recsys promote: index + served pyfunc version, alias champion) →
    recommend with the champion.

Meant to run on a schedule: `recsys render --recurring-run --cron '0 3 * * *' --config C` writes the
request body of KFP's recurring-run API around this pipeline's compiled YAML; each run's window ends
at the day the run starts, UTC (`until` left empty: a recurring run starts at its scheduled time), or
at `until`. The first turn prepares a window and its
train step stops with one line (nothing before it to train on); the next turn trains on it. Steps
reuse the training and recommendation components of pipelines/recsys_pipeline.py and call the
library in-process.

    python pipelines/continuous_pipeline.py --compile     # writes pipelines/continuous_pipeline.yaml
    python pipelines/continuous_pipeline.py --check       # exit 1 when the committed YAML is stale
"""

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recsys_pipeline import (  # noqa: E402 (the sibling file, not a package)
    _JOB,
    DATA_MOUNT,
    TRAINER_IMAGE,
    _cluster_step,
    _with_shm,
    recommend_all,
    step_cluster,
    train_task,
)

PIPELINE_NAME = "recsys-continuous"
PIPELINE_YAML = Path(__file__).with_suffix(".yaml")


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def prepare_window(config: str, overrides: list, data_root: str, until: str, days: int) -> NamedTuple(
    "Window", [("window", str), ("previous", str)]
):
    """Prepare the newest window (vocabularies extending the one before); its folder and the previous one."""
    import datetime as dt

    from recsys.promotion.daily import plan_window
    from recsys.promotion.daily import prepare_window as prepare

    # Without `until`, the window ends at the day this step runs (UTC): a recurring run starts at its
    # scheduled time. (KFP v2 does not expand [[ScheduledTime]] in parameters, kubeflow/pipelines#12494,
    # and kfp.local cannot resolve the schedule-time placeholder.)
    end = until or dt.datetime.now(dt.UTC).date().isoformat()
    plan = plan_window(data_root, end, days)
    print(
        f"window [{plan.since}, {plan.until}) → {prepare(config, overrides, plan)}; before it: {plan.previous or 'none'}"
    )
    return plan.path, plan.previous


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def warm_start(
    config: str, overrides: list, model_name: str, mlflow_tracking_uri: str, previous: str, window: str
) -> NamedTuple("WarmStart", [("model_name", str), ("champion_run", str), ("train_overrides", list)]):
    """The registered model's name, its champion's run and the overrides that train from it."""
    from recsys.config import load_config
    from recsys.promotion.daily import champion_run, check_previous, warm_start_overrides
    from recsys.tracking import resolve_tracking_uri

    check_previous(previous, window)  # the first turn: one line saying what to do
    sets = [f"tracking.uri={mlflow_tracking_uri}"] if mlflow_tracking_uri else []
    cfg = load_config(config, [*overrides, *sets])
    name = model_name or cfg.promotion.model_name or f"recsys-{cfg.name}"
    champion = champion_run(name, resolve_tracking_uri(cfg))
    print(f"{name}@champion: {champion or 'none yet (train from scratch)'}")
    return name, champion, warm_start_overrides(champion)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def gate(run_id: str, window: str, model_name: str, mlflow_tracking_uri: str, margin: float) -> NamedTuple(
    "Gate", [("promoted", bool), ("served_run", str), ("decision", str)]
):
    """recsys promote: candidate vs champion on the newest window; the run now served and the decision."""
    from recsys.promotion.gate import promote

    d = promote(run_id, window, mlflow_tracking_uri or None, model_name, None if margin < 0 else margin)
    print(d.line(), flush=True)
    return d.promoted, run_id if d.promoted else (d.champion_run or run_id), d.line()


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="One turn of continuous training: prepare the newest data window, warm-start train on "
    "the one before it, gate the candidate against the champion on the newest (MLflow Model Registry "
    "aliases), rebuild index and served version when promoted, recommend with the champion.",
)
def continuous_pipeline(
    config: str = "two_tower_synth",
    overrides: list = [],  # noqa: B006 (KFP reads parameter defaults from the signature)
    model_name: str = "",
    until: str = "",
    days: int = 1,
    margin: float = -1.0,
    image: str = TRAINER_IMAGE,
    backend: str = "pytorchjob",
    nodes: int = 1,
    gpus_per_node: int = 0,
    procs_per_node: int = 1,
    mlflow_tracking_uri: str = _JOB.mlflow_tracking_uri,
    data_root: str = f"{DATA_MOUNT}/continuous",
    data_pvc: str = _JOB.data_pvc,
    checkpoint_pvc: str = _JOB.checkpoint_pvc,
    mlflow_secret: str = _JOB.mlflow_secret or "mlflow-credentials",
    object_store_secret: str = "recsys-object-store",
    job_node_selector: dict = {},  # noqa: B006
    job_tolerations: list = [],  # noqa: B006
    recommend_k: int = 100,
    step_node_selector: dict = {},  # noqa: B006
    step_tolerations: list = [],  # noqa: B006
) -> str:
    """One turn; every argument is a run parameter in the Kubeflow UI.

    Args:
        config: Shipped config name or YAML path (readable in the step pods); its data.source is read per window.
        overrides: `a.b=v` config overrides.
        model_name: Registered model name ('' : promotion.model_name, else recsys-<config name>).
        until: End of the newest window, YYYY-MM-DD ('' : the day the run starts, UTC).
        days: Days per window.
        margin: Allowed shortfall of the candidate vs the champion (< 0: promotion.margin).
        image: Trainer image of the steps and the training job.
        backend: pytorchjob | trainjob (a distributed job) | local (torchrun inside the step).
        nodes: Pods of the training job.
        gpus_per_node: GPUs per training pod (0: CPU).
        procs_per_node: torchrun processes per pod when gpus_per_node is 0.
        mlflow_tracking_uri: MLflow tracking URI of the steps and the job ('' keeps the config's).
        data_root: Folder on the data PVC holding windows/<since>_<until>/.
        data_pvc: PVC mounted at /data.
        checkpoint_pvc: PVC mounted at /checkpoints in the training pods.
        mlflow_secret: Secret with MLflow credentials, optional.
        object_store_secret: Secret with object-store credentials, optional.
        job_node_selector: nodeSelector of the training job pods.
        job_tolerations: Tolerations of the training job pods.
        recommend_k: Items recommended per user by the champion.
        step_node_selector: nodeSelector of the pipeline's own step pods.
        step_tolerations: Tolerations of the pipeline's own step pods.
    """
    run_params = dict(locals())
    cluster = step_cluster(run_params)
    window = prepare_window(
        config=config,
        overrides=overrides,
        data_root=data_root,
        until=until,
        days=days,
    )
    _cluster_step(window, name="prepare-window", **cluster)
    start = warm_start(
        config=config,
        overrides=overrides,
        model_name=model_name,
        mlflow_tracking_uri=mlflow_tracking_uri,
        previous=window.outputs["previous"],
        window=window.outputs["window"],
    )
    _cluster_step(start, name="champion", **cluster)
    train = train_task(
        config=config,
        overrides=overrides,
        model_overrides=start.outputs["train_overrides"],
        prepared_dir=window.outputs["previous"],
        run_params=run_params,
        name="train-warm-start",
    )
    decision = gate(
        run_id=train.outputs["run_id"],
        window=window.outputs["window"],
        model_name=start.outputs["model_name"],
        mlflow_tracking_uri=mlflow_tracking_uri,
        margin=margin,
    )
    _with_shm(_cluster_step(decision, name="gate-promote-index", **cluster))
    recommend = recommend_all(
        run_id=decision.outputs["served_run"],
        mlflow_tracking_uri=mlflow_tracking_uri,
        prepared_dir=window.outputs["window"],
        k=recommend_k,
    )
    _cluster_step(recommend, name="recommend-champion", **cluster)
    return decision.outputs["decision"]


def compile_pipeline(path: Path = PIPELINE_YAML) -> Path:
    """Compile the pipeline to its IR YAML (what the Kubeflow UI uploads, and the recurring run embeds)."""
    compiler.Compiler().compile(continuous_pipeline, package_path=str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python pipelines/continuous_pipeline.py --compile | --check`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compile", action="store_true", help=f"write {PIPELINE_YAML.name}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {PIPELINE_YAML.name} is stale")
    p.add_argument("-o", "--output", type=Path, default=PIPELINE_YAML, help="compiled YAML path")
    args = p.parse_args(argv)
    if args.compile:
        print(f"wrote {compile_pipeline(args.output)}")
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_pipeline(Path(tmp) / PIPELINE_YAML.name).read_text()
    if fresh != args.output.read_text():
        print(
            f"{args.output}: stale; run `python pipelines/continuous_pipeline.py --compile`", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
