"""Streaming prepare: the output is byte-identical whatever data.chunk_rows is (1 row … all rows in one
chunk), for every split mode and source kind; memory does not grow with the row count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401 (pa.csv below)
import pyarrow.parquet as pq
import pytest

from recsys.config import config_from_dict
from recsys.data import splits as S
from recsys.data.loader import read_split_arrays
from recsys.data.metadata import read_metadata
from recsys.data.prepare import prepare
from recsys.data.readers import delimited

ALL = 10**9  # every row in one chunk: the in-memory mode


def _cfg(tmp_path: Path, name: str, source: dict, **data: object):  # noqa: ANN202
    return dlrm_cfg({"source": source, "prepared_dir": str(tmp_path / name), "block_size": 4, **data})


def dlrm_cfg(data: dict):  # noqa: ANN201
    """A tiny DLRM config around a `data` section (prepare tests)."""
    return config_from_dict(
        {
            "name": "t",
            "data": data,
            "model": {"kind": "dlrm", "embedding_dim": 8, "dlrm": {"dense_arch_layers": [8]}},
            "train": {"batch_size": 8},
            "eval": {"batch_size": 8},
        }
    )


def folder_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes (byte-equality of prepared folders)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_output(
    tmp_path: Path, source: dict, chunks: tuple[int, ...] = (7, ALL), **data: object
) -> Path:
    """Prepare with each chunk size; every output file (MDS shards, index.json, vocab, metadata) is equal."""
    outs = []
    for c in chunks:
        cfg = _cfg(tmp_path, f"c{c}", source, chunk_rows=c, **data)
        prepare(cfg, overwrite=False)
        outs.append(folder_files(Path(cfg.data.prepared_dir)))
    first = outs[0]
    assert any(k.endswith(".mds") or k.endswith(".zstd") for k in first)
    for other in outs[1:]:
        assert sorted(other) == sorted(first)
        for k in first:
            assert other[k] == first[k], f"{k} differs between chunk sizes {chunks}"
    return tmp_path / f"c{chunks[0]}"


# --------------------------------------------------------------------------------------- sources
def write_criteo(path: Path, rows: int, seed: int, bad_at: int | None = None) -> None:
    """Criteo-layout TSV with missing fields, ids of mixed widths in cat_1 and a bad row at `bad_at`."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        ints = [str(int(x)) if x >= 0 else "" for x in rng.integers(-1, 30, 13)]
        cats = [f"{int(x):08x}" if x >= 0 else "" for x in rng.zipf(1.5, 26) % 500 - 1]
        cats[1] = str(int(rng.zipf(1.3)) % 1000)  # variable-width ids: the string path
        label = "1" if rng.random() < 0.3 else "0"
        lines.append("\t".join([label, *ints, *cats]))
        if bad_at is not None and i == bad_at:
            lines.append("1\t2\t3")  # wrong field count
    path.write_text("\n".join(lines) + "\n")


def write_interactions(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "user": pa.array([f"u{x}" for x in rng.integers(0, 40, rows)]),
            "item": pa.array([f"i{x}" for x in rng.zipf(1.4, rows) % 300]),
            "rating": pa.array(rng.integers(1, 6, rows).astype(float)),
            "ts": pa.array(rng.integers(0, 50, rows).astype(float)),  # ties: broken by file order
            "age": pa.array(rng.integers(0, 80, rows).astype(float)),
        }
    )


def test_criteo_by_day_and_random_with_bad_rows_mid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small parse blocks, so the fast reader hands rows over before it meets the bad row and the
    # line-by-line parser takes over mid-file.
    monkeypatch.setattr(delimited, "_CSV_BLOCK", 1 << 14)
    paths = [tmp_path / f"day_{d}.tsv" for d in range(3)]
    for d, p in enumerate(paths):
        write_criteo(p, 900, seed=d, bad_at=700 if d == 1 else None)
    src = {"kind": "criteo", "paths": [str(p) for p in paths]}
    out = assert_same_output(
        tmp_path / "day", src, (97, 1000, ALL), split={"mode": "by_day"}, skip_bad_rows=True
    )
    meta = read_metadata(out)
    assert [s.bad_rows.count for s in meta.sources] == [0, 1, 0] and [s.rows for s in meta.sources] == [
        900
    ] * 3
    assert (meta.splits["val"].rows, meta.splits["test"].rows) == (900, 900)
    # val/test keep source order: the day-2 file's labels in file order
    labels = [float(line.split("\t")[0]) for line in paths[2].read_text().splitlines()]
    assert read_split_arrays(out, "test")["label"].tolist() == labels
    assert_same_output(tmp_path / "rnd", src, (250, ALL), split={"mode": "random"}, skip_bad_rows=True)


def test_table_csv_and_parquet_every_split_and_label_mode(tmp_path: Path) -> None:
    tbl = write_interactions(1500, seed=3)
    csv_path, pq_path = tmp_path / "r.csv", tmp_path / "r.parquet"
    pa.csv.write_csv(tbl, csv_path)
    pq.write_table(tbl, pq_path, row_group_size=200)
    for path in (csv_path, pq_path):
        src = {
            "kind": "table", "path": str(path), "label": "rating", "user": "user", "item": "item",
            "timestamp": "ts", "dense": ["age"],
        }  # fmt: skip
        root = tmp_path / path.suffix[1:]
        out = assert_same_output(
            root / "lln",
            src,
            split={"mode": "leave_last_n", "n": 2},
            label={"mode": "mean"},
            shuffle_window=64,
        )
        meta = read_metadata(out)
        assert meta.splits["test"].rows == 80 and meta.splits["val"].rows == 80  # 40 users, n = 2
        assert meta.label["threshold"] == pytest.approx(
            float(np.mean(tbl["rating"].to_numpy()[_lln(tbl) == S.TRAIN]))
        )
        assert_same_output(root / "rnd", src, (13, ALL), label={"mode": "threshold", "threshold": 4})


def _lln(tbl: pa.Table) -> np.ndarray:
    users = pa.compute.dictionary_encode(tbl["user"]).combine_chunks().indices.to_numpy()
    return S.leave_last_n(users, tbl["ts"].to_numpy(), 2)


def test_movielens_presplit_negatives_and_synthetic(tmp_path: Path) -> None:
    from tests.test_data_prepare import write_udata

    base, test = tmp_path / "u1.base", tmp_path / "u1.test"
    write_udata(base, users=9, per_user=11, seed=1)
    write_udata(test, users=3, per_user=2, seed=2)
    ml = {"kind": "movielens", "path": str(base)}
    assert_same_output(tmp_path / "ml", ml, split={"mode": "leave_last_n"}, label={"mode": "all_positive"})
    presplit = {"kind": "presplit", "train": ml, "test": {"kind": "movielens", "path": str(test)}}
    assert_same_output(
        tmp_path / "ps",
        presplit,
        split={"mode": "presplit", "val_fraction": 0.2},
        label={"mode": "all_positive"},
    )
    assert_same_output(
        tmp_path / "neg", ml, label={"mode": "mean"}, negatives={"per_positive": 2}, shuffle_window=16
    )
    synth = {"kind": "synthetic_ctr", "rows": 3000, "days": 3, "num_sparse": 4, "num_dense": 2}
    out = assert_same_output(
        tmp_path / "syn", synth, (111, ALL), split={"mode": "by_day"}, raw_dir=str(tmp_path / "raw")
    )
    facts = json.loads((out / "metadata.json").read_text())["synthetic"]
    assert set(facts["bayes_auc_by_split"]) == {"train", "val", "test"}


def test_train_order_is_shuffled_within_windows(tmp_path: Path) -> None:
    """Train rows come out window by window (data.shuffle_window source rows), each window shuffled."""
    n = 400
    tbl = pa.table(
        {"k": pa.array([f"{i:04d}" for i in range(n)]), "y": pa.array([float(i % 2) for i in range(n)])}
    )
    pa.csv.write_csv(tbl, tmp_path / "t.csv")
    src = {"kind": "table", "path": str(tmp_path / "t.csv"), "label": "y", "sparse": ["k"]}
    cfg = _cfg(tmp_path, "w", src, chunk_rows=33, shuffle_window=100, label={"mode": "as_is"}, min_count=1)
    prepare(cfg, overwrite=False)
    vocab = (Path(cfg.data.prepared_dir) / "vocab" / "k.txt").read_text().splitlines()
    sparse = read_split_arrays(cfg.data.prepared_dir, "train")["sparse"]
    pos = np.array([int(vocab[r]) for r in sparse[:, 0]])
    assign = S.random_split(n, 0.1, 0.1, 0)
    expect = np.flatnonzero(assign == S.TRAIN)
    expect = expect[np.lexsort((S.shuffle_keys(0, expect), expect // 100))]
    assert pos.tolist() == expect.tolist()
    assert (np.diff(pos // 100) >= 0).all() and not (np.diff(pos) > 0).all()


# --------------------------------------------------------------------------------------- memory
# Prepare runs in a child process, measured four ways: live numpy/Python memory (tracemalloc) held
# right after pass 1 and at its peak, the peak of Arrow's pool, and peak RSS. The child runs
# single-threaded (one feature worker, the MDS writers inline), so the live figures repeat from run
# to run whatever the machine's load. RSS also holds what the allocators keep after frees, which
# varies by several MB from run to run: a coarse check only. Arrow's CSV reader reads ~35 parse
# blocks ahead, so small blocks keep its read-ahead full at both sizes.
_CHILD = """
import json, os, sys, tracemalloc
import pyarrow as pa
import pyarrow.csv  # noqa: F401 (pa.csv below)
import streaming  # the MDS writer's imports (torch …) are not prepare's memory
from pathlib import Path
from recsys.bench.prepare_scale import _config
from recsys.data import mds
from recsys.data.readers import delimited
from recsys.data import prepare as P
delimited._CSV_BLOCK = 1 << 14
os.cpu_count = lambda: 1
mds.SplitWriter._submit = lambda self, fn, *args: fn(*args)
count, held = P._count, []
P._count = lambda *a: (count(*a), held.append(tracemalloc.get_traced_memory()[0]))[0]
def rss(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key))
files = [Path(f) for f in sys.argv[1].split(",")]
cfg = _config(files, Path(sys.argv[2]), 4_000, 4_000)
cfg.data.shard_size_limit = 1 << 20  # the MDS writer holds up to a shard per split in memory
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak of prepare alone
    before = rss("VmRSS")
except OSError:  # a kernel or sandbox that refuses: no RSS figure
    before = None
tracemalloc.start()
meta = P.prepare(cfg, overwrite=True)
print(json.dumps({
    "held_after_pass1_kb": held[0] / 1024,
    "live_kb": tracemalloc.get_traced_memory()[1] / 1024,
    "arrow_kb": pa.default_memory_pool().max_memory() / 1024,
    "rss_kb": None if before is None else rss("VmHWM") - before,
    "vocab": [f.num_embeddings for f in meta.sparse_features],
}))
"""


def _prepare_peaks(tmp_path: Path, rows: int) -> dict:
    """Memory figures of a prepare over `rows` generated Criteo rows (3 day files, <= 100 ids a feature)."""
    from recsys.bench.prepare_scale import write_criteo_tsv

    files = [tmp_path / f"{rows}_{d}.tsv" for d in range(3)]
    for d, f in enumerate(files):
        write_criteo_tsv(f, rows // 3, seed=d, cap=100)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, ",".join(map(str, files)), str(tmp_path / f"p{rows}")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MALLOC_ARENA_MAX": "1"},  # one glibc arena: less RSS noise
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_does_not_grow_with_rows(tmp_path: Path) -> None:
    """4x the rows (same chunk, window, shard size; vocabularies full at both sizes): memory the same.

    Margins from runs on a loaded 2-core machine: held after pass 1 +-4 KB (1 byte a row kept is
    +72 KB), live peak +-400 KB (the MDS writer's block alignment), Arrow +-200 KB, RSS +-12 MB.
    """
    small, big = (_prepare_peaks(tmp_path, rows) for rows in (24_000, 96_000))
    assert small["vocab"] == big["vocab"]  # nothing that should grow differs between the sizes
    grown = {k: round(big[k] - small[k]) for k in small if k != "vocab" and small[k] is not None}
    why = f"grew with rows (KiB): {grown}; {small} vs {big}"
    assert grown["held_after_pass1_kb"] < 32, f"pass 1 keeps something per row: {why}"
    assert grown["live_kb"] < 1024, f"numpy/Python peak {why}"
    assert grown["arrow_kb"] < 1024, f"Arrow's peak {why}"
    if small["rss_kb"] is not None:
        assert big["rss_kb"] < 1.15 * small["rss_kb"] + 24_000, f"peak RSS {why}"


def test_id_counter_equals_fit_on_all_rows_whatever_the_chunks() -> None:
    """Chunk-merged counts give fit_encoded's vocabulary and rows, through key mode (ids of one width),
    the switch to strings (a chunk of other widths) and string mode, with missing ids and min_count."""
    from recsys.data import vocab as V

    rng = np.random.default_rng(5)
    fixed = [f"{x:04x}" for x in rng.zipf(1.3, 600) % 5000]
    mixed = [str(x) for x in rng.zipf(1.3, 600) % 5000]
    values = [None if rng.random() < 0.05 else v for v in fixed + mixed + fixed]
    col = pa.chunked_array([pa.array(values, pa.string())])
    most = rng.random(len(values)) < 0.8
    only_fixed = most.copy()
    only_fixed[600:1200] = False  # the counter stays in key mode; mixed-width chunks are still mapped
    for train, min_count in ((most, 1), (most, 3), (only_fixed, 1)):
        vocab, lookup = V.fit_encoded(V.encode_column(col), train, min_count)
        counter, bounds = V.IdCounter(), [0, 250, 600, 610, 1200, 1500, len(values)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            counter.add(col.slice(a, b - a), train[a:b])
        assert counter.finish(min_count).to_pylist() == vocab.ids
        expect = V.apply(V.encode_column(col).codes, lookup)
        got = np.concatenate(
            [counter.rows(col.slice(a, b - a)) for a, b in zip(bounds, bounds[1:], strict=False)]
        )
        assert got.tolist() == expect.tolist()
