"""Per-interaction histories for `recsys data prepare` (data.history): each row's previous ≤ L items.

A row's history is its user's items strictly earlier in time, ties broken by file order (an earlier
line is earlier), as item-vocabulary rows, oldest first and most recent last. Pass 1 records, per row,
the user and item (codes in order of first appearance over the whole input) and the timestamp;
after the vocabularies are fixed, `finish` orders each user's events and keeps, per row, the
position of the user's previous event and the row's rank among the user's events; pass 2 asks
`rows(start, n)` for each chunk's histories by walking back L steps.

Memory: about 40 bytes a row while ordering (user, item, time, previous event, rank and the sort's
permutation), so prepare refuses inputs beyond data.history.max_rows with a message pointing at the
Spark path (recsys.data.spark_history builds the same columns on the executors). Rows without a user get an empty history and
are in no one's history; rows without a timestamp column use file order as time.

MDS columns written beside label/dense/sparse (see recsys.data.metadata):
    history       int64 [n, L]  item rows, oldest first, left-aligned; zero beyond the row's length
    history_rank  int64 [n]     events of the user before this one (untruncated); length = min(rank, L)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.hashing import TableMap
    from recsys.data.readers import Table

log = logging.getLogger(__name__)

# Where prepares that outgrow one machine go (recsys.data.spark_mds; the source must be kind `table`).
SPARK_PATH = (
    "use the Spark path (data.source.kind table): `recsys data prepare --config CONFIG --spark`, "
    "`python -m recsys.data.spark_mds --config CONFIG` under spark-submit, or "
    "`recsys render --data-prep spark --config CONFIG` for the Spark Operator"
)


class _GlobalCodes:
    """Codes of string ids in order of first appearance over every chunk seen (-1 = missing)."""

    def __init__(self) -> None:
        self.known = pa.array([], pa.string())

    def add(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """int64 codes of one chunk's column."""
        col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        local = pc.dictionary_encode(col.cast(pa.string()))
        merged = pc.dictionary_encode(pa.concat_arrays([self.known, local.dictionary]))
        to_global = merged.indices.slice(len(self.known)).to_numpy(zero_copy_only=False).astype(np.int64)
        self.known = merged.dictionary  # earlier ids keep their codes: they come first
        idx = local.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.where(idx >= 0, to_global[np.maximum(idx, 0)], -1)


class HistoryBuilder:
    """Pass 1: `observe` every chunk; then `finish` with the item id → row map; pass 2: `rows`."""

    def __init__(self, length: int, max_rows: int) -> None:
        self.length, self.max_rows = length, max_rows
        self._users, self._items = _GlobalCodes(), _GlobalCodes()
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.rows_seen = 0
        self._item_row: np.ndarray | None = None  # int64 [rows]: the row's item as a vocabulary row
        self._prev: np.ndarray | None = None  # int64 [rows]: position of the user's previous event, -1
        self._rank: np.ndarray | None = None  # int64 [rows]: the user's events before this one

    def observe(self, user: pa.ChunkedArray, item: pa.ChunkedArray, timestamp: np.ndarray | None) -> None:
        """Record one chunk's users, items and timestamps (rows in file order)."""
        self.rows_seen += len(user)
        if self.rows_seen > self.max_rows:
            raise UserError(
                f"data.history: the input has more than data.history.max_rows = {self.max_rows:,} rows; "
                "histories are ordered in memory here (~40 bytes a row): raise the limit if memory allows, "
                f"or {SPARK_PATH}"
            )
        ts = None if timestamp is None else np.asarray(timestamp, np.float64)
        self._parts.append((self._users.add(user), self._items.add(item), ts))

    def finish(self, item_rows_of: np.ndarray) -> None:
        """Order every user's events; `item_rows_of[code]` is the vocabulary row of item code `code`
        (see `item_ids`); afterwards the recorded codes are dropped."""
        users = np.concatenate([p[0] for p in self._parts]) if self._parts else np.zeros(0, np.int64)
        items = np.concatenate([p[1] for p in self._parts]) if self._parts else np.zeros(0, np.int64)
        times = [p[2] for p in self._parts]
        self._parts = []
        n = len(users)
        pos = np.arange(n, dtype=np.int64)
        if times and all(t is not None for t in times):
            ts = np.concatenate(times)  # type: ignore[arg-type]
        else:
            log.warning("data.history: no timestamp column; file order is time order")
            ts = pos.astype(np.float64)
        self._item_row = np.where(items >= 0, item_rows_of[np.maximum(items, 0)], 0).astype(np.int64)
        del items
        order = np.lexsort((pos, ts, users))  # by user, then time, then file position
        u = users[order]
        same = np.zeros(n, bool)
        same[1:] = u[1:] == u[:-1]
        same &= u >= 0  # rows without a user are nobody's history
        prev = np.full(n, -1, np.int64)
        prev[order[same]] = order[np.flatnonzero(same) - 1]
        starts = np.flatnonzero(~same)
        group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - group_start
        self._prev, self._rank = prev, rank

    def item_ids(self) -> pa.Array:
        """Raw item ids by item code (what `finish` maps to rows)."""
        return self._items.known

    def rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(history int64 [n, L], history_rank int64 [n]) of rows start .. start + n - 1."""
        assert self._prev is not None and self._rank is not None and self._item_row is not None
        L = self.length
        rank = self._rank[start : start + n]
        lengths = np.minimum(rank, L)
        out = np.zeros((n, L), np.int64)
        at = self._prev[start : start + n]
        for back in range(L):  # back = 0: the most recent earlier event
            has = lengths > back
            if not has.any():
                break
            rows = np.flatnonzero(has)
            out[rows, lengths[rows] - 1 - back] = self._item_row[at[rows]]
            at = np.where(has, self._prev[np.maximum(at, 0)], -1)
        return out, rank.copy()


# ------------------------------------------------------------------------ prepare's calls (one line each)
def new_history_builder(cfg: Config) -> HistoryBuilder | None:
    """The builder of cfg.data.history (None when off); refuses settings histories cannot follow."""
    h = cfg.data.history
    if h is None:
        return None
    if cfg.data.negatives.per_positive:
        raise UserError(
            "data.history: sampled negatives (data.negatives.per_positive) are not interactions and "
            "would enter histories; prepare histories without negatives"
        )
    return HistoryBuilder(h.length, h.max_rows)


def observe_chunk(history: HistoryBuilder, table: Table) -> None:
    """Pass 1: record one chunk of the source (it must have user and item columns)."""
    if table.user_feature is None or table.item_feature is None:
        raise UserError(
            f"data.history: the {table.kind} source has no user/item columns (data.source.user/item)"
        )
    names = table.sparse_names
    history.observe(
        table.sparse[names.index(table.user_feature)],
        table.sparse[names.index(table.item_feature)],
        table.timestamp,
    )


def finish_history(history: HistoryBuilder, items: TableMap) -> None:
    """After the vocabularies: order the events, with item ids mapped to rows by the item table."""
    from recsys.data.vocab import encoded_from_dictionary

    ids = history.item_ids()
    codes = np.arange(len(ids), dtype=np.int32)
    history.finish(items.rows_encoded(encoded_from_dictionary(codes, ids)))


def history_columns(history: HistoryBuilder, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: a chunk's ([n, L] history, [n, 1] rank) columns, appended to its sparse rows."""
    hist, rank = history.rows(start, n)
    return hist, rank[:, None]


def model_uses_history(cfg: Config) -> bool:
    """True when cfg's model reads the `history` feature (sequential, or a Two-Tower pooling it)."""
    m = cfg.model
    return m.kind == "sequential" or (m.kind == "two_tower" and m.two_tower.history_pooling != "none")


def jagged_history(history: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values int64, lengths int32 [n]) of the jagged `history` feature from its MDS columns."""
    lengths = np.minimum(rank, history.shape[1]).astype(np.int32)
    return history[np.arange(history.shape[1]) < lengths[:, None]], lengths
