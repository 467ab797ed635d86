"""The spill between prepare's passes (recsys.data.spill) gives back exactly what pass 1 wrote, whatever
the width of a chunk's dictionary indices (int8, int16 or int32 on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.data import vocab as V
from recsys.data.spill import ChunkSpill, SpilledChunk


def _column(rng: np.random.Generator, rows: int, distinct: int, fixed: bool) -> pa.Array:
    """Exactly `distinct` ids (8 hex characters when `fixed`, else of varying width), then random ones
    of them with 5 % null: the dictionary has `distinct` entries and the missing code is `distinct`."""
    values = np.r_[np.arange(distinct), rng.integers(0, distinct, rows - distinct)]
    text = [f"{v:08x}" if fixed else f"id{v}" for v in values]
    return pa.array(
        text, pa.string(), mask=np.r_[np.zeros(distinct, bool), rng.random(rows - distinct) < 0.05]
    )


# Missing code 127 still fits int8, 128 needs int16; 32767 fits int16, 32768 needs int32.
@pytest.mark.parametrize("distinct", [3, 127, 128, 32767, 32768])
def test_spill_round_trip_every_index_width(tmp_path: Path, distinct: int) -> None:
    rng = np.random.default_rng(distinct)
    rows = distinct + 1000
    encoded = [V.encode_column(_column(rng, rows, distinct, fixed)) for fixed in (True, False)]
    assign = rng.integers(0, 3, rows).astype(np.int8)
    label = rng.random(rows)
    dense = rng.random((rows, 3)).astype(np.float32)
    spill = ChunkSpill(tmp_path)
    try:
        spill.write(SpilledChunk(17, assign, label, dense, encoded))
        (back,) = list(spill)
    finally:
        spill.close()
    assert back.start == 17
    np.testing.assert_array_equal(back.assign, assign)
    np.testing.assert_array_equal(back.label, label)
    np.testing.assert_array_equal(back.dense, dense)
    for got, want in zip(back.encoded, encoded, strict=True):
        assert want.missing == distinct and (want.codes == distinct).any()
        assert got.codes.dtype == np.int32
        np.testing.assert_array_equal(got.codes, want.codes)
        assert got.dictionary.equals(want.dictionary)
        assert got.width == want.width
        if want.sort_keys is not None:
            np.testing.assert_array_equal(got.sort_keys, want.sort_keys)
    assert not spill.folder.exists()
