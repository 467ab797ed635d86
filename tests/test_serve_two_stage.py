"""Retrieve → rank behind one endpoint (recsys/retrieval/serve_two_stage.py): a tiny Two-Tower
(chaos TINY_RUN), a DCN ranker on its cross-fitted top-20 (`recsys data candidates`, 2 folds), built
with `recsys serve build --ranker-run-id`. Checked: the served lists equal the batch
`retrieve_and_rank` lists (items, order, ranker scores) in process, over real HTTP from
`mlflow models serve`, under MLServer (KServe's MLflow runtime, V2 protocol) in a virtualenv with only
the model's requirements, and in a process where recsys is importable only from the model's code/;
bad requests are 400s. A second pair (a history-pooling Two-Tower and a DLRM on sequence walks) serves
requests carrying histories: in process against the retrieval stage's own lists, under MLServer against
the in-process pyfunc (retrieve_and_rank takes no histories)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.chaos.serve_requests import TINY_RUN

# Three tiny Two-Tower trainings, a 20-step ranker and two model builds: ~1.5 min on an idle 2-core machine;
# the history pair ~1 min more; the MLServer test creates its ~5 GB virtualenv once (~10 min, then cached).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

N = 20


@dataclass
class Built:
    """The runs and the built two-stage model of this module."""

    uri: str
    tt: str
    ranker: str
    model: Path  # the downloaded model folder
    users: list[str]  # known users (raw ids)
    root: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Two-Tower → candidates → ranker → `recsys serve build --ranker-run-id` (N from the ranker data)."""
    import mlflow

    from recsys.cli import main
    from recsys.config import load_config
    from recsys.data.prepare import prepare
    from recsys.retrieval.candidates import build_candidates
    from recsys.train import train

    root = tmp_path_factory.mktemp("two-stage")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    track = [f"tracking.uri={uri}", "tracking.experiment=test-two-stage"]
    tt_cfg = load_config(
        "two_tower_synth",
        [*TINY_RUN, *track, f"data.prepared_dir={root / 'tt'}", f"train.checkpoint.dir={root / 'ck'}"],
    )
    prepare(tt_cfg, overwrite=False)
    tt = train(tt_cfg, resume="never").run_id
    rk_cfg = load_config(
        "movielens_100k_candidate_ranker",
        [*track, f"train.checkpoint.dir={root / 'ck-rk'}", "data.candidates.folds=2",
         f"data.candidates.top_n={N}", f"data.prepared_dir={root / 'rk'}", "train.epochs=1",
         "train.max_steps=20", "train.early_stopping.metric=null", "train.batch_size=256"],
    )  # fmt: skip
    build_candidates(rk_cfg, tt, uri)
    ranker = train(rk_cfg, resume="never").run_id
    argv = ["serve", "build", "--run-id", tt, "--ranker-run-id", ranker, "--tracking-uri", uri]
    assert main([*argv, "--register", ""]) == 0
    model_uri = (
        mlflow.MlflowClient(uri)
        .search_logged_models(
            experiment_ids=[mlflow.MlflowClient(uri).get_experiment_by_name("test-two-stage").experiment_id],
            filter_string="name = 'two_stage'",
        )[0]
        .model_uri
    )
    mlflow.set_tracking_uri(uri)
    model = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(root / "model")))
    users = (root / "tt" / "vocab" / "user_id.txt").read_text().splitlines()[1:31]
    return Built(uri, tt, ranker, model, users, root)


def _download(uri: str, model_uri: str, dst: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))


@pytest.fixture(scope="module")
def built_history(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A Two-Tower pooling each user's last items (mean; tests/test_sequential's walks), a DLRM with one
    uniform negative per positive on the same walks, and their two-stage model at N (no `--register`)."""
    from recsys.data.prepare import prepare
    from recsys.retrieval.serve_two_stage import build_two_stage
    from recsys.train import train
    from tests.test_sequential import make_cfg, two_tower, write_walks

    root = tmp_path_factory.mktemp("two-stage-history")
    write_walks(root / "walks.csv")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    track = [
        ("tracking.enabled", True),
        ("tracking.uri", uri),
        ("tracking.experiment", "test-two-stage-hist"),
    ]
    tt_cfg = make_cfg(root / "walks.csv", root / "tt", root / "tt-run", two_tower("mean"), *track,
                      ("train.epochs", 2))  # fmt: skip
    dlrm = {"kind": "dlrm", "dlrm": {"dense_arch_layers": [16], "over_arch_layers": [32, 1]}}
    rk_cfg = make_cfg(root / "walks.csv", root / "rk", root / "rk-run", dlrm, *track, ("train.epochs", 1),
                      ("data.negatives.per_positive", 1), ("data.history", None))  # fmt: skip
    prepare(tt_cfg, overwrite=False)
    prepare(rk_cfg, overwrite=False)
    tt, ranker = train(tt_cfg, resume="never").run_id, train(rk_cfg, resume="never").run_id
    model = _download(uri, build_two_stage(tt, ranker, uri, "", N).model_uri, root / "model")
    users = (root / "tt" / "vocab" / "user.txt").read_text().splitlines()[1:11]
    return Built(uri, tt, ranker, model, users, root)


#: History requests: a known user with items of our choosing, strangers (one with unknown ids), an
#: empty history, and a row without one (answered from its user id).
HISTORY_ROWS = [
    ("u1", ["i5", "i17", "i42"]),
    ("stranger", ["i7"]),
    ("stranger2", ["i9", "no-such-item", "i7", "also-unknown"]),
    ("u3", []),
    ("u2", None),
]


def _batch(b: Built, users: list[str], k: int) -> dict[str, tuple[list[str], list[float]]]:
    """user → (items, ranker scores) of batch `retrieve_and_rank` at N candidates."""
    from recsys.retrieval.rank import retrieve_and_rank

    path = b.root / "users.txt"
    path.write_text("".join(f"{u}\n" for u in users))
    t = retrieve_and_rank(b.tt, b.ranker, b.uri, path, candidates=N, k=k).table.to_pandas()
    return {
        u: (list(g.sort_values("rank")["item"]), list(g.sort_values("rank")["score"]))
        for u, g in t.groupby("user")
    }


def _check(rows: list[dict], want: dict[str, tuple[list[str], list[float]]]) -> None:
    for row in rows:
        items, scores = want[row["user_id"]]
        assert list(row["items"]) == items[: len(row["items"])], row["user_id"]
        np.testing.assert_allclose(row["scores"], scores[: len(row["scores"])], rtol=1e-5)


def test_served_two_stage_lists_equal_batch_retrieve_and_rank(built: Built) -> None:
    import mlflow
    import yaml

    flavor = yaml.safe_load((built.model / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("serve_two_stage_model.py")
    assert json.loads((built.model / "artifacts" / "two_stage.json").read_text())["candidates"] == N
    model = mlflow.pyfunc.load_model(str(built.model))
    users = [*built.users, "nobody", built.users[0]]  # an unknown user and a repeated one
    ks = [10] * len(built.users) + [10, 3]
    out = model.predict(pd.DataFrame({"user_id": users, "k": ks}))
    want = _batch(built, users, 10)
    _check(out.to_dict("records"), want)
    assert [len(i) for i in out["items"]] == ks
    assert list(out["fallback"]) == [False] * len(built.users) + [True, False]
    # The ranker re-orders: retrieval ranks are a permutation of positions within the top N.
    ranks = out["retrieval_ranks"][0]
    assert max(ranks) <= N and ranks != sorted(ranks)


def test_two_stage_over_http_and_bad_requests_are_400(built: Built, tmp_path: Path) -> None:
    from recsys.chaos.serve_requests import free_port, post, running, scoring_server_cmd

    port = free_port()
    cmd, env = scoring_server_cmd(built.model, port)
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/ping", tmp_path / "serve.log", env, timeout=180):
        records = [{"user_id": u, "k": 10} for u in built.users[:5]]
        status, text = post(f"{url}/invocations", json.dumps({"dataframe_records": records}).encode())
        assert status == 200, text
        _check(json.loads(text)["predictions"], _batch(built, built.users[:5], 10))
        for payload, expect in [
            ({"dataframe_records": [{"user_id": built.users[0], "k": 0}]}, "k must be between 1 and"),
            ({"dataframe_records": [{"k": 5}]}, "missing column 'user_id'"),
            ({"dataframe_records": [{"user_id": built.users[0], "history": "7"}]}, "must be a list"),
        ]:
            status, text = post(f"{url}/invocations", json.dumps(payload).encode())
            assert status == 400 and expect in json.loads(text)["message"], (payload, status, text)


def _history_frame(k: int = 10) -> pd.DataFrame:
    return pd.DataFrame(
        {"user_id": [u for u, _ in HISTORY_ROWS], "k": k, "history": [h for _, h in HISTORY_ROWS]}
    )


def test_history_two_stage_reranks_the_retrieval_stages_history_lists(built_history: Built) -> None:
    """By user id the lists equal batch retrieve_and_rank's; from a history (no batch counterpart in
    retrieve_and_rank) each list is the retrieval stage's own top N for that history, re-ordered by the
    ranker."""
    import mlflow

    from recsys.retrieval.serve import answer

    model = mlflow.pyfunc.load_model(str(built_history.model))
    users = built_history.users[:5]
    _check(
        model.predict(pd.DataFrame({"user_id": users, "k": 10})).to_dict("records"),
        _batch(built_history, users, 10),
    )
    frame = _history_frame()
    out = model.predict(frame)
    retrieval = model.unwrap_python_model()._state.retrieval  # the served retrieval stage
    top_n = answer(retrieval, list(frame["user_id"]), np.full(len(frame), N), list(frame["history"]))
    for row, candidates in zip(out.to_dict("records"), top_n["items"], strict=True):
        assert len(row["items"]) == 10 and [candidates[r - 1] for r in row["retrieval_ranks"]] == row["items"]
        assert row["scores"] == sorted(row["scores"], reverse=True)
    assert list(out["unknown_items"]) == [0, 0, 2, 0, 0] and not out["fallback"].any()


def test_two_stage_under_mlserver_answers_the_v2_protocol(
    built: Built, built_history: Built, tmp_path: Path
) -> None:
    """KServe's MLflow runtime (MLServer + mlserver-mlflow, V2 protocol) in a virtualenv with the model's
    own pins and no recsys (tests/test_serving_mlserver.py): by user id the same lists as batch
    retrieve_and_rank; from a history the same rows as the pyfunc predicting in this process."""
    import mlflow

    from recsys.chaos.serve_requests import post
    from tests.test_serving_mlserver import (
        mlserver,
        mlserver_venv,
        two_stage_packages,
        v2_columns,
        v2_request,
    )

    venv = mlserver_venv(*two_stage_packages())
    users, ks = [*built.users[:5], "nobody", built.users[0]], [10] * 6 + [3]
    frame = _history_frame()
    want = mlflow.pyfunc.load_model(str(built_history.model)).predict(frame)
    with mlserver(venv, built.model, tmp_path / "by-id") as url:
        status, text = post(f"{url}/infer", json.dumps(v2_request(users, ks)).encode())
        assert status == 200, text
        got = v2_columns(json.loads(text))
        rows = [dict(zip(got, row, strict=True)) for row in zip(*got.values(), strict=True)]
        _check(rows, _batch(built, users, 10))
        assert [len(i) for i in got["items"]] == ks and got["fallback"] == [False] * 5 + [True, False]
        # A history sent to a model whose retriever does not read one: the model's 400, not a 500.
        status, text = post(f"{url}/infer", json.dumps(v2_request([users[0]], [5], [["1"]])).encode())
        assert status == 400 and "does not read histories" in json.loads(text)["error"], (status, text)

    with mlserver(venv, built_history.model, tmp_path / "history") as url:
        body = v2_request(list(frame["user_id"]), list(frame["k"]), list(frame["history"]))
        status, text = post(f"{url}/infer", json.dumps(body).encode())
        assert status == 200, text
        got = v2_columns(json.loads(text))
        assert got["user_id"] == list(want["user_id"])
        for column in ("items", "retrieval_ranks", "fallback", "unknown_items"):
            assert got[column] == [list(v) if isinstance(v, list) else v for v in want[column].tolist()], (
                column
            )
        for served, local in zip(got["scores"], want["scores"], strict=True):
            np.testing.assert_allclose(served, local, rtol=1e-5)


# Run in a fresh interpreter: the venv's editable recsys is taken off the import path before MLflow
# loads the model, so every recsys module the model imports must come from its code/ folder.
_NO_RECSYS = """
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
assert importlib.util.find_spec("recsys") is None, importlib.util.find_spec("recsys")
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
request = json.loads(sys.argv[2])
out = model.predict(pd.DataFrame(request))
import recsys
print(json.dumps({"recsys": recsys.__file__, "rows": out.to_dict("records")}, default=list))
"""


def predict_without_recsys(model: Path, request: dict, cwd: Path) -> dict:
    """Load `model` and answer `request` in a subprocess where recsys is not importable otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", _NO_RECSYS, str(model), json.dumps(request)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_stage_model_loads_where_recsys_is_not_installed(built: Built, tmp_path: Path) -> None:
    got = predict_without_recsys(built.model, {"user_id": built.users[:3], "k": [10] * 3}, tmp_path)
    assert got["recsys"].startswith(str(built.model)), got["recsys"]
    _check(got["rows"], _batch(built, built.users[:3], 10))


def test_candidates_default_to_the_funnel_tag_then_the_ranker_data(built: Built) -> None:
    import mlflow

    from recsys.retrieval.rank import open_ranker
    from recsys.retrieval.serve_two_stage import CANDIDATES_TAG, default_candidates

    ranker = open_ranker(built.ranker, built.uri)
    assert default_candidates(ranker, {}) == N  # the ranker data's data.candidates.top_n
    mlflow.MlflowClient(built.uri).set_tag(built.ranker, CANDIDATES_TAG, "15")
    tags = mlflow.MlflowClient(built.uri).get_run(built.ranker).data.tags
    assert default_candidates(ranker, tags) == 15  # what `recsys bench funnel` chose on val
