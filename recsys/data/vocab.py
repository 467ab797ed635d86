"""Vocabularies: raw id (string) → embedding row, fit on the train split.

Row 0 is the out-of-vocabulary row: missing values, ids seen fewer than `min_count` times in train,
and ids that appear only in val/test all map there. Rows 1.. are the kept ids ordered by descending
train count, then by the id's text, so the same data always gives the same vocabulary. Vocabularies
are saved beside the data (vocab/<feature>.txt, line k = raw id of row k) so embeddings map back
to real ids. Ids are compared as exact strings: "0" is an id like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.id_lookup import IdLookup
from recsys.data.metadata import OOV_TOKEN, read_vocab_file
from recsys.errors import DataError


@dataclass
class Vocab:
    """The kept raw ids of one feature; row i+1 holds ids[i], row 0 is OOV."""

    ids: list[str]

    @property
    def num_embeddings(self) -> int:
        """Rows of the embedding table (vocabulary + the OOV row)."""
        return len(self.ids) + 1

    def raw(self, row: int) -> str:
        """Raw id of an embedding row (OOV_TOKEN for row 0)."""
        return OOV_TOKEN if row == 0 else self.ids[row - 1]

    def row(self, raw_id: str) -> int:
        """Embedding row of a raw id (0 when not in the vocabulary)."""
        if not hasattr(self, "_index"):
            self._index = {v: i + 1 for i, v in enumerate(self.ids)}
        return self._index.get(raw_id, 0)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary file: line 0 is the OOV token, line k the raw id of row k."""
        bad = next((v for v in self.ids if "\n" in v or "\r" in v), None)
        if bad is not None:
            raise DataError(f"{path}: raw id {bad!r} contains a line break; it cannot be saved")
        Path(path).write_text("\n".join([OOV_TOKEN, *self.ids]) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a vocabulary file written by save()."""
        return cls(ids=read_vocab_file(path)[1:])


def encode(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dictionary-encode raw ids: (codes int64 [n], -1 = missing; dictionary of distinct ids)."""
    enc = encode_column(column)
    codes = enc.codes.astype(np.int64)
    codes[codes == len(enc.dictionary)] = -1
    return codes, enc.dictionary


@dataclass
class Encoded:
    """One dictionary-encoded sparse column (see encode_column)."""

    codes: np.ndarray  # int32 [n]: index into dictionary; len(dictionary) = missing
    dictionary: pa.Array  # distinct ids (strings), in order of first appearance
    sort_keys: np.ndarray | None = None  # uint64 per dictionary entry, ordered as the ids' bytes
    width: int = 0  # byte length of every id when sort_keys is set

    @property
    def missing(self) -> int:
        """The code of a missing value (one past the dictionary)."""
        return len(self.dictionary)


def _as_array(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if column.type != pa.string():
        column = column.cast(pa.string())
    return column


def _fixed_width_keys(arr: pa.StringArray) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """The present ids as uint64 integers when they all have the same byte length w (1..8).

    Returns (keys of the present ids [n - missing], present mask or None when none is missing, w),
    or None when the widths differ. A key holds the id's bytes little-endian, zero-padded, so equal
    keys are equal ids; hashing integers instead of strings makes dictionary encoding ~2x cheaper
    (Criteo's ids are all 8 hex characters).
    """
    n, present = len(arr), len(arr) - arr.null_count
    if present == 0:
        return None
    offs = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    lens = np.diff(offs)
    valid = None if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    if valid is None:
        width = int(lens[0])
        ok = 1 <= width <= 8 and int(lens.min()) == int(lens.max()) == width
    else:
        width = int(lens[np.argmax(valid)])
        # Present ids all `width` long, and null slots hold no bytes: the present ids are contiguous.
        ok = 1 <= width <= 8 and bool((lens[valid] == width).all()) and offs[-1] - offs[0] == width * present
    if not ok:
        return None
    raw = np.frombuffer(arr.buffers()[2], np.uint8, present * width, int(offs[0]))
    if width == 8:
        keys = raw.view(np.uint64)
        if not keys.flags.aligned:
            keys = keys.copy()
    else:
        padded = np.zeros((present, 8), np.uint8)
        padded[:, :width] = raw.reshape(present, width)
        keys = padded.view(np.uint64).ravel()
    return keys, valid, width


def encode_column(column: pa.ChunkedArray | pa.Array) -> Encoded:
    """Dictionary-encode one column of raw ids (strings; null = missing) with Arrow's hashing."""
    arr = _as_array(column)
    arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if isinstance(arr, pa.ChunkedArray):  # empty chunked arrays stay chunked
        arr = pa.array([], type=pa.string())
    fixed = _fixed_width_keys(arr)
    if fixed is None:
        enc = pc.dictionary_encode(arr)
        k = len(enc.dictionary)
        codes = enc.indices.fill_null(k).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        return Encoded(codes=codes, dictionary=enc.dictionary)
    keys, valid, width = fixed
    enc = pc.dictionary_encode(pa.array(keys))
    dict_keys = enc.dictionary.to_numpy()
    k = len(dict_keys)
    idx = enc.indices.to_numpy()
    if valid is None:
        codes = idx
    else:
        codes = np.full(len(arr), k, np.int32)
        codes[valid] = idx
    data = np.ascontiguousarray(dict_keys.view(np.uint8).reshape(k, 8)[:, :width])
    offsets = np.arange(k + 1, dtype=np.int32) * np.int32(width)
    dictionary = pa.StringArray.from_buffers(k, pa.py_buffer(offsets), pa.py_buffer(data))
    # Byte-swapped keys order like the ids' bytes, i.e. like Arrow's sort of the strings.
    return Encoded(codes=codes, dictionary=dictionary, sort_keys=dict_keys.byteswap(), width=width)


def fit_encoded(enc: Encoded, train: np.ndarray, min_count: int) -> tuple[Vocab, np.ndarray]:
    """Fit on the train rows (`train` is a bool mask); returns the vocab and a code → row lookup
    (int64 [len(dictionary) + 1]; its last slot, the missing code, is row 0)."""
    k = len(enc.dictionary)
    counts = np.bincount(enc.codes[train], minlength=k + 1)[:k]
    keep = np.flatnonzero(counts >= min_count)
    if enc.sort_keys is not None:
        order = np.lexsort((enc.sort_keys[keep], -counts[keep]))
    else:
        kept = pa.table({"neg": pa.array(-counts[keep]), "id": enc.dictionary.take(pa.array(keep))})
        order = pc.sort_indices(kept, sort_keys=[("neg", "ascending"), ("id", "ascending")]).to_numpy()
    keep = keep[order]
    lookup = np.zeros(k + 1, dtype=np.int64)
    lookup[keep] = np.arange(1, len(keep) + 1)
    vocab = Vocab(ids=enc.dictionary.take(pa.array(keep)).to_pylist())
    return vocab, lookup


def fit(
    codes: np.ndarray, dictionary: pa.Array, train: np.ndarray, min_count: int
) -> tuple[Vocab, np.ndarray]:
    """Fit on the train rows (`train` is a bool mask); returns the vocab and a code → row lookup."""
    k = len(dictionary)
    c = np.where(codes < 0, k, codes).astype(np.int32)
    return fit_encoded(Encoded(codes=c, dictionary=dictionary), train, min_count)


def apply(codes: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Rows of every code (missing → 0): lookup[-1] is the missing slot."""
    return lookup[codes]


def _keys_to_strings(sort_keys: np.ndarray, width: int) -> pa.StringArray:
    """The ids behind byte-ordered uint64 keys of `width`-byte ids (see _fixed_width_keys)."""
    k = len(sort_keys)
    data = np.ascontiguousarray(sort_keys.byteswap().view(np.uint8).reshape(k, 8)[:, :width])
    offsets = np.arange(k + 1, dtype=np.int32) * np.int32(width)
    return pa.StringArray.from_buffers(k, pa.py_buffer(offsets), pa.py_buffer(data))


class IdCounter:
    """Train counts of one sparse feature's raw ids, merged chunk by chunk; memory ∝ distinct ids.

    While every chunk's ids share one byte width <= 8 (Criteo's hex ids), ids are kept as sorted uint64
    keys (merges are a searchsorted and an insert, no string hashing); otherwise as an Arrow string
    dictionary merged by Arrow's hashing. After `finish`, `rows` maps a chunk's ids to embedding rows
    with the same vocabulary `fit_encoded` gives on all rows at once: descending train count, then bytes.
    """

    def __init__(self) -> None:
        self.width: int | None = None  # key mode while set; 0 = not decided yet
        self.keys = np.zeros(0, np.uint64)  # key mode: sorted byte-ordered keys
        self.ids: pa.Array = pa.array([], pa.string())  # string mode: distinct ids, first-seen order
        self.counts = np.zeros(0, np.int64)
        self._started = False
        self._lookup: IdLookup | None = None  # after finish: the vocabulary hashed for string lookups
        self._seen: IdLookup | None = None  # string mode while counting: `ids` hashed for the merges

    def _to_strings(self) -> None:
        if self.width is not None and self._started:
            self.ids = _keys_to_strings(self.keys, self.width)
            self.keys = np.zeros(0, np.uint64)
        self.width, self._seen = None, None

    def add(self, column: pa.ChunkedArray | pa.Array, train: np.ndarray) -> Encoded:
        """Count the ids of the rows where `train` (bool mask) is set; returns the column's encoding."""
        enc = encode_column(column)
        self.add_encoded(enc, train)
        return enc

    def add_encoded(self, enc: Encoded, train: np.ndarray) -> None:
        """Count the ids of an encoded column at the rows where `train` (bool mask) is set."""
        k = len(enc.dictionary)
        counts = np.bincount(enc.codes[train], minlength=k + 1)[:k]
        seen = np.flatnonzero(counts)
        if not len(seen):
            return
        if not self._started:
            self._started, self.width = True, enc.width if enc.sort_keys is not None else None
        elif self.width is not None and (enc.sort_keys is None or enc.width != self.width):
            self._to_strings()
        if self.width is not None:
            assert enc.sort_keys is not None
            self._add_keys(enc.sort_keys[seen], counts[seen])
        else:
            self._add_strings(enc.dictionary.take(pa.array(seen)), counts[seen])

    def _add_keys(self, keys: np.ndarray, counts: np.ndarray) -> None:
        at = np.searchsorted(self.keys, keys)
        hit = at < len(self.keys)
        hit[hit] = self.keys[at[hit]] == keys[hit]
        self.counts[at[hit]] += counts[hit]
        new = np.argsort(keys[~hit])
        new_keys, new_counts = keys[~hit][new], counts[~hit][new]
        where = np.searchsorted(self.keys, new_keys)
        self.keys = np.insert(self.keys, where, new_keys)
        self.counts = np.insert(self.counts, where, new_counts)

    def _add_strings(self, ids: pa.Array, counts: np.ndarray) -> None:
        # The ids seen so far are hashed once and grown (hashing all of them again for every chunk
        # made pass 1 O(chunks × distinct ids)); new ids are appended in first-seen order.
        if self._seen is None:
            self._seen = IdLookup(self.ids)
        old = len(self.ids)
        at = self._seen.index_or_add(ids)
        self.ids = self._seen.ids
        grown = np.zeros(len(self.ids), np.int64)
        grown[:old] = self.counts
        grown[at] += counts  # `ids` are distinct, so no index repeats
        self.counts = grown

    def seen(self) -> tuple[pa.Array, np.ndarray]:
        """Every id counted so far (strings) and its train count; call before `finish`."""
        if self.width is not None and self._started:
            return _keys_to_strings(self.keys, self.width), self.counts.copy()
        return self.ids, self.counts.copy()

    def finish(self, min_count: int, previous: pa.Array | None = None) -> pa.Array:
        """Fix the vocabulary (ids with train count >= min_count); returns its ids in row order (rows 1..).

        With `previous` (an earlier window's ids in row order) those keep rows 1..P and the new ids follow."""
        if previous is not None:
            return self._finish_after(previous, min_count)
        keep = np.flatnonzero(self.counts >= min_count)
        if self.width is not None:
            order = np.lexsort((self.keys[keep], -self.counts[keep]))
            self._sorted_keys = self.keys[keep]
            self._sorted_rows = np.empty(len(keep), np.int64)
            self._sorted_rows[order] = np.arange(1, len(keep) + 1)
            vocab = _keys_to_strings(self._sorted_keys[order], self.width)
        else:
            kept = pa.table({"neg": pa.array(-self.counts[keep]), "id": self.ids.take(pa.array(keep))})
            order = pc.sort_indices(kept, sort_keys=[("neg", "ascending"), ("id", "ascending")])
            vocab = kept.column("id").take(order).combine_chunks()
        self.vocab, self._lookup, self._seen = vocab, None, None
        self.keys, self.ids, self.counts = (
            np.zeros(0, np.uint64),
            pa.array([], pa.string()),
            np.zeros(0, np.int64),
        )
        return vocab

    def _finish_after(self, previous: pa.Array, min_count: int) -> pa.Array:
        """Grow an earlier vocabulary: its ids keep their rows; ids new to it with train count >= min_count
        are appended by descending count, then bytes (the order a fresh vocabulary has)."""
        ids, counts = self.seen()
        previous = previous.cast(pa.string())
        kept = counts >= min_count
        ids, counts = ids.filter(pa.array(kept)), counts[kept]
        new = ~pc.is_in(ids, value_set=previous).to_numpy(zero_copy_only=False)
        table = pa.table({"neg": pa.array(-counts[new]), "id": ids.filter(pa.array(new))})
        order = pc.sort_indices(table, sort_keys=[("neg", "ascending"), ("id", "ascending")])
        vocab = pa.concat_arrays([previous, table.column("id").take(order).combine_chunks()])
        fixed = _fixed_width_keys(vocab) if len(vocab) and vocab.null_count == 0 else None
        if self.width is not None and fixed is not None and fixed[2] == self.width:
            keys = fixed[0].byteswap()  # byte-ordered, as the counter's keys
            at = np.argsort(keys)
            self._sorted_keys, self._sorted_rows = keys[at], (at + 1).astype(np.int64)
        else:  # ids of other widths than this window's: look rows up by string
            self.width = None
        self.vocab, self._lookup, self._seen = vocab, None, None
        self.keys, self.ids, self.counts = (
            np.zeros(0, np.uint64),
            pa.array([], pa.string()),
            np.zeros(0, np.int64),
        )
        return vocab

    def rows(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Embedding rows (int64) of a column of raw ids: 0 for missing and out-of-vocabulary ids."""
        return self.rows_encoded(encode_column(column))

    def rows_encoded(self, enc: Encoded) -> np.ndarray:
        """Embedding rows (int64) of an encoded column: 0 for missing and out-of-vocabulary ids."""
        k = len(enc.dictionary)
        lookup = np.zeros(k + 1, np.int64)  # the last slot is the missing code → row 0
        if self.width is not None and enc.sort_keys is not None:
            # Fixed-width keys on both sides; ids of another width than the vocabulary's never hit.
            if enc.width == self.width and len(self._sorted_keys):
                # Looked up in key order, the binary searches walk the vocabulary forward and stay in
                # cache: ~3x fewer CPU-seconds than in the dictionary's first-seen order.
                order = np.argsort(enc.sort_keys)
                keys = enc.sort_keys[order]
                at = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
                hit = self._sorted_keys[at] == keys
                lookup[order] = np.where(hit, self._sorted_rows[at], 0)
        elif k:  # string ids, or a chunk of mixed widths: by the vocabulary's hashed ids
            lookup[:k] = self._vocab_lookup().index_in(enc.dictionary) + 1
        return lookup[enc.codes]

    def _vocab_lookup(self) -> IdLookup:
        """The vocabulary hashed once for every chunk's string lookups (pc.index_in per chunk would
        hash all of it each time: O(chunks × vocabulary))."""
        if self._lookup is None:
            self._lookup = IdLookup(self.vocab)
        return self._lookup


def save_ids(path: str | Path, ids: pa.Array) -> None:
    """Write a vocabulary file from Arrow ids in row order; the same bytes as Vocab(ids).save(path)."""
    ids = ids.cast(pa.string())
    breaks = pc.match_substring_regex(ids, "[\r\n]")
    if pc.any(breaks).as_py():
        bad = ids.filter(breaks)[0].as_py()
        raise DataError(f"{path}: raw id {bad!r} contains a line break; it cannot be saved")
    with open(path, "wb") as f:
        f.write(OOV_TOKEN.encode("utf-8") + b"\n")
        step = 1 << 20  # bounded copies for large vocabularies
        for start in range(0, len(ids), step):
            part = ids.slice(start, step)
            joined = pc.binary_join(pa.ListArray.from_arrays([0, len(part)], part), "\n")[0]
            f.write(joined.as_py().encode("utf-8") + b"\n")


def encoded_from_dictionary(codes: np.ndarray, dictionary: pa.Array) -> Encoded:
    """An Encoded rebuilt from its codes and dictionary (with the byte-ordered keys when fixed-width)."""
    arr = _as_array(dictionary).combine_chunks() if not isinstance(dictionary, pa.Array) else dictionary
    fixed = _fixed_width_keys(arr.cast(pa.string())) if len(arr) and arr.null_count == 0 else None
    if fixed is None:
        return Encoded(codes=codes, dictionary=arr)
    keys, _, width = fixed
    return Encoded(codes=codes, dictionary=arr, sort_keys=keys.byteswap(), width=width)


def row_mapping(old: Vocab, new: Vocab, missing: int = 0) -> np.ndarray:
    """int64 [new.num_embeddings]: for each row of `new`, the row of the same raw id in `old`
    (`missing` when `old` lacks it); row 0 (OOV) maps to 0.

    What a model trained on `old` sees of data encoded with `new`: `row_mapping(old, new)[rows]`,
    so ids it never saw land in its OOV row; warm start passes missing=-1 to tell new ids apart.
    """
    found = pc.index_in(pa.array(new.ids, pa.string()), value_set=pa.array(old.ids, pa.string()))
    out = np.zeros(new.num_embeddings, np.int64)
    out[1:] = found.fill_null(missing - 1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    return out
