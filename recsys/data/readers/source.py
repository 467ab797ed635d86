"""A source config → its reader: the whole table (read_source) or chunks streamed from disk (iter_source)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys.data.metadata import SourceFile
from recsys.data.readers.criteo import iter_criteo, read_criteo
from recsys.data.readers.learning_from_sets import read_learning_from_sets
from recsys.data.readers.movielens import read_movielens
from recsys.data.readers.parquet_csv import iter_table, read_table
from recsys.data.readers.recbole import read_recbole
from recsys.data.readers.table import Table
from recsys.errors import UserError


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
