"""Generic Parquet or CSV files with a column mapping (source kind `table`), whole or in chunks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys.data.metadata import BadRows, SourceFile
from recsys.data.readers.delimited import FLOAT, STR, _BadRowLog, iter_delimited, read_delimited
from recsys.data.readers.files import _hash_in_background, _header, _source_file, check_file
from recsys.data.readers.table import Table, _float, _strings, _timestamps, log1p_dense
from recsys.errors import DataError, UserError


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
