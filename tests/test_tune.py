"""`recsys tune`: a strict search space, Optuna trials as MLflow child runs, real pruning, Katib render.

The real trainer on tiny synthetic Two-Tower data; MLflow is a real server (conftest's mlflow_server).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from recsys.config import Config, load_config
from recsys.errors import UserError

TT = [
    "data.source.num_users=300",
    "data.source.num_items=150",
    "data.source.interactions_per_user=20",
    "data.block_size=32",
    "train.batch_size=128",
    "train.epochs=1",
    "train.max_steps=8",
    "train.val_every_steps=4",
    "train.log_every_steps=4",
    "train.checkpoint.every_epoch=false",
    "train.checkpoint.keep_best=false",
    "train.early_stopping.restore_best=false",
    "tracking.log_model=false",
    "eval.ks=[10]",
]
LR = {"type": "float", "low": 0.01, "high": 0.3, "log": True}
SPACE = {
    "metric": "val/loss",
    "params": {
        "train.sparse_optimizer.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
        "model.embedding_dim": {"type": "categorical", "choices": [8, 16]},
    },
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Two-Tower data prepared once for the module."""
    from recsys.data.prepare import prepare

    root = tmp_path_factory.mktemp("tune_data") / "tt"
    prepare(load_config("two_tower_synth", [*TT, f"data.prepared_dir={root}"]), overwrite=False)
    return root


def _cfg(prepared: Path, uri: str | None = None, *sets: str) -> Config:
    tracking = [f"tracking.uri={uri}", "tracking.experiment=test-tune"] if uri else ["tracking.enabled=false"]
    return load_config("two_tower_synth", [*TT, f"data.prepared_dir={prepared}", *tracking, *sets])


def _write_space(tmp: Path, space: dict) -> Path:
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


# --------------------------------------------------------------------------------------- the space
def test_space_fields_are_checked_against_the_config(tmp_path: Path) -> None:
    from recsys.tune import load_space

    cfg = load_config("two_tower_synth")
    space = load_space(_write_space(tmp_path, SPACE), cfg)
    assert space.metric == "val/loss" and space.mode == "min"
    bad = copy.deepcopy(SPACE)
    bad["params"]["train.sparse_optimizer.lrr"] = {"type": "float", "low": 0.1, "high": 0.2}
    with pytest.raises(UserError) as e:
        load_space(_write_space(tmp_path, bad), cfg)
    assert len(str(e.value).splitlines()) == 1
    assert "params.train.sparse_optimizer.lrr" in str(e.value) and "unknown key" in str(e.value)
    # A float distribution on an integer field, and an unknown distribution key, fail at load time too.
    wrong = {"params": {"model.embedding_dim": {"type": "float", "low": 8, "high": 16}}}
    with pytest.raises(UserError, match="params.model.embedding_dim"):
        load_space(_write_space(tmp_path, wrong), cfg)
    typo = {"params": {"train.epochs": {"type": "int", "low": 1, "hgh": 3}}}
    with pytest.raises(UserError, match="hgh"):
        load_space(_write_space(tmp_path, typo), cfg)
    with pytest.raises(UserError, match="not a validation metric"):
        load_space(_write_space(tmp_path, {**SPACE, "metric": "test/auc"}), cfg)


def test_cli_names_the_unknown_field_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recsys.cli import main

    bad = {"params": {"model.two_tower.temprature": {"type": "float", "low": 0.02, "high": 0.2}}}
    space = _write_space(tmp_path, bad)
    assert main(["tune", "--config", "two_tower_synth", "--space", str(space), "--trials", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "params.model.two_tower.temprature" in err


# ------------------------------------------------------------------------------------------- Katib
def test_katib_experiment_validates_and_a_broken_field_fails(tmp_path: Path) -> None:
    from recsys.launch.kubeschema import validation_errors
    from recsys.tune import katib_objects, load_space, render_katib

    cfg = load_config("two_tower_synth")
    space = load_space(_write_space(tmp_path, {**SPACE, "metric": "val/ndcg@10"}), cfg)
    text = render_katib(cfg, space, trials=6, parallel=2, generated_by="test")
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Experiment"]
    exp = docs[1]["spec"]
    assert exp["objective"] == {
        "type": "maximize",
        "objectiveMetricName": "ndcg@10",
        "metricStrategies": [{"name": "ndcg@10", "value": "latest"}],
    }
    assert exp["algorithm"]["algorithmName"] == "tpe" and exp["maxTrialCount"] == 6
    assert {p["name"] for p in exp["parameters"]} == {"train_sparse_optimizer_lr", "model_embedding_dim"}
    command = exp["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ][0]["command"]
    assert "train.sparse_optimizer.lr=!!float ${trialParameters.train_sparse_optimizer_lr}" in command
    assert "model.embedding_dim=${trialParameters.model_embedding_dim}" in command
    # What the trainer reads once Katib has substituted a small double (printed as 1e-05).
    tuned = load_config("two_tower_synth", ["train.sparse_optimizer.lr=!!float 1e-05"])
    assert tuned.train.sparse_optimizer.lr == 1e-05
    # The collector's regex finds the validation column of the table the trainer prints.
    import re

    from recsys.train import format_results

    table = format_results({"ndcg@10": 0.25}, {"ndcg@10": 0.5, "loss": 1.0}, {"ndcg@10": 0.1})
    (regex,) = exp["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"]
    found = [m.groups() for line in table.splitlines() if (m := re.match(regex, line))]
    assert found == [("ndcg@10", "0.25000")]

    objs = katib_objects(cfg, space, 6, 2)
    assert validation_errors(objs[1]) == []
    broken = copy.deepcopy(objs[1])
    broken["spec"]["objective"]["objectiveMetricNmae"] = broken["spec"]["objective"].pop(
        "objectiveMetricName"
    )
    assert any("objectiveMetricNmae" in e for e in validation_errors(broken))
    broken = copy.deepcopy(objs[1])
    broken["spec"]["maxTrialCount"] = "6"
    assert any("maxTrialCount" in e for e in validation_errors(broken))
    # The trial's PyTorchJob is validated too, though Katib's model types it as a plain object.
    broken = copy.deepcopy(objs[1])
    broken["spec"]["trialTemplate"]["trialSpec"]["spec"]["runPolicy"]["backofLimit"] = 1
    assert any("backofLimit" in e for e in validation_errors(broken))


# -------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_tune_logs_a_parent_and_child_runs_and_writes_the_best_config(
    prepared: Path, tmp_path: Path, mlflow_server: str
) -> None:
    import mlflow

    from recsys.cli import main

    cfg_path = tmp_path / "base.yaml"
    from recsys.config import dump_config

    cfg_path.write_text(dump_config(_cfg(prepared, mlflow_server)))
    out = tmp_path / "best.yaml"
    argv = ["tune", "--config", str(cfg_path), "--space", str(_write_space(tmp_path, SPACE)), "--trials", "2"]
    assert main([*argv, "--workdir", str(tmp_path / "trials"), "--no-prune", "-o", str(out)]) == 0

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-tune")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED"
    values = {int(c.data.tags["recsys.tune.trial"]): c.data.metrics["val/loss"] for c in children}
    assert {k: parent.data.metrics[f"trial/{k}/val/loss"] for k in values} == pytest.approx(values)
    best_trial = min(values, key=values.get)
    assert parent.data.tags["recsys.tune.best_trial"] == str(best_trial)
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["trial-0", "trial-1"]

    best = load_config(out)
    (child,) = [c for c in children if c.data.tags["recsys.tune.trial"] == str(best_trial)]
    assert best.train.sparse_optimizer.lr == pytest.approx(
        float(child.data.params["train.sparse_optimizer.lr"])
    )
    assert best.model.embedding_dim == int(child.data.params["model.embedding_dim"])
    assert best.train.checkpoint.dir is None  # the config's own, not the trial's folder
    logged = client.download_artifacts(parent.info.run_id, "tune/best.yaml", str(tmp_path))
    assert Path(logged).read_text() == out.read_text()


@pytest.mark.slow
def test_a_worse_trial_is_pruned_at_its_first_validation(
    prepared: Path, tmp_path: Path, mlflow_server: str
) -> None:
    import mlflow

    from recsys.tune import load_space, tune

    cfg = _cfg(prepared, mlflow_server, "tracking.experiment=test-tune-prune", "train.max_steps=16")
    space = load_space(
        _write_space(
            tmp_path,
            {
                "metric": "val/loss",
                "params": {
                    "train.sparse_optimizer.lr": {"type": "float", "low": 1e-6, "high": 0.2, "log": True},
                    "train.dense_optimizer.lr": {"type": "float", "low": 1e-7, "high": 1e-2, "log": True},
                },
            },
        ),
        cfg,
    )
    # Trial 0 learns; trial 1 barely moves its weights, so its validation loss stays above trial 0's
    # at the same steps and the median rule (one completed trial) must prune it before its end.
    good = {"train.sparse_optimizer.lr": 0.2, "train.dense_optimizer.lr": 1e-2}
    bad = {"train.sparse_optimizer.lr": 1e-6, "train.dense_optimizer.lr": 1e-7}
    result = tune(cfg, space, 3, tmp_path / "trials", prune_startup_trials=1, enqueue=[good, bad])
    states = {t["number"]: t for t in result.trials}
    assert states[0]["state"] == "complete" and states[1]["state"] == "pruned"
    stopped = 4 * states[1]["steps"]  # validations every 4 steps
    assert stopped < 16, states  # pruned before its last validation: it stopped training early
    assert result.best_trial != 1

    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("test-tune-prune").experiment_id])
    (pruned,) = [r for r in runs if r.data.tags.get("recsys.tune.trial") == "1"]
    assert pruned.info.status == "KILLED" and pruned.data.tags["recsys.tune.state"] == "pruned"
    history = client.get_metric_history(pruned.info.run_id, "val/loss")
    assert [m.step for m in history] == list(range(4, stopped + 1, 4))  # no training after the prune
    assert max(m.step for m in client.get_metric_history(pruned.info.run_id, "train/loss")) == stopped
    assert mlflow.active_run() is None
    import torch.distributed as dist

    assert not dist.is_initialized()  # the trial's process group was torn down


@pytest.mark.slow
def test_katib_collector_and_tune_read_the_same_value_of_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One real run: the value Katib's StdOut regex finds in its output is tune's objective value, and
    with early stopping restoring the best it is the best validation, not the last one."""
    import re

    from conftest import tiny_dlrm_args

    from recsys.data.prepare import prepare
    from recsys.train import train
    from recsys.tune import katib_objects, load_space, objective_value

    args = tiny_dlrm_args(tmp_path)
    sets = [*args[3::2], "tracking.enabled=false", "train.max_steps=12", "train.val_every_steps=2"]
    sets += ["train.early_stopping.metric=val/auc", "train.dense_optimizer.lr=1.0"]  # ends below its best
    cfg = load_config("dlrm_synth", sets)
    prepare(cfg, overwrite=False)
    space = load_space(
        _write_space(tmp_path, {"metric": "val/auc", "params": {"train.dense_optimizer.lr": LR}}), cfg
    )
    capsys.readouterr()
    result = train(cfg, resume="never")
    out = capsys.readouterr().out

    aucs = [v["auc"] for v in result.validations]
    assert result.best is not None and result.best["value"] == max(aucs)
    assert aucs[-1] < max(aucs), aucs  # the run must end below its best, or this test shows nothing
    spec = katib_objects(cfg, space, 4, 1)[1]["spec"]
    (regex,) = spec["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"]
    found = [m.groups() for line in out.splitlines() if (m := re.match(regex, line))]
    assert len(found) == 1 and found[0][0] == spec["objective"]["objectiveMetricName"], out
    value = objective_value(result, cfg, space.metric)
    assert value == pytest.approx(result.best["value"])
    assert float(found[0][1]) == pytest.approx(value, abs=1e-5)
    # Katib keeps one value per metric and trial: the one printed, not the max/min of several lines.
    assert spec["objective"]["metricStrategies"] == [{"name": "auc", "value": "latest"}]


@pytest.mark.slow
def test_a_failed_trial_is_recorded_and_the_study_goes_on(
    prepared: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """A trial whose sampled batch size exceeds the train split raises in the trainer: it is recorded
    as failed (Optuna FAIL, MLflow FAILED + tag, the reason kept) and the next trial still runs."""
    import mlflow

    from recsys.tune import load_space, tune

    cfg = _cfg(prepared, mlflow_server, "tracking.experiment=test-tune-fail")
    batch = {"type": "categorical", "choices": [128, 65536]}
    space = load_space(
        _write_space(tmp_path, {"metric": "val/loss", "params": {"train.batch_size": batch}}), cfg
    )
    result = tune(
        cfg,
        space,
        2,
        tmp_path / "trials",
        prune=False,
        enqueue=[{"train.batch_size": 65536}, {"train.batch_size": 128}],
    )
    states = {t["number"]: t for t in result.trials}
    assert states[0]["state"] == "failed" and "fewer rows than one global batch" in states[0]["error"]
    assert states[1]["state"] == "complete" and result.best_trial == 1
    assert result.best_values == {"train.batch_size": 128}
    assert [t["optuna_state"] for t in result.trials] == ["FAIL", "COMPLETE"]

    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("test-tune-fail").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (failed,) = [r for r in runs if r.data.tags.get("recsys.tune.trial") == "0"]
    assert failed.info.status == "FAILED" and failed.data.tags["recsys.tune.state"] == "failed"
    assert parent.info.status == "FINISHED" and parent.data.tags["trial/0/state"] == "failed"
    assert "fewer rows than one global batch" in parent.data.tags["trial/0/error"]
