"""Side features: files of one row per user or item, joined onto the interactions by id.

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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.metadata import BadRows, SourceFile
from recsys.data.readers.files import _source_file
from recsys.data.readers.table import Table, _strings
from recsys.errors import UserError

log = logging.getLogger(__name__)


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
