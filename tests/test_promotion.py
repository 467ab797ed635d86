"""Gated promotion end to end on a real MLflow server: two time windows of synthetic interactions,
a good and a bad tiny Two-Tower trained on the older one, `recsys promote` on the newer one
(first promotion, refusal, promotion within a margin), the aliases after each, the index and served
pyfunc version rebuilt, serving commands resolving models:/NAME@champion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.chaos.serve_requests import TINY_RUN
from recsys.cli import main
from recsys.config import Config, load_config
from recsys.data.vocab import Vocab, row_mapping

#: The chaos scenario's tiny Two-Tower run (trains in well under a minute on 2 cores).
TINY = [*TINY_RUN, "tracking.experiment=test-promotion"]
#: A run that learnt next to nothing: the gate must refuse it against a trained one.
UNTRAINED = ["train.max_steps=1", "train.dense_optimizer.lr=1e-6", "train.sparse_optimizer.lr=1e-6"]


def test_row_mapping_follows_raw_ids_and_sends_new_ids_to_oov() -> None:
    old, new = Vocab(["a", "b", "c"]), Vocab(["b", "a", "c", "d"])
    assert row_mapping(old, new).tolist() == [0, 2, 1, 3, 0]
    assert row_mapping(new, new).tolist() == list(range(5))
    assert row_mapping(Vocab([]), new).tolist() == [0] * 5


def _write_windows(root: Path) -> None:
    """Synthetic interactions split by timestamp: w0.csv the older 75 %, w1.csv the newest 25 %."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from recsys.data.synth import interaction_arrays

    a = interaction_arrays(load_config("two_tower_synth", TINY).data.source)
    cut = np.quantile(a["timestamp"], 0.75)
    for name, keep in (("w0", a["timestamp"] < cut), ("w1", a["timestamp"] >= cut)):
        table = pa.table(
            {
                "user_id": pa.array(a["user"][keep].astype(str)),
                "item_id": pa.array(a["item"][keep].astype(str)),
                "timestamp": pa.array(a["timestamp"][keep], pa.int64()),
            }
        )
        pacsv.write_csv(table, root / f"{name}.csv")


def _cfg(root: Path, window: str, uri: str, *more: str) -> Config:
    source = (
        f"data.source={{kind: table, path: {root / window}.csv, sparse: [user_id, item_id], "
        "user: user_id, item: item_id, timestamp: timestamp}"
    )
    return load_config(
        "two_tower_synth", [*TINY, source, f"data.prepared_dir={root / window}", f"tracking.uri={uri}", *more]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, str]:
    """Windows w0 (trained on) and w1 (gated on), prepared; a good and an untrained run on w0."""
    from recsys.data.prepare import prepare
    from recsys.train import train

    root = tmp_path_factory.mktemp("promotion")
    _write_windows(root)
    for w in ("w0", "w1"):
        prepare(_cfg(root, w, mlflow_server), overwrite=False)
    good = train(_cfg(root, "w0", mlflow_server)).run_id
    # The bad run's own config asks for an HNSW index: the served version must carry that one.
    bad = train(_cfg(root, "w0", mlflow_server, *UNTRAINED, "promotion.index_kind=hnsw")).run_id
    return {"good": good, "bad": bad, "w0": str(root / "w0"), "w1": str(root / "w1")}


def _aliases(uri: str, name: str) -> dict[str, str]:
    import mlflow

    return dict(mlflow.MlflowClient(uri).get_registered_model(name).aliases)


def _promote(runs: dict[str, str], uri: str, name: str, run: str, *more: str) -> int:
    argv = ["promote", "--model", name, "--candidate", runs[run], "--data", runs["w1"], "--tracking-uri", uri]
    return main([*argv, *more])


@pytest.mark.slow
def test_gate_promotes_refuses_and_moves_aliases(
    runs: dict[str, str], mlflow_server: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import mlflow

    client, name = mlflow.MlflowClient(mlflow_server), "recsys-test-gate"

    # No champion yet: promoted whatever its figure; version 1 is champion and challenger.
    assert _promote(runs, mlflow_server, name, "good") == 0
    out = capsys.readouterr().out.splitlines()[-1]  # MLflow prints run links before it
    assert out.startswith(f"PROMOTED run {runs['good']} as {name} version 1") and "no champion yet" in out, (
        out
    )
    assert _aliases(mlflow_server, name) == {"champion": "1", "challenger": "1"}
    logged = client.get_run(runs["good"]).data.metrics
    assert logged["promotion/promoted"] == 1.0 and "promotion/champion" not in logged

    # Worse than the champion: refused (exit 3); champion unchanged, the candidate is the challenger.
    assert _promote(runs, mlflow_server, name, "bad") == 3
    out = capsys.readouterr().out.splitlines()[-1]  # MLflow prints run links before it
    assert out.startswith("REFUSED") and "< champion" in out, out
    assert _aliases(mlflow_server, name) == {"champion": "1", "challenger": "2"}
    logged = client.get_run(runs["bad"]).data.metrics
    assert logged["promotion/promoted"] == 0.0
    assert logged["promotion/candidate"] < logged["promotion/champion"]

    # Within a margin as wide as the gap: promoted; the old champion keeps alias `previous`.
    gap = logged["promotion/champion"] - logged["promotion/candidate"]
    assert _promote(runs, mlflow_server, name, "bad", "--margin", f"{gap + 1e-6}") == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("PROMOTED")
    assert _aliases(mlflow_server, name) == {"champion": "3", "challenger": "3", "previous": "1"}
    assert client.get_model_version_by_alias(name, "champion").run_id == runs["bad"]

    # The served version follows the alias: its index is the promoted run's, of the configured kind.
    manifest = _served_index_manifest(mlflow_server, f"models:/{name}@champion", tmp_path)
    assert manifest["run_id"] == runs["bad"] and manifest["params"]["kind"] == "hnsw", manifest
    manifest = _served_index_manifest(mlflow_server, f"models:/{name}@previous", tmp_path / "previous")
    assert manifest["run_id"] == runs["good"] and manifest["params"]["kind"] == "flat", manifest


def _served_index_manifest(uri: str, model_uri: str, dst: Path) -> dict:
    """index/manifest.json inside a registered pyfunc version's artifacts."""
    import json

    import mlflow

    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    (path,) = local.rglob("manifest.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_serving_commands_resolve_the_champion_alias(
    runs: dict[str, str], mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from recsys.promotion.registry import storage_location

    name = "recsys-test-serve-alias"
    assert _promote(runs, mlflow_server, name, "good") == 0
    alias = f"models:/{name}@champion"

    out = tmp_path / "recs.parquet"
    argv = ["recommend", "--run-id", alias, "--tracking-uri", mlflow_server, "--k", "5", "-o", str(out)]
    assert main(argv) == 0
    recs = pq.read_table(out).to_pandas()
    assert recs["user"].nunique() > 0 and recs.groupby("user").size().max() == 5

    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model(alias).predict(
        pd.DataFrame({"user_id": [recs["user"].iloc[0]], "k": [5]})
    )
    first = recs[recs["user"] == recs["user"].iloc[0]].sort_values("rank")
    assert served["items"][0] == list(first["item"])  # the served version answers like recommend

    location = mlflow.MlflowClient(mlflow_server).get_model_version_download_uri(name, "1")
    assert storage_location(alias, mlflow_server) == location
    render = ["serve", "render", "--config", "two_tower_synth", "--tracking-uri", mlflow_server]
    capsys.readouterr()
    # The test server stores files under mlflow-artifacts:/, which KServe cannot download: one line naming it.
    assert main([*render, "--storage-uri", alias, "-o", str(tmp_path / "isvc.yaml")]) == 2
    assert location in capsys.readouterr().err
    # The version by its number resolves to the same files (two-stage versions get no alias).
    assert main([*render, "--storage-uri", f"models:/{name}/1", "-o", str(tmp_path / "isvc.yaml")]) == 2
    assert location in capsys.readouterr().err
    assert main([*render, "--storage-uri", f"models:/{name}@nope"]) == 2
    assert "has alias 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_gate_refuses_the_window_the_candidate_trained_on(
    runs: dict[str, str], mlflow_server: str, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "promote",
        "--model",
        "recsys-test-unseen",
        "--candidate",
        runs["good"],
        "--tracking-uri",
        mlflow_server,
    ]
    assert main([*argv, "--data", runs["w0"]]) == 2
    err = capsys.readouterr().err
    assert f"run {runs['good']} was trained on this prepared data" in err, err
    assert main([*argv, "--data", runs["w1"], "--metric", "mrr@10"]) == 2  # not a metric we measure
    assert "promotion.metric 'mrr@10': not measured" in capsys.readouterr().err


@pytest.mark.slow
def test_dlrm_gate_compares_auc_and_registers_the_logged_model(
    tmp_path: Path, mlflow_server: str, capsys: pytest.CaptureFixture
) -> None:
    """DLRM: the window is more rows of the same generator (same ids and hidden model, other rows)."""
    import mlflow

    from recsys.data.prepare import prepare
    from recsys.train import train

    def cfg(folder: str, rows: int, *more: str) -> Config:
        sets = [
            f"data.source.rows={rows}", "data.source.cardinality=50", f"data.prepared_dir={tmp_path / folder}",
            "train.batch_size=256", "eval.batch_size=256", "train.epochs=1", f"tracking.uri={mlflow_server}",
            "tracking.experiment=test-promotion-dlrm", f"train.checkpoint.dir={tmp_path / 'ckpt'}",
        ]  # fmt: skip
        return load_config("dlrm_synth", [*sets, *more])

    prepare(cfg("d0", 6000), overwrite=False)
    prepare(cfg("d1", 4000), overwrite=False)
    good = train(cfg("d0", 6000)).run_id
    bad = train(cfg("d0", 6000, *UNTRAINED, "train.checkpoint.dir=" + str(tmp_path / "ckpt2"))).run_id
    name, argv = (
        "recsys-test-dlrm",
        ["promote", "--model", "recsys-test-dlrm", "--tracking-uri", mlflow_server],
    )
    assert main([*argv, "--candidate", good, "--data", str(tmp_path / "d1")]) == 0
    assert main([*argv, "--candidate", bad, "--data", str(tmp_path / "d1")]) == 3
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("REFUSED") and "candidate auc" in out, out
    assert _aliases(mlflow_server, name) == {"champion": "1", "challenger": "2"}
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_model_version(name, "1").run_id == good  # the model `recsys train` logged
    logged = client.get_run(bad).data.metrics
    assert (
        0.5 < logged["promotion/champion"] <= 1
        and logged["promotion/candidate"] < logged["promotion/champion"]
    )
