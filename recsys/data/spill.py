"""Pass 1's chunks kept on disk between the passes of `recsys data prepare` (Arrow IPC, uncompressed).

Pass 1 has parsed every chunk and dictionary-encoded its sparse columns to count ids; pass 2 reads
those encodings back (one file per chunk, deleted once read) instead of parsing and hashing the raw
files again, so only the chunk's distinct ids are looked up in the vocabularies. Disk use is 1, 2 or
4 bytes a row per sparse feature (the narrowest index of the chunk's dictionary) + 4 per dense
feature, in a hidden folder of the output. Uncompressed and memory-mapped when read back: lz4 saved
~40 % of the disk for ~0.2 CPU-s per 1M Criteo rows (6 % of prepare's CPU), the disk being the
cheaper of the two.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys.data.vocab import Encoded, encoded_from_dictionary

SPILL_COMPRESSION: str | None = None  # Arrow IPC body compression of the spill (None, "lz4" or "zstd")


@dataclass
class SpilledChunk:
    """One chunk as pass 2 needs it: rows start.., their split, labels, dense values, encoded ids."""

    start: int
    assign: np.ndarray  # int8 [n]
    label: np.ndarray | None  # raw float64 labels (None: the source has none)
    dense: np.ndarray  # float32 [n, D]
    encoded: list[Encoded]

    @property
    def rows(self) -> int:
        """Number of rows."""
        return len(self.assign)


def _index_type(missing: int) -> type:
    """The narrowest signed integer holding codes 0..missing (Arrow's dictionary indices are signed)."""
    for t in (np.int8, np.int16):
        if missing <= np.iinfo(t).max:
            return t
    return np.int32


class ChunkSpill:
    """Write chunks during pass 1, iterate them (each read once, then deleted) in pass 2."""

    def __init__(self, parent: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=".spill-", dir=parent))
        self.count = 0

    def write(self, chunk: SpilledChunk) -> None:
        """Keep one chunk on disk."""
        cols: dict[str, pa.Array] = {"assign": pa.array(chunk.assign)}
        if chunk.label is not None:
            cols["label"] = pa.array(chunk.label)
        for i in range(chunk.dense.shape[1]):
            cols[f"dense_{i}"] = pa.array(np.ascontiguousarray(chunk.dense[:, i]))
        for j, enc in enumerate(chunk.encoded):
            missing = enc.codes == enc.missing
            codes = enc.codes.astype(_index_type(enc.missing), copy=False)
            idx = pa.array(codes, mask=missing if missing.any() else None)
            cols[f"sparse_{j}"] = pa.DictionaryArray.from_arrays(idx, enc.dictionary)
        table = pa.table(cols).replace_schema_metadata(
            {"start": str(chunk.start), "dense": str(chunk.dense.shape[1]), "sparse": str(len(chunk.encoded))}
        )
        path = self.folder / f"{self.count:08d}.arrow"
        options = pa.ipc.IpcWriteOptions(compression=SPILL_COMPRESSION)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as w:
            w.write_table(table)
        self.count += 1

    def read(self, i: int) -> SpilledChunk:
        """Chunk i (0-based, in write order), left on disk."""
        path = self.folder / f"{i:08d}.arrow"
        with pa.memory_map(str(path), "r") as src:
            table = pa.ipc.open_file(src).read_all()
        meta = {k.decode(): int(v) for k, v in (table.schema.metadata or {}).items()}
        n, dense_n = table.num_rows, meta["dense"]
        dense = np.empty((n, dense_n), np.float32)
        for d in range(dense_n):
            dense[:, d] = table.column(f"dense_{d}").to_numpy()
        encoded = []
        for j in range(meta["sparse"]):
            arr = table.column(f"sparse_{j}").combine_chunks()
            k = len(arr.dictionary)
            codes = arr.indices.fill_null(k).to_numpy().astype(np.int32, copy=False)
            encoded.append(encoded_from_dictionary(codes, arr.dictionary))
        names = table.column_names
        return SpilledChunk(
            start=meta["start"],
            assign=table.column("assign").to_numpy(),
            label=table.column("label").to_numpy() if "label" in names else None,
            dense=dense,
            encoded=encoded,
        )

    def __iter__(self) -> Iterator[SpilledChunk]:
        for i in range(self.count):
            chunk = self.read(i)
            (self.folder / f"{i:08d}.arrow").unlink()
            yield chunk

    def close(self) -> None:
        """Remove the folder and whatever is left in it."""
        shutil.rmtree(self.folder, ignore_errors=True)
