"""The columnar `Table` every reader returns, and the column conversions readers share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys.data.metadata import BadRows, SourceFile
from recsys.data.readers.files import _source_file
from recsys.errors import DataError, UserError


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


def log1p_dense(values: np.ndarray) -> np.ndarray:
    """log(1+x) of count features; missing (NaN) → 0.

    Negative counts (Criteo's I2 holds a few -1/-2) are clamped to 0 before log1p, as the DLRM
    reference preprocessing does, so the transform is defined for every row.
    """
    v = np.nan_to_num(values.astype(np.float64, copy=False), nan=0.0)
    return np.log1p(np.maximum(v, 0.0)).astype(np.float32)


def _strings(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """A column as strings (ids keep their exact text; '0' stays '0')."""
    c = col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])
    return c if c.type == pa.string() else c.cast(pa.string())


def _float(col: pa.ChunkedArray) -> np.ndarray:
    return col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


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
