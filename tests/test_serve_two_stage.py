"""Retrieve → rank behind one endpoint (recsys/retrieval/serve_two_stage.py): a tiny Two-Tower
(chaos TINY_RUN), a DCN ranker on its cross-fitted top-20 (`recsys data candidates`, 2 folds), built
with `recsys serve build --ranker-run-id`. Checked: the served lists equal the batch
`retrieve_and_rank` lists (items, order, ranker scores) in process, over real HTTP from
`mlflow models serve`, and in a process where recsys is importable only from the model's code/;
bad requests are 400s."""

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

# Three tiny Two-Tower trainings, a 20-step ranker and two model builds: ~1.5 min on an idle 2-core machine.
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
