"""The integer fast path of vocabulary encoding (ids of one byte width ≤ 8) equals the string path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from recsys.data import vocab as V


def reference(column: pa.ChunkedArray, train: np.ndarray, min_count: int) -> tuple[list[str], np.ndarray]:
    """Vocabulary and rows by plain Arrow string hashing and sorting (count desc, then id text)."""
    enc = pc.dictionary_encode(column.combine_chunks())
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    c = codes[train]
    counts = np.bincount(c[c >= 0], minlength=len(enc.dictionary))
    keep = np.flatnonzero(counts >= min_count)
    kept = pa.table({"neg": pa.array(-counts[keep]), "id": enc.dictionary.take(pa.array(keep))})
    keep = keep[pc.sort_indices(kept, sort_keys=[("neg", "ascending"), ("id", "ascending")]).to_numpy()]
    lookup = np.zeros(len(enc.dictionary) + 1, np.int64)
    lookup[keep] = np.arange(1, len(keep) + 1)
    return enc.dictionary.take(pa.array(keep)).to_pylist(), lookup[codes]


@pytest.mark.parametrize("width", [1, 3, 8])
def test_fixed_width_ids_match_the_string_path(width: int) -> None:
    rng = np.random.default_rng(width)
    alphabet = np.array(list("0123456789abcdefAé"))  # é: 2 UTF-8 bytes, so ids mix byte patterns
    ids = []
    for _ in range(3000):
        s = "".join(rng.choice(alphabet[:16], size=width))
        ids.append(None if rng.random() < 0.1 else s)
    ids += ["é" * (width // 2) + "0" * (width % 2) if width > 1 else "A"] * 5
    # Several chunks, one of them a slice, as the CSV reader's blocks and concatenation give.
    full = pa.array(ids, type=pa.string())
    column = pa.chunked_array([full.slice(0, 1000), full.slice(1000, 1500), full.slice(2500)])
    train = rng.random(len(ids)) < 0.7
    sliced = pa.chunked_array([full.slice(7)])  # one chunk with a non-zero offset
    for col, tr in ((column, train), (sliced, train[7:])):
        enc = V.encode_column(col)
        assert enc.sort_keys is not None  # the fast path ran
        for min_count in (1, 3):
            vocab, lookup = V.fit_encoded(enc, tr, min_count)
            want_ids, want_rows = reference(col, tr, min_count)
            assert vocab.ids == want_ids
            assert lookup[enc.codes].tolist() == want_rows.tolist()


def test_mixed_widths_and_empty_ids_use_the_string_path() -> None:
    column = pa.chunked_array([["ab", "abc", None, "ab"], ["", "abc"]])
    enc = V.encode_column(column)
    assert enc.sort_keys is None
    vocab, lookup = V.fit_encoded(enc, np.ones(6, bool), 1)
    assert vocab.ids == ["ab", "abc", ""]
    assert lookup[enc.codes].tolist() == [1, 2, 0, 1, 3, 2]
