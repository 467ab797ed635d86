"""data.history on the Spark path: each row's previous ≤ L items, built on the executors.

The same rule as the file-based prepare (recsys.data.history), so the folders are equal: a row's history
is its user's items strictly earlier in time, ties broken by source position (an earlier row is
earlier), as item-vocabulary rows (out-of-vocabulary items → 0), oldest first, left-aligned and padded
with zeros to L; history_rank is the number of the user's earlier events (untruncated). Rows without a
timestamp column are ordered by position alone. Users are told apart by their raw id, so users outside
the user vocabulary still have their own histories.

One Window partitioned by the raw user id and ordered by (timestamp, position) gives both columns:
`collect_list` over rowsBetween(-L, -1) of the item row and `row_number` - 1. Spark sorts each user's
events in its shuffle (spilling to disk as it must); nothing per row reaches the driver. The columns
ride behind the sparse ones through the blocking (as in the file path's SplitWriter) and are split
back into the `history`/`history_rank` MDS columns by the block writer (recsys.data.mds.SplitWriter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

    from recsys.config import Config, TableSource

HISTORY = "_hist"  # array<long> [L + 1]: the history, then its rank (appended to the row's sparse array)


def check_history(cfg: Config, m: TableSource) -> None:
    """Refuse history settings the Spark path cannot follow, before any Spark job."""
    if cfg.data.history is None:
        return
    if m.user is None or m.item is None:
        raise UserError("data.history needs user and item columns (data.source.user / data.source.item)")
    if cfg.data.negatives.per_positive:
        raise UserError(
            "data.history: sampled negatives (data.negatives.per_positive) are not interactions and "
            "would enter histories; prepare histories without negatives"
        )


def with_history(mapped: DataFrame, cfg: Config, sparse_cols: list[str]) -> DataFrame:
    """`mapped` (spark_mds's frame: raw ids `_s{j}`, vocabulary rows `_r{j}`, `_ts`, `_pos`) plus the
    HISTORY column when data.history is set; unchanged otherwise."""
    if cfg.data.history is None:
        return mapped
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    m = cfg.data.source
    length = cfg.data.history.length
    user, item = sparse_cols.index(m.user or ""), sparse_cols.index(m.item or "")
    # _ts is null for every row without a timestamp column: the order is then the position alone.
    by_user = Window.partitionBy(f"_s{user}").orderBy("_ts", "_pos")
    item_row = F.coalesce(F.col(f"_r{item}"), F.lit(0)).cast("long")
    earlier = F.collect_list(item_row).over(by_user.rowsBetween(-length, -1))
    padded = F.concat(earlier, F.array_repeat(F.lit(0).cast("long"), F.lit(length) - F.size(earlier)))
    rank = (F.row_number().over(by_user) - 1).cast("long")
    return mapped.withColumn(HISTORY, F.concat(padded, F.array(rank)))


def sparse_with_history(sparse: Column, cfg: Config) -> Column:
    """The row's sparse array followed by its HISTORY values when data.history is set."""
    if cfg.data.history is None:
        return sparse
    from pyspark.sql import functions as F

    return F.concat(sparse, F.col(HISTORY))
