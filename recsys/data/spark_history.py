"""data.history on the Spark path: each row's previous ≤ L items, built on the executors.

The same rule as the file-based prepare (recsys.data.history), so the folders are equal: a row's history
is its user's items strictly earlier in time, ties broken by source position (an earlier row is
earlier), of the parts known to the row's part (its own and earlier ones, train < val < test: no train
row sees a val/test item), as item-vocabulary rows (out-of-vocabulary items → 0), oldest first,
left-aligned and padded with zeros to L; history_rank is the number of those earlier events
(untruncated). Rows without a timestamp column are ordered by position alone. Users are told apart by
their raw id, so users outside the user vocabulary still have their own histories; a row without a user
(null: spark_mds skips or refuses those as bad rows, the file path too) gets an empty history and is in
no one's, a row without an item is in its user's later histories as row 0.

Per part P, one Window partitioned by (raw user id, part ≤ P) and ordered by (timestamp, position)
gives both columns for P's rows: `collect_list` over rowsBetween(-L, -1) of the item row and
`row_number` - 1 (the rows of later parts sit in the other partition, out of the frame). On
leave_last_n no earlier event is in a later part, so the one all-parts Window (P = test) serves every
row and the other two are not computed. Spark sorts each user's events in its shuffle (spilling to disk
as it must); nothing per row reaches the driver. The columns
ride behind the sparse ones through the blocking (as in the file path's SplitWriter) and are split
back into the `history`/`history_rank` MDS columns by the block writer (recsys.data.mds.SplitWriter).

data.history.rule profile (a row carries its user's last L items of the parts known when its part is
scored, never itself; recsys.data.history): per user, the last L + 1 train events and the last L + 1
train-or-val events (a Window numbering them from the latest), one list each, joined back by user; a
train row filters itself out of the train list, a val row reads it, a test row the train-or-val one.
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

    from recsys.data import splits as S
    from recsys.data.history import KNOWN_PARTS

    m = cfg.data.source
    length = cfg.data.history.length
    user, item = sparse_cols.index(m.user or ""), sparse_cols.index(m.item or "")
    item_row = F.coalesce(F.col(f"_r{item}"), F.lit(0)).cast("long")
    zero = F.lit(0).cast("long")
    if cfg.data.history.rule == "profile":
        return _with_profile(mapped, f"_s{user}", item_row, length)

    def history_of(part: int) -> Column:
        """HISTORY as a row of `part` sees it: the events of KNOWN_PARTS[part] form its partition."""
        known = F.col("_split").isin(*KNOWN_PARTS[part])
        # _ts is null for every row without a timestamp column: the order is then the position alone.
        by_user = Window.partitionBy(f"_s{user}", known).orderBy("_ts", "_pos")
        earlier = F.collect_list(item_row).over(by_user.rowsBetween(-length, -1))
        padded = F.concat(earlier, F.array_repeat(zero, F.lit(length) - F.size(earlier)))
        found = F.concat(padded, F.array((F.row_number().over(by_user) - 1).cast("long")))
        # Rows without a user share the null partition: they must not see each other (the file path).
        return F.when(F.col(f"_s{user}").isNull(), F.array_repeat(zero, length + 1)).otherwise(found)

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


def _with_profile(mapped: DataFrame, user: str, item_row: Column, length: int) -> DataFrame:
    """`mapped` plus HISTORY under data.history.rule profile: per user, the last L + 1 events of train
    and of train + val (a Window numbering them from the latest, then one list per user, joined back by
    user); a train row drops itself from the train list, a val row takes it whole, a test row the
    train + val one; each keeps its last L. Per user L + 1 events at most, never a user's whole history."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from recsys.data import splits as S

    zero = F.lit(0).cast("long")
    out = mapped.withColumn("_item_row", item_row)
    for tag, known in (("t", (S.TRAIN,)), ("tv", (S.TRAIN, S.VAL))):
        events = out.where(F.col("_split").isin(*known) & F.col(user).isNotNull())
        latest_first = Window.partitionBy(user).orderBy(F.col("_ts").desc(), F.col("_pos").desc())
        last = (
            events.withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy(user)))
            .withColumn("_k", F.row_number().over(latest_first))
            .where(F.col("_k") <= length + 1)
            .groupBy(user)  # (-_k sorts oldest first)
            .agg(
                F.sort_array(F.collect_list(F.struct((-F.col("_k")).alias("k"), "_pos", "_item_row"))).alias(
                    f"_l{tag}"
                ),
                F.first("_n").alias(f"_n{tag}"),
            )
        )
        out = out.join(last, on=user, how="left")
    train, test = F.col("_split") == S.TRAIN, F.col("_split") == S.TEST
    events = F.when(train, F.filter(F.col("_lt"), lambda e: e["_pos"] != F.col("_pos")))
    events = events.when(test, F.col("_ltv")).otherwise(F.col("_lt"))
    rank = F.coalesce(F.when(test, F.col("_ntv")).otherwise(F.col("_nt")), F.lit(0)) - train.cast("long")
    rank = F.when(F.col(user).isNull(), zero).otherwise(rank).cast("long")
    items = F.transform(events, lambda e: e["_item_row"].cast("long"))
    items = F.coalesce(items, F.array().cast("array<long>"))  # no user, or no known event
    kept = F.slice(items, F.greatest(F.size(items) - length + 1, F.lit(1)), length)
    padded = F.concat(kept, F.array_repeat(zero, F.lit(length) - F.size(kept)))
    return out.withColumn(HISTORY, F.concat(padded, F.array(rank))).drop(
        "_item_row", "_lt", "_nt", "_ltv", "_ntv"
    )
