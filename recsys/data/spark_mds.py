"""Spark DataFrame → prepared MDS folder, equal to what `recsys data prepare` writes for the same rows.

Same layout (recsys.data.metadata): vocab/<feature>.txt, train/ val/ test/ MDS block datasets,
metadata.json last. Same rules, shared with the file-based path where they are functions:
labels (data.label), splits (data.split: random decided per row by `splits.random_split_at` from
(seed, position), leave_last_n by the same rule as `splits.leave_last_n`), vocabularies fit on train
(count ≥ min_count, rows ordered by descending count then id bytes, as `vocab.fit_encoded`), dense
log1p (`readers.log1p_dense`), MDS columns and blocks (`metadata.MDS_COLUMNS`; all blocks full but the
last of a split).

Everything that grows with the rows runs on the executors: reading, row positions, bad-row checks,
the split (a pandas UDF of the position), leave-last-n windows, label statistics, vocabulary counting
(one groupBy over all features) and numbering (one global sort, then a position in that order),
id → row mapping (joins), histories (data.history: one Window per user, recsys.data.spark_history),
ordering rows (one global sort), and writing: one range shuffle on
(split, block) puts each block whole in one partition and `recsys.data.spark_blocks` runs an MDSWriter
per partition (out/<split>/<partition>/, blocks cut from Arrow batches with numpy), then merges their
index.json into out/<split>/index.json, in block order. The driver only collects what grows with partitions or features (rows per partition,
ids per feature, rows per split), streams the vocab files partition by partition
(`toLocalIterator`), and writes metadata.json: its memory does not depend on the row count.

Row order: "source order" is the DataFrame's order (one Parquet file read by Spark keeps its row
order). val/test keep it. train is ordered by (position // data.shuffle_window,
`splits.shuffle_keys`(split.seed, position)): shuffled within windows of source rows, the rule every
prepare path shares.

Where it writes: `data.prepared_dir` is a local path as seen by the driver *and* the executors. On
Databricks, Unity Catalog Volumes (/Volumes/<catalog>/<schema>/<volume>/…) are FUSE-mounted on every
node, so they are written as local paths (streaming logs that it treats them as local; that is
intended). For object stores (s3://, gs://, dbfs:/Volumes/… through the Databricks SDK) pass
`remote=`: each executor stages its shards under prepared_dir and streaming uploads them, then the
merged index, vocab files and metadata.json are uploaded too. The trainer reads local/FUSE paths.

Run as a program (the entry of the Spark Operator's SparkApplication, or `spark-submit`):
`python -m recsys.data.spark_mds --config CONFIG [--overwrite] [--remote URI]`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.data import splits as S
from recsys.data.metadata import (
    SPLITS,
    BadRows,
    Metadata,
    SourceFile,
    SparseFeature,
    SplitInfo,
    data_settings,
    write_metadata,
)
from recsys.data.spark_history import check_history, sparse_with_history, with_history
from recsys.data.spark_tasks import blocks_tasks, shuffle_partitions_for, tasks_for
from recsys.data.spark_window import filter_window, previous_vocabularies, size_of
from recsys.errors import DataError, UserError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from recsys.config import Config, TableSource

_POS, _SPLIT, _LABEL, _DENSE, _SPARSE = "_pos", "_split", "_label", "_dense", "_sparse"
_LOW33 = (1 << 33) - 1  # monotonically_increasing_id: partition index << 33 | record number
MAX_BAD_EXAMPLES = 5
BROADCAST_VOCAB = 100_000  # vocabularies up to this many ids are broadcast to the id → row joins
# Frames with a row per input row are kept on disk: in memory they would crowd out what is not under
# Spark's memory manager (broadcast vocabularies are built on the driver; in local mode the tasks share the
# driver's heap too), and a 1g local[2] driver ran out of memory building broadcasts beside them.
ROWS_STORAGE = "DISK_ONLY"  # a pyspark.StorageLevel name (pyspark is imported lazily)
# Vocabulary ids the driver holds at a time while writing vocab files (one fetched partition): a fixed
# partition count, which adaptive execution does not coalesce into bigger fetches.
VOCAB_IDS_PER_FETCH = 20_000


def source_columns(cfg: Config) -> TableSource:
    """The column mapping of a DataFrame source: data.source must be kind `table`."""
    src = cfg.data.source
    if src.kind != "table":
        raise UserError(
            f"data.source.kind is {src.kind!r}: the Spark converter reads a DataFrame through the "
            "`table` mapping (label, dense, sparse, user, item, timestamp); set data.source.kind: table"
        )
    return src


def read_source_dataframe(spark: SparkSession, cfg: Config) -> DataFrame:
    """data.source.path read by Spark: Parquet (file or folder), CSV with a header, or a table name
    (`catalog.schema.table`, e.g. a Delta table in Unity Catalog)."""
    path = source_columns(cfg).path
    lower = path.lower().rstrip("/")
    if lower.endswith((".parquet", ".pq")) or (Path(path).is_dir() and any(Path(path).glob("*.parquet"))):
        return spark.read.parquet(path)
    if lower.endswith(".csv"):
        # Strings, as the file-based reader keeps ids' exact text; numbers are cast below.
        return spark.read.option("header", True).option("inferSchema", False).csv(path)
    if "/" not in path and path.count(".") in (1, 2):
        return spark.table(path)
    raise UserError(f"data.source.path {path!r}: not a .parquet/.csv path or a catalog.schema.table name")


# -------------------------------------------------------------------------------------- helpers
def _with_positions(df: DataFrame, cached: list[DataFrame]) -> DataFrame:
    """df plus _pos: 0..n-1 in the DataFrame's order (partition order, then row order within); the
    persisted frame it numbers is added to `cached` for the caller to release."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    tagged = df.withColumn("_mid", F.monotonically_increasing_id()).persist(
        getattr(StorageLevel, ROWS_STORAGE)
    )
    cached.append(tagged)
    counts = tagged.groupBy(F.shiftright("_mid", 33).alias("p")).count().orderBy("p").collect()
    offsets, total = [], 0
    for row in counts:
        offsets += [F.lit(int(row["p"])), F.lit(total)]
        total += int(row["count"])
    offset = F.element_at(F.create_map(*offsets), F.shiftright("_mid", 33)) if offsets else F.lit(0)
    return tagged.withColumn(_POS, (offset + F.col("_mid").bitwiseAND(F.lit(_LOW33))).cast("long")).drop(
        "_mid"
    )


def _numeric(df: DataFrame, name: str, role: str) -> tuple[Column, Column]:
    """(value as double, True where a non-null value failed to parse) for a numeric-role column."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, NumericType, StringType

    typ = df.schema[name].dataType
    col = F.col(name)
    if isinstance(typ, NumericType | BooleanType):
        return col.cast("double"), F.lit(False)
    if isinstance(typ, StringType):
        value = F.trim(col).try_cast("double")
        return value, col.isNotNull() & (F.trim(col) != "") & value.isNull()
    raise UserError(f"column {name!r} ({role}) has Spark type {typ.simpleString()}; expected a number")


def _id_text(df: DataFrame, name: str) -> Column:
    """A sparse column as the id text the file-based reader sees (pyarrow's cast to string)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, IntegralType, StringType

    typ = df.schema[name].dataType
    if isinstance(typ, StringType):
        return F.col(name)
    if isinstance(typ, IntegralType | BooleanType):
        return F.col(name).cast("string")
    # Floats and decimals print differently in Spark and pyarrow (1.0 vs 1): ids must be exact text.
    raise UserError(
        f"sparse column {name!r} has Spark type {typ.simpleString()}; cast it to string or an integer type "
        "first (ids are compared as exact text)"
    )


def _timestamp(df: DataFrame, name: str) -> tuple[Column, Column]:
    """(seconds as double, True where unparsable): numbers as they are, timestamps and ISO strings → s."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DateType, NumericType, StringType, TimestampNTZType, TimestampType

    typ = df.schema[name].dataType
    col = F.col(name)
    if isinstance(typ, NumericType):
        return col.cast("double"), F.lit(False)
    if isinstance(typ, TimestampType | TimestampNTZType | DateType):
        return F.floor(F.unix_micros(col.cast("timestamp")) / 1_000_000).cast("double"), F.lit(False)
    if isinstance(typ, StringType):
        value = F.coalesce(
            F.trim(col).try_cast("double"),
            F.floor(F.unix_micros(F.try_to_timestamp(F.trim(col))) / 1_000_000).cast("double"),
        )
        return value, col.isNotNull() & value.isNull()
    raise UserError(
        f"timestamp column {name!r} has Spark type {typ.simpleString()}; expected numbers or times"
    )


def _random_split_column(pos: Column, val_fraction: float, test_fraction: float, seed: int) -> Column:
    """The seeded random split of every row (int8), decided on the executors from its position alone
    by `splits.random_split_at`: the same rule as the file-based prepare, nothing sent per row."""
    import pandas as pd
    from pyspark.sql import functions as F

    S.random_split_at(np.zeros(0, np.int64), val_fraction, test_fraction, seed)  # bad fractions: say so here

    def split_of(p: pd.Series) -> pd.Series:
        return pd.Series(S.random_split_at(p.to_numpy(), val_fraction, test_fraction, seed), dtype="int8")

    # Real classes, not the postponed strings of this module: pandas_udf reads the hints.
    split_of.__annotations__ = {"p": pd.Series, "return": pd.Series}
    return F.pandas_udf(split_of, "byte")(pos)


def signed_order(keys: np.ndarray) -> np.ndarray:
    """uint64 keys as int64 that sort the same way (Spark has no unsigned long): flip the top bit."""
    return (np.asarray(keys, dtype=np.uint64) ^ np.uint64(1 << 63)).view(np.int64)


def _shuffle_key_column(pos: Column, seed: int) -> Column:
    """`splits.shuffle_keys`(seed, position) as a Spark long that sorts like the uint64 key."""
    import pandas as pd
    from pyspark.sql import functions as F

    def key_of(p: pd.Series) -> pd.Series:
        return pd.Series(signed_order(S.shuffle_keys(seed, p.to_numpy())))

    key_of.__annotations__ = {"p": pd.Series, "return": pd.Series}
    return F.pandas_udf(key_of, "long")(pos)


def _offsets(sizes: dict[int, int], keys: list[int], col: Column) -> Column:
    """The first global index of `col`'s group, from the group sizes in `keys` order (a literal map)."""
    from pyspark.sql import functions as F

    pairs, total = [], 0
    for k in keys:
        pairs += [F.lit(k), F.lit(total)]
        total += sizes.get(k, 0)
    return F.element_at(F.create_map(*pairs), col) if pairs else F.lit(0)


def _ranked(
    rows: DataFrame, counts: dict[int, int], block_size: int, seed: int, window: int, cached: list[DataFrame]
) -> DataFrame:
    """Rows of all splits with their index in the split's order (_idx) and block (_block = _idx //
    block_size). One global sort orders train by (position // window, shuffle key) and val/test by
    position; a row's index in its split is its position in that order minus the split's offset."""
    from pyspark.sql import functions as F

    src = F.col("_src")
    train = F.col(_SPLIT) == S.TRAIN
    by_order = (
        rows.withColumnRenamed(_POS, "_src")
        .withColumn("_win", F.when(train, F.expr(f"_src div {int(window)}")).otherwise(F.lit(0)).cast("long"))
        .withColumn("_key", F.when(train, _shuffle_key_column(src, seed)).otherwise(src))
    )
    # _pos: index in that order. A range shuffle into tasks of ~ROWS_PER_TASK rows (orderBy would use
    # spark.sql.shuffle.partitions: rows per task growing with the rows).
    order = [_SPLIT, "_win", "_key", "_src"]
    tasks = tasks_for(sum(counts.values()))
    ranked = _with_positions(by_order.repartitionByRange(tasks, *order).sortWithinPartitions(*order), cached)
    idx = (F.col(_POS) - _offsets(counts, [S.TRAIN, S.VAL, S.TEST], F.col(_SPLIT))).cast("long")
    return ranked.select(
        _SPLIT,
        idx.alias("_idx"),
        F.floor(idx / block_size).cast("long").alias("_block"),
        _LABEL,
        _DENSE,
        _SPARSE,
    )


def _vocabularies(
    split_df: DataFrame,
    features: int,
    min_count: int,
    cached: list[DataFrame],
    previous: tuple[DataFrame, dict[int, int]] | None = None,
) -> tuple[DataFrame, dict[int, int]]:
    """Vocabularies fit on train, numbered on the executors: (j, id, count, row) with row 1.. in the
    order of `vocab.fit_encoded` (count desc, then id bytes), and the kept ids per feature. With
    `previous` ((j, id, row) of an earlier window and its sizes, recsys.data.spark_window) its ids keep
    their rows and the new ones are numbered after them.

    One groupBy counts (feature, id) pairs; one global sort by (feature, count desc, id) and a
    position in that order (`_with_positions`: a count per partition reaches the driver) number them."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    pairs = (
        split_df.filter(F.col(_SPLIT) == S.TRAIN)
        .select(
            F.explode(
                F.array(
                    *[F.struct(F.lit(j).alias("j"), F.col(f"_s{j}").alias("id")) for j in range(features)]
                )
            ).alias("p")
        )
        .select("p.j", "p.id")
    )
    counts = pairs.filter(F.col("id").isNotNull()).groupBy("j", "id").count()
    kept = counts.filter(F.col("count") >= min_count)
    if previous is not None:
        kept = kept.join(previous[0].select("j", "id"), on=["j", "id"], how="left_anti")
    numbered = _with_positions(kept.orderBy("j", F.col("count").desc(), F.col("id").asc()), cached)
    sizes = {int(r["j"]): int(r["count"]) for r in numbered.groupBy("j").count().collect()}
    row = F.col(_POS) - _offsets(sizes, list(range(features)), F.col("j")) + 1
    if previous is not None:
        row = row + size_of(previous[1], F.col("j"))
    vocab_df = numbered.select("j", "id", row.cast("long").alias("row"))
    if previous is not None:
        vocab_df = previous[0].select("j", "id", "row").unionByName(vocab_df)
        sizes = {j: previous[1].get(j, 0) + sizes.get(j, 0) for j in range(features)}
    vocab_df = vocab_df.persist(StorageLevel.MEMORY_AND_DISK)
    # Materialised before the id → row joins read it: otherwise each of their (concurrent) broadcasts
    # recomputes it from the numbered frame on disk, one full pass per feature.
    vocab_df.count()
    return vocab_df, sizes


def write_vocab_files(vocab_df: DataFrame, paths: list[Path], total: int) -> None:
    """Stream the vocabularies (`total` ids) to vocab files (line 0 the OOV token, line k the id of
    row k), one partition of at most ~VOCAB_IDS_PER_FETCH ids at a time through the driver."""
    from recsys.data.metadata import OOV_TOKEN

    parts = max(1, math.ceil(total / VOCAB_IDS_PER_FETCH))
    ordered = (
        vocab_df.select("j", "id", "row")
        .repartitionByRange(parts, "j", "row")
        .sortWithinPartitions("j", "row")
    )
    files = [open(p, "w", encoding="utf-8", newline="\n") for p in paths]  # noqa: SIM115 - closed below
    try:
        for f in files:
            f.write(OOV_TOKEN + "\n")
        expected = [1] * len(paths)
        for r in ordered.toLocalIterator():
            j, raw = int(r["j"]), r["id"]
            if "\n" in raw or "\r" in raw:
                raise DataError(f"{paths[j]}: raw id {raw!r} contains a line break; it cannot be saved")
            if r["row"] != expected[j]:  # rows are 1..n per feature by construction: check, don't trust
                raise RuntimeError(f"{paths[j]}: vocabulary row {r['row']} where {expected[j]} was due")
            expected[j] += 1
            files[j].write(raw + "\n")
    finally:
        for f in files:
            f.close()


# ------------------------------------------------------------------------------------------ main
def prepare_dataframe(
    df: DataFrame,
    cfg: Config,
    overwrite: bool = False,
    remote: str | None = None,
    source_name: str | None = None,
) -> Metadata:
    """Convert a Spark DataFrame (columns named by the `table` mapping in data.source) into
    data.prepared_dir exactly as `recsys data prepare` would; `remote` also uploads it (s3://, dbfs:/…)."""
    with contextlib.ExitStack() as settings:  # session settings changed for the prepare, restored after
        return _prepare(df, cfg, overwrite, remote, source_name, settings)


def _prepare(
    df: DataFrame,
    cfg: Config,
    overwrite: bool,
    remote: str | None,
    source_name: str | None,
    settings: contextlib.ExitStack,
) -> Metadata:
    """prepare_dataframe's body; `settings` restores what it changes in the session when it ends."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from recsys.data.mds import SplitWriter
    from recsys.data.prepare import check_output, vocab_file

    m = source_columns(cfg)
    name = source_name or f"spark:{m.path}"
    out = Path(cfg.data.prepared_dir)
    if cfg.model.table_default.kind != "exact" or any(t.kind != "exact" for t in cfg.model.tables.values()):
        # Not silently exact: the trainer would then refuse the folder only after the whole conversion.
        raise UserError(
            "model.tables: capped and managed_collision tables are prepared by `recsys data prepare` "
            "only, not yet on Spark; use exact tables here"
        )
    check_history(cfg, m)
    if cfg.data.negatives.per_positive:  # not silently without them: metadata.json would record them
        raise UserError(
            "data.negatives.per_positive: sampled negatives are added by `recsys data prepare` only, "
            "not on Spark; set it to 0 here, or prepare the interactions with `recsys data prepare`"
        )
    sp, lab = cfg.data.split, cfg.data.label

    # ---- columns, in the file-based reader's order: user and item lead the sparse features
    wanted = [c for c in (m.label, m.timestamp, m.user, m.item, *m.dense, *m.sparse) if c]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise UserError(
            f"{name}: column {missing[0]!r} (data.source mapping) not found; columns present: {df.columns}"
        )
    sparse_cols = list(dict.fromkeys([c for c in (m.user, m.item) if c] + list(m.sparse)))
    dense_vals = [_numeric(df, c, "dense") for c in m.dense]
    label_val = _numeric(df, m.label, "label") if m.label else None
    ts_val = _timestamp(df, m.timestamp) if m.timestamp else None
    ids = [_id_text(df, c) for c in sparse_cols]
    if sp.mode == "presplit":
        raise UserError("data.split.mode presplit: convert each part's DataFrame with its own config instead")
    if sp.mode == "by_day":
        raise UserError("data.split.mode by_day needs day files (data.source.kind criteo or synthetic_ctr)")
    if sp.mode == "leave_last_n" and m.user is None:
        raise UserError("data.split.mode leave_last_n needs a user column (data.source.user)")
    from recsys.data.lineage import Previous, window_info
    from recsys.data.window import is_windowed

    previous = Previous.open(cfg)  # before check_output: never overwrite the folder a window grows from
    if previous is not None:
        previous.check_schema(sparse_cols, list(m.dense), cfg, {})  # Spark: exact tables only
    check_output(out, overwrite)  # before any Spark job: refuse (or clear, with overwrite) early

    # ---- bad rows: an empty required column or an unparsable number, as the file reader judges
    checks: list[tuple[Column, str]] = []
    for c in (m.label, m.timestamp, m.user, m.item):
        if c:
            checks.append((F.col(c).isNull(), f"column {c!r} is empty"))
    if label_val is not None:
        checks.append((label_val[1], f"column {m.label!r}: not a number"))
    if ts_val is not None:
        checks.append((ts_val[1], f"column {m.timestamp!r}: neither a number nor a date-time"))
    checks += [(bad, f"column {c!r}: not a number") for c, (_, bad) in zip(m.dense, dense_vals, strict=True)]
    reason = F.lit(None).cast("string")
    for cond, text in reversed(checks):
        reason = F.when(cond, F.lit(text)).otherwise(reason)
    staged = df.select(
        (label_val[0] if label_val else F.lit(None).cast("double")).alias(_LABEL),
        (ts_val[0] if ts_val else F.lit(None).cast("double")).alias("_ts"),
        F.array(*[F.coalesce(v, F.lit(float("nan"))) for v, _ in dense_vals])
        .cast("array<double>")
        .alias(_DENSE),
        *[v.alias(f"_s{j}") for j, v in enumerate(ids)],
        reason.alias("_bad"),
    )
    cached: list[DataFrame] = []  # persisted frames to release at the end
    staged = _with_positions(staged, cached)
    totals = staged.agg(F.count(F.lit(1)).alias("n"), F.count("_bad").alias("bad")).first()
    n, n_bad = int(totals["n"]), int(totals["bad"])
    bad_rows = BadRows()
    if n_bad:
        bad = staged.filter(F.col("_bad").isNotNull()).orderBy(_POS).limit(MAX_BAD_EXAMPLES).collect()
        first = f"{name}:row {bad[0][_POS] + 1}: {bad[0]['_bad']}"
        if not cfg.data.skip_bad_rows:
            raise DataError(
                f"{first} ({n_bad} bad rows; pass --skip-bad-rows / data.skip_bad_rows to skip them)"
            )
        bad_rows = BadRows(count=n_bad, examples=[f"{name}:row {r[_POS] + 1}: {r['_bad']}" for r in bad])
        good = staged.filter(F.col("_bad").isNull()).drop(_POS)
        staged = _with_positions(good, cached)  # positions of the kept rows, as the file reader renumbers
        n -= n_bad
    if n == 0:
        raise DataError(f"{name}: no rows to prepare")
    # From here on every shuffle of the rows (joins, counts, windows) has tasks of ~ROWS_PER_TASK rows.
    settings.enter_context(shuffle_partitions_for(df.sparkSession, n))
    read_rows = n  # the source's good rows, window or not (as the file reader records them)
    in_window, window = filter_window(staged, cfg, ts_val is not None, n)
    if in_window is not staged:  # positions of the window's rows, as the file reader numbers them
        staged, n = _with_positions(in_window.drop(_POS), cached), window.counts.kept

    # ---- split assignment
    if sp.mode == "random":
        split_col = _random_split_column(F.col(_POS), sp.val_fraction, sp.test_fraction, sp.seed)
    else:  # leave_last_n: per user, by time then position, the last n rows test, the n before val
        key = [F.col("_ts").desc(), F.col(_POS).desc()] if m.timestamp else [F.col(_POS).desc()]
        by_user = Window.partitionBy("_s0")
        from_end = F.row_number().over(by_user.orderBy(*key)) - 1
        size = F.count(F.lit(1)).over(by_user)
        split_col = (
            F.when((from_end < sp.n) & (size > sp.n), F.lit(S.TEST))
            .when((from_end < 2 * sp.n) & (size > 2 * sp.n), F.lit(S.VAL))
            .otherwise(F.lit(S.TRAIN))
            .cast("byte")
        )
    from pyspark import StorageLevel

    split_df = staged.withColumn(_SPLIT, split_col)
    if sp.mode != "random":  # a per-user window is a shuffle: compute it once. The random split is a
        # function of the position: recomputing it where used is cheaper than writing all rows again.
        split_df = split_df.persist(getattr(StorageLevel, ROWS_STORAGE))
    is_train = F.col(_SPLIT) == S.TRAIN

    # ---- labels (data.label), the same rules as prepare.binarize
    if lab.mode == "all_positive":
        label_info: dict[str, Any] = {"mode": "all_positive"}
        label_col = F.lit(1.0)
    elif m.label is None:
        raise UserError(
            f"data.label.mode {lab.mode!r} needs a label column; the source has none (use all_positive)"
        )
    elif lab.mode == "as_is":
        values = [r[0] for r in split_df.select(_LABEL).distinct().limit(1000).collect()]
        if not set(values) <= {0.0, 1.0}:
            raise UserError(
                f"data.label.mode as_is needs 0/1 labels, found values like {sorted(values)[:5]}; "
                "use mode threshold or mean for ratings"
            )
        label_info, label_col = {"mode": "as_is"}, F.col(_LABEL)
    else:
        if lab.mode == "threshold":
            thr = lab.threshold
        else:  # mean over train only (Spark's sum order: may differ from numpy's in the last bits)
            thr = split_df.filter(is_train).agg(F.avg(_LABEL)).first()[0]
            thr = float(thr if thr is not None else split_df.agg(F.avg(_LABEL)).first()[0])
        label_info = {"mode": lab.mode, "threshold": thr}
        label_col = (F.col(_LABEL) >= F.lit(thr)).cast("double")

    # ---- vocabularies: counted, sorted and numbered on the executors; the driver gets sizes only
    grown = None
    if previous is not None:
        grown = previous_vocabularies(
            df.sparkSession, previous, sparse_cols, lambda d: _with_positions(d, cached)
        )
    vocab_df, sizes = _vocabularies(split_df, len(ids), cfg.data.min_count, cached, grown)

    # ---- map ids → rows (missing and out-of-vocabulary → 0)
    mapped = split_df.select(
        _POS,
        _SPLIT,
        "_ts",
        label_col.cast("double").alias(_LABEL),
        _DENSE,
        *[f"_s{j}" for j in range(len(ids))],
    )
    # Broadcast joins first, shuffled ones last: by then the other ids are longs, not strings, and
    # each shuffle of the rows moves less.
    for j in sorted(range(len(ids)), key=lambda j: sizes.get(j, 0) > BROADCAST_VOCAB):
        v = vocab_df.filter(F.col("j") == j).select(F.col("id").alias(f"_s{j}"), F.col("row").alias(f"_r{j}"))
        if sizes.get(j, 0) <= BROADCAST_VOCAB:
            v = F.broadcast(v)  # no shuffle of the rows for a vocabulary that fits every executor
        mapped = mapped.join(v, on=f"_s{j}", how="left")
        if cfg.data.history is None or sparse_cols[j] != m.user:  # histories group users by raw id
            mapped = mapped.drop(f"_s{j}")
    mapped = with_history(mapped, cfg, sparse_cols)
    rows = mapped.select(
        _POS,
        _SPLIT,
        F.col(_LABEL).cast("float").alias(_LABEL),
        _DENSE,
        sparse_with_history(
            F.array(*[F.coalesce(F.col(f"_r{j}"), F.lit(0)).cast("long") for j in range(len(ids))]), cfg
        ).alias(_SPARSE),
    ).persist(getattr(StorageLevel, ROWS_STORAGE))
    stats = {
        int(r[_SPLIT]): (int(r["rows"]), int(r["pos"]))
        for r in rows.groupBy(_SPLIT)
        .agg(F.count(F.lit(1)).alias("rows"), F.sum(_LABEL).alias("pos"))
        .collect()
    }

    # ---- write: vocab files, MDS splits, metadata.json last (a folder with metadata.json is complete)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab").mkdir(exist_ok=True)
    features = [
        SparseFeature(name=c, num_embeddings=sizes.get(j, 0) + 1, vocab_file=vocab_file(c))
        for j, c in enumerate(sparse_cols)
    ]
    write_vocab_files(vocab_df, [out / f.vocab_file for f in features], sum(sizes.values()))
    from streaming.base.util import merge_index

    from recsys.data.spark_blocks import write_blocks

    infos: dict[str, SplitInfo] = {}
    history_length = cfg.data.history.length if cfg.data.history is not None else None
    dests: dict[int, Any] = {}
    for split_name, code in zip(SPLITS, (S.TRAIN, S.VAL, S.TEST), strict=True):
        count, positives = stats.get(code, (0, 0))
        infos[split_name] = SplitInfo(
            rows=count, blocks=math.ceil(count / cfg.data.block_size), positives=positives
        )
        target = out / split_name
        if count == 0:  # no rows reach a writer; an empty split is still a dataset
            d = cfg.data
            SplitWriter(
                target, d.block_size, d.compression, d.shard_size_limit, history_length=history_length
            ).close()
        else:
            dests[code] = (
                str(target) if remote is None else (str(target), f"{remote.rstrip('/')}/{split_name}")
            )
    num_blocks = sum(i.blocks for i in infos.values())
    index_files = write_blocks(
        _ranked(
            rows,
            {c: v[0] for c, v in stats.items()},
            cfg.data.block_size,
            sp.seed,
            cfg.data.shuffle_window,
            cached,
        ),
        {c: (d, None) if isinstance(d, str) else d for c, d in dests.items()},
        tasks=blocks_tasks(num_blocks, cfg.data.block_size),
        block_size=cfg.data.block_size,
        dense_dim=len(m.dense),
        sparse_dim=len(ids),
        history_length=history_length,
        mds_kwargs={"compression": cfg.data.compression, "size_limit": cfg.data.shard_size_limit},
    )
    for code, dest in dests.items():
        # Partition order is block order: the merged index keeps the split's blocks in order.
        merge_index(
            [(loc, rem) for loc, rem in index_files[code]], dest, keep_local=True, download_timeout=60
        )

    meta = Metadata(
        name=cfg.name,
        kind="interactions" if (m.user and m.item) else "ctr",
        block_size=cfg.data.block_size,
        dense_features=list(m.dense),
        sparse_features=features,
        user_feature=m.user,
        item_feature=m.item,
        splits=infos,
        # A DataFrame has no file bytes to checksum.
        sources=[SourceFile(path=name, sha256="", rows=read_rows, bad_rows=bad_rows)],
        label=label_info,
        settings=data_settings(cfg),
        window=window_info(
            window.record(),
            previous,
            {c: (grown[1][j], sizes.get(j, 0) - grown[1][j]) for j, c in enumerate(sparse_cols)}
            if grown
            else {},
        )
        if previous is not None or is_windowed(cfg)
        else None,
        lineage=previous.lineage() if previous is not None else [],
        history_length=cfg.data.history.length if cfg.data.history is not None else None,
    )
    write_metadata(out, meta)
    if remote is not None:
        _upload_extras(out, remote, [f.vocab_file for f in features])
    for d in (rows, vocab_df, split_df, *cached):
        d.unpersist()
    print(
        f"prepared {out} with Spark: "
        + ", ".join(f"{k} {v.rows} rows/{v.blocks} blocks" for k, v in infos.items())
        + f"; {len(features)} sparse, {len(m.dense)} dense features"
        + (f"; {bad_rows.count} bad rows skipped" if bad_rows.count else "")
        + (f"; uploaded to {remote}" if remote else "")
    )
    return meta


def _upload_extras(out: Path, remote: str, vocab_files: list[str]) -> None:
    """Upload vocab files and metadata.json (last) beside the already uploaded MDS splits."""
    from streaming.base.storage.upload import CloudUploader

    uploader = CloudUploader.get((str(out), remote.rstrip("/")), keep_local=True, exist_ok=True)
    for rel in [*vocab_files, "metadata.json"]:
        if ":" not in remote:  # a local or mounted "remote": its copy does not create folders
            Path(remote, rel).parent.mkdir(parents=True, exist_ok=True)
        uploader.upload_file(rel)


def prepare_on_spark(
    cfg: Config, spark: SparkSession | None = None, overwrite: bool = False, remote: str | None = None
) -> Metadata:
    """Read data.source.path with Spark (Parquet, CSV, or a catalog table) and prepare it."""
    from recsys.launch.spark import get_spark

    session = get_spark(spark)
    return prepare_dataframe(read_source_dataframe(session, cfg), cfg, overwrite=overwrite, remote=remote)


def main(argv: list[str] | None = None) -> int:
    """`python -m recsys.data.spark_mds --config C`: the prepare as a Spark program (spark-submit, the
    Spark Operator's SparkApplication): the master and resources come from the submit configuration."""
    import argparse

    from recsys.config import load_config
    from recsys.errors import exit_status

    p = argparse.ArgumentParser(prog="python -m recsys.data.spark_mds", description=main.__doc__)
    p.add_argument("--config", required=True, help="a shipped config name or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value override")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    p.add_argument("--remote", default=None, help="also upload to this object-store URI (s3://, dbfs:/ …)")
    args = p.parse_args(argv)

    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        prepare_on_spark(cfg, overwrite=args.overwrite, remote=args.remote)
        return 0

    return exit_status(run)


if __name__ == "__main__":
    import sys

    # Run the imported module's main, so the UDFs Spark ships name recsys.data.spark_mds, not __main__.
    from recsys.data.spark_mds import main as _main

    sys.exit(_main())
