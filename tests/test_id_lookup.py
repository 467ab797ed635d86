"""Raw-id lookups per chunk against a whole vocabulary or catalogue (IdCounter.rows_encoded's string
path, data.negatives' catalogue index): results, and a figure of their CPU cost as the set grows."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data import vocab as V
from recsys.data.negative_buckets import NegativeSampler


def string_ids(n: int, seed: int) -> pa.Array:
    """`n` distinct ids like "user_12345" of varying width (6 to 17 bytes), in random order."""
    rng = np.random.default_rng(seed)
    nums = rng.integers(0, 10 ** rng.integers(3, 13, 2 * n))  # up to 12 digits; repeats dropped below
    ids = pa.array(np.char.add("user_", nums.astype(str)).astype(object), pa.string())
    return pc.unique(ids)[:n]


def chunk_of(vocab: pa.Array, rows: int, oov: float, seed: int) -> V.Encoded:
    """A chunk of `rows` ids drawn from `vocab`, a fraction `oov` of them absent from it, encoded."""
    rng = np.random.default_rng(seed)
    ids = vocab.take(pa.array(rng.integers(0, len(vocab), rows))).to_numpy(zero_copy_only=False)
    new = rng.random(rows) < oov
    ids[new] = np.char.add("new_", rng.integers(0, 10**8, int(new.sum())).astype(str)).astype(object)
    return V.encode_column(pa.array(ids, pa.string()))


def _cpu_per_chunk(fn, chunks: list[V.Encoded]) -> tuple[float, float]:  # noqa: ANN001
    """CPU seconds of fn on the first chunk, and the median over the others."""
    took = []
    for enc in chunks:
        t = time.process_time()
        fn(enc)
        took.append(time.process_time() - t)
    return took[0], float(np.median(took[1:]))


def figures(sizes: list[int], chunks: int = 5, chunk_rows: int = 262_144) -> None:
    """Print the CPU seconds per chunk of IdCounter.rows_encoded (string ids of varying width) and of
    data.negatives' catalogue index, as the vocabulary / catalogue grows:
    `PYTHONPATH=.:tests python -m tests.test_id_lookup 100000 1000000 4000000`."""
    import os

    for n in sizes:
        ids = string_ids(n, seed=n)
        counter = V.IdCounter()
        counter.add(ids, np.ones(len(ids), bool))
        counter.finish(1)
        catalogue = ids.take(pc.sort_indices(ids))
        sampler = NegativeSampler(Path("."), 1, 0, 0, 1, 0, [0], catalogue)
        encoded = [chunk_of(ids, chunk_rows, 0.05, seed=i) for i in range(chunks)]
        vocab = _cpu_per_chunk(counter.rows_encoded, encoded)
        cat = _cpu_per_chunk(sampler.catalogue_index, encoded)
        print(
            f"{len(ids):>10,} ids, {chunks} chunks of {chunk_rows:,} rows (~{len(encoded[1].dictionary):,} distinct):"
            f" rows_encoded {vocab[0]:.3f} CPU-s first chunk, {vocab[1]:.3f} CPU-s median chunk;"
            f" catalogue_index {cat[0]:.3f} / {cat[1]:.3f} CPU-s (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )


if __name__ == "__main__":
    figures([int(x) for x in sys.argv[1:]])
