"""Spark backend on local[2]: TorchDistributor training into MLflow, and DataFrame → MDS equal to
`recsys data prepare` of the same rows. Skipped with the reason when pyspark or Java 17+ is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.config import Config, config_from_dict
from recsys.launch.spark import spark_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
UNAVAILABLE = spark_unavailable_reason()


def needs_spark(test: Any) -> Any:
    """Mark a test `spark` and skip it, saying why, where pyspark or Java 17+ is missing."""
    skip = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"Spark tier skipped: {UNAVAILABLE}")
    return pytest.mark.spark(skip(test))


@pytest.fixture(scope="module")
def spark() -> Any:
    """One local[2] session for the module (starting a JVM costs seconds)."""
    from recsys.launch.spark import get_spark

    session = get_spark(None, master="local[2]")
    # Few shuffle partitions: the data is tiny and every partition is a task on 2 cores.
    session.conf.set("spark.sql.shuffle.partitions", "4")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def rows_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Interaction rows with every awkward case: null dense values, null and rare ids, int ids,
    negative counts, timestamp ties; written once as Parquet for both converters."""
    from spark_containers import write_rows_parquet

    return write_rows_parquet(tmp_path_factory.mktemp("spark_rows") / "rows.parquet")


def table_config(parquet: Path, prepared: Path, split: str, **extra: Any) -> Config:
    """A `table` source over the Parquet file; two-tower sized for a seconds-long CPU run."""
    label = {"mode": "threshold", "threshold": 4.0} if split == "random" else {"mode": "mean"}
    data: dict[str, Any] = {
        "name": "spark-eq",
        "data": {
            "source": {
                "kind": "table",
                "path": str(parquet),
                "label": "rating",
                "dense": ["d1", "d2"],
                "sparse": ["c1"],
                "user": "user_id",
                "item": "item_id",
                "timestamp": "ts",
            },
            "prepared_dir": str(prepared),
            "label": label,
            "split": {"mode": split, "seed": 3},
            "min_count": 2,
            "block_size": 64,
        },
        "model": {"kind": "two_tower", "embedding_dim": 8, "two_tower": {"layers": [16, 8]}},
        "train": {"batch_size": 128, "epochs": 1, "log_every_steps": 5},
        "eval": {"batch_size": 128, "ks": [5, 10]},
    }
    for dotted, value in extra.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(data)


def _sorted_rows(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """A split's rows as one float64 matrix [label | dense | sparse], lexicographically sorted."""
    m = np.column_stack(
        [arrays["label"][:, None], arrays["dense"], arrays["sparse"].astype(np.float64)]
    ).astype(np.float64)
    return m[np.lexsort(m.T[::-1])] if len(m) else m


def assert_same_prepared(file_dir: Path, spark_dir: Path) -> None:
    """Same metadata (but the source record), vocab files byte for byte, and the same rows per split:
    val/test in the same order, train as the same multiset (Spark orders train by a hash)."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata

    a, b = read_metadata(file_dir), read_metadata(spark_dir)
    da, db = a.model_dump(exclude={"sources"}), b.model_dump(exclude={"sources"})
    assert da == db, f"metadata differs:\n{json.dumps(da, indent=1)}\n{json.dumps(db, indent=1)}"
    assert a.sources[0].rows == b.sources[0].rows
    for f in a.sparse_features:
        assert (file_dir / f.vocab_file).read_bytes() == (spark_dir / f.vocab_file).read_bytes(), f.name
    for split in ("train", "val", "test"):
        x, y = read_split_arrays(file_dir, split), read_split_arrays(spark_dir, split)
        assert len(x["label"]) == a.splits[split].rows
        if split != "train":
            for k in ("label", "dense", "sparse"):
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{split}/{k}")
        np.testing.assert_array_equal(_sorted_rows(x), _sorted_rows(y), err_msg=split)
    # Blocks in the merged index: all full but the last of each split (the loader relies on it).
    from recsys.data.mds import BlockReader

    for split in ("train", "val", "test"):
        sizes = [len(blk["label"]) for blk in BlockReader(spark_dir / split).iter_blocks()]
        assert len(sizes) == b.splits[split].blocks
        assert all(s == b.block_size for s in sizes[:-1]) and 0 < sizes[-1] <= b.block_size, (split, sizes)


@pytest.fixture(scope="module")
def spark_prepared(spark: Any, rows_parquet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rows prepared by Spark with the leave-last-n split (shared by the training test)."""
    from recsys.data.spark_mds import prepare_dataframe

    out = tmp_path_factory.mktemp("spark_prepared") / "leave_last_n"
    cfg = table_config(rows_parquet, out, "leave_last_n")
    prepare_dataframe(spark.read.parquet(str(rows_parquet)), cfg)
    return out


@needs_spark
@pytest.mark.parametrize("split", ["leave_last_n", "random"])
def test_dataframe_to_mds_equals_file_prepare(
    split: str, spark: Any, rows_parquet: Path, spark_prepared: Path, tmp_path: Path
) -> None:
    """Spark's conversion equals `recsys data prepare` of the same Parquet rows, split by split;
    the random case also goes through streaming's (local, remote) upload path."""
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare
    from recsys.data.spark_mds import prepare_dataframe

    file_dir = tmp_path / "file"
    prepare(table_config(rows_parquet, file_dir, split), overwrite=False)
    if split == "leave_last_n":
        assert_same_prepared(file_dir, spark_prepared)
        return
    staged, remote = tmp_path / "spark", tmp_path / "remote"
    meta = prepare_dataframe(
        spark.read.parquet(str(rows_parquet)), table_config(rows_parquet, staged, split), remote=str(remote)
    )
    assert meta.splits["val"].rows > 0 and meta.splits["test"].rows > 0
    assert_same_prepared(file_dir, staged)
    assert_same_prepared(file_dir, remote)  # the uploaded copy is complete: shards, index, vocab, metadata
    assert read_metadata(remote).splits == meta.splits
    # Partition folders written by Spark tasks, merged into one index in block order.
    index = json.loads((staged / "train" / "index.json").read_text())
    assert all("/" in s["raw_data"]["basename"] for s in index["shards"])


@needs_spark
def test_bad_row_names_the_row(spark: Any, rows_parquet: Path, tmp_path: Path) -> None:
    """An empty required column stops the conversion with `source:row N: column 'x' is empty`."""
    from recsys.data.spark_mds import prepare_dataframe
    from recsys.errors import DataError

    bad = spark.createDataFrame(
        [("u1", 1, 5.0, 1, 1.0, 1, "a"), (None, 2, 4.0, 2, 2.0, 2, "b")],
        "user_id string, item_id long, rating double, ts long, d1 double, d2 int, c1 string",
    )
    with pytest.raises(DataError, match=r"row 2: column 'user_id' is empty"):
        prepare_dataframe(bad, table_config(rows_parquet, tmp_path / "bad", "random"))
    assert not (tmp_path / "bad" / "metadata.json").exists()
    # With skip_bad_rows the row is counted and kept as an example; val/test come out empty datasets.
    cfg = table_config(rows_parquet, tmp_path / "skip", "random", data__skip_bad_rows=True)
    meta = prepare_dataframe(bad, cfg, source_name="two-rows")
    assert meta.sources[0].bad_rows.count == 1 and meta.sources[0].rows == 1
    assert meta.sources[0].bad_rows.examples == ["two-rows:row 2: column 'user_id' is empty"]
    assert (meta.splits["train"].rows, meta.splits["val"].rows, meta.splits["test"].rows) == (1, 0, 0)


@needs_spark
def test_train_under_torch_distributor(
    spark: Any, spark_prepared: Path, rows_parquet: Path, tmp_path: Path
) -> None:
    """The Spark backend of the launcher contract: job.procs_per_node=2 → TorchDistributor with 2 CPU
    processes (local mode: one torchrun on the driver) trains on Spark-written MDS to completion; the
    handle's result carries rank 0's run id, which is in MLflow with the trainer's metrics."""
    import mlflow

    from recsys.launch.contract import submit

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = table_config(
        rows_parquet,
        spark_prepared,
        "leave_last_n",
        tracking__uri=uri,
        tracking__experiment="spark-test",
        tracking__log_model=False,
        job__procs_per_node=2,
        job__name="spark-contract",
    )
    handle = submit(cfg, "spark")
    assert handle.status() == "Running"
    result = handle.wait(900)
    assert (result.backend, result.job_name, result.state, result.reason) == (
        "spark",
        "spark-contract",
        "Succeeded",
        "",
    ), result
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.prepared_dir"] == str(spark_prepared)
    assert run.data.params["job.procs_per_node"] == "2"
    assert any(k.startswith("test/") for k in run.data.metrics), sorted(run.data.metrics)
    assert "train/loss" in run.data.metrics


@needs_spark
def test_spark_failure_reason_is_a_value(spark: Any, rows_parquet: Path, tmp_path: Path) -> None:
    """A rank's failure comes back as the result's reason (the ranks' result files on the driver)."""
    from recsys.launch.contract import submit

    missing = tmp_path / "not-prepared"
    cfg = table_config(rows_parquet, missing, "leave_last_n", tracking__uri=f"sqlite:///{tmp_path / 'm.db'}")
    result = submit(cfg, "spark").wait(600)
    assert result.state == "Failed" and result.run_id is None
    assert str(missing) in result.reason and "\n" not in result.reason.strip(), result.reason


@needs_spark
def test_executor_mode_on_one_host_is_refused(spark: Any, spark_prepared: Path, rows_parquet: Path) -> None:
    """local_mode=False on local[2] would put two torchrun nodes on one host, which the MDS loader
    cannot share (seen: FileExistsError on its shared memory): refused in one line, before training."""
    from recsys.errors import UserError
    from recsys.launch.spark import run_on_spark

    cfg = table_config(rows_parquet, spark_prepared, "leave_last_n")
    with pytest.raises(UserError, match="--local-mode"):
        run_on_spark(cfg, num_processes=2, local_mode=False, spark=spark)


def test_backend_spark_without_pyspark_says_how_to_install(tmp_path: Path) -> None:
    """With pyspark unimportable, `recsys launch --backend spark` fails in one line naming the fix."""
    code = (
        "import sys; sys.modules['pyspark'] = None\n"
        "from recsys.cli import main\n"
        "sys.exit(main(['launch', '--backend', 'spark', '--config', 'two_tower_synth']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, env=os.environ
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "pyspark" in lines[0], proc.stderr


@needs_spark
def test_cli_prepare_with_spark_equals_file_prepare(
    spark: Any, rows_parquet: Path, spark_prepared: Path, tmp_path: Path
) -> None:
    """`recsys data prepare --spark` (in this process, so it reuses the active session) writes what the
    Python API writes."""
    from recsys.cli import main
    from recsys.config import dump_config

    out = tmp_path / "cli"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_config(table_config(rows_parquet, out, "leave_last_n")))
    assert main(["data", "prepare", "--config", str(cfg_path), "--spark"]) == 0
    assert_same_prepared(spark_prepared, out)
    # A second run refuses to overwrite, in one line, exit status 2.
    assert main(["data", "prepare", "--config", str(cfg_path), "--spark"]) == 2


def _ctr_config(parquet: Path, prepared: Path, sparse: list[str], **data: Any) -> Config:
    """A CTR `table` source (label, one dense, the given sparse columns), random split."""
    return config_from_dict(
        {
            "name": "spark-rule",
            "data": {
                "source": {
                    "kind": "table",
                    "path": str(parquet),
                    "label": "label",
                    "dense": ["d"],
                    "sparse": sparse,
                },
                "prepared_dir": str(prepared),
                "label": {"mode": "as_is"},
                "split": {"mode": "random", "val_fraction": 0.1, "test_fraction": 0.1, "seed": 5},
                **data,
            },
            "model": {"kind": "dlrm", "embedding_dim": 64},
        }
    )


def _ctr_parquet(path: Path, n: int, seed: int) -> Path:
    """n rows: label, dense d, `pid` a unique id per row (16 hex digits of a hash of the position: as
    incompressible as real ids, so a collect of them cannot hide under compression), `c` with 50 ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.data.splits import mix64

    rng = np.random.default_rng(seed)
    pq.write_table(
        pa.table(
            {
                "label": pa.array((rng.random(n) < 0.3).astype(np.int32)),
                "d": pa.array(rng.integers(0, 100, n)),
                "pid": pa.array([f"{h:016x}" for h in mix64(99, np.arange(n)).tolist()]),
                "c": pa.array([f"c{v}" for v in rng.integers(0, 50, n)]),
            }
        ),
        path,
        row_group_size=max(1, n // 7),
    )
    return path


@needs_spark
def test_split_and_train_order_follow_the_shared_row_rule(spark: Any, tmp_path: Path) -> None:
    """Each row's split is splits.random_split_at(position); val/test keep source order; train is
    ordered by (position // data.shuffle_window, splits.shuffle_keys(seed, position)) — the rule every
    prepare path shares. A unique id per row (its position) lets the output be traced back to the input."""
    import pyarrow.parquet as pq

    from recsys.data import splits as S
    from recsys.data.loader import read_split_arrays
    from recsys.data.readers import log1p_dense
    from recsys.data.spark_mds import prepare_dataframe
    from recsys.data.vocab import Vocab

    n, window = 1500, 100
    parquet = _ctr_parquet(tmp_path / "rows.parquet", n, seed=2)
    out = tmp_path / "out"
    cfg = _ctr_config(parquet, out, ["pid", "c"], block_size=32, shuffle_window=window)
    meta = prepare_dataframe(spark.read.parquet(str(parquet)), cfg)
    pos = np.arange(n)
    want_split = S.random_split_at(pos, 0.1, 0.1, 5)
    # pid only counts on train: val/test ids are out of vocabulary, so trace them by their split rank.
    vocab = Vocab.load(out / meta.sparse_features[0].vocab_file)
    train = read_split_arrays(out, "train")
    pos_of = {f"{h:016x}": i for i, h in enumerate(S.mix64(99, pos).tolist())}
    got = np.array([pos_of[vocab.raw(int(r))] for r in train["sparse"][:, 0]])
    mine = pos[want_split == S.TRAIN]
    order = np.lexsort((S.shuffle_keys(5, mine), mine // window))
    np.testing.assert_array_equal(got, mine[order])
    # val/test: the rows where the rule says, in source order (label and dense value row by row).
    source = pq.read_table(parquet)
    for name, code in (("val", S.VAL), ("test", S.TEST)):
        keep = pos[want_split == code]
        assert meta.splits[name].rows == len(keep) > 0
        rows = read_split_arrays(out, name)
        np.testing.assert_array_equal(
            rows["label"], source.column("label").to_numpy()[keep].astype(np.float32)
        )
        dense = log1p_dense(source.column("d").to_numpy()[keep].astype(np.float64)[:, None])
        np.testing.assert_array_equal(rows["dense"], dense, err_msg=name)


@needs_spark
@pytest.mark.slow
def test_driver_collects_nothing_that_grows_with_rows(tmp_path: Path) -> None:
    """The prepare as a Spark program under a capped driver: 512m heap and spark.driver.maxResultSize
    1m (Spark's least), so any collect of per-row data (300k rows) or of a whole vocabulary (~240k ids of `pid`) fails
    the job. Broadcasts also pass through the driver: they stay below autoBroadcastJoinThreshold (a
    setting, here 1m) and spark_mds.BROADCAST_VOCAB. It must finish and write what the file-based
    prepare writes for the same rows."""
    from recsys.config import dump_config
    from recsys.data.prepare import prepare

    n = 300_000
    parquet = _ctr_parquet(tmp_path / "rows.parquet", n, seed=3)
    cfg = _ctr_config(parquet, tmp_path / "spark", ["pid", "c"], block_size=256)
    (tmp_path / "cfg.yaml").write_text(dump_config(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env["PYSPARK_SUBMIT_ARGS"] = (
        "--master local[2] --driver-memory 512m --conf spark.driver.maxResultSize=1m "
        "--conf spark.sql.autoBroadcastJoinThreshold=1m --conf spark.sql.shuffle.partitions=8 "
        "--conf spark.ui.enabled=false pyspark-shell"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "recsys.data.spark_mds", "--config", str(tmp_path / "cfg.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    errors = [ln for ln in proc.stderr.splitlines() if "Exception" in ln or "Error" in ln]
    assert proc.returncode == 0, "\n".join(errors[:10]) or proc.stderr[-3000:]
    prepare(_ctr_config(parquet, tmp_path / "file", ["pid", "c"], block_size=256), overwrite=False)
    assert_same_prepared(tmp_path / "file", tmp_path / "spark")
