"""Windows of data on the Spark path: the same window and the same grown vocabularies as
`recsys data prepare` of the same rows (Spark local[2]; skipped with the reason where it cannot run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import test_spark
from tests.test_spark import _sorted_rows, needs_spark, table_config

# The Spark session and the Parquet rows of test_spark, as fixtures of this module too.
spark = test_spark.spark
rows_parquet = test_spark.rows_parquet


def assert_same_window(file_dir: Path, spark_dir: Path) -> None:
    """Same metadata but where the folders are (sources, previous folder, lineage), vocab files byte for
    byte, and the same rows per split."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata

    a, b = read_metadata(file_dir), read_metadata(spark_dir)
    where = {"sources": True, "lineage": True, "window": {"previous"}}
    assert a.model_dump(exclude=where) == b.model_dump(exclude=where)
    assert a.sources[0].rows == b.sources[0].rows
    for f in a.sparse_features:
        assert (file_dir / f.vocab_file).read_bytes() == (spark_dir / f.vocab_file).read_bytes(), f.name
    for split in ("train", "val", "test"):
        x, y = read_split_arrays(file_dir, split), read_split_arrays(spark_dir, split)
        np.testing.assert_array_equal(_sorted_rows(x), _sorted_rows(y), err_msg=split)


@pytest.mark.slow
@needs_spark
def test_spark_windows_equal_file_windows(spark: Any, rows_parquet: Path, tmp_path: Path) -> None:
    """Two consecutive windows of the same rows, the second growing the first's vocabularies: Spark's
    folders equal the file-based prepare's, and the second's vocab files extend the first's."""
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare
    from recsys.data.spark_mds import prepare_dataframe

    df = spark.read.parquet(str(rows_parquet))
    for how in ("file", "spark"):
        first, second = tmp_path / how / "w1", tmp_path / how / "w2"
        cfgs = [
            table_config(rows_parquet, first, "random", data__window={"until": 250}),
            table_config(rows_parquet, second, "random", data__window={"since": 250, "previous": str(first)}),
        ]
        for cfg in cfgs:
            prepare(cfg, overwrite=False) if how == "file" else prepare_dataframe(df, cfg)
    for w in ("w1", "w2"):
        assert_same_window(tmp_path / "file" / w, tmp_path / "spark" / w)
    w1, w2 = tmp_path / "spark" / "w1", tmp_path / "spark" / "w2"
    meta = read_metadata(w2)
    assert meta.window is not None and meta.window.rows_added["item_id"] > 0
    assert meta.lineage[0].path == str(w1)
    for f in meta.sparse_features:
        assert (w2 / f.vocab_file).read_bytes().startswith((w1 / f.vocab_file).read_bytes()), f.name


@pytest.mark.slow
@needs_spark
def test_spark_empty_window_is_a_clear_error(spark: Any, rows_parquet: Path, tmp_path: Path) -> None:
    from recsys.data.spark_mds import prepare_dataframe
    from recsys.errors import UserError

    cfg = table_config(rows_parquet, tmp_path / "out", "random", data__window={"since": 10_000})
    with pytest.raises(UserError, match=r"data.window: no rows in \[1970-01-01T02:46:40\+00:00, end\)"):
        prepare_dataframe(spark.read.parquet(str(rows_parquet)), cfg)
