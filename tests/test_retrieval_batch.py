"""Distributed batch inference of `recsys recommend` on one tiny Two-Tower run (real MLflow server):
torchrun on 2 ranks, Spark local[2] and a local Ray instance give the single process's rows exactly;
parts are atomic, re-runs skip them, the manifest checks out; the PyTorchJob/TrainJob render is valid
and runs the same command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.cli import build_parser, main
from recsys.config import Config, load_config
from recsys.errors import UserError
from recsys.launch.spark import spark_unavailable_reason
from recsys.retrieval.batch import (
    MANIFEST,
    BatchJob,
    make_job,
    part_path,
    partition,
    read_parts,
    recommend_argv,
    render_batch_job,
    run_part,
)
from tests.test_retrieval_recommend import TINY

SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("rank", pa.int32()),
        ("item", pa.string()),
        ("score", pa.float32()),
        ("fallback", pa.bool_()),
    ]
)
K = 12


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> tuple[Config, str, Path]:
    """A tiny Two-Tower trained once, with a deliberately poor HNSW index logged (4 candidates: many
    lists are refilled deeper and exactly), and a users file: every user reversed + 2 unknown ones.
    Returns (config, run id, users file)."""
    from recsys.data.prepare import prepare
    from recsys.retrieval.index import IndexParams, build_run_index
    from recsys.train import train

    root = tmp_path_factory.mktemp("batch")
    cfg = load_config(
        "two_tower_synth", [*TINY, f"data.prepared_dir={root / 'tt'}", f"tracking.uri={mlflow_server}"]
    )
    prepare(cfg, overwrite=False)
    run_id = train(cfg).run_id
    build_run_index(run_id, mlflow_server, IndexParams("hnsw", m=4, ef_search=4), recall_k=K)
    vocab = (Path(cfg.data.prepared_dir) / "vocab/user_id.txt").read_text().splitlines()[1:]
    users = root / "users.txt"
    users.write_text("\n".join(["nobody", *reversed(vocab), "<OOV>"]) + "\n")
    return cfg, run_id, users


@pytest.fixture(scope="module")
def reference(batch_run: tuple[Config, str, Path], mlflow_server: str) -> dict[str, pa.Table]:
    """The single-process tables, for users 'all' and for the users file."""
    from recsys.retrieval.recommend import recommend

    _, run_id, users = batch_run
    out = {}
    for spec in ("all", str(users)):
        rec = recommend(run_id, mlflow_server, users=spec, k=K)
        assert rec.index == "hnsw"
        out[spec] = rec.table
    return out


def _job(batch_run: tuple[Config, str, Path], mlflow_server: str, users: str = "all", k: int = K) -> BatchJob:
    return make_job(batch_run[1], mlflow_server, users if users == "all" else str(batch_run[2]), k)


def _sorted(table: pa.Table) -> pa.Table:
    """Schema-normalised rows ordered by (user, rank): how engines that reorder users are compared."""
    table = table.replace_schema_metadata(None).select(SCHEMA.names).cast(SCHEMA)
    return table.sort_by([("user", "ascending"), ("rank", "ascending")])


def _assert_same(got: pa.Table, want: pa.Table) -> None:
    got, want = _sorted(got), _sorted(want)
    assert got.num_rows == want.num_rows
    for name in SCHEMA.names:  # column by column: a failure names the column
        assert got.column(name).equals(want.column(name)), name


# -------------------------------------------------------------------------------------------- unit
def test_partition_is_contiguous_and_covers_every_user() -> None:
    for n in (0, 1, 5, 300, 301):
        for parts in (1, 2, 3, 7):
            slices = [partition(n, parts, p) for p in range(parts)]
            assert [i for s in slices for i in range(n)[s]] == list(range(n))
            sizes = [len(range(n)[s]) for s in slices]
            assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------- four engines
@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_ranks_parts_manifest_and_rerun(
    batch_run: tuple[Config, str, Path],
    reference: dict[str, pa.Table],
    mlflow_server: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
) -> None:
    _, run_id, users = batch_run
    out = tmp_path / "recs"
    argv = ["recommend", "--run-id", run_id, "--tracking-uri", mlflow_server, "--users", str(users)]
    argv += ["--k", str(K), "-o", str(out), "--nproc", "2"]
    assert main(argv) == 0
    assert "in 2 parts" in capfd.readouterr().out
    # Concatenated in part order, the parts ARE the single-process table (same rows, same order).
    _assert_same(read_parts(out), reference[str(users)])
    assert read_parts(out).equals(reference[str(users)].replace_schema_metadata(None))
    manifest = json.loads((out / MANIFEST).read_text())
    n_users = len(users.read_text().split())
    assert manifest["run_id"] == run_id and manifest["k"] == K and manifest["exclude"] == "train"
    assert manifest["index"] == "hnsw" and manifest["world"] == 2 and manifest["users_total"] == n_users
    parts = manifest["parts"]
    assert [p["file"] for p in parts] == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    assert [p["users"] for p in parts] == [n_users // 2, n_users - n_users // 2]
    for p in parts:
        data = (out / p["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == p["sha256"]
        assert pq.read_metadata(out / p["file"]).num_rows == p["rows"]
    assert sorted(f.name for f in out.iterdir()) == [MANIFEST, *(p["file"] for p in parts)]  # no temp files

    # A re-run (a restarted pod) skips a written part; a lost part is recomputed byte for byte.
    job = make_job(run_id, mlflow_server, str(users), K)
    before = part_path(out, 0, 2).stat().st_mtime_ns
    assert run_part(job, out, 0, 2) is False and part_path(out, 0, 2).stat().st_mtime_ns == before
    part_path(out, 1, 2).unlink()
    assert run_part(job, out, 1, 2) is True
    assert hashlib.sha256(part_path(out, 1, 2).read_bytes()).hexdigest() == parts[1]["sha256"]
    # Parts of another job (another k) are refused, never mixed in.
    with pytest.raises(UserError, match="a part of another batch job"):
        run_part(make_job(run_id, mlflow_server, str(users), K + 1), out, 0, 2)


@pytest.mark.slow
def test_parts_are_matched_by_the_users_file_content_not_its_path(
    batch_run: tuple[Config, str, Path], mlflow_server: str, tmp_path: Path
) -> None:
    """A part written for a users file belongs to a job with the same ids at another path (a pod that
    mounts it elsewhere) and not to one with other ids at the same path (the file was rewritten)."""
    _, run_id, users = batch_run
    out, mine = tmp_path / "recs", tmp_path / "users.txt"
    mine.write_bytes(users.read_bytes())
    assert run_part(make_job(run_id, mlflow_server, str(mine), K), out, 0, 2) is True
    moved = tmp_path / "mounted-elsewhere" / "users.txt"
    moved.parent.mkdir()
    moved.write_bytes(users.read_bytes())
    assert run_part(make_job(run_id, mlflow_server, str(moved), K), out, 0, 2) is False  # same job
    mine.write_text("\n".join(users.read_text().split()[:5]) + "\n")  # other ids, same path
    with pytest.raises(UserError, match="a part of another batch job"):
        run_part(make_job(run_id, mlflow_server, str(mine), K), out, 0, 2)


UNAVAILABLE = spark_unavailable_reason()


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"Spark tier skipped: {UNAVAILABLE}")
def test_spark_map_in_pandas_gives_the_same_rows(
    batch_run: tuple[Config, str, Path], reference: dict[str, pa.Table], mlflow_server: str, tmp_path: Path
) -> None:
    from recsys.launch.spark import get_spark
    from recsys.retrieval.batch import recommend_spark

    spark = get_spark(None, master="local[2]")
    spark.sparkContext.setLogLevel("ERROR")
    try:
        for users in ("all", "file"):
            df = recommend_spark(_job(batch_run, mlflow_server, users), spark, partitions=3)
            # Written as a Databricks job would write it (and read back without pandas conversions).
            df.write.mode("overwrite").parquet(str(tmp_path / users))
            got = pq.read_table(tmp_path / users)
            _assert_same(got, reference["all" if users == "all" else str(batch_run[2])])
    finally:
        spark.stop()


def _start_local_ray(attempts: int = 3) -> None:
    """A local instance on 2 CPUs; workers inherit this interpreter (and so the venv's recsys).

    Retried: on a loaded machine the raylet gives its dashboard agent a fixed 15 s to start and then
    aborts (ray-project/ray#65983), which says nothing about the code under test."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise


@pytest.mark.slow
def test_ray_data_map_batches_gives_the_same_rows(
    batch_run: tuple[Config, str, Path], reference: dict[str, pa.Table], mlflow_server: str
) -> None:
    import ray

    from recsys.retrieval.batch import recommend_ray

    _start_local_ray()
    try:
        job = _job(batch_run, mlflow_server, "file")
        got = recommend_ray(job, actors=2, batch_size=64).to_arrow_refs()
        _assert_same(pa.concat_tables(ray.get(got)), reference[str(batch_run[2])])
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------- Kubernetes
@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_rendered_job_runs_the_batch_command_and_is_valid(backend: str) -> None:
    """No MLflow needed: the training config and a job go in, validated documents come out."""
    import yaml

    from recsys.launch.jobspec import CONFIG_PATH

    cfg = load_config("two_tower_synth", ["job.nodes=2", "job.procs_per_node=3"])
    job = BatchJob("abc123", "http://127.0.0.1:5000", "/data/users.txt", 50, ("train", "val"))
    docs = render_batch_job(cfg, job, backend, "/data/recs/abc123")  # validated inside (kubeschema)
    config_map, kind = docs
    assert config_map["kind"] == "ConfigMap" and kind["kind"] == (
        "PyTorchJob" if backend == "pytorchjob" else "TrainJob"
    )
    assert kind["metadata"]["name"] == f"{cfg.job.name}-recommend"
    pod_cfg = yaml.safe_load(config_map["data"]["config.yaml"])
    assert pod_cfg["tracking"]["uri"] == cfg.job.mlflow_tracking_uri  # the pods' MLflow, not this machine's
    if backend == "pytorchjob":
        replicas = kind["spec"]["pytorchReplicaSpecs"]
        command = replicas["Master"]["template"]["spec"]["containers"][0]["command"]
        assert kind["spec"]["nprocPerNode"] == "3" and replicas["Worker"]["replicas"] == 1
        assert (
            replicas["Master"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            == "batch-recommend"
        )
    else:
        command = kind["spec"]["trainer"]["command"]
        assert kind["spec"]["trainer"]["numNodes"] == 2 and kind["spec"]["trainer"]["numProcPerNode"] == 3
    assert command[:5] == ["python", "-m", "recsys.launch.elastic", "-m", "recsys"]
    # The pods run exactly the command this test's job describes, read by the real parser.
    args = build_parser().parse_args(command[5:])
    assert (args.run_id, args.users, args.k, args.exclude, args.output) == (
        "abc123", "/data/users.txt", 50, "train,val", "/data/recs/abc123"
    )  # fmt: skip
    assert args.config == CONFIG_PATH and args.tracking_uri == cfg.job.mlflow_tracking_uri
    assert command[5:] == recommend_argv(
        BatchJob("abc123", cfg.job.mlflow_tracking_uri, "/data/users.txt", 50, ("train", "val"), CONFIG_PATH),
        "/data/recs/abc123",
    )


def test_bad_batch_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["recommend", "--run-id", "r", "--tracking-uri", "sqlite:///unused.db", "-o", str(tmp_path / "o")]
    for extra, expect in (
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--nproc", "2", "--k", "0"], "--k must be >= 1"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("recsys: ") and "\n" not in err and expect in err, err
    cfg = load_config("two_tower_synth", ["job.name=a-very-long-job-name-for-a-batch-recommend-x"])
    with pytest.raises(UserError, match="job.name"):
        render_batch_job(cfg, BatchJob("r", "u"), "pytorchjob", "/data/o", name="x" * 41)


def test_spark_and_ray_users_refuse_null_ids_before_opening_the_run() -> None:
    import pandas as pd

    from recsys.retrieval.batch import _spark_batches, recommend_ray

    # The run does not exist: the bad user must be named before anything tries to open it.
    job = BatchJob("no-such-run", "sqlite:///unused.db")
    with pytest.raises(UserError, match="recommend_spark users, in a batch: row 2: user is null"):
        next(_spark_batches(job, iter([pd.DataFrame({"user": ["a", None]})])))
    with pytest.raises(UserError, match="recommend_ray users: row 3: user is empty"):
        recommend_ray(job, users=["a", "b", ""])
