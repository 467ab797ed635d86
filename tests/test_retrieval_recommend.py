"""`recsys index build` and `recsys recommend` end to end on a real tiny Two-Tower run (real mlflow
server): seen items never come back, lists stay k long, unknown users get popularity, bad input is
one line. Each test gets its own copy of the trained run, so a logged index never leaks between tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.chaos.serve_requests import TINY_RUN
from recsys.cli import main
from recsys.config import Config, load_config
from recsys.errors import UserError
from recsys.retrieval.recommend import parse_exclude, read_users, recommend

#: The chaos scenario's tiny Two-Tower run (trains in well under a minute on 2 cores).
TINY = [*TINY_RUN, "tracking.experiment=test-retrieval"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> tuple[Config, str]:
    """A tiny Two-Tower trained once for this module: (its config, its run id)."""
    from recsys.data.prepare import prepare
    from recsys.train import train

    root = tmp_path_factory.mktemp("retrieval")
    cfg = load_config(
        "two_tower_synth", [*TINY, f"data.prepared_dir={root / 'tt'}", f"tracking.uri={mlflow_server}"]
    )
    prepare(cfg, overwrite=False)
    return cfg, train(cfg).run_id


@pytest.fixture
def run_id(trained: tuple[Config, str], mlflow_server: str) -> str:
    """A fresh run holding the trained run's tags, config and embeddings (and no index)."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    src = client.get_run(trained[1])
    run = client.create_run(src.info.experiment_id, tags={"model": src.data.tags["model"]})
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("config", "embeddings"):
            local = mlflow.artifacts.download_artifacts(
                run_id=src.info.run_id, artifact_path=path, dst_path=tmp, tracking_uri=mlflow_server
            )
            client.log_artifacts(run.info.run_id, local, path)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


# ----------------------------------------------------------------------------------------- helpers
def _vocab(cfg: Config, feature: str) -> list[str]:
    return (Path(cfg.data.prepared_dir) / f"vocab/{feature}.txt").read_text().splitlines()


def _seen(cfg: Config, splits: tuple[str, ...]) -> set[tuple[str, str]]:
    """(raw user, raw item) pairs of the splits."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata

    meta = read_metadata(cfg.data.prepared_dir)
    cols = [meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")]
    users, items = _vocab(cfg, "user_id"), _vocab(cfg, "item_id")
    out = set()
    for split in splits:
        s = read_split_arrays(cfg.data.prepared_dir, split)["sparse"]
        out |= {(users[u], items[i]) for u, i in s[:, cols].tolist() if u and i}
    return out


def _lists(table: pa.Table) -> dict[str, list[str]]:
    df = table.to_pandas()
    return {u: list(g.sort_values("rank")["item"]) for u, g in df.groupby("user", sort=False)}


def _embeddings(uri: str, run_id: str, side: str) -> tuple[list[str], np.ndarray]:
    import mlflow

    from recsys.retrieval.runs import read_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        e = read_embeddings(
            mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=f"embeddings/{side}_embeddings.parquet",
                dst_path=tmp,
                tracking_uri=uri,
            )
        )
    return list(e.ids), e.vectors


# ------------------------------------------------------------------------------------------ recommend
@pytest.mark.slow
def test_cli_recommend_all_users_is_exact_top_k_of_unseen(
    trained: tuple[Config, str],
    run_id: str,
    mlflow_server: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    cfg, k = trained[0], 10
    out = tmp_path / "recs.parquet"
    assert (
        main(
            ["recommend", "--run-id", run_id, "--tracking-uri", mlflow_server, "--k", str(k), "-o", str(out)]
        )
        == 0
    )
    assert "index: flat" in capsys.readouterr().out  # no index logged: exact, built on the fly
    table = pq.read_table(out)
    assert table.schema.names == ["user", "rank", "item", "score", "fallback"]
    assert [str(t) for t in table.schema.types] == ["string", "int32", "string", "float", "bool"]
    lists = _lists(table)
    users, u_emb = _embeddings(mlflow_server, run_id, "user")
    items, i_emb = _embeddings(mlflow_server, run_id, "item")
    assert list(lists) == users and not table.column("fallback").to_numpy().any()
    seen = _seen(cfg, ("train",))
    score_of = {u: dict(zip(items, row, strict=True)) for u, row in zip(users, u_emb @ i_emb.T, strict=True)}
    for user in users:
        assert len(lists[user]) == k  # full length although seen items were removed
        assert not {(user, i) for i in lists[user]} & seen
        # Brute force: the k best unseen items (up to float noise between near-equal scores).
        allowed = sorted((s for i, s in score_of[user].items() if (user, i) not in seen), reverse=True)
        got = [score_of[user][i] for i in lists[user]]
        np.testing.assert_allclose(got, allowed[:k], atol=1e-5)
    df = table.to_pandas()
    assert (df.groupby("user")["rank"].apply(list) == [list(range(1, k + 1))] * len(users)).all()
    assert (df.groupby("user")["score"].apply(lambda s: bool((np.diff(s) <= 1e-6).all()))).all()


@pytest.mark.slow
def test_excluding_all_splits_and_the_catalogue_limit(
    trained: tuple[Config, str], run_id: str, mlflow_server: str
) -> None:
    cfg = trained[0]
    splits = ("train", "val", "test")
    n_items = len(_vocab(cfg, "item_id")) - 1
    k = n_items - 5  # most users have seen more than 5 items: their lists end with the catalogue
    rec = recommend(run_id, mlflow_server, k=k, exclude=splits)
    seen = _seen(cfg, splits)
    for user, items in _lists(rec.table).items():
        n_seen = sum(1 for u, _ in seen if u == user)
        assert len(items) == min(k, n_items - n_seen) == len(set(items))
        assert not {(user, i) for i in items} & seen


@pytest.mark.slow
def test_unknown_users_get_popularity_flagged(
    trained: tuple[Config, str], run_id: str, mlflow_server: str, tmp_path: Path
) -> None:
    from recsys.data.loader import read_split_arrays

    cfg = trained[0]
    known = _vocab(cfg, "user_id")[1:3]
    users = tmp_path / "users.csv"
    users.write_text("user\n" + "\n".join(["nobody", known[0], "<OOV>", known[1], "nobody"]) + "\n")
    rec = recommend(run_id, mlflow_server, users=users, k=7)
    df = rec.table.to_pandas()
    assert list(dict.fromkeys(df["user"])) == ["nobody", known[0], "<OOV>", known[1]]
    assert rec.users == 4 and rec.fallback == 2
    assert df.groupby("user")["fallback"].all().to_dict() == {
        "nobody": True, "<OOV>": True, known[0]: False, known[1]: False
    }  # fmt: skip
    train = read_split_arrays(cfg.data.prepared_dir, "train")
    counts = np.bincount(train["sparse"][train["label"] > 0, 1], minlength=len(_vocab(cfg, "item_id")))
    counts[0] = 0
    top = np.argsort(-counts, kind="stable")[:7]
    vocab = _vocab(cfg, "item_id")
    cold = df[df["user"] == "nobody"]
    assert list(cold["item"]) == [vocab[r] for r in top]
    assert list(cold["score"]) == [float(counts[r]) for r in top]


# ---------------------------------------------------------------------------------------------- index
@pytest.mark.slow
def test_index_build_logs_index_and_recommend_uses_it(
    trained: tuple[Config, str], run_id: str, mlflow_server: str, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    # 5 lists (the default for 199 items), 1 probed: ~40 items per search, fewer than k + seen.
    run = ["--run-id", run_id, "--tracking-uri", mlflow_server]
    assert main(["index", "build", *run, "--kind", "ivf", "--nprobe", "1"]) == 0
    printed = capsys.readouterr().out
    assert "index ivf" in printed and "recall@100" in printed
    client = mlflow.MlflowClient(mlflow_server)
    assert sorted(f.path for f in client.list_artifacts(run_id, "index")) == [
        "index/index.faiss", "index/item_ids.parquet", "index/manifest.json"
    ]  # fmt: skip
    recall = client.get_run(run_id).data.metrics["index/ivf/recall_at_100"]
    assert 0.0 < recall < 0.9, recall
    rec = recommend(run_id, mlflow_server, k=60)
    assert rec.index == "ivf"
    seen = _seen(trained[0], ("train",))
    for user, items in _lists(rec.table).items():
        # One list cannot fill 60 unseen items: deeper, then exact searches refill every list.
        assert len(items) == 60 == len(set(items)) and not {(user, i) for i in items} & seen


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_search_unseen_is_exact_top_k_of_unseen_for_every_index(kind: str) -> None:
    """No MLflow: a poorly set approximate index (1 of 5 lists; 4 HNSW candidates) is refilled to the
    exact answer when it cannot fill k unseen items."""
    from recsys.bench.recommend import clustered_embeddings
    from recsys.retrieval.index import IndexParams, build_index
    from recsys.retrieval.recommend import _exact_of, search_unseen

    items, users = clustered_embeddings(200, 50, dim=16, clusters=5, rank=4, seed=1)
    params = IndexParams(kind, nlist=5, nprobe=1, m=4, ef_search=4)
    index = build_index(items, [f"i{j}" for j in range(200)], params)
    rng = np.random.default_rng(0)
    seen_sets = [np.sort(rng.choice(200, rng.integers(0, 60), replace=False)) for _ in range(50)]
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in seen_sets])])
    seen = (indptr, np.concatenate(seen_sets).astype(np.int64))
    k = 120
    scores, found = search_unseen(index, users, np.arange(50), seen, k, _exact_of(index))
    full = users @ items.T
    for u in range(50):
        full[u, seen_sets[u]] = -np.inf
        want = min(k, 200 - len(seen_sets[u]))
        assert (found[u, :want] >= 0).all() and (found[u, want:] == -1).all()
        assert not set(found[u, :want].tolist()) & set(seen_sets[u].tolist())
        np.testing.assert_allclose(scores[u, :want], np.sort(full[u])[::-1][:want], atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input
def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recsys: ") and "\n" not in err, err
    return err


@pytest.mark.slow
def test_unknown_and_wrong_runs_are_one_line(
    mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-retrieval") or client.get_experiment(
        client.create_experiment("test-retrieval")
    )
    dlrm = client.create_run(exp.experiment_id, tags={"model": "dlrm"}).info.run_id
    bare = client.create_run(exp.experiment_id, tags={"model": "two_tower"}).info.run_id
    out = str(tmp_path / "o.parquet")
    for cmd in (["recommend", "-o", out], ["index", "build"]):
        err = _one_line_error([*cmd, "--run-id", "0" * 32, "--tracking-uri", mlflow_server], capsys)
        assert "not found" in err
        err = _one_line_error([*cmd, "--run-id", dlrm, "--tracking-uri", mlflow_server], capsys)
        assert "is a dlrm run, not a Two-Tower" in err
        err = _one_line_error([*cmd, "--run-id", bare, "--tracking-uri", mlflow_server], capsys)
        assert "has no embeddings/user_embeddings.parquet" in err


@pytest.mark.slow
def test_moved_prepared_folder_is_one_line_and_set_points_at_it(
    trained: tuple[Config, str],
    run_id: str,
    mlflow_server: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    base = [
        "recommend",
        "--run-id",
        run_id,
        "--tracking-uri",
        mlflow_server,
        "-o",
        str(tmp_path / "o.parquet"),
    ]
    err = _one_line_error([*base, "--set", "data.prepared_dir=/nowhere"], capsys)
    assert "its prepared data /nowhere" in err and "--set data.prepared_dir=PATH" in err
    assert main([*base, "--k", "3", "--set", f"data.prepared_dir={trained[0].data.prepared_dir}"]) == 0
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 3 * (len(_vocab(trained[0], "user_id")) - 1)
    # Another dataset's folder would silently exclude the wrong items: refused.
    from recsys.data.prepare import prepare

    other = load_config(
        "two_tower_synth", [*TINY, "data.source.seed=7", f"data.prepared_dir={tmp_path / 'other'}"]
    )
    prepare(other, overwrite=False)
    capsys.readouterr()  # prepare's own progress lines
    err = _one_line_error([*base, "--set", f"data.prepared_dir={tmp_path / 'other'}"], capsys)
    assert "vocabulary differs from the run's embeddings" in err


def test_bad_users_files_k_and_exclude_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = [
        "recommend",
        "--run-id",
        "r",
        "--tracking-uri",
        "sqlite:///unused.db",
        "-o",
        str(tmp_path / "o.parquet"),
    ]
    assert "--k must be >= 1" in _one_line_error([*base, "--k", "0"], capsys)
    (tmp_path / "empty.txt").write_text("")
    assert "no user ids" in _one_line_error([*base, "--users", str(tmp_path / "empty.txt")], capsys)
    (tmp_path / "blank.txt").write_text("7\n  \n8\n")
    assert "blank.txt:2: blank line" in _one_line_error(
        [*base, "--users", str(tmp_path / "blank.txt")], capsys
    )
    assert "cannot read" in _one_line_error([*base, "--users", str(tmp_path / "missing.txt")], capsys)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    assert "cannot read" in _one_line_error([*base, "--users", str(tmp_path / "bad.parquet")], capsys)
    pq.write_table(pa.table({"uid": ["a"]}), tmp_path / "cols.parquet")
    assert "no column 'user' (columns: uid)" in _one_line_error(
        [*base, "--users", str(tmp_path / "cols.parquet")], capsys
    )
    assert "--exclude 'train,tests'" in _one_line_error([*base, "--exclude", "train,tests"], capsys)


def test_users_files_refuse_null_and_empty_ids_naming_the_row(tmp_path: Path) -> None:
    # Nothing is dropped: a null or empty user is one line naming the file and row (first data row = 1).
    cases = {
        "null.parquet": pa.table({"user": ["x", None, "y"]}),
        "empty.parquet": pa.table({"user": ["x", "y", ""]}),
    }
    for name, table in cases.items():
        pq.write_table(table, tmp_path / name)
    (tmp_path / "empty.csv").write_text("user,other\n007,1\n,2\n")
    (tmp_path / "blank.csv").write_text('user\n007\n" "\n')
    pq.write_table(pa.table({"user": [7.0, 8.0]}), tmp_path / "float.parquet")
    for name, expect in (
        ("null.parquet", "row 2: user is null"),
        ("empty.parquet", "row 3: user is empty"),
        ("empty.csv", "row 2: user is empty"),
        ("blank.csv", "row 2: user is blank"),
        ("float.parquet", "column 'user' holds double values; write ids as text or integers"),
    ):
        with pytest.raises(UserError) as e:
            read_users(tmp_path / name)
        assert str(e.value).startswith(f"--users {tmp_path / name}: {expect}"), str(e.value)


def test_users_files_keep_ids_as_text(tmp_path: Path) -> None:
    # Lines are split on "\n" only: \x1c, \x85, \u2028 … are part of an id (str.splitlines splits on them);
    # a Windows "\r" is not; an id is kept exactly as written; duplicates are dropped, order kept.
    (tmp_path / "u.txt").write_bytes("007\r\n 42 \na\x1cb\nc\u2028d\x85e\n007\nlast".encode())
    assert read_users(tmp_path / "u.txt") == ["007", " 42 ", "a\x1cb", "c\u2028d\x85e", "last"]
    (tmp_path / "u.csv").write_text("user,other\n007,1\n8,2\n")
    assert read_users(tmp_path / "u.csv") == ["007", "8"]
    pq.write_table(pa.table({"user": ["x", "y", "x"]}), tmp_path / "u.parquet")
    assert read_users(tmp_path / "u.parquet") == ["x", "y"]
    pq.write_table(pa.table({"user": pa.array([7, 8], pa.int64())}), tmp_path / "i.parquet")
    assert read_users(tmp_path / "i.parquet") == ["7", "8"]
    assert parse_exclude("train,val") == ("train", "val") and parse_exclude("none") == ()
    with pytest.raises(UserError):
        parse_exclude("")
