"""Positions of raw ids in a set of ids hashed once (and grown), probed chunk by chunk in O(chunk).

`pyarrow.compute.index_in(values, value_set=ids)` hashes all of `ids` on every call, so looking up
every chunk of a prepare against a vocabulary or catalogue of V ids costs O(chunks × V), and so does
merging each chunk's ids into the ids seen so far by dictionary-encoding them all again. IdLookup
hashes the set once (a 64-bit hash of each id's bytes, sorted: 12 B per id beside the ids), inserts
new ids' hashes as the set grows, and answers a chunk's ids with a binary search of their hashes; an
id is found only where the bytes at the found position are equal, so a hash collision never maps an
id to another id's position. Ids of the set that share a hash with another id of the set (~V²/2^65
pairs: most likely none at 4M ids) are looked up among themselves by string: many collisions would
cost time, never a wrong position.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_BLOCK_BYTES = 1 << 20  # id bytes hashed per numpy pass: ~50 MB of temporaries, whatever the set's size
_BLOCK_IDS = 1 << 17  # and at most this many ids (their per-id temporaries)
#: A set at most this many times the values looked up is searched by pc.index_in: hashing it there
#: costs less than this module's slower hashing and probing of the values (several times Arrow's
#: cost per id, measured), and is O(values) too.
SMALL_SET = 4
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial's base (the golden-ratio constant)


def _strings(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous string or large_string array (other types cast to string)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        ids = ids.cast(pa.string())
    return ids


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit moves every output bit (in place, returns x)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def string_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each id's bytes (uint64 [len(ids)]; a null hashes as its slot's bytes, usually
    empty). Not for storage or across versions: only equal bytes are promised equal hashes."""
    arr = _strings(ids)
    n = len(arr)
    out = np.zeros(n, np.uint64)
    if n == 0:
        return out
    wide = pa.types.is_large_string(arr.type)
    offs = np.frombuffer(
        arr.buffers()[1], np.int64 if wide else np.int32, n + 1, arr.offset * (8 if wide else 4)
    )
    offs = offs.astype(np.int64)
    data = arr.buffers()[2]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    longest = int(np.diff(offs).max())
    powers = np.cumprod(np.full(max(longest, 1), _MULT, np.uint64))  # base^(j+1) mod 2^64, wrapping
    s = 0
    while s < n:
        fits = int(np.searchsorted(offs, offs[s] + _BLOCK_BYTES, side="right")) - 1
        e = min(max(s + 1, fits), s + _BLOCK_IDS, n)
        o = offs[s : e + 1] - offs[s]
        lens = np.diff(o)
        seg = raw[offs[s] : offs[e]].astype(np.uint64)
        at = np.arange(len(seg), dtype=np.int64) - np.repeat(o[:-1], lens)  # each byte's place in its id
        sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum((seg + np.uint64(1)) * powers[at])])
        h = sums[o[1:]] - sums[o[:-1]]  # Σ (byte + 1) · base^(j+1) over the id's bytes, mod 2^64
        out[s:e] = _mix(h ^ lens.astype(np.uint64))
        s = e
    return out


class IdLookup:
    """Positions of ids in `ids` (a set of distinct, non-null ids that only grows), as pc.index_in
    with value_set=ids gives them, with the set hashed once (on the first lookup that needs it) and
    new ids hashed as they are added; memory 12 B per id beside the ids."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray) -> None:
        """Keep the set; it is hashed on the first lookup of values it outnumbers SMALL_SET times."""
        self.ids = _strings(ids)
        self._hashes: np.ndarray | None = None

    def _build(self) -> None:
        hashes = string_hashes(self.ids)
        order = np.argsort(hashes, kind="stable")  # stable: equal hashes keep the lower position first
        self._hashes = hashes[order]
        self._positions = order.astype(np.int32 if len(order) < 2**31 else np.int64)
        self._find_shared()

    def _find_shared(self) -> None:
        """Note the ids that share a hash: a search finds the first of them, the others by string."""
        assert self._hashes is not None
        shared = np.zeros(len(self._hashes), bool)
        same = self._hashes[1:] == self._hashes[:-1]
        shared[1:] |= same
        shared[:-1] |= same
        self._shared_hashes = np.unique(self._hashes[shared])
        self._shared_positions = np.sort(self._positions[shared])
        self._shared_ids = self.ids.take(pa.array(self._shared_positions))

    def _append(self, new: pa.Array, hashes: np.ndarray | None) -> None:
        """Append ids that are not in the set (`hashes`: theirs, when known); positions follow the
        set's. Costs a copy of the set's arrays, no re-hashing of it."""
        base = len(self.ids)
        self.ids = pa.concat_arrays([self.ids, new])
        if self._hashes is None or not len(new):
            return
        h = string_hashes(new) if hashes is None else hashes
        order = np.argsort(h, kind="stable")
        # After the equal hashes already there: within a hash, positions stay in increasing order.
        where = np.searchsorted(self._hashes, h[order], side="right")
        if len(self.ids) >= 2**31:
            self._positions = self._positions.astype(np.int64)
        self._hashes = np.insert(self._hashes, where, h[order])
        self._positions = np.insert(self._positions, where, (base + order).astype(self._positions.dtype))
        self._find_shared()

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the ids themselves (0 until the set is hashed)."""
        if self._hashes is None:
            return 0
        return self._hashes.nbytes + self._positions.nbytes + self._shared_positions.nbytes

    def index_in(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Position in the set of each value (int64 [len(values)]; -1: null or not in the set)."""
        return self._index_in(_strings(values).cast(self.ids.type))[0]

    def index_or_add(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Position of each value (distinct, non-null ids), the ones not in the set appended to it in
        their order (int64 [len(values)]): a dictionary encoding that keeps first-seen order."""
        values = _strings(values).cast(self.ids.type)
        at, h = self._index_in(values)
        new = at < 0
        if new.any():
            at[new] = len(self.ids) + np.arange(int(new.sum()))
            self._append(values.filter(pa.array(new)), None if h is None else h[new])
        return at

    def _index_in(self, values: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """index_in, and the values' hashes when it computed them."""
        if not len(values) or not len(self.ids):
            return np.full(len(values), -1, np.int64), None
        if len(self.ids) <= SMALL_SET * len(values):  # Arrow's one-off hash of the set costs less
            found = pc.index_in(values, value_set=self.ids)
            return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64), None
        if self._hashes is None:
            self._build()
        assert self._hashes is not None
        out = np.full(len(values), -1, np.int64)
        h = string_hashes(values)
        # Searched in hash order, the binary searches walk the table forward and stay in cache.
        order = np.argsort(h)
        at = np.minimum(np.searchsorted(self._hashes, h[order]), len(self._hashes) - 1)
        hit = self._hashes[at] == h[order]
        rows, pos = order[hit], self._positions[at[hit]]
        # Equal hashes are candidates only: the bytes decide (a null value is never equal).
        same = pc.equal(values.take(pa.array(rows)), self.ids.take(pa.array(pos)))
        same = same.fill_null(False).to_numpy(zero_copy_only=False)
        out[rows[same]] = pos[same]
        if len(self._shared_hashes):
            self._resolve_shared(values, h, out)
        return out, h

    def _resolve_shared(self, values: pa.Array, h: np.ndarray, out: np.ndarray) -> None:
        """Values whose hash several ids of the set share: found by string among those ids."""
        rows = np.flatnonzero(np.isin(h, self._shared_hashes) & (out < 0))
        if len(rows):
            found = pc.index_in(values.take(pa.array(rows)), value_set=self._shared_ids)
            found = found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            out[rows[found >= 0]] = self._shared_positions[found[found >= 0]]
