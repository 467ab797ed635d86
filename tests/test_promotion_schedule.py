"""Continuous training on a schedule: window planning, the continuous pipeline (compiled YAML fresh,
its loop wired as prepare → warm start → train → gate → recommend; run under kfp.local once the window
and warm-start fields exist), the KFP recurring-run request body (checked against kfp_server_api's
V2beta1RecurringRun) and the Kubernetes CronJob running `recsys daily` (checked against the kubernetes
client's models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import load_pipeline

from recsys.cli import build_parser, main
from recsys.config import load_config
from recsys.errors import UserError
from recsys.promotion.daily import plan_window, window_overrides

REPO = Path(__file__).resolve().parents[1]


def _pipeline_module() -> Any:
    return load_pipeline("continuous_pipeline")


# ------------------------------------------------------------------------------------------ windows
def test_window_plan_is_the_day_before_until_and_finds_the_previous_one(tmp_path: Path) -> None:
    root = str(tmp_path)
    first = plan_window(root, "2026-12-07", days=1)
    assert (first.since, first.until, first.previous) == ("2026-12-06", "2026-12-07", "")
    assert first.path == f"{root}/windows/2026-12-06_2026-12-07"
    Path(first.path).mkdir(parents=True)
    (Path(first.path) / "metadata.json").write_text("{}")
    # KFP's schedule time is a timestamp: the window ends at its day.
    second = plan_window(root, "2026-12-08T03:00:00Z", days=1)
    assert (second.since, second.until, second.previous) == ("2026-12-07", "2026-12-08", first.path)
    assert window_overrides(second)[-1] == f"data.window.previous={first.path}"
    week = plan_window(root, "2026-12-08", days=7)
    assert (week.since, week.previous) == ("2026-12-01", "")
    for bad, days in (("yesterday", 1), ("2026-12-08", 0)):
        with pytest.raises(UserError):
            plan_window(root, bad, days)


# ----------------------------------------------------------------------------------------- pipeline
def test_continuous_pipeline_yaml_is_fresh_and_wires_the_loop() -> None:
    import tempfile

    module = _pipeline_module()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = module.compile_pipeline(Path(tmp) / "p.yaml").read_text()
    committed = (REPO / "pipelines" / "continuous_pipeline.yaml").read_text()
    assert fresh == committed, "stale: run `python pipelines/continuous_pipeline.py --compile`"
    spec = next(yaml.safe_load_all(committed))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"prepare-window", "warm-start", "train-model", "gate", "recommend-all"}

    def source(task: str, param: str) -> dict:
        return tasks[task]["inputs"]["parameters"][param]["taskOutputParameter"]

    # Train on the window before the newest, from the champion; gate on the newest; recommend the served run.
    assert source("train-model", "prepared_dir") == {
        "producerTask": "prepare-window",
        "outputParameterKey": "previous",
    }
    assert source("train-model", "model_overrides")["producerTask"] == "warm-start"
    assert source("gate", "run_id") == {"producerTask": "train-model", "outputParameterKey": "run_id"}
    assert source("gate", "window") == {"producerTask": "prepare-window", "outputParameterKey": "window"}
    assert source("recommend-all", "run_id") == {"producerTask": "gate", "outputParameterKey": "served_run"}
    assert "until" in tasks["prepare-window"]["inputs"]["parameters"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_continuous_pipeline_runs_two_turns_under_kfp_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turn 1 trains from scratch and is promoted (no champion); turn 2 warm-starts from it and is gated."""
    import mlflow
    from kfp import local

    from recsys.promotion.daily import prepare_window
    from tests.test_promotion import _write_windows

    monkeypatch.chdir(tmp_path)
    _write_windows(tmp_path)  # w0.csv, w1.csv: synthetic interactions with timestamps
    source = (
        f"data.source={{kind: table, path: {tmp_path}/w0.csv, sparse: [user_id, item_id], "
        "user: user_id, item: item_id, timestamp: timestamp}"
    )
    overrides = [source, "train.epochs=1", "train.max_steps=4", "eval.ks=[10]"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ts = sorted(int(line.split(",")[2]) for line in (tmp_path / "w0.csv").read_text().splitlines()[1:])
    import datetime as dt

    day = dt.datetime.fromtimestamp(ts[len(ts) // 2], dt.UTC).date()
    days = 30
    prepare_window("two_tower_synth", overrides, plan_window(str(tmp_path / "data"), day.isoformat(), days))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "out"),
        raise_on_error=True,
    )
    pipeline = _pipeline_module().continuous_pipeline
    decisions = []
    for turn in (1, 2):
        until = (day + dt.timedelta(days=turn * days)).isoformat()
        run = pipeline(
            config="two_tower_synth", overrides=overrides, model_name="recsys-continuous-test", until=until,
            days=days, backend="local", mlflow_tracking_uri=uri, data_root=str(tmp_path / "data"), recommend_k=5,
        )  # fmt: skip
        decisions.append(run.output)
    assert decisions[0].startswith("PROMOTED") and "no champion yet" in decisions[0]
    client = mlflow.MlflowClient(uri)
    champion = client.get_model_version_by_alias("recsys-continuous-test", "champion")
    challenger = client.get_model_version_by_alias("recsys-continuous-test", "challenger")
    assert str(challenger.version) == "2"  # an int from a SQLite store
    parent = client.get_run(challenger.run_id).data.tags.get("recsys.parent_run_id")
    assert parent == client.get_model_version("recsys-continuous-test", "1").run_id  # warm-started
    assert str(champion.version) in ("1", "2")


# ------------------------------------------------------------------------------------ recurring run
def test_recurring_run_body_is_a_valid_v2beta1_recurring_run(tmp_path: Path) -> None:
    import kfp_server_api as api

    out = tmp_path / "recurring.json"
    argv = ["render", "--recurring-run", "--cron", "0 3 * * *", "--config", "two_tower_synth"]
    argv += ["--pipeline-yaml", str(REPO / "pipelines" / "continuous_pipeline.yaml")]
    assert main([*argv, "--set", "train.epochs=2", "--model", "recsys-tt", "-o", str(out)]) == 0
    body = json.loads(out.read_text())
    client = api.ApiClient()
    model = client._ApiClient__deserialize(body, "V2beta1RecurringRun")
    assert isinstance(model, api.V2beta1RecurringRun)
    assert client.sanitize_for_serialization(model) == body  # every field is one of the model's
    assert model.trigger.cron_schedule.cron == "0 0 3 * * *"  # KFP's six fields, seconds first
    assert model.mode == "ENABLE" and model.max_concurrency == "1" and model.no_catchup is True
    params = model.runtime_config.parameters
    assert params == {"config": "two_tower_synth", "overrides": ["train.epochs=2"], "model_name": "recsys-tt"}
    # Every parameter is one the pipeline declares, and the spec is the committed compile.
    declared = body["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert set(params) <= set(declared)
    committed = next(yaml.safe_load_all((REPO / "pipelines" / "continuous_pipeline.yaml").read_text()))
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"] == committed["pipelineInfo"]


@pytest.mark.parametrize("cron", ["0 3 * *", "@daily", "0 0 3 * * *"])
def test_bad_cron_is_one_line(cron: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["render", "--cronjob", "--cron", cron, "--config", "two_tower_synth"]) == 2
    assert "expected five fields" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ cronjob
def test_cronjob_is_valid_and_runs_a_recsys_daily_command(tmp_path: Path) -> None:
    from recsys.launch.kubeschema import validation_errors

    out = tmp_path / "cron.yaml"
    argv = [
        "render",
        "--cronjob",
        "--cron",
        "0 3 * * *",
        "--config",
        "two_tower_synth",
        "--backend",
        "trainjob",
    ]
    assert main([*argv, "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(
        "# generated by recsys render --cronjob --cron '0 3 * * *' --backend trainjob --config two_tower_synth"
    )
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"]
    assert all(validation_errors(d) == [] for d in docs)
    cron = docs[-1]
    assert cron["spec"]["schedule"] == "0 3 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs[0]["metadata"]["name"]
    # The container's command is a `recsys daily` the CLI accepts, on the config the ConfigMap holds.
    (container,) = pod["containers"]
    assert container["command"][:2] == ["recsys", "daily"]
    args = build_parser().parse_args(container["command"][1:])
    assert args.backend == "trainjob" and args.data_root.startswith("/data/")
    config = tmp_path / "config.yaml"
    config.write_text(docs[3]["data"]["config.yaml"])
    assert load_config(str(config)).name == load_config("two_tower_synth").name


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        ("spec/schedule", 3, "schedule: expected str"),
        ("spec/concurrencyPolicy", None, None),  # optional: removing it stays valid
        ("spec/jobTemplate/spec/backofLimit", 1, "backofLimit: unknown field"),
    ],
)
def test_broken_cronjob_fails_validation(path: str, value: Any, expect: str | None) -> None:
    from recsys.launch.kubeschema import validation_errors
    from recsys.promotion.schedule import cronjob_documents

    doc = cronjob_documents(load_config("two_tower_synth"), "0 3 * * *", "pytorchjob")[-1]
    *parents, last = path.split("/")
    node = doc
    for key in parents:
        node = node[key]
    if value is None:
        node.pop(last)
    else:
        node[last] = value
    errors = validation_errors(doc)
    assert (not errors) if expect is None else any(expect in e for e in errors), errors
