"""The Spark prepare's task counts follow the row count (recsys.data.spark_tasks): rows per task stay
bounded as the rows grow, and many small tasks still write what the file-based prepare writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from recsys.data import spark_tasks
from recsys.data.spark_tasks import ROWS_PER_TASK, blocks_tasks, tasks_for
from tests import test_spark
from tests.test_spark import assert_same_prepared, needs_spark, table_config

spark = test_spark.spark
rows_parquet = test_spark.rows_parquet


@pytest.mark.parametrize("rows", [1, 1_000_000, 3_000_000, 10_000_000, 4_400_000_000])
def test_rows_per_task_stay_bounded_as_rows_grow(rows: int) -> None:
    """A row shuffle and the block writer give each task at most ROWS_PER_TASK rows at any row count
    (a fixed partition count gave 10M / 16 = 625k rows per task)."""
    tasks = tasks_for(rows)
    assert math.ceil(rows / tasks) <= ROWS_PER_TASK
    assert tasks == 1 or rows / (tasks - 1) > ROWS_PER_TASK  # no more tasks than needed
    for block_size in (64, 256, 4096):
        blocks = math.ceil(rows / block_size)
        per_task = math.ceil(blocks / blocks_tasks(blocks, block_size))
        assert per_task * block_size <= max(ROWS_PER_TASK, block_size)
    assert tasks_for(10_000_000) == 67


@needs_spark
def test_many_small_tasks_equal_file_prepare(
    spark: Any, rows_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 300 rows per task (2,000 rows: 7 tasks per row shuffle, writers of 4 blocks) the folder
    equals the file-based prepare's, its blocks come from several writer tasks, and the session's
    settings (shuffle partitions, cached batch rows) are restored afterwards."""
    from recsys.data.prepare import prepare
    from recsys.data.spark_mds import prepare_dataframe

    monkeypatch.setattr(spark_tasks, "ROWS_PER_TASK", 300)
    keys = (spark_tasks.SHUFFLE_PARTITIONS, spark_tasks.CACHE_BATCH)
    before = [spark.conf.get(k) for k in keys]
    prepare(table_config(rows_parquet, tmp_path / "file", "random"), overwrite=False)
    prepare_dataframe(
        spark.read.parquet(str(rows_parquet)), table_config(rows_parquet, tmp_path / "spark", "random")
    )
    assert_same_prepared(tmp_path / "file", tmp_path / "spark")
    index = json.loads((tmp_path / "spark" / "train" / "index.json").read_text())
    parts = {s["raw_data"]["basename"].split("/")[0] for s in index["shards"]}
    assert len(parts) >= 4, parts
    assert [spark.conf.get(k) for k in keys] == before
