"""Per-interaction histories for `recsys data prepare` (data.history): each row's previous ≤ L items.

A row's history is its user's items strictly earlier in time, ties broken by file order (an earlier
line is earlier), as item-vocabulary rows, oldest first and most recent last — of the parts known to
the row's part only (KNOWN_PARTS): parts are ordered train < val < test, and a row sees the events of
its own part and of earlier parts, never those of a later one. On a random split a train row's history
so holds train items only (never a val/test item of its user, which early stopping and the test
metrics score), a val row's train and val items, a test row's all; on leave_last_n no earlier event
is in a later part, so the rule changes nothing there. That is data.history.rule `causal`.

Rule `profile` (for splits that are not temporal): a row carries its user's last ≤ L items by (time,
file order) among the events known when its part is scored, earlier or later in time, never its own:
a train row the user's other train events, a val row the train events, a test row the train and val
events; history_rank counts them (untruncated). A random split's scoring knows a set of parts, not a
moment, and training histories then read like the ones scored.

Pass 1 records, per row, the user and item (codes in order of first appearance over the whole input),
the timestamp and the part; after the vocabularies are fixed, `finish` orders each user's events and
keeps, per row and per part P, the position of the user's previous event that a row of P may see, and
the row's rank (how many events its history may draw on); pass 2 asks `rows(start, n)` for each
chunk's histories by walking back L steps along the chain of the row's own part. Under `profile`,
`finish` keeps the chains of TRAIN and VAL only and, per row, where its walk starts: the user's last
train event (train and val rows) or last train-or-val event (test rows), from O(users) heads and
counts; a walk takes ≤ L + 1 steps, a train row skipping itself on its own chain.

Memory (tracemalloc at 2M rows, 2026-12-07): pass 1 keeps 25 bytes a row (user, item, time, part);
ordering peaks ~81 bytes a row above that, as before the part rule; pass 2 keeps 21 (three int32
chains, int32 rank and item row, the part; 24 before, with one int64 chain) below 2^31 rows; `profile`
the same (two chains and the walk's start in place of the third chain); its ordering peaks lower (~72
bytes a row at 2M rows, 50k users, 2026-12-07: fewer chains, the heads O(users), per-row work in steps of
PROFILE_CHUNK rows), and pass 2 takes ~1.5 µs of CPU a row at L 50 (causal ~1.3). So prepare
refuses inputs beyond data.history.max_rows with a message pointing at the Spark path
(recsys.data.spark_history builds the same columns on the executors). Rows without a user get an
empty history and are in no one's history; a row without an item is in its user's later histories as
row 0 (the OOV row, as an item outside the vocabulary); rows without a timestamp column use file order
as time. (prepare's readers skip or refuse rows with an empty user or item as bad rows before this.)

MDS columns written beside label/dense/sparse (see recsys.data.metadata):
    history       int64 [n, L]  item rows, oldest first, left-aligned; zero beyond the row's length
    history_rank  int64 [n]     the events the row's history draws on (untruncated); length = min(rank, L)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.id_lookup import IdLookup
from recsys.data.splits import TEST, TRAIN, VAL
from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.hashing import TableMap
    from recsys.data.metadata import Metadata
    from recsys.data.readers import Table

log = logging.getLogger(__name__)

# Where prepares that outgrow one machine go (recsys.data.spark_mds; the source must be kind `table`).
SPARK_PATH = (
    "use the Spark path (data.source.kind table): `recsys data prepare --config CONFIG --spark`, "
    "`python -m recsys.data.spark_mds --config CONFIG` under spark-submit, or "
    "`recsys render --data-prep spark --config CONFIG` for the Spark Operator"
)


#: Rows per step of the profile rule's per-row work in `finish` (its temporaries: ~50 bytes a row of it).
PROFILE_CHUNK = 1 << 18
#: Parts whose earlier events a row of each part sees: its own and the ones before it (train < val < test).
KNOWN_PARTS = {TRAIN: (TRAIN,), VAL: (TRAIN, VAL), TEST: (TRAIN, VAL, TEST)}
PARTS = len(KNOWN_PARTS)


class _GlobalCodes:
    """Codes of string ids in order of first appearance over every chunk seen (-1 = missing)."""

    def __init__(self) -> None:
        # The ids seen, hashed once and grown: re-encoding all of them with each chunk's was
        # O(chunks × distinct ids).
        self._ids = IdLookup(pa.array([], pa.string()))

    @property
    def known(self) -> pa.Array:
        """Every id seen so far, in order of first appearance (code i = known[i])."""
        return self._ids.ids

    def add(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """int64 codes of one chunk's column."""
        col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        local = pc.dictionary_encode(col.cast(pa.string()))
        to_global = self._ids.index_or_add(local.dictionary)  # earlier ids keep their codes
        idx = local.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        out = np.full(len(idx), -1, np.int64)
        has = idx >= 0  # a chunk of nulls only has an empty dictionary: nothing to index there
        out[has] = to_global[idx[has]]
        return out


class HistoryBuilder:
    """Pass 1: `observe` every chunk; then `finish` with the item id → row map; pass 2: `rows`."""

    def __init__(self, length: int, max_rows: int, rule: str = "causal") -> None:
        self.length, self.max_rows, self.rule = length, max_rows, rule
        self._users, self._items = _GlobalCodes(), _GlobalCodes()
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]] = []
        self.rows_seen = 0
        self._item_row: np.ndarray | None = None  # [rows]: the row's item as a vocabulary row
        self._part: np.ndarray | None = None  # int8 [rows]: the row's part (splits.TRAIN/VAL/TEST)
        # [PARTS, rows]: per part P, the position of the user's previous event a row of P sees (-1: none);
        # row P is read only at rows of parts ≤ P, the ones on the chain of a P row's history
        self._prev: np.ndarray | None = None
        self._rank: np.ndarray | None = None  # [rows]: the user's earlier events the row's part sees
        # profile: [rows] the event a row's walk starts from, the user's last one of the parts known when
        # the row's part is scored (-1: none); the walk follows chain TRAIN (train, val rows) or VAL (test)
        self._start: np.ndarray | None = None

    def observe(
        self, user: pa.ChunkedArray, item: pa.ChunkedArray, timestamp: np.ndarray | None, part: np.ndarray
    ) -> None:
        """Record one chunk's users, items, timestamps and parts (splits.TRAIN/VAL/TEST; rows in file order)."""
        self.rows_seen += len(user)
        if self.rows_seen > self.max_rows:
            raise UserError(
                f"data.history: the input has more than data.history.max_rows = {self.max_rows:,} rows; "
                "histories are ordered in memory here (~40 bytes a row): raise the limit if memory allows, "
                f"or {SPARK_PATH}"
            )
        ts = None if timestamp is None else np.asarray(timestamp, np.float64)
        part = np.asarray(part, np.int8)
        if len(part) != len(user) or (len(part) and (part.min() < 0 or part.max() >= PARTS)):
            raise ValueError(
                f"history: {len(part)} part codes in 0..{PARTS - 1} expected for {len(user)} rows"
            )
        self._parts.append((self._users.add(user), self._items.add(item), ts, part))

    def finish(self, item_rows_of: np.ndarray) -> None:
        """Order every user's events; `item_rows_of[code]` is the vocabulary row of item code `code`
        (see `item_ids`); afterwards the recorded codes are dropped."""
        users = np.concatenate([p[0] for p in self._parts]) if self._parts else np.zeros(0, np.int64)
        items = np.concatenate([p[1] for p in self._parts]) if self._parts else np.zeros(0, np.int64)
        parts = np.concatenate([p[3] for p in self._parts]) if self._parts else np.zeros(0, np.int8)
        times = [p[2] for p in self._parts]
        self._parts = []
        n = len(users)
        pos = np.arange(n, dtype=np.int64)
        if times and all(t is not None for t in times):
            ts = np.concatenate(times)  # type: ignore[arg-type]
        else:
            log.warning("data.history: no timestamp column; file order is time order")
            ts = pos.astype(np.float64)
        # Positions and ranks fit int32 below 2^31 rows (the default max_rows is far below): half the memory.
        index = np.int32 if n < 2**31 - 1 else np.int64
        row = np.where(items >= 0, item_rows_of[np.maximum(items, 0)], 0)
        self._item_row = row.astype(np.int32 if row.size == 0 or row.max() < 2**31 - 1 else np.int64)
        del items, row
        order = np.lexsort((pos, ts, users))  # by user, then time, then file position
        del pos, ts
        u, p_sorted = users[order], parts[order]
        del users
        # profile walks the chains of TRAIN (train events) and VAL (train and val events) only
        chains = PARTS if self.rule == "causal" else VAL + 1
        prev = np.full((chains, n), -1, index)
        rank = np.zeros(n, index)
        for part in range(chains):
            seen = np.isin(p_sorted, KNOWN_PARTS[part])  # the events a row of `part` may see, in user order
            sel, su = order[seen], u[seen]
            same = np.zeros(len(sel), bool)
            same[1:] = su[1:] == su[:-1]
            same &= su >= 0  # rows without a user are nobody's history
            prev[part, sel[same]] = sel[np.flatnonzero(same) - 1]
            starts = np.flatnonzero(~same)
            within = np.arange(len(sel)) - np.repeat(starts, np.diff(np.r_[starts, len(sel)]))
            mine = p_sorted[seen] == part
            rank[sel[mine]] = within[mine]
        if self.rule == "profile":
            self._start = _profile_starts(order, u, p_sorted, rank)
        self._prev, self._rank, self._part = prev, rank, parts

    def item_ids(self) -> pa.Array:
        """Raw item ids by item code (what `finish` maps to rows)."""
        return self._items.known

    def rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(history int64 [n, L], history_rank int64 [n]) of rows start .. start + n - 1."""
        assert self._prev is not None and self._rank is not None and self._item_row is not None
        assert self._part is not None
        if self._start is not None:
            return self._profile_rows(start, n)
        L = self.length
        rank = self._rank[start : start + n].astype(np.int64)
        lengths = np.minimum(rank, L)
        out = np.zeros((n, L), np.int64)
        part = self._part[start : start + n]
        at = self._prev[part, np.arange(start, start + n)].astype(np.int64)
        for back in range(L):  # back = 0: the most recent earlier event; each row on its part's chain
            has = lengths > back
            if not has.any():
                break
            rows = np.flatnonzero(has)
            out[rows, lengths[rows] - 1 - back] = self._item_row[at[rows]]
            at = np.where(has, self._prev[part, np.maximum(at, 0)], -1)
        return out, rank

    def _profile_rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`rows` under the profile rule: walk back from the user's last known event, skipping the row."""
        assert self._prev is not None and self._rank is not None and self._item_row is not None
        assert self._part is not None and self._start is not None
        L = self.length
        rank = self._rank[start : start + n].astype(np.int64)
        lengths = np.minimum(rank, L)
        out = np.zeros((n, L), np.int64)
        part = self._part[start : start + n]
        chain = (part == TEST).astype(np.intp)  # 0: train events (chain TRAIN); 1: train and val (VAL)
        at = self._start[start : start + n].astype(np.int64)
        me = np.where(part == TRAIN, np.arange(start, start + n), -1)  # a train row is on its own chain
        filled = np.zeros(n, np.int64)
        for _ in range(L + 1):  # L items, plus the row itself skipped once on the way
            live = (at >= 0) & (filled < lengths)
            if not live.any():
                break
            rows = np.flatnonzero(live & (at != me))
            out[rows, lengths[rows] - 1 - filled[rows]] = self._item_row[at[rows]]
            filled[rows] += 1
            at = np.where(live, self._prev[chain, np.maximum(at, 0)], -1)
        return out, rank


def _profile_starts(order: np.ndarray, u: np.ndarray, p_sorted: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Profile rule: per row where its walk starts — the user's last event of the parts known when the
    row's part is scored (-1: none) — with `rank` overwritten in place by how many of those events the
    row may draw on (a train row not itself). `order` sorts rows by user, time, file position; `u`,
    `p_sorted` are the users and parts in that order. Per-row work goes by chunks: beside the output
    only O(users) heads and counts and O(chunk) temporaries."""
    n, users, chunk = len(order), max(int(u.max()) + 1 if len(u) else 0, 1), PROFILE_CHUNK
    heads = [np.full(users, -1, np.int64) for _ in range(2)]  # last train / last train-or-val event
    counts = [np.zeros(users, np.int64) for _ in range(2)]
    for a in range(0, n, chunk):
        uc, pc_, oc = u[a : a + chunk], p_sorted[a : a + chunk], order[a : a + chunk]
        for k, known in enumerate(((TRAIN,), (TRAIN, VAL))):
            m = np.isin(pc_, known) & (uc >= 0)
            su, sel = uc[m], oc[m]
            if len(su):
                last = np.r_[su[1:] != su[:-1], True]
                heads[k][su[last]] = sel[last]  # a later chunk holds a user's later events: it overwrites
                counts[k] += np.bincount(su, minlength=users)
    start = np.full(n, -1, rank.dtype)
    for a in range(0, n, chunk):
        uc, pc_, oc = u[a : a + chunk], p_sorted[a : a + chunk], order[a : a + chunk]
        uu, test, has = np.maximum(uc, 0), pc_ == TEST, uc >= 0
        start[oc] = np.where(has, np.where(test, heads[1][uu], heads[0][uu]), -1)
        rk = np.where(test, counts[1][uu], counts[0][uu]) - (pc_ == TRAIN)
        rank[oc] = np.where(has, rk, 0)
    return start


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
    return HistoryBuilder(h.length, h.max_rows, h.rule)


def observe_chunk(history: HistoryBuilder, table: Table, assign: np.ndarray) -> None:
    """Pass 1: record one chunk of the source (it must have user and item columns) and its rows' parts."""
    if table.user_feature is None or table.item_feature is None:
        raise UserError(
            f"data.history: the {table.kind} source has no user/item columns (data.source.user/item)"
        )
    names = table.sparse_names
    history.observe(
        table.sparse[names.index(table.user_feature)],
        table.sparse[names.index(table.item_feature)],
        table.timestamp,
        assign,
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


def history_rule(meta: Metadata) -> str:
    """data.history.rule a prepared folder was made with (folders from before the field: causal)."""
    settings = (meta.settings or {}).get("history")
    return str(settings.get("rule", "causal")) if isinstance(settings, dict) else "causal"


def jagged_history(history: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values int64, lengths int32 [n]) of the jagged `history` feature from its MDS columns."""
    lengths = np.minimum(rank, history.shape[1]).astype(np.int32)
    return history[np.arange(history.shape[1]) < lengths[:, None]], lengths
