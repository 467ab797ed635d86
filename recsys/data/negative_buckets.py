"""`data.negatives` in `recsys data prepare`, in memory bounded by data.chunk_rows and the items.

Between pass 1 (ids counted, chunks spilled: recsys.data.spill) and pass 2 (rows mapped and
written), prepare samples the negatives (the rule: recsys.data.negatives) in two steps:

1. partition: every spilled chunk's interactions (position, split, positive?, the user id's 128-bit
   hash, the item's catalogue index: 32 B KEY records) are appended to one file per bucket =
   hash(user id) mod B, B = ⌈rows / data.chunk_rows⌉, so a bucket holds every row of its users and
   about one chunk of rows; each catalogue item's table rows (item id and item side features) of its
   last train row are kept (per-item state, [items, 1 + item side features] int64);
2. sample: bucket by bucket, the bucket's one file is read, its users told apart by their id hash (a
   collision among 10^12 distinct users has probability ~10^-15), their (user, item) pairs with their
   earliest split built, and the negatives drawn (keyed by position, so the draws do not depend on
   B or the chunks); each bucket's negatives (position, draw k, catalogue index: 16 B records,
   sorted by position) are cut at the chunks' first positions and appended to one raw file per chunk.

Pass 2 then reads, for each chunk, its one negatives file, orders it by (position, k) and writes each
negative right after its positive (train rows shuffled within windows as usual, a negative keyed
apart: negatives.negative_keys).

Opens: B + C files in all (C spilled chunks), each written and read once (recsys.data.negative_files);
a bucket's slice of every chunk, or a chunk's negatives from every bucket, would be B × C opens
(~14.5M at 1B rows and the default chunk_rows: hours). Each phase keeps its B (then C) files open,
unbuffered, so memory does not grow with them; the open-file soft limit is raised to fit them, and a
hard limit too low is refused naming data.chunk_rows. A file is read whole only when it is used.
What remains B × C is one os.write per (chunk, bucket) and per (bucket, chunk) slice.

Disk, in the spill folder: 32 B per interaction (key files, each removed once its bucket is sampled)
and 16 B per negative (each chunk's file removed once pass 2 has read it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data import splits as S
from recsys.data import vocab as V
from recsys.data.hashing import id_hashes_128
from recsys.data.id_lookup import IdLookup
from recsys.data.negative_files import KEY, NEGATIVE, ChunkFiles, KeyFiles, ensure_open_files
from recsys.data.negatives import draw_negatives, negative_keys

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.hashing import TableMap
    from recsys.data.readers import Table
    from recsys.data.spill import ChunkSpill, SpilledChunk

#: Interactions per bucket (None: data.chunk_rows); tests set it to show buckets do not change the output.
ROWS_PER_BUCKET: int | None = None


def _catalogue(counter: V.IdCounter) -> pa.Array:
    """The items with a train row, ordered by raw id (so the order does not depend on chunking)."""
    ids, counts = counter.seen()
    ids = ids.filter(pa.array(counts > 0)).cast(pa.string())
    return ids.take(pc.sort_indices(ids))


@dataclass
class NegativeSampler:
    """Negatives of one prepare: the catalogue, each item's table rows, and the bucket files."""

    folder: Path
    per_positive: int
    seed: int
    shuffle_seed: int
    buckets: int
    user_col: int
    item_cols: list[int]  # the item feature, then its side features (their sparse columns)
    catalogue: pa.Array
    item_rows: np.ndarray = field(init=False)  # int64 [items, len(item_cols)]: values of the last train row
    chunks: ChunkFiles | None = None  # the negatives' files, one per spilled chunk (after sample)
    positives: int = 0
    sampled: int = 0

    # The catalogue hashed once: pc.index_in per chunk would hash all of it each time.
    _catalogue_lookup: IdLookup = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_rows = np.zeros((len(self.catalogue), len(self.item_cols)), np.int64)
        self._catalogue_lookup = IdLookup(self.catalogue)

    @classmethod
    def start(
        cls, cfg: Config, first: Table, counters: list[V.IdCounter], spill: ChunkSpill, rows: int
    ) -> NegativeSampler:
        """Take the catalogue from pass 1's item counter (before the vocabularies are fixed from it)."""
        names = first.sparse_names
        item = names.index(first.item_feature or "")
        item_cols = [item, *(names.index(n) for n in first.item_side)]
        per_bucket = ROWS_PER_BUCKET or cfg.data.chunk_rows
        return cls(
            folder=spill.folder,
            per_positive=cfg.data.negatives.per_positive,
            seed=cfg.data.negatives.seed,
            shuffle_seed=cfg.data.split.seed,
            buckets=max(1, math.ceil(rows / per_bucket)),
            user_col=names.index(first.user_feature or ""),
            item_cols=item_cols,
            catalogue=_catalogue(counters[item]),
        )

    @property
    def note(self) -> str:
        """The read note metadata.json keeps of the sampling."""
        return f"negatives: {self.sampled:,} sampled rows (label 0) for {self.positives:,} positives"

    # ------------------------------------------------------------------------------ step 1
    def sample(
        self, spill: ChunkSpill, maps: list[TableMap], labels_of: Callable[[SpilledChunk], np.ndarray]
    ) -> None:
        """Partition every spilled chunk's interactions by user bucket, then draw bucket by bucket;
        `labels_of` gives a chunk's binary labels (pass 2's label rule)."""
        ensure_open_files(max(self.buckets, spill.count))
        keys = KeyFiles(self.folder, self.buckets)
        starts: list[int] = []
        try:
            for i in range(spill.count):
                chunk = spill.read(i)
                positive = labels_of(chunk) > 0
                self.positives += int(positive.sum())
                starts.append(chunk.start)
                keys.append(*self._partition(chunk, positive, maps))
        finally:
            keys.close()
        self.chunks = ChunkFiles(self.folder, starts)
        try:
            for b in range(self.buckets):
                self.chunks.append(self._sample_bucket(keys.read(b)))
        finally:
            self.chunks.close()

    def _partition(
        self, chunk: SpilledChunk, positive: np.ndarray, maps: list[TableMap]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The chunk's interactions as KEY records sorted by user bucket, and each record's bucket."""
        users, items = chunk.encoded[self.user_col], chunk.encoded[self.item_cols[0]]
        item_cat = self.catalogue_index(items)
        self._observe_items(chunk, item_cat, maps)
        rows = np.flatnonzero((users.codes != users.missing) & (items.codes != items.missing))
        hashes = id_hashes_128(users.dictionary)
        bucket = (hashes[:, 0] % np.uint64(self.buckets)).astype(np.int32)[users.codes[rows]]
        order = np.argsort(bucket, kind="stable")  # stable: a bucket's rows stay in position order
        rows, bucket = rows[order], bucket[order]
        user = hashes[users.codes[rows]]
        records = np.zeros(len(rows), KEY)  # zeros: the padding bytes written are zero too
        records["pos"] = chunk.start + rows.astype(np.int64)
        records["user_lo"], records["user_hi"] = user[:, 0], user[:, 1]
        records["item"] = item_cat[rows]
        records["split"] = chunk.assign[rows]
        records["positive"] = positive[rows]
        return records, bucket

    def catalogue_index(self, items: V.Encoded) -> np.ndarray:
        """Each row's item as its catalogue index (int32; -1: missing or not in the catalogue)."""
        k = len(items.dictionary)
        cat_of = np.full(k + 1, -1, np.int32)  # the last slot: missing item
        if k:
            cat_of[:k] = self._catalogue_lookup.index_in(items.dictionary)
        return cat_of[items.codes]

    def _observe_items(self, chunk: SpilledChunk, item_cat: np.ndarray, maps: list[TableMap]) -> None:
        """Each catalogue item's table rows of its latest train row so far (chunks come in order)."""
        train = np.flatnonzero((chunk.assign == S.TRAIN) & (item_cat >= 0))[::-1]
        if not len(train):
            return
        cats, first = np.unique(item_cat[train], return_index=True)
        last = train[first]
        for col, j in enumerate(self.item_cols):
            enc = chunk.encoded[j]
            sub = V.Encoded(enc.codes[last], enc.dictionary, enc.sort_keys, enc.width)
            self.item_rows[cats, col] = maps[j].rows_encoded(sub)

    # ------------------------------------------------------------------------------ step 2
    def _sample_bucket(self, part: np.ndarray) -> np.ndarray:
        """The negatives of one bucket's users (its KEY records, in position order) as NEGATIVE
        records, sorted by position."""
        if not len(part):  # no chunk had a row of its users
            return np.empty(0, NEGATIVE)
        pos = part["pos"]
        # A code per distinct 128-bit user hash (draw_negatives only compares users for equality).
        order = np.lexsort((part["user_lo"], part["user_hi"]))
        lo, hi = part["user_lo"][order], part["user_hi"][order]
        users = np.empty(len(part), np.int64)
        users[order] = np.cumsum(np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]) - 1
        src, k, cand = draw_negatives(
            users,
            part["item"].astype(np.int64),
            part["split"],
            part["positive"],
            pos,
            len(self.catalogue),
            self.per_positive,
            self.seed,
        )
        del users, part
        self.sampled += len(src)
        out = np.empty(len(src), NEGATIVE)
        out["pos"], out["k"], out["item"] = pos[src], k, cand
        return out

    # ------------------------------------------------------------------------------ pass 2
    def _of_chunk(self, start: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position, k, catalogue index) of the negatives of rows start..start+rows-1, in order."""
        assert self.chunks is not None, "sample() writes the negatives before pass 2 reads them"
        neg = self.chunks.read(self.chunks.chunk_of(start))
        # (position, k) is unique and k < per_positive: one int64 key sorts as lexsort would, ~4x faster
        order = np.argsort(neg["pos"] * self.per_positive + neg["k"])
        neg = neg[order]
        return neg["pos"], neg["k"].astype(np.int32), neg["item"].astype(np.int32)

    def extend(
        self, start: int, assign: np.ndarray, labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A chunk's rows with each positive's negatives right behind it: (assign, labels, dense,
        sparse, positions, train shuffle keys), all in that order."""
        n = len(assign)
        pos, k, item = self._of_chunk(start, n)
        rel = pos - start
        neg_sparse = sparse[rel]
        neg_sparse[:, self.item_cols] = self.item_rows[item].astype(sparse.dtype)
        if dense.shape[1] == 0:  # DLRM's dense arch needs an input: a constant one acts as a learned bias
            dense = np.ones((n, 1), np.float32)
        own = np.arange(start, start + n, dtype=np.int64)
        order = np.argsort(np.concatenate([own, pos]), kind="stable")  # a positive, then its negatives
        keys = np.concatenate(
            [
                S.shuffle_keys(self.shuffle_seed, own),
                negative_keys(self.shuffle_seed, pos, k, self.per_positive),
            ]
        )
        return (
            np.concatenate([assign, assign[rel]])[order],
            np.concatenate([labels, np.zeros(len(rel), labels.dtype)])[order],
            np.concatenate([dense, dense[rel]])[order],
            np.concatenate([sparse, neg_sparse])[order],
            np.concatenate([own, pos])[order],
            keys[order],
        )
