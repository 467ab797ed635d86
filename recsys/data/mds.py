"""MDS block datasets: write one split as blocks of rows, and read blocks back without StreamingDataset.

One MDS sample is one block of up to `block_size` consecutive rows (columns in metadata.MDS_COLUMNS).
Blocks are what makes conversion and loading fast: per-sample overhead is paid once per block,
not once per row. Only the last block of a split can be short.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from recsys.data.metadata import HISTORY_COLUMNS, MDS_COLUMNS
from recsys.errors import UserError


def write_split(
    out_dir: str | Path,
    label: np.ndarray,
    dense: np.ndarray,
    sparse: np.ndarray,
    block_size: int,
    compression: str | None,
    size_limit: int,
    on_block: Callable[[int], None] | None = None,
) -> int:
    """Write rows (label [n], dense [n, D], sparse [n, S]) as MDS blocks; returns the number of blocks."""
    writer = SplitWriter(out_dir, block_size, compression, size_limit, on_block)
    writer.write(label, dense, sparse)
    writer.close()
    return writer.blocks


class BlockReader:
    """Random access to the blocks of one MDS split folder, decompressing each shard in memory once.

    Used for evaluation and whole-split reads, where StreamingDataset's shuffling, partition padding
    and shared memory are unwanted; it never writes into the prepared folder.
    """

    def __init__(self, split_dir: str | Path) -> None:
        from streaming.base.format import reader_from_json

        self.split_dir = Path(split_dir)
        index = self.split_dir / "index.json"
        if not index.is_file():
            raise UserError(f"{index}: not found; run `recsys data prepare` (is data.prepared_dir right?)")
        obj = json.loads(index.read_text())
        self._shards = [reader_from_json(str(self.split_dir), None, s) for s in obj["shards"]]
        self._infos = obj["shards"]
        counts = np.array([s.samples for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_blocks = int(self._starts[-1])
        self._cache_id = -1
        self._cache: tuple[bytes, np.ndarray] | None = None

    def _shard_bytes(self, shard_id: int) -> tuple[bytes, np.ndarray]:
        if self._cache_id != shard_id:
            info = self._infos[shard_id]
            raw = self.split_dir / info["raw_data"]["basename"]
            if raw.is_file():
                data = raw.read_bytes()
            else:
                from streaming.base.compression import decompress

                zip_info = info.get("zip_data")
                if not zip_info:
                    raise UserError(f"{raw}: shard file missing")
                data = decompress(info["compression"], (self.split_dir / zip_info["basename"]).read_bytes())
            count = self._shards[shard_id].samples
            offsets = np.frombuffer(data, np.uint32, count + 1, offset=4)
            self._cache_id, self._cache = shard_id, (data, offsets)
        assert self._cache is not None
        return self._cache

    def block(self, i: int) -> dict[str, Any]:
        """Block i of the split as {label, dense, sparse} numpy arrays."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range (0..{self.num_blocks - 1})")
        shard_id = int(np.searchsorted(self._starts, i, side="right") - 1)
        data, offsets = self._shard_bytes(shard_id)
        j = i - int(self._starts[shard_id])
        return self._shards[shard_id].decode_sample(data[offsets[j] : offsets[j + 1]])

    def iter_blocks(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
        """Blocks start..stop-1 in order."""
        for i in range(start, self.num_blocks if stop is None else stop):
            yield self.block(i)


class SplitWriter:
    """One split's MDS blocks written as rows arrive in pieces (a block holds `block_size` consecutive
    rows; only the last is short): the one block writer of every path (write_split, the file prepare,
    the Spark prepare's tasks). A split with no rows is a writer closed at once.

    Blocks are encoded, compressed and written on a thread of their own (zstd and file writes release
    the GIL), so the three splits' writers overlap the caller's work; at most two pieces wait.
    """

    def __init__(
        self,
        out_dir: str | Path | tuple[str, str],
        block_size: int,
        compression: str | None,
        size_limit: int,
        on_block: Callable[[int], None] | None = None,
        history_length: int | None = None,
        keep_local: bool = False,
    ) -> None:
        """`out_dir`: a folder, or (local, remote) to upload as MDSWriter does (`keep_local` keeps the
        local copy); `history_length`: None, or L when rows carry histories."""
        from concurrent.futures import Future, ThreadPoolExecutor

        from streaming import MDSWriter

        # With histories, `sparse` rows end with L history columns and the rank (recsys.data.history).
        self.history_length = history_length
        columns = MDS_COLUMNS if history_length is None else {**MDS_COLUMNS, **HISTORY_COLUMNS}
        self._writer = MDSWriter(
            out=out_dir if isinstance(out_dir, tuple) else str(out_dir),
            columns=columns,
            compression=compression,
            size_limit=size_limit,
            keep_local=keep_local,
        )
        self.block_size, self.on_block = block_size, on_block
        self._held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._held_rows = 0
        self.rows = self.blocks = 0
        self.positives = 0.0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mds")
        self._queued: list[Future[None]] = []

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        while len(self._queued) >= 2:
            self._queued.pop(0).result()  # bounded memory; re-raises the writer thread's errors
        self._queued.append(self._thread.submit(fn, *args))

    def write(self, label: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> None:
        """Append rows (label [n], dense [n, D], sparse [n, S]); full blocks are written in the background."""
        if not len(label):
            return
        if dense.shape[1] == 0:
            # MDS cannot encode empty arrays: with no dense features the column holds one zero per row
            # (see metadata.py); readers cut it back to the metadata's D = 0.
            dense = np.zeros((len(label), 1), dtype=np.float32)
        self.rows += len(label)
        self.positives += float(np.sum(label, dtype=np.float64))
        self._submit(self._append, label, dense, sparse)

    def _append(self, label: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> None:
        # The held partial block is completed from the piece's head; then whole blocks are written
        # straight from slices of the piece, each cast on its own: no concatenated copy of the piece.
        at, n, size = 0, len(label), self.block_size
        if self._held_rows:
            at = min(size - self._held_rows, n)
            self._held.append((label[:at], dense[:at], sparse[:at]))
            self._held_rows += at
            if self._held_rows < size:
                return
            self._write_block(*(np.concatenate(c) for c in zip(*self._held, strict=True)))
            self._held, self._held_rows = [], 0
        full = at + (n - at) // size * size
        for start in range(at, full, size):
            self._write_block(
                label[start : start + size], dense[start : start + size], sparse[start : start + size]
            )
        if full < n:  # copied, so the rest of the piece is not kept alive by its last rows
            self._held = [(label[full:].copy(), dense[full:].copy(), sparse[full:].copy())]
            self._held_rows = n - full

    def _write_block(self, label: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> None:
        sample = {
            "label": np.ascontiguousarray(label, dtype=np.float32),
            "dense": np.ascontiguousarray(dense, dtype=np.float32),
            "sparse": np.ascontiguousarray(sparse, dtype=np.int64),
        }
        if self.history_length is not None:  # the last L + 1 sparse columns: history, then its rank
            cut = sparse.shape[1] - self.history_length - 1
            sample["sparse"] = np.ascontiguousarray(sparse[:, :cut], dtype=np.int64)
            sample["history"] = np.ascontiguousarray(sparse[:, cut:-1], dtype=np.int64)
            sample["history_rank"] = np.ascontiguousarray(sparse[:, -1], dtype=np.int64)
        self._writer.write(sample)
        self.blocks += 1
        if self.on_block is not None:
            self.on_block(len(label))

    def _finish(self) -> None:
        if self._held_rows:  # the last, short block
            self._write_block(*(np.concatenate(c) for c in zip(*self._held, strict=True)))
            self._held, self._held_rows = [], 0
        w = self._writer
        if w.new_samples:
            # MDSWriter.finish() writes the last shard, queues its upload, and then sleeps a whole
            # second whenever that upload has not yet left the queue, a race with the upload thread for
            # the GIL: 0 to 3 s (one per split, closed in turn) of a ~3.5 s prepare of 1M rows. So the
            # last shard is written here, and the queue drained (a no-op task behind the uploads, FIFO)
            # before finish() looks at it.
            w.flush_shard()
            w._reset_cache()
        w.executor.submit(lambda: None).result()
        w.finish()

    def close(self) -> None:
        """Write the last (short) block and the index; waits for the writer thread."""
        self._submit(self._finish)
        try:
            for fut in self._queued:
                fut.result()
        finally:
            self._queued = []
            self._thread.shutdown(wait=True)
