"""data.history on the Spark path equals the file-based prepare's: the same history and history_rank
columns row for row, on rows with timestamp ties, users with more than L events and items outside the
vocabulary (Spark local[2]; skipped with the reason where it cannot run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.config import Config, config_from_dict
from tests import test_spark
from tests.test_spark import needs_spark

spark = test_spark.spark  # the module's local[2] session, as a fixture of this module too

L = 5


def write_events(path: Path, rows: int = 1500, seed: int = 7) -> Path:
    """Parquet events in shuffled order: ~30 events per user over 40 seconds (many ties), zipf items
    (rare ones fall outside the min_count vocabulary)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in rng.integers(0, 50, rows)]),
            "item": pa.array((rng.zipf(1.4, rows) % 300).astype(np.int64)),
            "ts": pa.array(rng.integers(0, 40, rows).astype(np.int64)),
            "rating": pa.array(rng.integers(1, 6, rows).astype(np.float64)),
        }
    )
    pq.write_table(table, path)
    return path


def history_config(src: Path, out: Path, split: str, timestamp: str | None) -> Config:
    """A `table` source with data.history; min_count 2 leaves rare items out of the vocabulary."""
    return config_from_dict(
        {
            "name": "spark-history",
            "data": {
                "source": {"kind": "table", "path": str(src), "user": "user", "item": "item",
                           "sparse": ["user", "item"], "label": "rating", "timestamp": timestamp},
                "prepared_dir": str(out),
                "label": {"mode": "threshold", "threshold": 4.0},
                "split": {"mode": split, "seed": 2},
                "min_count": 2,
                "block_size": 32,
                "chunk_rows": 400,
                "history": {"length": L},
            },
            "model": {"kind": "two_tower", "embedding_dim": 8,
                      "two_tower": {"user_features": ["user"], "item_features": ["item"],
                                    "history_pooling": "mean"}},
            "train": {"batch_size": 64, "pipeline": False},
        }
    )  # fmt: skip


@needs_spark
@pytest.mark.parametrize(
    ("split", "timestamp"),
    [("random", "ts"), pytest.param("leave_last_n", None, marks=pytest.mark.slow)],
)
def test_spark_histories_equal_file_prepare(
    split: str, timestamp: str | None, spark: Any, tmp_path: Path
) -> None:
    """Metadata, vocab files and every split's columns (history and history_rank included) are equal,
    row for row in the same order; without a timestamp column both order events by position."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare
    from recsys.data.spark_mds import prepare_dataframe

    src = write_events(tmp_path / "events.parquet")
    file_dir, spark_dir = tmp_path / "file", tmp_path / "spark"
    prepare(history_config(src, file_dir, split, timestamp), overwrite=False)
    prepare_dataframe(spark.read.parquet(str(src)), history_config(src, spark_dir, split, timestamp))

    a, b = read_metadata(file_dir), read_metadata(spark_dir)
    assert a.model_dump(exclude={"sources"}) == b.model_dump(exclude={"sources"})
    assert b.history_length == L
    for f in a.sparse_features:
        assert (file_dir / f.vocab_file).read_bytes() == (spark_dir / f.vocab_file).read_bytes(), f.name
    ranks = []
    for name in ("train", "val", "test"):
        x, y = read_split_arrays(file_dir, name, a), read_split_arrays(spark_dir, name, b)
        assert set(x) == set(y) >= {"history", "history_rank"}
        for k in x:  # train too: both paths order it by the same (window, shuffle key) rule
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}/{k}")
        ranks.append(y["history_rank"])
        lengths = np.minimum(y["history_rank"], L)
        assert not (y["history"][np.arange(L) >= lengths[:, None]]).any()  # zero beyond the length
    rank = np.concatenate(ranks)
    # The data exercises what the rule is about: truncated histories, OOV items inside histories.
    assert (rank > L).sum() > 500 and (rank == 0).sum() >= 50
    train = read_split_arrays(spark_dir, "train", b)
    assert (train["history"][:, 0][train["history_rank"] >= L] == 0).any()  # an OOV item (row 0)


@needs_spark
@pytest.mark.slow
def test_spark_empty_split_is_the_file_prepares_byte_for_byte(spark: Any, tmp_path: Path) -> None:
    """A split with no rows (val_fraction 0, histories on) is written by mds.SplitWriter on both paths:
    the same files, byte for byte."""
    from recsys.data.prepare import prepare
    from recsys.data.spark_mds import prepare_dataframe

    src = write_events(tmp_path / "events.parquet", rows=300)
    dirs = {"file": tmp_path / "file", "spark": tmp_path / "spark"}
    cfgs = {}
    for name, out in dirs.items():
        cfg = history_config(src, out, "random", "ts")
        split = cfg.data.split.model_copy(update={"val_fraction": 0.0})
        cfgs[name] = cfg.model_copy(update={"data": cfg.data.model_copy(update={"split": split})})
    prepare(cfgs["file"], overwrite=False)
    meta = prepare_dataframe(spark.read.parquet(str(src)), cfgs["spark"])
    assert meta.splits["val"].rows == 0 and meta.history_length == L
    got = {k: {p.relative_to(v): p.read_bytes() for p in (v / "val").rglob("*")} for k, v in dirs.items()}
    assert got["file"] == got["spark"] and list(got["file"]) == [Path("val/index.json")]


def test_spark_history_refuses_what_the_file_path_refuses(tmp_path: Path) -> None:
    """No user column, or sampled negatives beside histories: one line naming the field, before Spark."""
    from recsys.data.spark_history import check_history
    from recsys.errors import UserError

    cfg = history_config(tmp_path / "x.parquet", tmp_path / "out", "random", "ts")
    check_history(cfg, cfg.data.source)  # fine as it is
    no_user = cfg.data.source.model_copy(update={"user": None})
    with pytest.raises(UserError, match="data.history needs user and item columns"):
        check_history(cfg, no_user)
    negatives = cfg.data.model_copy(
        update={"negatives": cfg.data.negatives.model_copy(update={"per_positive": 2})}
    )
    with pytest.raises(UserError, match="data.negatives.per_positive"):
        check_history(cfg.model_copy(update={"data": negatives}), cfg.data.source)
