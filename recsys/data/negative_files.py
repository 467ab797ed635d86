"""The files `data.negatives` keeps between prepare's passes, each opened once (recsys.data.negative_buckets).

Step 1 appends each chunk's interactions to one Arrow IPC stream per user bucket, step 2 appends each
bucket's negatives to one raw file per chunk (fixed-width NEGATIVE records): sampling a bucket reads
one file, pass 2 reads one file per chunk, so there are B + C opens in all instead of B × C. Every
file of a phase stays open while that phase runs (B, then C descriptors): unbuffered (Arrow's
OSFile, os.write), so nothing held in memory grows with the number of files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys.errors import UserError

#: A sampled negative as kept between step 2 and pass 2: its positive's position, draw k, catalogue index.
NEGATIVE = np.dtype([("pos", "<i8"), ("k", "<i4"), ("item", "<i4")])
#: Descriptors left for everything else prepare opens while a phase keeps its files open.
HEADROOM = 256


def ensure_open_files(needed: int) -> None:
    """Raise the soft open-file limit to fit `needed` files at once; refuse, naming data.chunk_rows,
    when the hard limit cannot."""
    try:
        import resource
    except ImportError:  # not a POSIX system: no limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + HEADROOM
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise UserError(
                f"data.chunk_rows: sampling negatives keeps {needed:,} files open at once (one per user "
                f"bucket, then one per chunk: rows / data.chunk_rows) but the open-file limit is {hard:,}; "
                "raise data.chunk_rows (fewer, larger chunks) or the hard limit (ulimit -Hn, the "
                "container's nofile)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else hard, hard))


class KeyStreams:
    """One Arrow IPC stream per user bucket; each chunk appends its slice of every bucket."""

    def __init__(self, folder: Path, buckets: int) -> None:
        self.folder = folder
        self.writers: dict[int, tuple[pa.NativeFile, pa.ipc.RecordBatchStreamWriter]] = {}
        self.buckets = buckets

    def path(self, b: int) -> Path:
        """Bucket b's file (absent when no chunk had a row of its users)."""
        return self.folder / f"neg-keys-{b:06d}.arrow"

    def append(self, table: pa.Table) -> None:
        """Append a chunk's rows, sorted by their int `bucket` column (not written)."""
        bucket = table.column("bucket").to_numpy()
        table = table.drop_columns(["bucket"])
        bounds = np.searchsorted(bucket, np.arange(self.buckets + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            a, z = int(bounds[b]), int(bounds[b + 1])
            if b not in self.writers:
                sink = pa.OSFile(str(self.path(b)), "wb")
                self.writers[b] = (sink, pa.ipc.new_stream(sink, table.schema))
            self.writers[b][1].write_table(table.slice(a, z - a))

    def close(self) -> None:
        """Finish and close every stream."""
        for sink, writer in self.writers.values():
            writer.close()
            sink.close()
        self.writers.clear()


class ChunkFiles:
    """One raw file of NEGATIVE records per spilled chunk; each bucket appends its negatives of it."""

    def __init__(self, folder: Path, starts: list[int]) -> None:
        self.folder = folder
        self.starts = np.asarray(starts, np.int64)  # the chunks' first positions, ascending
        self.fds: dict[int, int] = {}

    def path(self, c: int) -> Path:
        """Chunk c's file (absent when it got no negatives)."""
        return self.folder / f"neg-{c:06d}.bin"

    def chunk_of(self, start: int) -> int:
        """The index of the chunk whose rows start at `start` (pass 2 reads the chunks pass 1 spilled)."""
        c = int(np.searchsorted(self.starts, start))
        if c == len(self.starts) or self.starts[c] != start:
            raise RuntimeError(
                f"no spilled chunk starts at row {start}: pass 2's chunks differ from pass 1's"
            )
        return c

    def append(self, neg: np.ndarray) -> None:
        """Append a bucket's negatives (NEGATIVE records sorted by position) to their chunks' files."""
        bounds = np.searchsorted(neg["pos"], np.r_[self.starts, np.iinfo(np.int64).max])
        for c in np.flatnonzero(np.diff(bounds)):
            if c not in self.fds:
                self.fds[c] = os.open(self.path(c), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            data = memoryview(neg[bounds[c] : bounds[c + 1]].tobytes())
            while data:  # os.write may write part of it
                data = data[os.write(self.fds[c], data) :]

    def read(self, c: int) -> np.ndarray:
        """Chunk c's negatives (in no particular order), its file removed."""
        path = self.path(c)
        if not path.exists():
            return np.empty(0, NEGATIVE)
        neg = np.fromfile(path, NEGATIVE)
        path.unlink()
        return neg

    def close(self) -> None:
        """Close every file (they stay on disk for pass 2)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
