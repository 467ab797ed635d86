"""Criteo TSV files (label, integer counts, hex categoricals; file i is day i), whole or in chunks."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.metadata import SourceFile
from recsys.data.readers.delimited import INT, STR, _BadRowLog, iter_delimited, read_delimited
from recsys.data.readers.files import _hash_in_background
from recsys.data.readers.table import Table, _float, _strings, concat_tables


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
