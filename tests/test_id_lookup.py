"""Raw-id lookups per chunk against a whole vocabulary or catalogue (IdCounter.rows_encoded's string
path, data.negatives' catalogue index): results, and a figure of their CPU cost as the set grows."""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_data_prepare_streaming import folder_files
from test_negatives_streaming import _cfg, _interactions

from recsys.data import id_lookup
from recsys.data import vocab as V
from recsys.data.id_lookup import IdLookup
from recsys.data.memory import counter_bytes
from recsys.data.negative_buckets import NegativeSampler
from recsys.data.prepare import prepare

# Ids that differ only in width, in trailing or zero bytes, or in UTF-8 bytes beyond ASCII.
TRICKY = [
    "",
    "1",
    "01",
    "001",
    "1 ",
    "a",
    "a\x00",
    "\x00",
    "\x00\x00",
    "é",
    "e\u0301",
    "user_7",
    "user_07",
    "x" * 300,
]


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


def reference(values: pa.Array, ids: pa.Array) -> np.ndarray:
    """What IdLookup must give: Arrow's index_in with the whole set (null and absent: -1)."""
    found = pc.index_in(values.cast(pa.string()), value_set=ids)
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _chunks(ids: pa.Array, seed: int) -> list[pa.Array | pa.ChunkedArray]:
    """Chunks of different dictionaries over `ids`: absent ids, nulls, a slice, a chunked column."""
    rng = np.random.default_rng(seed)
    out: list[pa.Array | pa.ChunkedArray] = []
    for size in (1, 7, 60, 500):
        picked = ids.take(pa.array(rng.integers(0, len(ids), size))).to_pylist()
        picked += [f"absent_{i}" for i in range(size // 5)] + [None] * (size // 7) + TRICKY[: size % 15]
        out.append(pa.array([picked[i] for i in rng.permutation(len(picked))], pa.string()))
    full = out[-1]
    out += [
        full.slice(3, 200),
        pa.chunked_array([full.slice(0, 100), full.slice(250)]),
        pa.array([], pa.string()),
    ]
    return out


@pytest.fixture(params=[0, 4], ids=["hashed", "small-sets-by-arrow"])
def small_set(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """SMALL_SET 0 sends every lookup through the hashed table; the default lets Arrow take small sets."""
    monkeypatch.setattr(id_lookup, "SMALL_SET", request.param)
    return request.param


@pytest.fixture(params=["real", "by-length", "constant"])
def hashes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The real hash, or one that collides on purpose (one value per id length, or one for all)."""
    strong = id_lookup.string_hashes

    def weak(ids: pa.Array) -> np.ndarray:
        if request.param == "constant":
            return np.full(len(strong(ids)), 7, np.uint64)
        return pc.binary_length(id_lookup._strings(ids)).fill_null(0).to_numpy().astype(np.uint64)

    if request.param != "real":
        monkeypatch.setattr(id_lookup, "string_hashes", weak)
    return request.param


def test_lookup_reused_across_chunks_equals_index_in(small_set: int, hashes: str) -> None:
    """Only equal bytes match, whatever the hashes: an id never takes the position of another id
    with its hash, and every id of a shared hash is found."""
    ids = pa.concat_arrays([string_ids(600, seed=1), pa.array(TRICKY, pa.string())])
    lookup = IdLookup(ids)
    for values in _chunks(ids, seed=2):
        expected = reference(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values, ids)
        assert lookup.index_in(values).tolist() == expected.tolist()
    assert lookup.nbytes > 0  # the small chunks went through the hashed table either way


def test_index_or_add_is_a_first_seen_dictionary_encoding(small_set: int, hashes: str) -> None:
    """A set grown chunk by chunk (IdCounter's string mode) gives the positions and order that
    dictionary-encoding the set and each chunk's ids together gives."""
    start = string_ids(300, seed=3)
    lookup, ids = IdLookup(start), start
    for values in _chunks(string_ids(900, seed=3), seed=4):
        distinct = pc.unique(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
        distinct = distinct.drop_null()
        both = pc.dictionary_encode(pa.concat_arrays([ids, distinct]))
        at = lookup.index_or_add(distinct)
        assert at.tolist() == both.indices.to_numpy()[len(ids) :].tolist()
        ids = both.dictionary
        assert lookup.ids.to_pylist() == ids.to_pylist()
        assert lookup.index_in(ids).tolist() == list(range(len(ids)))


def test_string_hashes_tell_apart_tricky_ids_and_ignore_slicing() -> None:
    arr = pa.array(TRICKY, pa.string())
    h = id_lookup.string_hashes(arr)
    assert len(set(h.tolist())) == len(TRICKY)
    assert id_lookup.string_hashes(arr.slice(3)).tolist() == h[3:].tolist()
    assert id_lookup.string_hashes(arr.cast(pa.large_string())).tolist() == h.tolist()


def test_id_counter_rows_of_string_ids_equal_the_one_pass_fit(small_set: int, hashes: str) -> None:
    """IdCounter's string path (ids of varying width, or longer than 8 bytes), fit chunk by chunk,
    maps every later chunk like fit_encoded on all rows at once; so does its mixed-width path (a
    vocabulary of 3-byte ids, chunks of other widths too)."""
    rng = np.random.default_rng(5)
    for pool in (string_ids(3_000, seed=6).to_pylist(), [f"{x:03d}" for x in range(1000)]):
        rows = [pool[i] for i in rng.zipf(1.2, 20_000) % len(pool)]
        rows = [None if rng.random() < 0.05 else r for r in rows] + ["1", "12345", "é"]
        column = pa.array(rows, pa.string())
        train = rng.random(len(rows)) < 0.8
        train[-3:] = False  # other widths only in the chunks looked up: the 3-byte vocabulary keeps its keys
        counter = V.IdCounter()
        for start in range(0, len(rows) - 3, 4096):
            end = min(start + 4096, len(rows) - 3)
            counter.add(column.slice(start, end - start), train[start:end])
        vocab = counter.finish(2)
        held = counter_bytes(counter)  # the vocabulary's table is hashed on the first look-up
        fitted, lookup = V.fit_encoded(V.encode_column(column), train, 2)
        assert vocab.to_pylist() == fitted.ids
        expected = lookup[V.encode_column(column).codes]
        for start in range(0, len(rows), 3000):
            assert counter.rows(column.slice(start, 3000)).tolist() == expected[start : start + 3000].tolist()
        if small_set == 0:  # prepare's memory figures count the hashed table (recsys.data.memory)
            assert counter_bytes(counter) == held + counter._lookup.nbytes > held


def test_history_codes_are_first_seen_over_the_chunks(small_set: int, hashes: str) -> None:
    """data.history's (and last_events') global codes: each chunk's ids coded in order of first
    appearance over every chunk, nulls -1."""
    from recsys.data.history import _GlobalCodes

    codes, seen = _GlobalCodes(), {}
    for values in _chunks(string_ids(900, seed=9), seed=10):
        got = codes.add(values).tolist()
        flat = values.to_pylist()
        for v in flat:
            if v is not None and v not in seen:
                seen[v] = len(seen)
        assert got == [-1 if v is None else seen[v] for v in flat]
    assert codes.known.to_pylist() == list(seen)


def test_negatives_catalogue_index(small_set: int) -> None:
    catalogue = string_ids(1_500, seed=7)
    catalogue = catalogue.take(pc.sort_indices(catalogue))
    sampler = NegativeSampler(Path("."), 1, 0, 0, 1, 0, [0], catalogue)
    for values in _chunks(catalogue, seed=8):
        enc = V.encode_column(values)
        expected = np.append(reference(enc.dictionary, catalogue), -1)[enc.codes]
        assert sampler.catalogue_index(enc).tolist() == expected.tolist()


def test_prepare_writes_the_same_files_through_the_hashed_lookups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streaming prepare with negatives (string ids of mixed widths: every sparse feature's rows
    and the catalogue looked up per chunk) writes the same bytes whether Arrow hashes the sets per
    chunk (these sets are small) or every lookup goes through the hashed tables."""
    path = tmp_path / "r.parquet"
    _interactions(path, 1200, seed=3)
    outs = []
    for small_set in (10**9, 0):
        monkeypatch.setattr(id_lookup, "SMALL_SET", small_set)
        cfg = _cfg(path, tmp_path / f"s{small_set}", chunk_rows=97, split={"mode": "leave_last_n", "n": 2})
        prepare(cfg, overwrite=False)
        outs.append(folder_files(Path(cfg.data.prepared_dir)))
    assert sorted(outs[0]) == sorted(outs[1])
    for k in outs[0]:
        assert outs[1][k] == outs[0][k], f"{k} differs through the hashed lookups"


def _cpu_per_chunk(fn, chunks: list[V.Encoded]) -> tuple[float, float]:  # noqa: ANN001
    """CPU seconds of fn on the first chunk, and the median over the others."""
    took = []
    for enc in chunks:
        t = time.process_time()
        fn(enc)
        took.append(time.process_time() - t)
    return took[0], float(np.median(took[1:]))


def figures(sizes: list[int], chunks: int = 5, chunk_rows: int = 262_144) -> None:
    """Print the CPU seconds per chunk of IdCounter.rows_encoded (string ids of varying width), of
    data.negatives' catalogue index and of IdCounter.add_encoded (pass 1's merge of a chunk's ids
    into those seen so far), as the vocabulary / catalogue / ids seen grow:
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
        counting = V.IdCounter()  # pass 1: a chunk's train ids merged into the ids seen so far
        counting.add(ids, np.ones(len(ids), bool))
        count = _cpu_per_chunk(partial(counting.add_encoded, train=np.ones(chunk_rows, bool)), encoded)
        print(
            f"{len(ids):>10,} ids, {chunks} chunks of {chunk_rows:,} rows (~{len(encoded[1].dictionary):,} distinct):"
            f" rows_encoded {vocab[0]:.3f} CPU-s first chunk, {vocab[1]:.3f} CPU-s median chunk;"
            f" catalogue_index {cat[0]:.3f} / {cat[1]:.3f} CPU-s; add_encoded (pass 1) {count[0]:.3f} /"
            f" {count[1]:.3f} CPU-s; the set {ids.nbytes / 2**20:.0f} MiB,"
            f" hashed table {sampler._catalogue_lookup.nbytes / 2**20:.0f} MiB"
            f" (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )


_PREPARE = """
import hashlib, json, os, resource, sys, time
from pathlib import Path
from recsys.config import config_from_dict
from recsys.data.prepare import prepare
t = time.perf_counter()
prepare(config_from_dict(json.loads(sys.argv[1])), overwrite=True)
wall = time.perf_counter() - t
use = resource.getrusage(resource.RUSAGE_SELF)
out = Path(json.loads(sys.argv[1])["data"]["prepared_dir"])
digest = hashlib.sha256()
for p in sorted(out.rglob("*")):
    if p.is_file():
        digest.update(str(p.relative_to(out)).encode() + p.read_bytes())
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"wall_s": wall, "cpu_s": use.ru_utime + use.ru_stime, "peak_rss_mb": hwm / 1024,
                  "sha256": digest.hexdigest()}))
"""


def prepare_figures(rows: int, trees: list[str]) -> None:
    """Prepare `rows` interactions with string ids ("user_…" from rows/3 users, "item_…" from rows/8
    items, both of varying width; 1 negative a positive; 262,144-row chunks) with the code of each
    tree (a checkout's root) in a child process; print its CPU-s, wall, peak RSS and the output's
    sha256: `PYTHONPATH=.:tests python -m tests.test_id_lookup --prepare 4000000 /path/to/before .`."""
    import json
    import os
    import subprocess
    import tempfile

    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    users = string_ids(rows // 3, seed=1)
    items = pc.utf8_replace_slice(string_ids(rows // 8, seed=2), 0, 4, "item")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.parquet"
        table = pa.table(
            {
                "user": users.take(pa.array(rng.integers(0, len(users), rows))),
                "item": items.take(pa.array((rng.zipf(1.1, rows) - 1) % len(items))),
                "rating": rng.integers(1, 6, rows).astype(float),
                "ts": rng.integers(0, 10**6, rows).astype(float),
            }
        )
        pq.write_table(table, path)
        del table
        config = {
            "name": "lookups",
            "data": {
                "source": {"kind": "table", "path": str(path), "label": "rating", "user": "user", "item": "item", "timestamp": "ts"},
                "prepared_dir": str(Path(tmp) / "out"),
                "negatives": {"per_positive": 1, "seed": 0},
                "label": {"mode": "threshold", "threshold": 2},
                "chunk_rows": 262_144,
                "block_size": 8,
            },
            "model": {"kind": "dlrm", "embedding_dim": 8, "dlrm": {"dense_arch_layers": [8]}},
            "train": {"batch_size": 8},
            "eval": {"batch_size": 8},
        }  # fmt: skip
        for tree in trees:
            root = str(Path(tree).resolve())  # the child's cwd too: `-c` puts it first on sys.path
            run = subprocess.run(
                [sys.executable, "-c", _PREPARE, json.dumps(config)],
                env={**os.environ, "PYTHONPATH": root},
                cwd=root,
                capture_output=True,
                text=True,
            )
            if run.returncode:
                raise SystemExit(run.stderr[-3000:])
            r = json.loads(run.stdout.strip().splitlines()[-1])
            assert Path(root, "recsys", "data", "vocab.py").exists()
            print(
                f"{rows:,} rows, {len(users):,} users, {len(items):,} items, tree {tree}: {r['cpu_s']:.1f} CPU-s,"
                f" {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB, output sha256 {r['sha256'][:16]}"
                f" (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--prepare"]:
        prepare_figures(int(sys.argv[2]), sys.argv[3:])
    else:
        figures([int(x) for x in sys.argv[1:]])
