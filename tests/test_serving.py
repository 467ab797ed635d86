"""Serving end to end: a tiny real Two-Tower run → `recsys serve build` (pyfunc, registered) → a real
`mlflow models serve` on 127.0.0.1 answering HTTP requests; and request parsing without MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from recsys.cli import main
from recsys.config import Config, load_config
from tests.conftest import free_port, stop_process_group, wait_http_ok
from tests.test_retrieval_recommend import TINY, _seen, _vocab


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> tuple[Config, str]:
    """A tiny Two-Tower trained once for this module: (its config, its run id)."""
    from recsys.data.prepare import prepare
    from recsys.train import train

    root = tmp_path_factory.mktemp("serving")
    overrides = [*TINY, "tracking.experiment=test-serving"]
    cfg = load_config(
        "two_tower_synth", [*overrides, f"data.prepared_dir={root / 'tt'}", f"tracking.uri={mlflow_server}"]
    )
    prepare(cfg, overwrite=False)
    return cfg, train(cfg).run_id


def _post(url: str, payload: Any) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body) of a POST of `payload` as JSON."""
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _check_model_from_code(model_uri: str, tracking_uri: str, dst: Path, build_log: str) -> None:
    """The logged model is code (models-from-code), not a cloudpickle, and needs no recsys install."""
    import mlflow
    import yaml
    from packaging.requirements import Requirement

    from recsys.retrieval.serve import MODEL_PANDAS, SERVING_CODE

    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    assert "CloudPickle" not in build_log, build_log  # MLflow warns when python_model is an object
    assert not list(local.rglob("*.pkl")), sorted(p.name for p in local.rglob("*"))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("serve_model.py"), flavor
    for rel in SERVING_CODE:
        assert (local / "code" / "recsys" / rel).is_file(), rel
    reqs = {r.name: r.specifier for r in map(Requirement, (local / "requirements.txt").read_text().split())}
    assert reqs["pandas"] == Requirement(MODEL_PANDAS).specifier and "recsys" not in reqs, reqs


@pytest.mark.slow
def test_built_model_serves_over_http_like_recommend(
    trained: tuple[Config, str], mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from recsys.retrieval.recommend import recommend

    cfg, run_id = trained
    name = "recsys-test-serving"
    argv = ["serve", "build", "--run-id", run_id, "--tracking-uri", mlflow_server, "--register", name]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert f"registered as {name} version 1" in printed, printed
    assert "files at mlflow-artifacts:/" in printed, printed  # the storage location KServe copies from
    _check_model_from_code(f"models:/{name}/1", mlflow_server, tmp_path / "model", captured.err)

    port, log = free_port(), tmp_path / "serve.log"
    # mlflow execs `uvicorn` by name: the venv's bin must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/1",
        "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "--workers", "1",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(proc, f"{url}/ping", log, "mlflow models serve", timeout=90)
        known = _vocab(cfg, "user_id")[1:3]
        records = [
            {"user_id": known[0], "k": 5},
            {"user_id": "nobody", "k": 5},
            {"user_id": known[1], "k": 3},
            {"user_id": known[1]},  # no k: the default, 10
        ]
        status, body = _post(f"{url}/invocations", {"dataframe_records": records})
        assert status == 200, body
        rows = body["predictions"]
        assert [r["user_id"] for r in rows] == [known[0], "nobody", known[1], known[1]]
        assert [r["fallback"] for r in rows] == [False, True, False, False]
        assert [len(r["items"]) for r in rows] == [5, 5, 3, 10]
        assert rows[3]["items"][:3] == rows[2]["items"]  # a shorter list is the longer one's prefix

        # Known users: the same items in the same order as `recsys recommend`, none seen in train.
        users = tmp_path / "users.txt"
        users.write_text("\n".join([*known, "nobody"]) + "\n")
        batch = recommend(run_id, mlflow_server, users=users, k=5).table.to_pandas()
        want = {u: list(g.sort_values("rank")["item"]) for u, g in batch.groupby("user")}
        seen = _seen(cfg, ("train",))
        assert rows[0]["items"] == want[known[0]]
        assert rows[2]["items"] == want[known[1]][:3]
        assert not {(known[0], i) for i in rows[0]["items"]} & seen
        assert rows[0]["scores"] == sorted(rows[0]["scores"], reverse=True)
        # Unknown user: the popularity list recommend gives it, scores = train counts.
        assert rows[1]["items"] == want["nobody"]
        cold = batch[batch["user"] == "nobody"].sort_values("rank")
        assert rows[1]["scores"] == [float(s) for s in cold["score"]]

        # Bad payloads: 400 with a message that says what is wrong.
        for payload, expect in [
            ({"dataframe_records": [{"user_id": known[0], "k": 0}]}, "k must be between 1 and"),
            ({"dataframe_records": [{"k": 5}]}, "missing column 'user_id'"),
            ({"dataframe_records": [{"user_id": known[0], "k": 2.5}]}, "k must be an integer"),
            ({"dataframe_records": [{"user_id": known[0], "k": "ten"}]}, "k must be an integer"),
            ({"dataframe_records": [{"user_id": "", "k": 5}]}, "user_id is empty or blank in row(s) [0]"),
        ]:
            status, body = _post(f"{url}/invocations", payload)
            assert 400 <= status < 500, (payload, status, body)
            assert expect in body["message"], (payload, body)
    finally:
        stop_process_group(proc)


# ----------------------------------------------------------------------------- request parsing, no MLflow
def test_parse_requests_accepts_rows_and_defaults_k() -> None:
    from recsys.retrieval.serve import DEFAULT_K, parse_requests

    users, ks = parse_requests(pd.DataFrame({"user_id": ["a", "007"], "k": [3, 1]}))
    assert users == ["a", "007"] and ks.tolist() == [3, 1]
    users, ks = parse_requests(pd.DataFrame({"user_id": ["a"]}))
    assert ks.tolist() == [DEFAULT_K]
    _, ks = parse_requests(pd.DataFrame.from_records([{"user_id": "a", "k": 4}, {"user_id": "b"}]))
    assert ks.tolist() == [4, DEFAULT_K]


@pytest.mark.parametrize(
    ("frame", "expect"),
    [
        ({"k": [5]}, "missing column 'user_id'"),
        ({"user_id": ["a"], "k": [0]}, "k must be between 1 and"),
        ({"user_id": ["a"], "k": [-3]}, "k must be between 1 and"),
        ({"user_id": ["a"], "k": [2.5]}, "k must be an integer"),
        ({"user_id": ["a"], "k": ["ten"]}, "k must be an integer"),
        ({"user_id": ["a"], "k": [True]}, "k must be an integer"),
        ({"user_id": [None], "k": [3]}, "user_id is empty"),
        ({"user_id": ["a", ""], "k": [3, 3]}, "user_id is empty or blank in row(s) [1]"),
        ({"user_id": [" "], "k": [3]}, "user_id is empty or blank in row(s) [0]"),
        ({"user_id": [42], "k": [3]}, "user_id must be a string; got [42]"),
        ({"user_id": [["a"]], "k": [3]}, "user_id must be a string"),
        ({"user_id": ["a"], "k": ["5"]}, "k must be an integer"),  # a string is not read as a number
        ({"user_id": ["a"], "k": [{"n": 5}]}, "k must be an integer"),
        ({"user_id": ["a"], "k": [10**400]}, "k must be between 1 and"),  # too large for a float
        ({"user_id": ["a"], "k": [float("inf")]}, "k must be between 1 and"),
        ({"user_id": ["a"], "k": [10**6]}, "k must be between 1 and 1000"),
        ({"user_id": ["a"], "k": [3], "items": [1]}, "unknown column(s) ['items']"),
    ],
)
def test_bad_requests_are_invalid_parameter_value(frame: dict[str, list[Any]], expect: str) -> None:
    from mlflow.exceptions import MlflowException

    from recsys.retrieval.serve import parse_requests

    with pytest.raises(MlflowException) as e:
        parse_requests(pd.DataFrame(frame))
    assert expect in e.value.message
    assert e.value.get_http_status_code() == 400


def test_rows_per_request_are_capped_with_a_short_message() -> None:
    from mlflow.exceptions import MlflowException

    from recsys.retrieval.serve import MAX_ROWS, parse_requests

    users, _ = parse_requests(pd.DataFrame({"user_id": ["u"] * MAX_ROWS}))
    assert len(users) == MAX_ROWS
    with pytest.raises(MlflowException) as e:
        parse_requests(pd.DataFrame({"user_id": ["u"] * 100_000}))
    assert f"100,000 rows in one request; at most {MAX_ROWS:,}" in e.value.message
    # Many bad values: the message names a few and the count, not all of them.
    with pytest.raises(MlflowException) as e:
        parse_requests(pd.DataFrame({"user_id": ["u"] * MAX_ROWS, "k": [0] * MAX_ROWS}))
    assert f"({MAX_ROWS:,} in all)" in e.value.message and len(e.value.message) < 200


def test_answer_is_object_columns_that_mlserver_can_encode() -> None:
    """MLServer's V2 codec knows object and numpy dtypes only: pandas 3's `str` dtype was its KeyError 'O'."""
    import numpy as np

    from recsys.retrieval.index import build_index
    from recsys.retrieval.recommend import _exact_of
    from recsys.retrieval.serve import ServingState, answer

    rng = np.random.default_rng(0)
    index = build_index(rng.normal(size=(6, 4)).astype(np.float32), [f"i{j}" for j in range(6)])
    state = ServingState(
        index=index,
        user_pos={"a": 0},
        user_vectors=rng.normal(size=(1, 4)).astype(np.float32),
        seen=(np.array([0, 1]), np.array([2])),  # user a saw index position 2
        popular=np.arange(6),
        popular_counts=np.arange(6, 0, -1),
        exact=_exact_of(index),
    )
    out = answer(state, ["a", "new"], np.array([3, 2]))
    assert out["user_id"].dtype == object and out["items"].dtype == object, out.dtypes
    assert out["fallback"].tolist() == [False, True]
    assert "i2" not in out["items"][0] and len(out["items"][0]) == 3
    assert out["items"][1] == ["i0", "i1"] and out["scores"][1] == [6.0, 5.0]


# ------------------------------------------------------------------------------------------- KServe
def _isvc(**kw: Any) -> dict[str, Any]:
    from recsys.launch.kserve import inference_service

    cfg = load_config("two_tower_synth", ["job.cpu='2'", "job.memory=4Gi"])
    return inference_service(cfg, "s3://models/recsys-two-tower/1", **kw)


def test_rendered_inference_service_validates() -> None:
    from recsys.launch.kubeschema import validation_errors

    doc = _isvc(image="ghcr.io/recsys/serving:0.1.0", service_account="recsys-serving")
    assert validation_errors(doc) == []
    assert doc["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    predictor = doc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "mlflow"} and model["storageUri"].startswith("s3://")
    assert model["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert model["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        ("spec/predictor/model/storageURI", "s3://x", "model.storageURI: unknown field"),
        ("spec/predictor/model/modelFormat/nam", "mlflow", "modelFormat.nam: unknown field"),
        ("spec/predictor/minReplicas", "1", "minReplicas: expected int"),
        ("spec/predictor/securityContext/runAsNonRoot", "yes", "runAsNonRoot: expected bool"),
        ("spec/predictor/model/resources/limits", ["4Gi"], "limits: expected a mapping"),
        ("spec/predictor", None, "predictor"),  # required field missing
    ],
)
def test_broken_inference_service_fails(path: str, value: Any, expect: str) -> None:
    import copy

    from recsys.launch.kubeschema import validation_errors

    doc = copy.deepcopy(_isvc())
    *parents, last = path.split("/")
    node = doc
    for key in parents:
        node = node[key]
    node[last] = value
    errors = validation_errors(doc)
    assert any(expect in e for e in errors), errors


def test_serve_render_cli_writes_a_validated_file(tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "isvc.yaml"
    argv = ["serve", "render", "--config", "two_tower_synth", "--storage-uri", "pvc://recsys-models/tt/1"]
    assert main([*argv, "--name", "tt", "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# generated by recsys serve render --config two_tower_synth")
    (doc,) = [d for d in yaml.safe_load_all(text) if d]
    assert doc["kind"] == "InferenceService" and doc["metadata"]["name"] == "tt"
    assert doc["metadata"]["namespace"] == load_config("two_tower_synth").job.namespace
    # runs:/ is no storage URI and not resolved (models:/NAME/VERSION now is: test_kserve_two_stage.py).
    assert main([*argv[:-1], "runs:/0123abcd/retrieval", "-o", str(out)]) == 2
