"""Served from a request's history: `recsys recommend --history-file` and the served pyfunc (loaded
in-process through mlflow.pyfunc.load_model) compute user vectors from the given items with one
function and give the same lists, with an exact (flat) index and with HNSW; a user never seen gets
recommendations from its items alone; unknown item ids are counted; a run whose model does not read
histories refuses one with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.config import Config
from recsys.data.prepare import prepare
from recsys.errors import UserError
from tests.test_sequential import SEQUENTIAL, make_cfg, write_walks

TRACK = ("tracking.experiment", "test-serve-history")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> tuple[Config, str, Config, str]:
    """(config, run id) of a tiny sequential run and of a plain Two-Tower on the same walks."""
    from recsys.train import train

    d = tmp_path_factory.mktemp("servehist")
    write_walks(d / "walks.csv")
    tracked = [("tracking.enabled", True), ("tracking.uri", mlflow_server), TRACK]
    seq = make_cfg(d / "walks.csv", d / "prep", d / "seq", SEQUENTIAL, *tracked, ("train.epochs", 4))
    prepare(seq, overwrite=False)
    plain_model = {"kind": "two_tower", "two_tower": {"user_features": ["user"], "item_features": ["item"],
                                                      "layers": [16], "temperature": 0.1}}  # fmt: skip
    plain = make_cfg(d / "walks.csv", d / "prep", d / "plain", plain_model, *tracked, ("train.epochs", 1))
    return seq, train(seq, resume="never").run_id, plain, train(plain, resume="never").run_id


def _lists(table: pd.DataFrame) -> dict[str, list[str]]:
    return {u: list(g.sort_values("rank")["item"]) for u, g in table.groupby("user")}


HISTORIES = [
    ("u1", ["i5", "i17", "i42"]),  # a known user with recent items of our choosing
    ("stranger", ["i7"]),  # never seen: the items alone
    ("stranger2", ["i9", "no-such-item", "i7", "also-unknown"]),  # two unknown ids, counted
    ("u3", []),  # an empty history
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_batch_and_served_lists_match_for_the_same_histories(
    runs: tuple[Config, str, Config, str],
    mlflow_server: str,
    tmp_path: Path,
    kind: str,
    capsys: pytest.CaptureFixture,
) -> None:
    import mlflow

    from recsys.cli import main
    from recsys.retrieval.index import IndexParams, build_run_index
    from recsys.retrieval.recommend import recommend
    from recsys.retrieval.serve import build_model

    cfg, run_id, _, _ = runs
    if kind == "hnsw":  # the run's index becomes HNSW: both paths read it
        build_run_index(run_id, mlflow_server, IndexParams("hnsw", m=4, ef_search=4), recall_k=10)
    path = tmp_path / "histories.jsonl"
    path.write_text("".join(json.dumps({"user": u, "history": h}) + "\n" for u, h in HISTORIES))
    rec = recommend(run_id, mlflow_server, k=10, history_file=path)
    assert rec.index == kind and rec.unknown_items == 2 and rec.fallback == 2
    batch = rec.table.to_pandas()
    out = tmp_path / "recs.parquet"
    argv = ["recommend", "--run-id", run_id, "--tracking-uri", mlflow_server, "--history-file", str(path)]
    assert main([*argv, "--k", "10", "-o", str(out)]) == 0
    assert "2 unknown history items dropped" in capsys.readouterr().out
    assert pd.read_parquet(out).equals(batch)
    want = _lists(batch)

    built = build_model(run_id, mlflow_server, register="")
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(built.model_uri)
    request = pd.DataFrame(
        {"user_id": [u for u, _ in HISTORIES], "k": 10, "history": [h for _, h in HISTORIES]}
    )
    served = model.predict(request)
    for (user, hist), items, unknown, fallback in zip(
        HISTORIES, served["items"], served["unknown_items"], served["fallback"], strict=True
    ):
        assert list(items) == want[user], (kind, user)
        assert not set(items) & set(hist), user  # the given items are excluded
        assert not fallback
        assert unknown == batch[batch["user"] == user]["unknown_items"].iloc[0]
    assert list(served["unknown_items"]) == [0, 0, 2, 0]
    alone = model.predict(request.iloc[[2]].reset_index(drop=True))  # a row's list ignores the others
    assert list(alone["items"][0]) == want["stranger2"]
    # A request without histories keeps the stored vectors: the known user's usual list.
    plain = model.predict(pd.DataFrame({"user_id": ["u1"], "k": [10]}))
    assert (
        list(plain["items"][0])
        == _lists(recommend(run_id, mlflow_server, k=10, users=_users(tmp_path)).table.to_pandas())["u1"]
    )


@pytest.mark.slow
def test_history_requests_over_http(
    runs: tuple[Config, str, Config, str], mlflow_server: str, tmp_path: Path
) -> None:
    """A real `mlflow models serve` takes the history field as JSON and answers the batch list; a
    history that is not a list is a 400 with its message."""
    import os
    import subprocess
    import sys

    from recsys.retrieval.recommend import recommend
    from recsys.retrieval.serve import build_model
    from tests.conftest import free_port, stop_process_group, wait_http_ok
    from tests.test_serving import _post

    _, run_id, _, _ = runs
    built = build_model(run_id, mlflow_server, register="")
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", built.model_uri, "--env-manager", "local",
           "-p", str(port), "-h", "127.0.0.1", "--workers", "1"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(proc, f"{url}/ping", log, "mlflow models serve", timeout=120)
        hist = ["i9", "no-such-item", "i7"]
        status, body = _post(
            f"{url}/invocations", {"dataframe_records": [{"user_id": "stranger", "k": 10, "history": hist}]}
        )
        assert status == 200, body
        (row,) = body["predictions"]
        path = tmp_path / "h.jsonl"
        path.write_text(json.dumps({"user": "stranger", "history": hist}) + "\n")
        want = _lists(recommend(run_id, mlflow_server, k=10, history_file=path).table.to_pandas())
        assert row["items"] == want["stranger"] and row["unknown_items"] == 1 and not row["fallback"]
        status, body = _post(
            f"{url}/invocations", {"dataframe_records": [{"user_id": "u1", "history": "i7"}]}
        )
        assert 400 <= status < 500 and "must be a list of item ids" in body["message"], body
        # An item that is no id is refused naming the row and item, not counted as unknown.
        records = [{"user_id": "u1", "history": ["i7"]}, {"user_id": "u2", "history": ["i7", True]}]
        status, body = _post(f"{url}/invocations", {"dataframe_records": records})
        assert 400 <= status < 500 and "history in row 1: item 2 is True" in body["message"], body
    finally:
        stop_process_group(proc)


def _users(tmp_path: Path) -> Path:
    p = tmp_path / "users.txt"
    p.write_text("u1\n")
    return p


@pytest.mark.slow
def test_an_unseen_users_list_follows_its_history(
    runs: tuple[Config, str, Config, str], mlflow_server: str
) -> None:
    """The walks' next item follows from the last one: a stranger's list depends on its items, is not
    the popularity list, and a known user's full history gives its exported vector back."""
    from recsys.retrieval.recommend import open_retriever

    cfg, run_id, _, _ = runs
    ret = open_retriever(run_id, mlflow_server)
    lists = {}
    for last in ("i3", "i50", "i77"):
        table, unknown = ret.recommend_histories(["stranger"], [[last]], 10)
        lists[last] = table.column("item").to_pylist()
        assert unknown.tolist() == [0] and not any(table.column("fallback").to_pylist())
    popular = ret.recommend(["stranger"], 10).column("item").to_pylist()  # the cold-user fallback
    assert len({tuple(v) for v in lists.values()}) == 3 and popular not in lists.values(), lists

    # A known user with its full known history (what the export used) gets its exported vector.
    events: dict[str, list[tuple[int, str]]] = {}
    src = Path(cfg.data.source.path)
    for line in src.read_text().splitlines()[1:]:
        u, i, t = line.split(",")
        events.setdefault(u, []).append((int(t), i))
    user = "u5"
    full = [i for _, i in sorted(events[user])]
    vec = ret.encoder.user_vectors([user], [full]).vectors[0]
    exported = ret.users.vectors[ret.emb_of_id[user]]
    np.testing.assert_allclose(vec, exported, atol=1e-5)


@pytest.mark.slow
def test_a_model_without_histories_refuses_them(
    runs: tuple[Config, str, Config, str], mlflow_server: str, tmp_path: Path
) -> None:
    from recsys.retrieval.recommend import recommend
    from recsys.retrieval.serve import BadRequest, answer, load_state, write_artifacts

    _, _, _, plain_id = runs
    path = tmp_path / "h.csv"
    path.write_text("user,item,timestamp\nu1,i3,5\nu1,i4,2\n")
    with pytest.raises(UserError, match="does not read histories"):
        recommend(plain_id, mlflow_server, k=5, history_file=path)
    artifacts, _ = write_artifacts(plain_id, mlflow_server, tmp_path / "art")
    state = load_state(artifacts)
    with pytest.raises(BadRequest, match="does not read histories"):
        answer(state, ["u1"], np.array([5]), [["i3"]])


@pytest.mark.slow
def test_a_history_model_loads_where_recsys_is_not_installed(
    runs: tuple[Config, str, Config, str], mlflow_server: str, tmp_path: Path
) -> None:
    """The encoder's model, config and data code come from the model's code/ folder: a process whose
    recsys is not importable otherwise loads it and answers as the model does in this process."""
    import mlflow

    from recsys.retrieval.serve import build_model
    from tests.test_serve_two_stage import predict_without_recsys

    _, run_id, _, _ = runs
    built = build_model(run_id, mlflow_server, register="")
    mlflow.set_tracking_uri(mlflow_server)
    local = Path(mlflow.artifacts.download_artifacts(built.model_uri, dst_path=str(tmp_path / "model")))
    request = {"user_id": ["stranger", "u1"], "k": [10, 10], "history": [["i9", "i7"], ["i5", "i17"]]}
    got = predict_without_recsys(local, request, tmp_path)
    assert got["recsys"].startswith(str(local)), got["recsys"]
    want = mlflow.pyfunc.load_model(str(local)).predict(pd.DataFrame(request))
    assert [r["items"] for r in got["rows"]] == [list(x) for x in want["items"]]
    assert [r["unknown_items"] for r in got["rows"]] == [0, 0]


@pytest.mark.parametrize(
    ("history", "expect"),
    [
        (["i1", ""], "item 2 is empty"),
        (["  "], "item 1 is blank"),
        ([None, "i1"], "item 1 is null"),
        (["i1", True], "item 2 is True (a bool)"),
        (["i1", np.False_], "item 2 is np.False_ (a bool)"),
        ([2.0], "item 1 is 2.0 (a float)"),
        (["i1", float("nan")], "item 2 is null"),
    ],
)
def test_a_request_history_item_that_is_no_id_is_a_400(history: list, expect: str) -> None:
    """null, "", blank, bool and float items are refused naming row and item (they would be counted as
    unknown items); text and integer ids are kept as their text."""
    from recsys.retrieval.serve import BadRequest, parse_histories

    good = pd.DataFrame({"user_id": ["a", "b"], "history": [["x", 7, np.int64(8)], None]})
    assert parse_histories(good) == [["x", "7", "8"], None]
    bad = pd.DataFrame({"user_id": ["a", "b"], "history": [["x"], history]})
    with pytest.raises(BadRequest) as e:
        parse_histories(bad)
    assert f"history in row 1: {expect}" in e.value.message, e.value.message
    assert e.value.get_http_status_code() == 400


def test_history_file_formats_order_by_time_and_name_bad_lines(tmp_path: Path) -> None:
    from recsys.retrieval.history_users import read_history_file

    csv = tmp_path / "h.csv"
    csv.write_text("user,item,timestamp\na,i1,5\nb,i9,1\na,i2,3\na,i3,5\n")
    assert read_history_file(csv) == (["b", "a"], [["i9"], ["i2", "i1", "i3"]])  # ties: file order
    pd.DataFrame({"user": ["a", "a"], "item": ["x", "y"]}).to_parquet(tmp_path / "h.parquet")
    assert read_history_file(tmp_path / "h.parquet") == (["a"], [["x", "y"]])  # no timestamp: file order
    # A raw U+2028 is valid inside a JSON string: the line must not be split there.
    (tmp_path / "u.jsonl").write_text('{"user": "a\u2028b", "history": ["x\x85y"]}\r\n', newline="")
    assert read_history_file(tmp_path / "u.jsonl") == (["a\u2028b"], [["x\x85y"]])
    bad = tmp_path / "h.jsonl"
    bad.write_text('{"user": "a", "history": ["x"]}\n{"user": "b", "history": "x"}\n')
    with pytest.raises(UserError, match=r"h.jsonl:2: expected"):
        read_history_file(bad)
    with pytest.raises(UserError, match="no column"):
        (tmp_path / "n.csv").write_text("who,what\na,b\n")
        read_history_file(tmp_path / "n.csv")


def test_history_file_keeps_ids_exact_and_refuses_null_or_empty_ones(tmp_path: Path) -> None:
    from recsys.retrieval.history_users import read_history_file

    # Ids are text: "007" stays "007" (not the number 7).
    (tmp_path / "ids.csv").write_text("user,item\n007,010\n007,2\n")
    assert read_history_file(tmp_path / "ids.csv") == (["007"], [["010", "2"]])
    # A null or empty id, or a null timestamp, is refused naming the row: never dropped, never "None".
    bad = {
        "u.parquet": pd.DataFrame({"user": ["a", None], "item": ["x", "y"]}),
        "i.parquet": pd.DataFrame({"user": ["a", "a"], "item": ["x", None]}),
        "t.parquet": pd.DataFrame({"user": ["a", "a"], "item": ["x", "y"], "timestamp": [1.0, None]}),
    }
    for name, df in bad.items():
        df.to_parquet(tmp_path / name)
    (tmp_path / "e.csv").write_text("user,item\na,x\n,y\n")
    expect = {"u.parquet": "user is null", "i.parquet": "item is null", "t.parquet": "timestamp is null"}
    for name, what in {**expect, "e.csv": "user is empty"}.items():
        with pytest.raises(UserError, match=re.escape(f"--history-file {tmp_path / name}: row 2: {what};")):
            read_history_file(tmp_path / name)
    for n, line in enumerate(('{"user": null, "history": ["x"]}', '{"user": "a", "history": ["x", ""]}')):
        (tmp_path / f"{n}.jsonl").write_text(f'{{"user": "ok", "history": []}}\n{line}\n')
    with pytest.raises(UserError, match=r"0.jsonl:2: user is null"):
        read_history_file(tmp_path / "0.jsonl")
    with pytest.raises(UserError, match=r"1.jsonl:2: history item 2 is empty"):
        read_history_file(tmp_path / "1.jsonl")
