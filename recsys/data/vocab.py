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

from recsys.data.metadata import OOV_TOKEN
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
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines or lines[0] != OOV_TOKEN:
            raise DataError(f"{path}:1: expected the OOV token {OOV_TOKEN!r}")
        return cls(ids=lines[1:])


def encode(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dictionary-encode raw ids: (codes int64 [n], -1 = missing; dictionary of distinct ids)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.ChunkedArray):  # empty chunked arrays stay chunked
        arr = pa.array([], type=pa.string())
    enc = pc.dictionary_encode(arr)
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, enc.dictionary


def fit(
    codes: np.ndarray, dictionary: pa.Array, train: np.ndarray, min_count: int
) -> tuple[Vocab, np.ndarray]:
    """Fit on the train rows (`train` is a bool mask); returns the vocab and a code → row lookup."""
    c = codes[train]
    counts = np.bincount(c[c >= 0], minlength=len(dictionary))
    keep = np.flatnonzero(counts >= min_count)
    kept = pa.table({"neg": pa.array(-counts[keep]), "id": dictionary.take(pa.array(keep))})
    order = pc.sort_indices(kept, sort_keys=[("neg", "ascending"), ("id", "ascending")]).to_numpy()
    keep = keep[order]
    lookup = np.zeros(len(dictionary) + 1, dtype=np.int64)  # last slot: code -1 (missing) → row 0
    lookup[keep] = np.arange(1, len(keep) + 1)
    vocab = Vocab(ids=dictionary.take(pa.array(keep)).to_pylist())
    return vocab, lookup


def apply(codes: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Rows of every code (missing → 0): lookup[-1] is the missing slot."""
    return lookup[codes]
