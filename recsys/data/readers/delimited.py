"""Delimited text files (CSV, TSV, `::`, `|`) → pyarrow Tables, whole or in chunks.

Fast path: pyarrow's multi-threaded CSV reader. When it rejects a file (wrong field count, a value
that does not parse, a bad label), the file is re-read line by line, which names the offending
`file:line` and, with skip_bad_rows, skips and counts such rows. Never silent: every skipped row is
counted, and the first few are kept as examples for the log and metadata.json.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from recsys.data.metadata import BadRows
from recsys.data.readers.files import check_file
from recsys.errors import DataError

log = logging.getLogger(__name__)

MAX_BAD_EXAMPLES = 5


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
