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
    """Same metadata (but the source record), vocab files byte for byte, and the same rows per split."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata

    a, b = read_metadata(file_dir), read_metadata(spark_dir)
    assert a.model_dump(exclude={"sources"}) == b.model_dump(exclude={"sources"})
    assert a.sources[0].rows == b.sources[0].rows
    for f in a.sparse_features:
        assert (file_dir / f.vocab_file).read_bytes() == (spark_dir / f.vocab_file).read_bytes(), f.name
    for split in ("train", "val", "test"):
        x, y = read_split_arrays(file_dir, split), read_split_arrays(spark_dir, split)
        np.testing.assert_array_equal(_sorted_rows(x), _sorted_rows(y), err_msg=split)


@pytest.mark.slow
@needs_spark
def test_spark_window_equals_file_window(spark: Any, rows_parquet: Path, tmp_path: Path) -> None:
    """A window [250, 450) growing an earlier window's vocabularies: Spark's folder equals the
    file-based prepare's, and its vocab files extend the earlier ones."""
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare
    from recsys.data.spark_mds import prepare_dataframe

    w1 = tmp_path / "w1"
    prepare(table_config(rows_parquet, w1, "random", data__window={"until": 250}), overwrite=False)
    window = {"since": 250, "until": 450, "previous": str(w1)}
    for how in ("file", "spark"):
        cfg = table_config(rows_parquet, tmp_path / how, "random", data__window=window)
        if how == "file":
            prepare(cfg, overwrite=False)
        else:
            prepare_dataframe(spark.read.parquet(str(rows_parquet)), cfg)
    assert_same_window(tmp_path / "file", tmp_path / "spark")
    meta = read_metadata(tmp_path / "spark")
    assert meta.window is not None and meta.window.rows_added["item_id"] > 0 and meta.window.rows_after > 0
    assert meta.lineage[0].path == str(w1) and meta.window.previous == meta.lineage[0]
    for f in meta.sparse_features:
        assert (tmp_path / "spark" / f.vocab_file).read_bytes().startswith((w1 / f.vocab_file).read_bytes())


@pytest.mark.slow
@needs_spark
def test_spark_empty_window_is_a_clear_error(spark: Any, rows_parquet: Path, tmp_path: Path) -> None:
    from recsys.data.spark_mds import prepare_dataframe
    from recsys.errors import UserError

    cfg = table_config(rows_parquet, tmp_path / "out", "random", data__window={"since": 10_000})
    with pytest.raises(UserError, match=r"data.window: no rows in \[1970-01-01T02:46:40\+00:00, end\)"):
        prepare_dataframe(spark.read.parquet(str(rows_parquet)), cfg)
