"""data.history on the Spark path: each row's previous ≤ L items, built on the executors.

The same rule as the file-based prepare (recsys.data.history), so the folders are equal: a row's history
is its user's items strictly earlier in time, ties broken by source position (an earlier row is
earlier), of the parts known to the row's part (its own and earlier ones, train < val < test: no train
row sees a val/test item), as item-vocabulary rows (out-of-vocabulary items → 0), oldest first,
left-aligned and padded with zeros to L; history_rank is the number of those earlier events
(untruncated). Rows without a timestamp column are ordered by position alone. Users are told apart by
their raw id, so users outside the user vocabulary still have their own histories.

Per part P, one Window partitioned by (raw user id, part ≤ P) and ordered by (timestamp, position)
gives both columns for P's rows: `collect_list` over rowsBetween(-L, -1) of the item row and
`row_number` - 1 (the rows of later parts sit in the other partition, out of the frame). On
leave_last_n no earlier event is in a later part, so the one all-parts Window (P = test) serves every
row and the other two are not computed. Spark sorts each user's events in its shuffle (spilling to disk
as it must); nothing per row reaches the driver. The columns
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
    if cfg.data.history.rule != "causal":
        raise UserError(
            "data.history.rule profile is built by the local prepare only (recsys.data.history); the Spark "
            "path builds data.history.rule causal: prepare without --spark, or use the causal rule"
        )


def with_history(mapped: DataFrame, cfg: Config, sparse_cols: list[str]) -> DataFrame:
    """`mapped` (spark_mds's frame: raw ids `_s{j}`, vocabulary rows `_r{j}`, `_ts`, `_pos`) plus the
    HISTORY column when data.history is set; unchanged otherwise."""
    if cfg.data.history is None:
        return mapped
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from recsys.data import splits as S
    from recsys.data.history import KNOWN_PARTS

    m = cfg.data.source
    length = cfg.data.history.length
    user, item = sparse_cols.index(m.user or ""), sparse_cols.index(m.item or "")
    item_row = F.coalesce(F.col(f"_r{item}"), F.lit(0)).cast("long")
    zero = F.lit(0).cast("long")

    def history_of(part: int) -> Column:
        """HISTORY as a row of `part` sees it: the events of KNOWN_PARTS[part] form its partition."""
        known = F.col("_split").isin(*KNOWN_PARTS[part])
        # _ts is null for every row without a timestamp column: the order is then the position alone.
        by_user = Window.partitionBy(f"_s{user}", known).orderBy("_ts", "_pos")
        earlier = F.collect_list(item_row).over(by_user.rowsBetween(-length, -1))
        padded = F.concat(earlier, F.array_repeat(zero, F.lit(length) - F.size(earlier)))
        return F.concat(padded, F.array((F.row_number().over(by_user) - 1).cast("long")))

    if cfg.data.split.mode == "leave_last_n":  # parts follow time per user: every part's frame is the same
        return mapped.withColumn(HISTORY, history_of(S.TEST))
    by_part = F.when(F.col("_split") == S.TRAIN, history_of(S.TRAIN))
    by_part = by_part.when(F.col("_split") == S.VAL, history_of(S.VAL)).otherwise(history_of(S.TEST))
    return mapped.withColumn(HISTORY, by_part)


def sparse_with_history(sparse: Column, cfg: Config) -> Column:
    """The row's sparse array followed by its HISTORY values when data.history is set."""
    if cfg.data.history is None:
        return sparse
    from pyspark.sql import functions as F

    return F.concat(sparse, F.col(HISTORY))
