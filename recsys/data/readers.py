"""Readers of every raw source kind → one columnar `Table` of raw values.

Fast path: pyarrow's multi-threaded CSV reader. When it rejects a file (wrong field count, a value
that does not parse, a bad label), the file is re-read line by line, which names the offending
`file:line` and, with skip_bad_rows, skips and counts such rows. Never silent: every skipped row is
counted, and the first few are kept as examples for the log and metadata.json.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.metadata import BadRows, SourceFile
from recsys.errors import DataError, UserError

log = logging.getLogger(__name__)

MAX_BAD_EXAMPLES = 5


@dataclass
class Table:
    """Raw rows of one source, columnar; sparse ids are strings (null = missing), dense is log1p'd."""

    kind: str  # 'ctr' or 'interactions'
    label: np.ndarray | None  # float64 [n] raw label or rating; None: no label column
    dense: np.ndarray  # float32 [n, D], log(1+max(x,0)), missing → 0
    dense_names: list[str]
    sparse: list[pa.ChunkedArray]  # raw ids as strings, one per sparse feature
    sparse_names: list[str]
    timestamp: np.ndarray | None = None  # float64 [n] (temporal splits)
    day: np.ndarray | None = None  # int32 [n] day index (Criteo by-day split)
    user_feature: str | None = None
    item_feature: str | None = None
    sources: list[SourceFile] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Number of rows."""
        return len(self.dense)


def concat_tables(tables: list[Table]) -> Table:
    """Rows of several tables with the same schema, in order (day files, presplit parts)."""
    first = tables[0]
    for t in tables[1:]:
        if t.sparse_names != first.sparse_names or t.dense_names != first.dense_names:
            raise UserError(
                f"sources disagree on columns: {first.sparse_names + first.dense_names} vs "
                f"{t.sparse_names + t.dense_names}"
            )

    def cat(arrs: list[np.ndarray | None]) -> np.ndarray | None:
        return None if any(a is None for a in arrs) else np.concatenate(arrs)  # type: ignore[arg-type]

    return Table(
        kind=first.kind,
        label=cat([t.label for t in tables]),
        dense=np.concatenate([t.dense for t in tables]),
        dense_names=first.dense_names,
        sparse=[
            pa.chunked_array([c for t in tables for c in t.sparse[j].chunks], type=pa.string())
            for j in range(len(first.sparse))
        ],
        sparse_names=first.sparse_names,
        timestamp=cat([t.timestamp for t in tables]),
        day=cat([t.day for t in tables]),
        user_feature=first.user_feature,
        item_feature=first.item_feature,
        sources=[s for t in tables for s in t.sources],
    )


# ------------------------------------------------------------------------------------------ helpers
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: str | Path) -> Path:
    """The path, if it is a non-empty file; otherwise a one-line error."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: file not found (check data.source paths)")
    if not p.is_file():
        raise UserError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file")
    return p


def log1p_dense(values: np.ndarray) -> np.ndarray:
    """log(1+x) of count features; missing (NaN) → 0.

    Negative counts (Criteo's I2 holds a few -1/-2) are clamped to 0 before log1p, as the DLRM
    reference preprocessing does, so the transform is defined for every row.
    """
    v = np.nan_to_num(values.astype(np.float64, copy=False), nan=0.0)
    return np.log1p(np.maximum(v, 0.0)).astype(np.float32)


class _BadRowLog:
    """Counts skipped rows of one file and keeps the first few as `file:line: reason`."""

    def __init__(self, path: Path, skip: bool) -> None:
        self.path, self.skip, self.info = path, skip, BadRows()

    def bad(self, line: int | str, reason: str) -> None:
        msg = f"{self.path}:{line}: {reason}"
        if not self.skip:
            raise DataError(msg + " (use --skip-bad-rows / data.skip_bad_rows to skip such rows)")
        self.info.count += 1
        if len(self.info.examples) < MAX_BAD_EXAMPLES:
            self.info.examples.append(msg)
            log.warning("skipping bad row: %s", msg)

    def done(self) -> None:
        if self.info.count:
            log.warning("%s: skipped %d bad rows", self.path, self.info.count)


# Bytes per parse block of pyarrow's CSV reader: 1 MiB blocks parsed ~2x fewer CPU-seconds than
# 16 MiB ones on the 1M-row Criteo bench (the block's columns stay in cache) and still feed every core.
_CSV_BLOCK = 1 << 20

# Column types of the delimited readers.
INT, FLOAT, STR = pa.int64(), pa.float64(), pa.string()


def _convert(value: str, typ: pa.DataType) -> Any:
    """One field as the line-by-line parser sees it ('' → None); raises ValueError when it does not parse."""
    if value == "":
        return None
    if typ == INT:
        return int(value)
    if typ == FLOAT:
        f = float(value)
        if math.isnan(f):
            return None
        return f
    return value


def read_delimited(
    path: Path,
    *,
    delimiter: str,
    columns: list[str],
    types: dict[str, pa.DataType],
    header: bool,
    required: list[str],
    quoting: bool,
    skip_bad_rows: bool,
    row_check: Callable[[dict[str, Any]], str | None] | None = None,
    table_check: Callable[[pa.Table], bool] | None = None,
) -> tuple[pa.Table, BadRows]:
    """Read the named `columns` of a delimited file into a pyarrow Table typed by `types`.

    `columns` are the file's columns (header=False) or the subset to read (header=True). Empty fields
    are null; a null in a `required` column, a field that does not parse, a wrong field count, or a
    `row_check` failure make a bad row. `table_check` vetoes the fast path (then the line-by-line
    parser, which applies `row_check`, decides).
    """
    import pyarrow.csv as pacsv

    check_file(path)
    bad = _BadRowLog(path, skip_bad_rows)
    try:
        tbl = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=None if header else columns, block_size=_CSV_BLOCK, use_threads=True
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if quoting else False,
                newlines_in_values=False,
                ignore_empty_lines=True,
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types={c: types[c] for c in columns},
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        ok = all(tbl.column(c).null_count == 0 for c in required) and (
            table_check is None or table_check(tbl)
        )
        if ok:
            if tbl.num_rows == 0:
                raise DataError(f"{path}: no data rows")
            return tbl, bad.info
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        log.info("%s: fast reader rejected the file (%s); locating bad rows line by line", path, e)
    tbl = _read_lines(path, delimiter, columns, types, header, required, quoting, bad, row_check)
    bad.done()
    return tbl, bad.info


def _read_lines(
    path: Path,
    delimiter: str,
    columns: list[str],
    types: dict[str, pa.DataType],
    header: bool,
    required: list[str],
    quoting: bool,
    bad: _BadRowLog,
    row_check: Callable[[dict[str, Any]], str | None] | None,
) -> pa.Table:
    """Line-by-line parse: the slow path that knows line numbers."""
    out: dict[str, list[Any]] = {c: [] for c in columns}
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        if quoting:
            reader: Any = csv.reader(f, delimiter=delimiter)

            def records() -> Any:
                for rec in reader:
                    yield reader.line_num, rec
        else:

            def records() -> Any:
                for i, line in enumerate(f, 1):
                    yield i, line.rstrip("\r\n").split(delimiter)

        it = records()
        if header:
            _, head = next(it)
            width = len(head)
            pos = [head.index(c) for c in columns]
        else:
            width, pos = len(columns), list(range(len(columns)))
        for lineno, rec in it:
            if rec == [] or rec == [""]:
                continue
            if len(rec) != width:
                bad.bad(lineno, f"expected {width} fields separated by {delimiter!r}, got {len(rec)}")
                continue
            row: dict[str, Any] = {}
            err = None
            for c, p in zip(columns, pos, strict=True):
                try:
                    row[c] = _convert(rec[p], types[c])
                except ValueError:
                    err = f"column {c!r}: {rec[p]!r} is not a valid {types[c]}"
                    break
                if row[c] is None and c in required:
                    err = f"column {c!r} is empty"
                    break
            if err is None and row_check is not None:
                err = row_check(row)
            if err is not None:
                bad.bad(lineno, err)
                continue
            for c in columns:
                out[c].append(row[c])
    if not out[columns[0]]:
        skipped = f" ({bad.info.count} bad rows skipped)" if bad.info.count else ""
        raise DataError(f"{path}: no data rows{skipped}")
    return pa.table({c: pa.array(out[c], type=types[c]) for c in columns})


def _header(path: Path, delimiter: str) -> list[str]:
    """Column names from the first line of a delimited file."""
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
    return next(csv.reader(io.StringIO(first), delimiter=delimiter), [])


def _hash_in_background(path: Path) -> Future[str]:
    """sha256 of a file in a thread (hashlib releases the GIL), overlapping the parse."""
    if not path.is_file():
        check_file(path)
    return _HASH_POOL.submit(sha256_file, path)


_HASH_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")


def _source_file(path: Path, rows: int, bad: BadRows) -> SourceFile:
    return SourceFile(path=str(path), sha256=sha256_file(path), rows=rows, bad_rows=bad)


def _strings(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """A column as strings (ids keep their exact text; '0' stays '0')."""
    c = col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])
    return c if c.type == pa.string() else c.cast(pa.string())


def _float(col: pa.ChunkedArray) -> np.ndarray:
    return col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


# ------------------------------------------------------------------------------------------- criteo
def read_criteo(
    paths: list[str | Path], skip_bad_rows: bool, num_dense: int = 13, num_sparse: int = 26
) -> Table:
    """Criteo TSV files (label, num_dense ints, num_sparse hex categoricals); file i is day i."""
    dense_names = [f"int_{i}" for i in range(num_dense)]
    sparse_names = [f"cat_{i}" for i in range(num_sparse)]
    columns = ["label", *dense_names, *sparse_names]
    types = {"label": INT, **dict.fromkeys(dense_names, INT), **dict.fromkeys(sparse_names, STR)}

    def label_ok(tbl: pa.Table) -> bool:
        lab = tbl.column("label")
        return len(lab) > 0 and pc.all(pc.is_in(lab, pa.array([0, 1]))).as_py() is not False

    def row_check(row: dict[str, Any]) -> str | None:
        return None if row["label"] in (0, 1) else f"label must be 0 or 1, got {row['label']}"

    def one(day: int, p: str | Path) -> Table:
        path = Path(p)
        digest = _hash_in_background(path)
        tbl, bad = read_delimited(
            path,
            delimiter="\t",
            columns=columns,
            types=types,
            header=False,
            required=["label"],
            quoting=False,
            skip_bad_rows=skip_bad_rows,
            row_check=row_check,
            table_check=label_ok,
        )
        n = tbl.num_rows
        dense = np.empty((n, num_dense), dtype=np.float32)
        for i, c in enumerate(dense_names):  # missing → 0, straight into float32
            dense[:, i] = pc.fill_null(tbl.column(c), 0).to_numpy()
        # Negative counts (a few -1/-2 in Criteo's I2) are clamped to 0 before log1p, as in log1p_dense.
        np.log1p(np.maximum(dense, 0, out=dense), out=dense)
        return Table(
            kind="ctr",
            label=_float(tbl.column("label")),
            dense=dense,
            dense_names=dense_names,
            sparse=[_strings(tbl.column(c)) for c in sparse_names],
            sparse_names=sparse_names,
            day=np.full(n, day, dtype=np.int32),
            sources=[SourceFile(path=str(path), sha256=digest.result(), rows=n, bad_rows=bad)],
        )

    # Two files in flight: one file's numpy work (dense, log1p) overlaps the next one's parse.
    # Results come back in file order, so the first bad file (in order) is the error raised.
    pool = ThreadPoolExecutor(max_workers=min(2, len(paths)) or 1, thread_name_prefix="criteo")
    try:
        tables = list(pool.map(one, range(len(paths)), paths))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return concat_tables(tables)


# ------------------------------------------------------------------------------------------ ratings
def _interactions(
    path: Path,
    tbl: pa.Table,
    bad: BadRows,
    user: str,
    item: str,
    label: str | None,
    timestamp: str | None,
    extra_sparse: list[str] = (),  # type: ignore[assignment]
    dense: list[str] = (),  # type: ignore[assignment]
    names: tuple[str, str] = ("user_id", "item_id"),
) -> Table:
    n = tbl.num_rows
    dense_arr = np.stack([_float(tbl.column(c)) for c in dense], axis=1) if dense else np.zeros((n, 0))
    return Table(
        kind="interactions",
        label=_float(tbl.column(label)) if label else None,
        dense=log1p_dense(dense_arr),
        dense_names=list(dense),
        sparse=[_strings(tbl.column(c)) for c in (user, item, *extra_sparse)],
        sparse_names=[*names, *extra_sparse],
        timestamp=_timestamps(path, tbl.column(timestamp), timestamp) if timestamp else None,
        user_feature=names[0],
        item_feature=names[1],
        sources=[_source_file(path, n, bad)],
    )


def _timestamps(path: Path, col: pa.ChunkedArray, name: str) -> np.ndarray:
    """A timestamp column as float64 seconds: numbers as they are, ISO date-times parsed."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return _float(col)
    if pa.types.is_timestamp(col.type):
        return col.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy(zero_copy_only=False).astype(float)
    for target in (pa.float64(), pa.timestamp("s")):
        try:
            out = col.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return _timestamps(path, out, name)
    raise DataError(f"{path}: column {name!r}: values are neither numbers nor ISO date-times")


def read_movielens(path: str | Path, skip_bad_rows: bool) -> Table:
    """MovieLens u.data (tab-separated user, item, rating, timestamp; no header; also u1.base etc.)
    or ratings.csv (header userId,movieId,rating,timestamp)."""
    p = check_file(path)
    head = _header(p, ",")
    if head[:2] == ["userId", "movieId"]:
        cols = ["userId", "movieId", "rating", "timestamp"]
        missing = [c for c in cols if c not in head]
        if missing:
            raise DataError(f"{p}: ratings.csv header lacks {missing} (columns present: {head})")
        tbl, bad = read_delimited(
            p,
            delimiter=",",
            columns=cols,
            types={"userId": STR, "movieId": STR, "rating": FLOAT, "timestamp": INT},
            header=True,
            required=cols,
            quoting=True,
            skip_bad_rows=skip_bad_rows,
        )
        return _interactions(p, tbl, bad, "userId", "movieId", "rating", "timestamp")
    cols = ["user", "item", "rating", "timestamp"]
    tbl, bad = read_delimited(
        p,
        delimiter="\t",
        columns=cols,
        types={"user": STR, "item": STR, "rating": FLOAT, "timestamp": INT},
        header=False,
        required=cols,
        quoting=False,
        skip_bad_rows=skip_bad_rows,
    )
    return _interactions(p, tbl, bad, "user", "item", "rating", "timestamp")


def read_learning_from_sets(path: str | Path, skip_bad_rows: bool) -> Table:
    """ "Learning from Sets of Items" item_ratings.csv: hashed string user ids, movie ids, ratings
    (header userId,movieId,rating[,tstamp|timestamp]); the user hash is kept as the raw id."""
    p = check_file(path)
    head = _header(p, ",")
    lower = {h.lower(): h for h in head}
    user = lower.get("userid") or lower.get("user_id")
    item = lower.get("movieid") or lower.get("itemid") or lower.get("item_id")
    rating = lower.get("rating")
    ts = lower.get("tstamp") or lower.get("timestamp")
    if not (user and item and rating):
        raise DataError(
            f"{p}: expected columns userId, movieId, rating (item_ratings.csv); columns present: {head}"
        )
    cols = [user, item, rating] + ([ts] if ts else [])
    types = {user: STR, item: STR, rating: FLOAT}
    if ts:
        types[ts] = STR
    tbl, bad = read_delimited(
        p,
        delimiter=",",
        columns=cols,
        types=types,
        header=True,
        required=cols,
        quoting=True,
        skip_bad_rows=skip_bad_rows,
    )
    return _interactions(p, tbl, bad, user, item, rating, ts)


# -------------------------------------------------------------------------------------------- table
def read_table(
    path: str | Path,
    *,
    label: str | None,
    dense: list[str],
    sparse: list[str],
    timestamp: str | None,
    user: str | None,
    item: str | None,
    skip_bad_rows: bool,
) -> Table:
    """Generic Parquet or CSV with a column mapping; user/item (when given) lead the sparse features."""
    p = check_file(path)
    parquet = p.suffix.lower() in (".parquet", ".pq")
    if parquet:
        import pyarrow.parquet as pq

        try:
            present = pq.read_schema(p).names
        except pa.ArrowInvalid as e:
            raise DataError(f"{p}: not a readable Parquet file: {e}") from None
    else:
        present = _header(p, ",")
    mapping = {"label": label, "timestamp": timestamp, "user": user, "item": item}
    wanted = [c for c in [*mapping.values(), *dense, *sparse] if c]
    missing = [c for c in wanted if c not in present]
    if missing:
        raise UserError(
            f"{p}: column {missing[0]!r} (data.source mapping) not found; columns present: {present}"
        )
    sparse_cols = list(dict.fromkeys([c for c in (user, item) if c] + list(sparse)))
    cols = list(dict.fromkeys(wanted))
    types = {c: STR for c in sparse_cols}
    types.update({c: FLOAT for c in dense})
    if label:
        types[label] = FLOAT
    if timestamp:
        types[timestamp] = STR
    required = [c for c in (label, timestamp, user, item) if c]
    if parquet:
        tbl, bad = _read_parquet(p, cols, types, required, skip_bad_rows)
    else:
        tbl, bad = read_delimited(
            p,
            delimiter=",",
            columns=cols,
            types=types,
            header=True,
            required=required,
            quoting=True,
            skip_bad_rows=skip_bad_rows,
        )
    n = tbl.num_rows
    dense_arr = np.stack([_float(tbl.column(c)) for c in dense], axis=1) if dense else np.zeros((n, 0))
    return Table(
        kind="interactions" if (user and item) else "ctr",
        label=_float(tbl.column(label)) if label else None,
        dense=log1p_dense(dense_arr),
        dense_names=list(dense),
        sparse=[_strings(tbl.column(c)) for c in sparse_cols],
        sparse_names=sparse_cols,
        timestamp=_timestamps(p, tbl.column(timestamp), timestamp) if timestamp else None,
        user_feature=user,
        item_feature=item,
        sources=[_source_file(p, n, bad)],
    )


def _read_parquet(
    p: Path, cols: list[str], types: dict[str, pa.DataType], required: list[str], skip: bool
) -> tuple[pa.Table, BadRows]:
    """Parquet columns cast to `types`; a null in a required column is a bad row (`file:row N`)."""
    import pyarrow.parquet as pq

    tbl = pq.read_table(p, columns=cols)
    out = {}
    for c in cols:
        try:
            out[c] = tbl.column(c).cast(types[c])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{p}: column {c!r} cannot be read as {types[c]}: {e}") from None
    tbl = pa.table(out)
    bad = _BadRowLog(p, skip)
    if required:
        null = np.zeros(tbl.num_rows, dtype=bool)
        for c in required:
            null |= tbl.column(c).is_null().to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(null):
            empty = next(c for c in required if tbl.column(c)[int(i)].as_py() is None)
            bad.bad(f"row {int(i) + 1}", f"column {empty!r} is empty")
        if null.any():
            tbl = tbl.filter(pa.array(~null))
    bad.done()
    return tbl, bad.info


# ------------------------------------------------------------------------------------------ sources
def read_source(src: Any, skip_bad_rows: bool, raw_dir: str | Path | None = None) -> Table:
    """Read any non-presplit source config (see recsys.config) into a Table."""
    kind = src.kind
    if kind == "criteo":
        return read_criteo(src.paths, skip_bad_rows)
    if kind == "movielens":
        return read_movielens(src.path, skip_bad_rows)
    if kind == "learning_from_sets":
        return read_learning_from_sets(src.path, skip_bad_rows)
    if kind == "table":
        return read_table(
            src.path,
            label=src.label,
            dense=src.dense,
            sparse=src.sparse,
            timestamp=src.timestamp,
            user=src.user,
            item=src.item,
            skip_bad_rows=skip_bad_rows,
        )
    if kind in ("synthetic_ctr", "synthetic_interactions"):
        from recsys.data.synth import raw_files

        files = raw_files(src, raw_dir)
        if kind == "synthetic_ctr":
            return read_criteo(files, skip_bad_rows, src.num_dense, src.num_sparse)
        t = read_table(
            files[0],
            label="rating",
            dense=[],
            sparse=[],
            timestamp="timestamp",
            user="user_id",
            item="item_id",
            skip_bad_rows=skip_bad_rows,
        )
        return t
    raise UserError(f"data.source.kind {kind!r} cannot be read here (presplit is read by prepare)")
