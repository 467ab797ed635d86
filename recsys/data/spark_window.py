"""Windows of data on the Spark path (recsys.data.spark_mds): the same rules as recsys.data.window and
recsys.data.lineage, run on the executors.

The window is one filter on the rows' timestamps and one aggregation of what it kept and left out.
Growing an earlier folder's vocabularies reads its vocab files as DataFrames (line k = row k, numbered
by the same per-partition counts as the rows), drops the ids it already holds from this window's kept
ids, and numbers the rest after them: a new id's row is the previous size plus its rank in (count
desc, id bytes). Nothing that grows with the rows or the vocabularies reaches the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from recsys.data.lineage import Previous
from recsys.data.window import WindowFilter

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from recsys.config import Config


def filter_window(
    staged: DataFrame, cfg: Config, has_time: bool, rows: int
) -> tuple[DataFrame, WindowFilter]:
    """The rows of `staged` (column `_ts`: seconds) inside data.window, and the filter with its counts
    filled in (an empty window raises here, as in the file-based prepare); `rows` = rows of `staged`."""
    from pyspark.sql import functions as F

    window = WindowFilter(cfg)
    if not window.active:
        window.counts.kept = rows
        return staged, window
    if not has_time:
        raise window.no_timestamp()
    ts = F.col("_ts")
    known = ts.isNotNull() & ~F.isnan(ts)
    early = known & (ts < F.lit(window.since)) if window.since is not None else F.lit(False)
    late = known & (ts >= F.lit(window.until)) if window.until is not None else F.lit(False)
    keep = known & ~early & ~late
    c = staged.agg(
        F.sum(keep.cast("long")).alias("kept"),
        F.sum(early.cast("long")).alias("before"),
        F.sum(late.cast("long")).alias("after"),
        F.sum((~known).cast("long")).alias("no_time"),
        F.min(F.when(known, ts)).alias("first"),
        F.max(F.when(known, ts)).alias("last"),
    ).first()
    counts = window.counts
    counts.kept, counts.before, counts.after, counts.no_time = (
        int(c[k] or 0) for k in ("kept", "before", "after", "no_time")
    )
    counts.first, counts.last = c["first"], c["last"]
    window.check_not_empty()
    return staged.filter(keep), window


def previous_vocabularies(
    spark: SparkSession, previous: Previous, names: list[str], numbered: Callable[[DataFrame], DataFrame]
) -> tuple[DataFrame, dict[int, int]]:
    """The previous folder's vocabularies as (j, id, row) rows (row >= 1) and their sizes per feature j,
    read from its vocab files on the executors; `numbered(df)` adds `_pos` in file order."""
    from pyspark.sql import functions as F

    parts, sizes = [], {}
    for j, name in enumerate(names):
        feature = next(f for f in previous.meta.sparse_features if f.name == name)
        lines = numbered(spark.read.text(str(previous.path / feature.vocab_file)))
        parts.append(
            lines.filter(F.col("_pos") > 0).select(
                F.lit(j).alias("j"), F.col("value").alias("id"), F.col("_pos").cast("long").alias("row")
            )
        )
        sizes[j] = feature.num_embeddings - 1
    out = parts[0]
    for part in parts[1:]:
        out = out.unionByName(part)
    return out, sizes


def size_of(sizes: dict[int, int], j: Column) -> Column:
    """The previous size of feature `j` (a literal map; 0 for a feature it had no rows of)."""
    from pyspark.sql import functions as F

    pairs = [x for k, v in sorted(sizes.items()) for x in (F.lit(k), F.lit(v))]
    return F.coalesce(F.element_at(F.create_map(*pairs), j), F.lit(0)) if pairs else F.lit(0)
