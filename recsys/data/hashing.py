"""Tables for unbounded id spaces: how a column of raw ids becomes table rows beyond exact vocabularies.

Three kinds (model.tables / model.table_default, see docs/tables.md):

- exact: recsys.data.vocab as before (row 0 = OOV; one row per train id seen min_count times).
- capped (max_rows = M, hashed_rows = H): row 0 = missing value; rows 1..K (K = M - 1 - H) hold the K
  most frequent train ids (count >= min_count), in the exact vocabulary's order; every other id (rarer,
  beyond the cap, or never seen in train) goes to row K + 1 + id_hash(id) mod H. The vocabulary file
  names the shared rows `<HASHED j>` so exported embeddings say which rows no single id owns.
- managed_collision: the data carries id_hash(id) itself (int64; 0 = missing value) and TorchRec's
  MCH module maps it to one of M rows while training (recsys.models.tables). The vocabulary file
  lists the train ids (by count) so exported embeddings can be keyed by raw id.

id_hash is BLAKE2b-64 of the id's UTF-8 bytes (person b"recsys-id"), little-endian, modulo 2^63 - 1:
stable across processes, machines and languages (Python's hash() is salted per process).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from recsys.data import vocab as V

if TYPE_CHECKING:
    from recsys.config import TableConfig

HASH_NAME = "blake2b-64(utf-8, person=recsys-id) mod 2^63-1"
UNUSED_TOKEN = "<UNUSED>"
_MOD = (1 << 63) - 1  # keeps int64 max free: TorchRec's MCH marks empty slots with it


def _digest(raw_id: str, size: int, person: bytes) -> bytes:
    """BLAKE2b of the id's UTF-8 bytes: the one stable id hash every use below derives from."""
    return hashlib.blake2b(raw_id.encode("utf-8"), digest_size=size, person=person).digest()


def id_hash(raw_id: str) -> int:
    """The stable 63-bit hash of one raw id (what managed-collision data carries)."""
    return int.from_bytes(_digest(raw_id, 8, b"recsys-id"), "little") % _MOD


def id_hashes(ids: list[str]) -> np.ndarray:
    """id_hash of each id (int64 [len(ids)])."""
    return np.fromiter((id_hash(v) for v in ids), dtype=np.int64, count=len(ids))


def id_hashes_128(ids: pa.Array) -> np.ndarray:
    """128-bit BLAKE2b of each id (uint64 [len(ids), 2], person b"recsys-user"): ids told apart by hash
    where keeping the strings would cost too much (data.negatives' user buckets)."""
    digests = b"".join(_digest(v, 16, b"recsys-user") for v in ids.cast(pa.string()).to_pylist())
    return np.frombuffer(digests, "<u8").reshape(len(ids), 2)


def hashed_token(j: int) -> str:
    """Vocabulary-file name of the j-th shared (hashed) row of a capped table."""
    return f"<HASHED {j}>"


class TableMap:
    """One feature's table in prepare (recsys.data.prepare): the ids of its vocabulary file and the
    value each raw id is written as, fixed from the train counts of a vocab.IdCounter: exact rows,
    capped rows with the tail hashed into the shared rows, or the id hashes of a managed-collision table.
    """

    def __init__(
        self, counter: V.IdCounter, min_count: int, spec: TableConfig | None, previous: pa.Array | None = None
    ) -> None:
        """Fix the table; `previous` (an earlier window's owned ids, in row order) keep their rows."""
        self.counter = counter
        self.kind = "exact" if spec is None else spec.kind
        self.hashed_rows, self.collisions = 0, None
        if self.kind == "managed_collision":
            self.ids = counter.finish(1, previous)  # every train id listed, so exports are keyed by raw id
            self.num_embeddings = spec.max_rows or 0  # type: ignore[union-attr]
            self.max_value = _MOD
            return
        seen = counter.seen() if self.kind == "capped" else None
        exact = counter.finish(min_count, previous)
        if self.kind == "exact":
            self.ids, self.num_embeddings, self.max_value = exact, len(exact) + 1, len(exact)
            return
        max_rows, hashed = spec.max_rows or 0, spec.resolved_hashed_rows()  # type: ignore[union-attr]
        self.keep, self.hashed_rows, self.num_embeddings, self.max_value = (
            max_rows - 1 - hashed,
            hashed,
            max_rows,
            max_rows - 1,
        )
        kept = exact.slice(0, self.keep).to_pylist()
        fill = [UNUSED_TOKEN] * (self.keep - len(kept)) + [hashed_token(j) for j in range(hashed)]
        self.ids = pa.array(kept + fill, pa.string())
        assert seen is not None
        self.collisions = self._collisions(*seen)

    def rows_encoded(self, enc: V.Encoded) -> np.ndarray:
        """The value written for each row of an encoded column (int64; 0 = missing value)."""
        k = len(enc.dictionary)
        if self.kind == "managed_collision":
            values = np.zeros(k + 1, np.int64)
            values[:k] = id_hashes(enc.dictionary.to_pylist())
            return values[enc.codes]
        rows = self.counter.rows_encoded(enc)
        if self.kind == "exact":
            return rows
        tail = ((rows == 0) | (rows > self.keep)) & (enc.codes != k)
        if tail.any():
            codes, inverse = np.unique(enc.codes[tail], return_inverse=True)
            hashes = id_hashes(enc.dictionary.take(pa.array(codes)).to_pylist())
            rows = rows.copy()
            rows[tail] = (self.keep + 1 + hashes % self.hashed_rows)[inverse]
        return rows

    def _collisions(self, ids: pa.Array, counts: np.ndarray) -> dict[str, int]:
        """What shares rows among the train ids, counted on train."""
        train = counts > 0
        ids, counts = ids.filter(pa.array(train)), counts[train]
        rows = self.rows_encoded(V.encode_column(ids))
        per_row = np.bincount(rows, minlength=self.num_embeddings)
        shared = per_row[rows] > 1
        return {
            "train_ids": int(len(rows)),
            "train_ids_in_shared_rows": int(shared.sum()),
            "train_values": int(counts.sum()),
            "train_values_in_shared_rows": int(counts[shared].sum()),
        }
