"""The files `data.negatives` keeps between prepare's passes, each opened once (recsys.data.negative_buckets).

Step 1 appends each chunk's interactions to one raw file of fixed-width KEY records per user bucket,
step 2 appends each bucket's negatives to one raw file of NEGATIVE records per chunk: sampling a
bucket reads one file, pass 2 reads one file per chunk, so there are B + C opens in all instead of
B × C. A chunk's slice of a bucket (or a bucket's negatives of a chunk) is one os.write of the
records as they are in memory and a file is read back by one np.fromfile: nothing is encoded or
decoded per slice, since the B × C slices are the only cost that grows faster than the rows. Every
file of a phase stays open while that phase runs (B, then C descriptors): unbuffered (os.write), so
nothing held in memory grows with the number of files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recsys.errors import UserError

#: An interaction as kept between step 1 and step 2: its position, its user's 128-bit id hash, the
#: item's catalogue index (-1: not in it), its split and whether it is a positive (32 B, aligned).
KEY = np.dtype(
    {
        "names": ["pos", "user_lo", "user_hi", "item", "split", "positive"],
        "formats": ["<i8", "<u8", "<u8", "<i4", "i1", "?"],
        "offsets": [0, 8, 16, 24, 28, 29],
        "itemsize": 32,
    }
)
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


class _RecordFiles:
    """One raw file of `dtype` records per part (bucket or chunk), appended to and read back whole."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype) -> None:
        self.folder, self.prefix, self.dtype = folder, prefix, dtype
        self.fds: dict[int, int] = {}

    def path(self, i: int) -> Path:
        """Part i's file (absent when nothing was appended to it)."""
        return self.folder / f"{self.prefix}-{i:06d}.bin"

    def _append(self, records: np.ndarray, bounds: np.ndarray) -> None:
        """Append records[bounds[i]:bounds[i + 1]] to part i, for every part with some."""
        for i in np.flatnonzero(np.diff(bounds)):
            if i not in self.fds:
                self.fds[i] = os.open(self.path(i), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            data = memoryview(records[bounds[i] : bounds[i + 1]].view(np.uint8))
            while data:  # os.write may write part of it
                data = data[os.write(self.fds[i], data) :]

    def read(self, i: int) -> np.ndarray:
        """Part i's records in the order they were appended, its file removed."""
        path = self.path(i)
        if not path.exists():
            return np.empty(0, self.dtype)
        records = np.fromfile(path, self.dtype)
        path.unlink()
        return records

    def close(self) -> None:
        """Close every file (they stay on disk until read)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class KeyFiles(_RecordFiles):
    """One file of KEY records per user bucket; each chunk appends its slice of every bucket."""

    def __init__(self, folder: Path, buckets: int) -> None:
        super().__init__(folder, "neg-keys", KEY)
        self.buckets = buckets

    def append(self, records: np.ndarray, bucket: np.ndarray) -> None:
        """Append a chunk's KEY records, sorted by their `bucket` (int, one per record)."""
        self._append(records, np.searchsorted(bucket, np.arange(self.buckets + 1)))


class ChunkFiles(_RecordFiles):
    """One file of NEGATIVE records per spilled chunk; each bucket appends its negatives of it."""

    def __init__(self, folder: Path, starts: list[int]) -> None:
        super().__init__(folder, "neg", NEGATIVE)
        self.starts = np.asarray(starts, np.int64)  # the chunks' first positions, ascending

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
        self._append(neg, np.searchsorted(neg["pos"], np.r_[self.starts, np.iinfo(np.int64).max]))
