"""The committed pipeline IR equals a fresh compile, and the compiled pipeline has the promised shape."""

from pathlib import Path

import pytest
import yaml
from conftest import load_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("pipeline") / "recsys_pipeline.yaml"
    load_pipeline("recsys_pipeline").compile_pipeline(out)
    text = out.read_text()
    # The IR file holds two YAML documents: the pipeline spec and the Kubernetes platform spec.
    docs = list(yaml.safe_load_all(text))
    return text, {"spec": docs[0], "platform": docs[1]["platforms"]["kubernetes"]}


def _steps(ir: dict) -> dict:
    """The pipeline's step tasks: the root DAG's, with a condition's (dsl.If) inner tasks in its place."""
    out = {}
    for key, task in ir["spec"]["root"]["dag"]["tasks"].items():
        if "triggerPolicy" in task:
            out.update(ir["spec"]["components"][task["componentRef"]["name"]]["dag"]["tasks"])
        else:
            out[key] = task
    return out


def test_committed_yaml_matches_fresh_compile(compiled: tuple[str, dict]) -> None:
    """KFP's compiler is deterministic here (checked: two compiles are byte-identical), so no normalising."""
    text, _ = compiled
    committed = (REPO / "pipelines" / "recsys_pipeline.yaml").read_text()
    assert committed == text, "pipelines/recsys_pipeline.yaml is stale: run `make pipelines` and commit it"


def test_steps_and_dependencies(compiled: tuple[str, dict]) -> None:
    _, ir = compiled
    tasks = ir["spec"]["root"]["dag"]["tasks"]
    names = {t["taskInfo"]["name"]: key for key, t in tasks.items()}
    assert set(names) == {
        "prepare-data-two-tower",
        "prepare-data-dlrm",
        "train-two-tower",
        "train-dlrm",
        "index-two-tower",
        "recommend-two-tower",
        "evaluate-two-tower",
        "evaluate-dlrm",
        "summary",
        "rank-step",  # the retrieve → rank step's condition (rank_top_n > 0)
    }

    def deps(display: str) -> set[str]:
        key = names[display]
        return {tasks[d]["taskInfo"]["name"] for d in tasks[key].get("dependentTasks", [])}

    for model in ("two-tower", "dlrm"):
        assert deps(f"train-{model}") == {f"prepare-data-{model}"}
    # Two-Tower: train → index → batch recommend → evaluate (which scores the recommendations too).
    assert deps("index-two-tower") == {"train-two-tower"}
    assert deps("recommend-two-tower") == {"train-two-tower", "index-two-tower", "prepare-data-two-tower"}
    assert deps("evaluate-two-tower") == {"prepare-data-two-tower", "train-two-tower", "recommend-two-tower"}
    assert deps("evaluate-dlrm") == {"prepare-data-dlrm", "train-dlrm"}
    # Retrieve → rank: after the Two-Tower's training, skipped unless rank_top_n > 0.
    rank = tasks[names["rank-step"]]
    assert deps("rank-step") == {"prepare-data-two-tower", "train-two-tower"}
    assert "rank_top_n" in rank["triggerPolicy"]["condition"] and "> 0" in rank["triggerPolicy"]["condition"]
    assert deps("summary") == {
        "train-two-tower",
        "train-dlrm",
        "evaluate-two-tower",
        "evaluate-dlrm",
        "recommend-two-tower",
    }
    for task in _steps(ir).values():
        assert task["cachingOptions"] == {}, "every step runs anew (caching off)"


def test_parameters(compiled: tuple[str, dict]) -> None:
    _, ir = compiled
    params = ir["spec"]["root"]["inputDefinitions"]["parameters"]
    for name in (
        "two_tower_config",
        "dlrm_config",
        "overrides",
        "image",
        "nodes",
        "gpus_per_node",
        "backend",
        "mlflow_tracking_uri",
        "data_root",
        "data_pvc",
        "checkpoint_pvc",
        "mlflow_secret",
        "object_store_secret",
        "index_kind",
        "recommend_k",
    ):
        assert name in params, name
    assert params["overrides"]["parameterType"] == "LIST"
    assert params["backend"]["defaultValue"] == "pytorchjob"
    assert params["recommend_k"]["defaultValue"] == 100 and params["index_kind"]["defaultValue"] == "flat"
    assert params["rank_top_n"]["defaultValue"] == 0  # the rank step is off unless asked for
    from recsys.config import JobConfig

    assert params["image"]["defaultValue"] == JobConfig().image


def test_per_run_names_come_from_placeholders(compiled: tuple[str, dict]) -> None:
    """Job names and data folders are made at run time from the pipeline-job placeholders."""
    _, ir = compiled
    tasks = ir["spec"]["root"]["dag"]["tasks"]
    for task in tasks.values():
        if task["taskInfo"]["name"].startswith(("train-", "prepare-data-")):
            params = task["inputs"]["parameters"]
            assert params["pipeline_job_name"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
            assert params["pipeline_task_id"]["runtimeValue"]["constant"] == "{{$.pipeline_task_uuid}}"


def test_kubernetes_platform_settings(compiled: tuple[str, dict]) -> None:
    _, ir = compiled
    tasks = _steps(ir)
    executors = ir["platform"]["deploymentSpec"]["executors"]
    by_step = {
        t["taskInfo"]["name"]: executors[f"exec-{t['componentRef']['name'].removeprefix('comp-')}"]
        for t in tasks.values()
        if t["taskInfo"]["name"] != "summary"
    }

    def param(ref: dict) -> str:  # inside a condition, pipeline parameters arrive as pipelinechannel--NAME
        return ref["componentInputParameter"].removeprefix("pipelinechannel--")

    for step, cfg in by_step.items():
        pvcs = {m["mountPath"]: param(m["pvcNameParameter"]) for m in cfg["pvcMount"]}
        assert pvcs["/data"] == "data_pvc", step
        secrets = {param(s["secretNameParameter"]) for s in cfg["secretAsEnv"]}
        assert secrets == {"mlflow_secret", "object_store_secret"}, step
        assert param(cfg["nodeSelector"]["nodeSelectorJson"]) == "step_node_selector"
        assert param(cfg["tolerations"][0]["tolerationJson"]) == "step_tolerations"
    for step in ("train-two-tower", "train-dlrm", "evaluate-two-tower", "evaluate-dlrm", "rank-two-tower"):
        (shm,) = by_step[step]["emptyDirMounts"]
        assert (shm["mountPath"], shm["medium"]) == ("/dev/shm", "Memory")
    for step in ("train-two-tower", "train-dlrm"):
        mounts = {m["mountPath"] for m in by_step[step]["pvcMount"]}
        assert mounts == {"/data", "/checkpoints"}
        # The job pods get the run's PVCs and secrets through the train step's parameters.
        params = tasks[next(k for k, t in tasks.items() if t["taskInfo"]["name"] == step)]["inputs"][
            "parameters"
        ]
        for name in ("data_pvc", "checkpoint_pvc", "mlflow_secret", "object_store_secret"):
            assert params[name]["componentInputParameter"] == name, (step, name)


def test_both_pipelines_train_through_one_step_definition(compiled: tuple[str, dict], tmp_path: Path) -> None:
    """The continuous pipeline's train step takes every job parameter from the run parameter of the same
    name and gets the same pod settings as the main pipeline's (both come from train_task)."""
    module = load_pipeline("recsys_pipeline")
    continuous = load_pipeline("continuous_pipeline")
    _, ir = compiled
    main_train = ir["spec"]["root"]["dag"]["tasks"]["train-model"]
    cont_docs = list(yaml.safe_load_all(continuous.compile_pipeline(tmp_path / "c.yaml").read_text()))
    cont_train = cont_docs[0]["root"]["dag"]["tasks"]["train-model"]
    assert module.TRAIN_RUN_PARAMS and "backend" in module.TRAIN_RUN_PARAMS
    for train in (main_train, cont_train):
        params = train["inputs"]["parameters"]
        for name in module.TRAIN_RUN_PARAMS:
            assert params[name]["componentInputParameter"] == name, name
    executor = "exec-train-model"
    assert (
        cont_docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]
        == ir["platform"]["deploymentSpec"]["executors"][executor]
    )
    with pytest.raises(TypeError, match="no run parameter"):
        module.train_task(
            config="c", overrides=[], model_overrides=[], prepared_dir="p", run_params={}, name="train-x"
        )


def test_steps_run_in_the_image_parameter(compiled: tuple[str, dict]) -> None:
    _, ir = compiled
    for name, executor in ir["spec"]["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}", name
        # The trainer image carries kfp: no pip install at run time (clusters without egress work).
        assert "pip install" not in " ".join(executor["container"]["command"]), name


def test_pipeline_rbac_is_valid_and_minimal() -> None:
    """The steps' service account may run training jobs in the job namespace, and nothing more."""
    import kubernetes_validate

    from recsys.config import JobConfig

    path = REPO / "manifests" / "base" / "pipeline-rbac.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    role, binding = docs
    assert (role["kind"], binding["kind"]) == ("Role", "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == JobConfig().namespace
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    granted = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    jobs = sorted(["create", "get", "list", "watch", "delete"])
    assert granted == {
        ("kubeflow.org", "pytorchjobs"): jobs,
        ("trainer.kubeflow.org", "trainjobs"): jobs,
        ("", "configmaps"): sorted([*jobs, "patch"]),
        ("", "pods"): ["get", "list"],
        ("", "pods/log"): ["get"],
    }
