"""Readers of every raw source kind → one columnar `Table` of raw values.

Fast path: pyarrow's multi-threaded CSV reader. When it rejects a file (wrong field count, a value
that does not parse, a bad label), the file is re-read line by line, which names the offending
`file:line` and, with skip_bad_rows, skips and counts such rows. Never silent: every skipped row is
counted, and the first few are kept as examples for the log and metadata.json.

Side features (MovieLens u.user/u.item, users.dat/movies.dat, movies.csv; RecBole .user/.item) are
joined onto every interaction by user or item id and become extra sparse features, listed in
`Table.user_side` / `Table.item_side` (metadata.json `user_side_features` / `item_side_features`).
An interaction whose id has no side row is kept with those features missing (embedding row 0) and
counted in `Table.notes` (metadata.json `read_notes`); a repeated id in a side file is a bad row.

Multi-valued fields (genres, any RecBole token_seq) become k single-valued features
`<name>_0 … <name>_{k-1}`: the first k tokens in file order, null (→ the OOV row 0) where an entity
has fewer. The prepared layout (sparse int64 [n, S]) and the loader's KeyedJaggedTensor carry exactly
one id per row per feature, so a true multi-hot bag would need jagged lengths in the MDS blocks and
the loader. Limitations of the slots: tokens beyond k are dropped (counted in notes); each slot is
its own table with its own vocabulary, so "Comedy" as an item's first genre and as its second are
different embeddings, and the slot a genre lands in depends on the order the file lists them.
Numbers become tokens too, so the towers can embed them: ml-100k ages in years → ml-1m's age groups,
RecBole float fields → quantile buckets over the side file's rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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
    user_side: list[str] = field(default_factory=list)  # sparse features joined by user id
    item_side: list[str] = field(default_factory=list)  # sparse features joined by item id
    notes: list[str] = field(default_factory=list)  # what reading changed beyond bad rows (counted)

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
        user_side=first.user_side,
        item_side=first.item_side,
        notes=list(dict.fromkeys(n for t in tables for n in t.notes)),  # a side file read per part
    )


# ------------------------------------------------------------------------------------------ helpers
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:  # one reused 256 KiB buffer, not a new 4 MiB bytes per read
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    encoding: str = "utf-8",
    data: bytes | None = None,
    separator_name: str | None = None,
) -> tuple[pa.Table, BadRows]:
    """Read the named `columns` of a delimited file into a pyarrow Table typed by `types`.

    `columns` are the file's columns (header=False) or the subset to read (header=True). Empty fields
    are null; a null in a `required` column, a field that does not parse, a wrong field count, or a
    `row_check` failure make a bad row. `table_check` vetoes the fast path (then the line-by-line
    parser, which applies `row_check`, decides). `data` is the file's bytes after a transform that
    keeps its lines (MovieLens' `::` → one character); messages still name `path` and its lines, and
    `separator_name` the separator the file really has.
    """
    import pyarrow.csv as pacsv

    check_file(path)
    bad = _BadRowLog(path, skip_bad_rows)
    try:
        tbl = pacsv.read_csv(
            path if data is None else pa.BufferReader(data),
            read_options=pacsv.ReadOptions(
                column_names=None if header else columns,
                block_size=_CSV_BLOCK,
                use_threads=True,
                encoding=encoding,
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
    # The slow path that knows line numbers (of `data` when given, else the file), in one table.
    tbl = pa.concat_tables(
        _iter_lines(
            path,
            delimiter,
            columns,
            types,
            header,
            required,
            quoting,
            bad,
            row_check,
            encoding,
            data,
            separator_name,
        )
    )
    bad.done()
    return tbl, bad.info


def _iter_lines(
    path: Path,
    delimiter: str,
    columns: list[str],
    types: dict[str, pa.DataType],
    header: bool,
    required: list[str],
    quoting: bool,
    bad: _BadRowLog,
    row_check: Callable[[dict[str, Any]], str | None] | None,
    encoding: str = "utf-8",
    data: bytes | None = None,
    shown_separator: str | None = None,
    chunk_rows: int | None = None,
    skip_rows: int = 0,
) -> Iterator[pa.Table]:
    """Line-by-line parse in tables of at most `chunk_rows` rows, after `skip_rows` good rows already read
    (by the fast reader, whose rows are good by construction: they are only counted, not parsed)."""
    out: dict[str, list[Any]] = {c: [] for c in columns}
    rows = 0
    with open(path, "rb") if data is None else io.BytesIO(data) as f:
        at = [0]  # number of the line last decoded (one record is one line: no newlines in values)
        lines = _decoded_lines(f, encoding, bad, at)
        if quoting:
            reader: Any = csv.reader(lines, delimiter=delimiter)

            def records() -> Any:
                for rec in reader:
                    yield at[0], rec
        else:

            def records() -> Any:
                for line in lines:
                    yield at[0], line.rstrip("\r\n").split(delimiter)

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
            if rows < skip_rows:
                rows += 1
                continue
            if len(rec) != width:
                sep = shown_separator or repr(delimiter)
                bad.bad(lineno, f"expected {width} fields separated by {sep}, got {len(rec)}")
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
            rows += 1
            if chunk_rows is not None and len(out[columns[0]]) >= chunk_rows:
                yield pa.table({c: pa.array(out[c], type=types[c]) for c in columns})
                out = {c: [] for c in columns}
    if rows == 0:
        skipped = f" ({bad.info.count} bad rows skipped)" if bad.info.count else ""
        raise DataError(f"{path}: no data rows{skipped}")
    if out[columns[0]] or chunk_rows is None:
        yield pa.table({c: pa.array(out[c], type=types[c]) for c in columns})


def iter_delimited(
    path: Path,
    *,
    delimiter: str,
    columns: list[str],
    types: dict[str, pa.DataType],
    header: bool,
    required: list[str],
    quoting: bool,
    bad: _BadRowLog,
    chunk_rows: int,
    row_check: Callable[[dict[str, Any]], str | None] | None = None,
    table_check: Callable[[pa.Table], bool] | None = None,
) -> Iterator[pa.Table]:
    """read_delimited in tables of `chunk_rows` rows (the last one shorter), in bounded memory.

    pyarrow's streaming reader parses block by block; at the first block it rejects (or that fails a
    check), the rest of the file goes to the line-by-line parser, which skips the rows already given
    and names the bad rows. The rows are the same as read_delimited's, however the file is chunked.
    """
    import pyarrow.csv as pacsv

    check_file(path)
    given, pending = 0, []
    try:
        reader = pacsv.open_csv(
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
        held = 0
        for batch in reader:
            ok = all(batch.column(c).null_count == 0 for c in required) and (
                table_check is None or batch.num_rows == 0 or table_check(pa.Table.from_batches([batch]))
            )
            if not ok:
                break
            pending.append(batch)
            held += batch.num_rows
            while held >= chunk_rows:
                tbl = pa.Table.from_batches(pending)
                yield tbl.slice(0, chunk_rows)
                given += chunk_rows
                rest = tbl.slice(chunk_rows)
                pending, held = rest.to_batches(), rest.num_rows
        else:
            if held:
                yield pa.Table.from_batches(pending)
            elif given == 0:
                raise DataError(f"{path}: no data rows")
            return
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        log.info("%s: fast reader rejected a block (%s); locating bad rows line by line", path, e)
    yield from _iter_lines(
        path,
        delimiter,
        columns,
        types,
        header,
        required,
        quoting,
        bad,
        row_check,
        chunk_rows=chunk_rows,
        skip_rows=given,
    )
    bad.done()


def _decoded_lines(f: BinaryIO, encoding: str, bad: _BadRowLog, at: list[int]) -> Iterator[str]:
    """The lines of a binary file, each decoded alone (at[0] = its number); one that does not decode
    is a bad row naming its byte, not a UnicodeDecodeError traceback."""
    for lineno, raw in enumerate(f, 1):
        at[0] = lineno
        try:
            yield raw.decode(encoding)
        except UnicodeDecodeError as e:
            byte = raw[e.start : e.start + 1].hex()
            bad.bad(
                lineno,
                f"byte 0x{byte} at column {e.start + 1} is not valid {encoding}; re-encode the file as "
                f"{encoding} (e.g. `iconv -f latin1 -t {encoding}`)",
            )


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
def _criteo_layout(num_dense: int, num_sparse: int) -> dict[str, Any]:
    """Columns, types and checks of a Criteo TSV (label, num_dense ints, num_sparse hex categoricals)."""
    dense_names = [f"int_{i}" for i in range(num_dense)]
    sparse_names = [f"cat_{i}" for i in range(num_sparse)]
    columns = ["label", *dense_names, *sparse_names]
    types = {"label": INT, **dict.fromkeys(dense_names, INT), **dict.fromkeys(sparse_names, STR)}

    def label_ok(tbl: pa.Table) -> bool:
        lab = tbl.column("label")
        return len(lab) > 0 and pc.all(pc.is_in(lab, pa.array([0, 1]))).as_py() is not False

    def row_check(row: dict[str, Any]) -> str | None:
        return None if row["label"] in (0, 1) else f"label must be 0 or 1, got {row['label']}"

    return dict(
        delimiter="\t",
        columns=columns,
        types=types,
        header=False,
        required=["label"],
        quoting=False,
        row_check=row_check,
        table_check=label_ok,
    )


def _criteo_table(
    tbl: pa.Table, day: int, num_dense: int, num_sparse: int, sources: list[SourceFile]
) -> Table:
    """Rows of one Criteo day file (or a chunk of it) as a Table."""
    dense_names = [f"int_{i}" for i in range(num_dense)]
    sparse_names = [f"cat_{i}" for i in range(num_sparse)]
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
        sources=sources,
    )


def read_criteo(
    paths: list[str | Path], skip_bad_rows: bool, num_dense: int = 13, num_sparse: int = 26
) -> Table:
    """Criteo TSV files (label, num_dense ints, num_sparse hex categoricals); file i is day i."""
    layout = _criteo_layout(num_dense, num_sparse)

    def one(day: int, p: str | Path) -> Table:
        path = Path(p)
        digest = _hash_in_background(path)
        tbl, bad = read_delimited(path, skip_bad_rows=skip_bad_rows, **layout)
        source = SourceFile(path=str(path), sha256=digest.result(), rows=tbl.num_rows, bad_rows=bad)
        return _criteo_table(tbl, day, num_dense, num_sparse, [source])

    # Two files in flight: one file's numpy work (dense, log1p) overlaps the next one's parse.
    # Results come back in file order, so the first bad file (in order) is the error raised.
    pool = ThreadPoolExecutor(max_workers=min(2, len(paths)) or 1, thread_name_prefix="criteo")
    try:
        tables = list(pool.map(one, range(len(paths)), paths))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return concat_tables(tables)


def iter_criteo(
    paths: list[str | Path],
    skip_bad_rows: bool,
    chunk_rows: int,
    sources: list[SourceFile] | None,
    num_dense: int = 13,
    num_sparse: int = 26,
) -> Iterator[Table]:
    """read_criteo in Tables of at most `chunk_rows` rows (a chunk never spans two day files).

    Each file's SourceFile (sha256, rows, bad rows) is appended to `sources` once the file is read
    (None: a later pass over the same files, which need not hash them again).
    """
    layout = _criteo_layout(num_dense, num_sparse)
    for day, p in enumerate(paths):
        path = Path(p)
        digest = _hash_in_background(path) if sources is not None else None
        bad = _BadRowLog(path, skip_bad_rows)
        rows = 0
        for tbl in iter_delimited(path, bad=bad, chunk_rows=chunk_rows, **layout):
            rows += tbl.num_rows
            yield _criteo_table(tbl, day, num_dense, num_sparse, [])
        if sources is not None and digest is not None:
            sources.append(SourceFile(path=str(path), sha256=digest.result(), rows=rows, bad_rows=bad.info))


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


# --------------------------------------------------------------------------------- side features
@dataclass
class SideTable:
    """Side features of one entity kind (user or item): one row per distinct id, from a side file."""

    what: str  # 'user' or 'item'
    source: SourceFile
    ids: pa.Array  # distinct raw ids (strings)
    features: dict[str, pa.Array]  # feature name → raw value per id (strings; null = missing)
    notes: list[str] = field(default_factory=list)


def _side(
    what: str, p: Path, tbl: pa.Table, bad: BadRows, id_col: str, features: dict, notes: list
) -> SideTable:
    """A SideTable from a side file's parsed rows."""
    ids = _strings(tbl.column(id_col)).combine_chunks()
    return SideTable(what, _source_file(p, tbl.num_rows, bad), ids, features, notes)


def _unique_ids(column: str) -> Callable[[pa.Table], bool]:
    """table_check: the id column holds no repeats (else the line-by-line pass names them)."""
    return lambda tbl: pc.count_distinct(tbl.column(column), mode="all").as_py() == tbl.num_rows


def _no_repeats(column: str, what: str) -> Callable[[dict[str, Any]], str | None]:
    """row_check: an id seen on an earlier line is a bad row (the first line of an id wins)."""
    seen: set[Any] = set()

    def check(row: dict[str, Any]) -> str | None:
        key = row[column]
        if key in seen:
            return f"{what} id {key!r} repeats an earlier line (ids must be unique in a {what} file)"
        seen.add(key)
        return None

    return check


def split_tokens(values: pa.ChunkedArray | pa.Array, separator: str) -> tuple[pa.Array, np.ndarray]:
    """Tokens of every row of a multi-valued string column: (flat tokens, row of each token).

    Empty tokens (two separators in a row, an empty field) are not tokens; null rows have none."""
    arr = _strings(values).combine_chunks()
    lists = pc.split_pattern(arr, pattern=separator)
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    return flat.filter(pa.array(keep)), parents[keep]


def token_slots(
    flat: pa.Array, parents: np.ndarray, n: int, names: list[str]
) -> tuple[dict[str, pa.Array], int]:
    """The first len(names) tokens of each of n rows as single-valued features (null where a row has
    fewer); returns them and how many rows had more tokens than slots. `parents` is non-decreasing."""
    counts = np.bincount(parents, minlength=n)
    starts = np.cumsum(counts) - counts
    out = {}
    for j, name in enumerate(names):
        has = counts > j
        idx = pa.array(np.where(has, starts + j, 0), type=pa.int64(), mask=~has)
        out[name] = flat.take(idx)
    return out, int((counts > len(names)).sum())


def quantile_tokens(values: pa.ChunkedArray | pa.Array, buckets: int) -> pa.Array:
    """Numbers as bucket tokens ('<24', '[24,31)', '>=57') cut at quantiles of the present values;
    missing stays null. Quantiles over the side file's rows (one per entity), not interactions."""
    v = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    missing = np.isnan(v)
    present = v[~missing]
    if present.size == 0:
        return pa.nulls(len(v), pa.string())
    edges = np.unique(np.quantile(present, np.linspace(0, 1, buckets + 1)[1:-1]))
    edges = edges[edges > present.min()]  # an edge at the minimum would leave its first bucket empty
    if len(edges) == 0:
        labels = [f"{present.min():g}"]
    else:
        inner = [f"[{a:g},{b:g})" for a, b in zip(edges[:-1], edges[1:], strict=True)]
        labels = [f"<{edges[0]:g}", *inner, f">={edges[-1]:g}"]
    bucket = np.searchsorted(edges, np.nan_to_num(v), side="right")
    return pa.array(np.array(labels, dtype=object)[bucket], type=pa.string(), mask=missing)


def join_side(table: Table, side: SideTable, key: str, inter_path: Path) -> None:
    """Append the side features of each row's `key` id to `table`, in place.

    Rows whose id has no row in the side file keep the interaction, with the side features missing
    (embedding row 0); they are counted in table.notes (metadata.json `read_notes`) and logged.
    """
    clash = [f for f in side.features if f in table.sparse_names]
    if clash:
        raise UserError(
            f"{side.source.path}: feature {clash[0]!r} is already a feature of {inter_path}; "
            "rename it (data.source.rename)"
        )
    keys = table.sparse[table.sparse_names.index(key)]
    idx = pc.index_in(keys, value_set=side.ids)
    if idx.null_count:
        lost = pc.unique(keys.filter(pc.is_null(idx)))
        note = (
            f"{inter_path}: {idx.null_count:,} interactions ({len(lost):,} distinct {side.what} ids, e.g. "
            f"{lost[:3].to_pylist()}) have no row in {side.source.path}; their {side.what} features "
            "are missing (embedding row 0)"
        )
        log.warning(note)
        table.notes.append(note)
    for name, values in side.features.items():
        table.sparse.append(_strings(values.take(idx)))
        table.sparse_names.append(name)
    (table.user_side if side.what == "user" else table.item_side).extend(side.features)
    table.sources.append(side.source)
    table.notes.extend(side.notes)
    for note in side.notes:
        log.warning(note)


# ---------------------------------------------------------------------------------------- movielens
# ml-1m's users.dat holds age groups (1 = under 18, 18 = 18-24, 25, 35, 45, 50, 56 = 56+); ml-100k's
# ages in years are mapped to the same codes so both give one small, shared age vocabulary.
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
_AGE_GROUPS = np.array(["1", "18", "25", "35", "45", "50", "56"], dtype=object)
# u.item's 19 genre flags, in file order (ml-100k u.genre).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]  # fmt: skip
_DAT_SEP = "\x1f"  # what `::` becomes before parsing (pyarrow splits on one character)
_TITLE_YEAR = r"\((?P<year>\d{4})(?:[-–]\d{4})?\)\s*$"  # "Toy Story (1995)", "Show (2006–2007)"
_DATE_YEAR = r"^\d{1,2}-[A-Za-z]{3}-(?P<year>\d{4})$"  # u.item release date "01-Jan-1995"


def _first_line(p: Path, encoding: str = "latin-1") -> str:
    """The file's first line (latin-1, the default, decodes any bytes: enough to detect a format)."""
    with open(p, "rb") as f:
        return f.readline().decode(encoding, errors="replace").rstrip("\r\n")


def _dat(p: Path) -> dict[str, Any]:
    """read_delimited options of a `::`-separated .dat file (ml-1m, ml-10m; ml-1m is latin-1)."""
    data = p.read_bytes().replace(b"::", _DAT_SEP.encode())
    return {"delimiter": _DAT_SEP, "data": data, "encoding": "latin-1", "separator_name": "'::'"}


def _year(values: pa.ChunkedArray, pattern: str) -> pa.Array:
    """The 4-digit year captured by `pattern` (null where it does not match)."""
    arr = _strings(values).combine_chunks()
    return pc.struct_field(pc.extract_regex(arr, pattern=pattern), [0])


def genre_names(slots: int) -> list[str]:
    """Names of the genre features: genre_0 … genre_{slots-1}."""
    return [f"genre_{j}" for j in range(slots)]


def _read_ratings(p: Path, skip_bad_rows: bool) -> Table:
    """u.data / u1.base (tab), ratings.dat (`::`) or ratings.csv (header userId,movieId,…)."""
    cols = ["user", "item", "rating", "timestamp"]
    types = {"user": STR, "item": STR, "rating": FLOAT, "timestamp": INT}
    first = _first_line(p)
    head = next(csv.reader([first]), [])
    if head[:2] == ["userId", "movieId"]:
        csv_cols = ["userId", "movieId", "rating", "timestamp"]
        missing = [c for c in csv_cols if c not in head]
        if missing:
            raise DataError(f"{p}: ratings.csv header lacks {missing} (columns present: {head})")
        tbl, bad = read_delimited(
            p,
            delimiter=",",
            columns=csv_cols,
            types=dict(zip(csv_cols, types.values(), strict=True)),
            header=True,
            required=csv_cols,
            quoting=True,
            skip_bad_rows=skip_bad_rows,
        )
        return _interactions(p, tbl, bad, "userId", "movieId", "rating", "timestamp")
    opts: dict[str, Any] = _dat(p) if "::" in first else {"delimiter": "\t"}
    tbl, bad = read_delimited(
        p,
        columns=cols,
        types=types,
        header=False,
        required=cols,
        quoting=False,
        skip_bad_rows=skip_bad_rows,
        **opts,
    )
    return _interactions(p, tbl, bad, "user", "item", "rating", "timestamp")


def read_movielens_users(path: str | Path, skip_bad_rows: bool) -> SideTable:
    """u.user (`id|age|gender|occupation|zip`, ages in years → age groups) or users.dat
    (`id::gender::age::occupation::zip`, ages already groups): features age, gender, occupation."""
    p = check_file(path)
    dat = "::" in _first_line(p)
    if dat:
        cols, opts = ["user_id", "gender", "age", "occupation", "zip"], _dat(p)
    else:
        cols, opts = (
            ["user_id", "age", "gender", "occupation", "zip"],
            {"delimiter": "|", "encoding": "latin-1"},
        )
    tbl, bad = read_delimited(
        p,
        columns=cols,
        types={c: INT if c == "age" and not dat else STR for c in cols},
        header=False,
        required=["user_id"],
        quoting=False,
        skip_bad_rows=skip_bad_rows,
        row_check=_no_repeats("user_id", "user"),
        table_check=_unique_ids("user_id"),
        **opts,
    )
    age = tbl.column("age")
    if not dat:
        group = np.searchsorted(_AGE_EDGES, pc.fill_null(age, 0).to_numpy(), side="right")
        age = pa.array(
            _AGE_GROUPS[group], type=pa.string(), mask=age.is_null().to_numpy(zero_copy_only=False)
        )
    features = {
        "age": _strings(age).combine_chunks(),
        "gender": _strings(tbl.column("gender")).combine_chunks(),
        "occupation": _strings(tbl.column("occupation")).combine_chunks(),
    }
    return _side("user", p, tbl, bad, "user_id", features, [])


def read_movielens_items(path: str | Path, skip_bad_rows: bool, genre_slots: int = 3) -> SideTable:
    """u.item, movies.dat or movies.csv (detected from the first line): features genre_0 … and year.

    Genres keep the file's order (u.item: flag order of u.genre; the others: `A|B` order); the year is
    u.item's release date year, or the "(1995)" at the end of the title in the others."""
    p = check_file(path)
    first = _first_line(p)
    if "::" in first or first.startswith("movieId"):
        tbl, bad, flat, parents, year = _read_movies(p, skip_bad_rows, dat="::" in first)
    elif "|" in first:
        tbl, bad, flat, parents, year = _read_u_item(p, skip_bad_rows)
    else:
        raise DataError(f"{p}:1: not a MovieLens item file (u.item, movies.dat or movies.csv)")
    features, over = token_slots(flat, parents, tbl.num_rows, genre_names(genre_slots))
    notes = []
    if over:
        notes.append(
            f"{p}: {over:,} items have more than {genre_slots} genres; genres after the first "
            f"{genre_slots} (in file order) are dropped (data.source.genre_slots)"
        )
    return _side("item", p, tbl, bad, "item_id", {**features, "year": year}, notes)


def _read_movies(
    p: Path, skip_bad_rows: bool, dat: bool
) -> tuple[pa.Table, BadRows, pa.Array, np.ndarray, pa.Array]:
    """movies.dat (`id::title::A|B`) or movies.csv (`movieId,title,genres`, quoted)."""
    cols = ["item_id", "title", "genres"] if dat else ["movieId", "title", "genres"]
    opts: dict[str, Any] = _dat(p) if dat else {"delimiter": ","}
    tbl, bad = read_delimited(
        p,
        columns=cols,
        types=dict.fromkeys(cols, STR),
        header=not dat,
        required=cols[:1],
        quoting=not dat,
        skip_bad_rows=skip_bad_rows,
        row_check=_no_repeats(cols[0], "item"),
        table_check=_unique_ids(cols[0]),
        **opts,
    )
    tbl = tbl.rename_columns(["item_id", "title", "genres"])
    flat, parents = split_tokens(tbl.column("genres"), "|")
    return tbl, bad, flat, parents, _year(tbl.column("title"), _TITLE_YEAR)


def _read_u_item(p: Path, skip_bad_rows: bool) -> tuple[pa.Table, BadRows, pa.Array, np.ndarray, pa.Array]:
    """ml-100k u.item: id|title|release date|video release date|IMDb URL|19 genre flags (latin-1)."""
    flags = [f"is_{g}" for g in ML100K_GENRES]
    cols = ["item_id", "title", "release_date", "video_release_date", "url", *flags]
    repeats = _no_repeats("item_id", "item")

    def row_check(row: dict[str, Any]) -> str | None:
        bad_flag = next((f for f in flags if row[f] not in (0, 1)), None)
        if bad_flag is not None:
            return f"genre flag {bad_flag.removeprefix('is_')!r} must be 0 or 1, got {row[bad_flag]}"
        date = row["release_date"]
        if date is not None and re.search(_DATE_YEAR, date) is None:
            return f"release date {date!r} is not DD-Mon-YYYY"
        return repeats(row)

    def table_check(tbl: pa.Table) -> bool:
        flags_ok = all(pc.all(pc.is_in(tbl.column(f), pa.array([0, 1]))).as_py() for f in flags)
        dates = tbl.column("release_date")
        return (
            flags_ok
            and _year(dates, _DATE_YEAR).null_count == dates.null_count
            and _unique_ids("item_id")(tbl)
        )

    tbl, bad = read_delimited(
        p,
        delimiter="|",
        columns=cols,
        types={c: INT if c in flags else STR for c in cols},
        header=False,
        required=["item_id", *flags],
        quoting=False,
        skip_bad_rows=skip_bad_rows,
        row_check=row_check,
        table_check=table_check,
        encoding="latin-1",
    )
    matrix = np.stack([tbl.column(f).to_numpy() for f in flags], axis=1)
    rows, genre = np.nonzero(matrix)  # row-major: each item's genres in flag order
    flat = pa.array(np.array(ML100K_GENRES, dtype=object)[genre], type=pa.string())
    return tbl, bad, flat, rows, _year(tbl.column("release_date"), _DATE_YEAR)


def read_movielens(
    path: str | Path,
    skip_bad_rows: bool,
    users: str | Path | None = None,
    items: str | Path | None = None,
    genre_slots: int = 3,
) -> Table:
    """MovieLens ratings in an original layout, with optional side features joined by id.

    Ratings: u.data / u1.base (tab-separated user, item, rating, timestamp; no header), ratings.dat
    (`::`-separated, ml-1m/10m) or ratings.csv (header userId,movieId,rating,timestamp). `users`
    (u.user, users.dat) adds age, gender, occupation; `items` (u.item, movies.dat, movies.csv) adds
    genre_0 … genre_{genre_slots-1} and year (see the module docstring for the genre slots).
    """
    p = check_file(path)
    table = _read_ratings(p, skip_bad_rows)
    if users is not None:
        join_side(table, read_movielens_users(users, skip_bad_rows), "user_id", p)
    if items is not None:
        join_side(table, read_movielens_items(items, skip_bad_rows, genre_slots), "item_id", p)
    return table


# ------------------------------------------------------------------------------------------ recbole
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")


def recbole_fields(path: Path) -> dict[str, tuple[str, str]]:
    """Field name → (header column, type) of a RecBole atomic file's `name:type` header."""
    out: dict[str, tuple[str, str]] = {}
    for col in _first_line(path, "utf-8").split("\t"):
        name, sep, typ = col.rpartition(":")
        if not (sep and name and typ in RECBOLE_TYPES):
            raise DataError(
                f"{path}:1: header field {col!r} is not name:type with type one of "
                f"{', '.join(RECBOLE_TYPES)} (a RecBole atomic file starts with such a header)"
            )
        if name in out:
            raise DataError(f"{path}:1: field {name!r} appears twice in the header")
        out[name] = (col, typ)
    return out


def read_recbole(src: Any, skip_bad_rows: bool) -> Table:
    """RecBole atomic files (config kind `recbole`): the .inter interactions, with the .user and .item
    fields joined by id as side features (token → one feature; token_seq → `<name>_0 …` slots;
    float → quantile-bucket tokens; float_seq is refused)."""
    p = check_file(src.inter)
    fields = recbole_fields(p)
    wanted = {
        "user_id_field": src.user_id_field,
        "item_id_field": src.item_id_field,
        "rating_field": src.rating_field,
        "time_field": src.time_field,
    }
    for opt, name in wanted.items():
        if name is not None and name not in fields:
            raise DataError(f"{p}:1: no field {name!r} (data.source.{opt}); fields present: {list(fields)}")
    uid, iid, rating, ts = (fields[n][0] if n is not None else None for n in wanted.values())
    cols = [c for c in (uid, iid, rating, ts) if c is not None]
    types = {c: STR if c in (uid, iid) else FLOAT for c in cols}
    tbl, bad = read_delimited(
        p,
        delimiter="\t",
        columns=cols,
        types=types,
        header=True,
        required=cols,
        quoting=False,
        skip_bad_rows=skip_bad_rows,
    )
    unused = [f for f, (c, _) in fields.items() if c not in cols]
    if unused:
        log.info("%s: fields not used: %s", p, unused)
    names = tuple(src.rename.get(f, f) for f in (src.user_id_field, src.item_id_field))
    table = _interactions(p, tbl, bad, uid, iid, rating, ts, names=names)  # type: ignore[arg-type]
    known = set(fields)
    for what, side_path, name in (("user", src.user, names[0]), ("item", src.item, names[1])):
        if side_path is not None:
            side, side_fields = read_recbole_side(side_path, what, src, skip_bad_rows)
            known |= side_fields
            join_side(table, side, name, p)
    unknown = sorted(set(src.rename) - known)
    if unknown:
        raise UserError(
            f"data.source.rename: {unknown[0]!r} is not a field of the source files ({sorted(known)})"
        )
    return table


def read_recbole_side(
    path: str | Path, what: str, src: Any, skip_bad_rows: bool
) -> tuple[SideTable, set[str]]:
    """One .user or .item file as a SideTable of the chosen fields; also returns the file's field names."""
    p = check_file(path)
    fields = recbole_fields(p)
    id_field = getattr(src, f"{what}_id_field")
    if id_field not in fields:
        raise DataError(
            f"{p}:1: no field {id_field!r} (data.source.{what}_id_field); fields present: {list(fields)}"
        )
    chosen = getattr(src, f"{what}_features")
    chosen = [f for f in fields if f != id_field] if chosen is None else chosen
    for f in chosen:
        if f not in fields or f == id_field:
            raise UserError(
                f"data.source.{what}_features: {f!r} is not a feature field of {p} (fields: {list(fields)})"
            )
        if fields[f][1] == "float_seq":
            raise UserError(
                f"data.source.{what}_features: {f!r} is float_seq in {p}, which has no embedding here; leave it out"
            )
    id_col = fields[id_field][0]
    cols = [id_col, *(fields[f][0] for f in chosen)]
    tbl, bad = read_delimited(
        p,
        delimiter="\t",
        columns=cols,
        types={c: FLOAT if c.endswith(":float") else STR for c in cols},
        header=True,
        required=[id_col],
        quoting=False,
        skip_bad_rows=skip_bad_rows,
        row_check=_no_repeats(id_col, what),
        table_check=_unique_ids(id_col),
    )
    features, notes = _recbole_features(p, what, tbl, {f: fields[f] for f in chosen}, src)
    return _side(what, p, tbl, bad, id_col, features, notes), set(fields)


def _recbole_features(
    p: Path, what: str, tbl: pa.Table, chosen: dict[str, tuple[str, str]], src: Any
) -> tuple[dict[str, pa.Array], list[str]]:
    """Features of the chosen fields by type: token → itself, float → quantile-bucket tokens,
    token_seq → `<name>_0 …` slots (with a note when tokens are dropped)."""
    features: dict[str, pa.Array] = {}
    notes = []
    for f, (col, typ) in chosen.items():
        name = src.rename.get(f, f)
        if typ == "token":
            features[name] = _strings(tbl.column(col)).combine_chunks()
        elif typ == "float":
            features[name] = quantile_tokens(tbl.column(col), src.float_buckets)
        else:
            k = src.seq_slots
            flat, parents = split_tokens(tbl.column(col), src.seq_separator)
            slots, over = token_slots(flat, parents, tbl.num_rows, [f"{name}_{j}" for j in range(k)])
            features.update(slots)
            if over:
                notes.append(
                    f"{p}: {over:,} {what}s have more than {k} {f!r} tokens; tokens after the first {k} "
                    "are dropped (data.source.seq_slots)"
                )
    return features, notes


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
@dataclass
class _TablePlan:
    """What read_table reads from a generic CSV/Parquet file and how its columns map."""

    path: Path
    parquet: bool
    columns: list[str]
    types: dict[str, pa.DataType]
    required: list[str]
    sparse: list[str]
    dense: list[str]
    label: str | None
    timestamp: str | None
    user: str | None
    item: str | None

    def table(self, tbl: pa.Table, sources: list[SourceFile]) -> Table:
        """Rows read from the file (all or a chunk) as a Table."""
        n = tbl.num_rows
        dense = self.dense
        dense_arr = np.stack([_float(tbl.column(c)) for c in dense], axis=1) if dense else np.zeros((n, 0))
        return Table(
            kind="interactions" if (self.user and self.item) else "ctr",
            label=_float(tbl.column(self.label)) if self.label else None,
            dense=log1p_dense(dense_arr),
            dense_names=list(dense),
            sparse=[_strings(tbl.column(c)) for c in self.sparse],
            sparse_names=self.sparse,
            timestamp=_timestamps(self.path, tbl.column(self.timestamp), self.timestamp)
            if self.timestamp
            else None,
            user_feature=self.user,
            item_feature=self.item,
            sources=sources,
        )


def _plan_table(
    path: str | Path,
    label: str | None,
    dense: list[str],
    sparse: list[str],
    timestamp: str | None,
    user: str | None,
    item: str | None,
) -> _TablePlan:
    """Check the mapped columns exist in the file (one line naming the first missing) and type them."""
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
    types = {c: STR for c in sparse_cols}
    types.update({c: FLOAT for c in dense})
    if label:
        types[label] = FLOAT
    if timestamp:
        types[timestamp] = STR
    return _TablePlan(
        path=p,
        parquet=parquet,
        columns=list(dict.fromkeys(wanted)),
        types=types,
        required=[c for c in (label, timestamp, user, item) if c],
        sparse=sparse_cols,
        dense=list(dense),
        label=label,
        timestamp=timestamp,
        user=user,
        item=item,
    )


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
    plan = _plan_table(path, label, dense, sparse, timestamp, user, item)
    p = plan.path
    if plan.parquet:
        tbl, bad = _read_parquet(p, plan.columns, plan.types, plan.required, skip_bad_rows)
    else:
        tbl, bad = read_delimited(
            p,
            delimiter=",",
            columns=plan.columns,
            types=plan.types,
            header=True,
            required=plan.required,
            quoting=True,
            skip_bad_rows=skip_bad_rows,
        )
    return plan.table(tbl, [_source_file(p, tbl.num_rows, bad)])


def iter_table(
    path: str | Path,
    *,
    label: str | None,
    dense: list[str],
    sparse: list[str],
    timestamp: str | None,
    user: str | None,
    item: str | None,
    skip_bad_rows: bool,
    chunk_rows: int,
    sources: list[SourceFile] | None,
) -> Iterator[Table]:
    """read_table in Tables of at most `chunk_rows` rows; the file's SourceFile goes to `sources` at the
    end (None: not hashed, a later pass)."""
    plan = _plan_table(path, label, dense, sparse, timestamp, user, item)
    p = plan.path
    digest = _hash_in_background(p) if sources is not None else None
    bad = _BadRowLog(p, skip_bad_rows)
    if plan.parquet:
        parts = _iter_parquet(p, plan.columns, plan.types, plan.required, bad, chunk_rows)
    else:
        parts = iter_delimited(
            p,
            delimiter=",",
            columns=plan.columns,
            types=plan.types,
            header=True,
            required=plan.required,
            quoting=True,
            bad=bad,
            chunk_rows=chunk_rows,
        )
    rows = 0
    for tbl in parts:
        rows += tbl.num_rows
        yield plan.table(tbl, [])
    if sources is not None and digest is not None:
        sources.append(SourceFile(path=str(p), sha256=digest.result(), rows=rows, bad_rows=bad.info))


def _read_parquet(
    p: Path, cols: list[str], types: dict[str, pa.DataType], required: list[str], skip: bool
) -> tuple[pa.Table, BadRows]:
    """Parquet columns cast to `types`; a null in a required column is a bad row (`file:row N`)."""
    import pyarrow.parquet as pq

    bad = _BadRowLog(p, skip)
    tbl = _parquet_part(p, pq.read_table(p, columns=cols), cols, types, required, bad, 0)
    bad.done()
    return tbl, bad.info


def _parquet_part(
    p: Path,
    tbl: pa.Table,
    cols: list[str],
    types: dict[str, pa.DataType],
    required: list[str],
    bad: _BadRowLog,
    start: int,
) -> pa.Table:
    """Rows start.. of a Parquet file cast to `types`, without the rows missing a required column."""
    out = {}
    for c in cols:
        try:
            out[c] = tbl.column(c).cast(types[c])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{p}: column {c!r} cannot be read as {types[c]}: {e}") from None
    tbl = pa.table(out)
    if required:
        null = np.zeros(tbl.num_rows, dtype=bool)
        for c in required:
            null |= tbl.column(c).is_null().to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(null):
            empty = next(c for c in required if tbl.column(c)[int(i)].as_py() is None)
            bad.bad(f"row {start + int(i) + 1}", f"column {empty!r} is empty")
        if null.any():
            tbl = tbl.filter(pa.array(~null))
    return tbl


def _iter_parquet(
    p: Path,
    cols: list[str],
    types: dict[str, pa.DataType],
    required: list[str],
    bad: _BadRowLog,
    chunk_rows: int,
) -> Iterator[pa.Table]:
    """_read_parquet in tables of at most `chunk_rows` rows, one row group's batch at a time."""
    import pyarrow.parquet as pq

    start = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=chunk_rows, columns=cols):
        tbl = _parquet_part(p, pa.Table.from_batches([batch]), cols, types, required, bad, start)
        start += batch.num_rows
        if tbl.num_rows:
            yield tbl
    bad.done()


def read_source(src: Any, skip_bad_rows: bool, raw_dir: str | Path | None = None) -> Table:
    """Read any non-presplit source config (see recsys.config) into a Table."""
    kind = src.kind
    if kind == "criteo":
        return read_criteo(src.paths, skip_bad_rows)
    if kind == "movielens":
        return read_movielens(src.path, skip_bad_rows, src.users, src.items, src.genre_slots)
    if kind == "recbole":
        return read_recbole(src, skip_bad_rows)
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


def slice_table(t: Table, start: int, stop: int) -> Table:
    """Rows start..stop-1 of a Table (views; the sources and notes stay with the whole table)."""
    from dataclasses import replace

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[start:stop]

    return replace(
        t,
        label=cut(t.label),
        dense=t.dense[start:stop],
        sparse=[c.slice(start, stop - start) for c in t.sparse],
        timestamp=cut(t.timestamp),
        day=cut(t.day),
        sources=[],
    )


#: Source kinds streamed from disk chunk by chunk; the others are small files joined with side tables,
#: read whole once and then cut into chunks.
STREAMED_KINDS = ("criteo", "synthetic_ctr", "table", "synthetic_interactions")


def iter_source(
    src: Any,
    skip_bad_rows: bool,
    chunk_rows: int,
    sources: list[SourceFile] | None,
    raw_dir: str | Path | None = None,
) -> Iterator[Table]:
    """A streamed source kind (STREAMED_KINDS) in Tables of at most `chunk_rows` rows, in file order."""
    kind = src.kind
    if kind == "criteo":
        return iter_criteo(src.paths, skip_bad_rows, chunk_rows, sources)
    if kind == "table":
        return iter_table(
            src.path,
            label=src.label,
            dense=src.dense,
            sparse=src.sparse,
            timestamp=src.timestamp,
            user=src.user,
            item=src.item,
            skip_bad_rows=skip_bad_rows,
            chunk_rows=chunk_rows,
            sources=sources,
        )
    from recsys.data.synth import raw_files

    files = raw_files(src, raw_dir)
    if kind == "synthetic_ctr":
        return iter_criteo(files, skip_bad_rows, chunk_rows, sources, src.num_dense, src.num_sparse)
    if kind == "synthetic_interactions":
        return iter_table(
            files[0],
            label="rating",
            dense=[],
            sparse=[],
            timestamp="timestamp",
            user="user_id",
            item="item_id",
            skip_bad_rows=skip_bad_rows,
            chunk_rows=chunk_rows,
            sources=sources,
        )
    raise UserError(f"data.source.kind {kind!r} is read whole, not streamed")
