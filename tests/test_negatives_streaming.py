"""data.negatives through streaming prepare (recsys.data.negative_buckets): the same files whatever
data.chunk_rows and the number of user buckets; the sampling rule holds on the rows written; the
memory does not grow with the rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_prepare_streaming import dlrm_cfg, folder_files

from recsys.config import config_from_dict
from recsys.data import negative_buckets
from recsys.data import splits as S
from recsys.data.loader import read_split_arrays
from recsys.data.prepare import prepare

PER_POSITIVE = 3


def _interactions(path: Path, rows: int, seed: int) -> pa.Table:
    """60 users, popular items (zipf over 150): users hit their own items often, so draws are redrawn."""
    rng = np.random.default_rng(seed)
    tbl = pa.table(
        {
            "user": pa.array([f"u{x}" for x in rng.integers(0, 60, rows)]),
            "item": pa.array([f"i{x}" for x in rng.zipf(1.3, rows) % 150]),
            "rating": pa.array(rng.integers(1, 6, rows).astype(float)),
            "ts": pa.array(rng.integers(0, 40, rows).astype(float)),
            "ctx": pa.array([f"c{x}" for x in rng.integers(0, 5, rows)]),
        }
    )
    pq.write_table(tbl, path, row_group_size=100)
    return tbl


def _cfg(path: Path, out: Path, **data: object):  # noqa: ANN202
    src = {
        "kind": "table", "path": str(path), "label": "rating", "user": "user", "item": "item",
        "timestamp": "ts", "sparse": ["ctx"],
    }  # fmt: skip
    d = {
        "source": src,
        "prepared_dir": str(out),
        "block_size": 4,
        "negatives": {"per_positive": PER_POSITIVE, "seed": 5},
        "label": {"mode": "threshold", "threshold": 2},  # rating 1: label-0 interactions, no negatives
        **data,
    }
    return dlrm_cfg(d)


@pytest.mark.parametrize("split", [{"mode": "random"}, {"mode": "leave_last_n", "n": 2}])
def test_same_files_whatever_chunks_and_buckets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: dict
) -> None:
    """chunk_rows × rows per bucket: (50, chunk), (97, 13), (all, all) → byte-identical folders."""
    path = tmp_path / "r.parquet"
    _interactions(path, 1200, seed=1)
    outs = []
    for chunk, per_bucket in ((50, None), (97, 13), (10**9, None)):
        monkeypatch.setattr(negative_buckets, "ROWS_PER_BUCKET", per_bucket)
        cfg = _cfg(path, tmp_path / f"c{chunk}", chunk_rows=chunk, split=split, shuffle_window=64)
        prepare(cfg, overwrite=False)
        outs.append(folder_files(Path(cfg.data.prepared_dir)))
    assert any(k.endswith(".mds") or k.endswith(".zstd") for k in outs[0])
    for other in outs[1:]:
        assert sorted(other) == sorted(outs[0])
        for k in outs[0]:
            assert other[k] == outs[0][k], f"{k} differs with the chunk or bucket size"


def test_rule_holds_on_the_rows_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every negative: an item of the train catalogue, never an item its user has a row with in its
    split or an earlier one; PER_POSITIVE of them per positive of each user and split; train
    negatives may be a user's later (val/test) items."""
    monkeypatch.setattr(negative_buckets, "ROWS_PER_BUCKET", 70)
    path = tmp_path / "r.parquet"
    tbl = _interactions(path, 1500, seed=2)
    cfg = _cfg(path, tmp_path / "p", chunk_rows=111)
    meta = prepare(cfg, overwrite=False)
    out = Path(cfg.data.prepared_dir)
    vocab = {n: (out / "vocab" / f"{n}.txt").read_text().splitlines() for n in ("user", "item")}
    ui, ii = meta.sparse_index("user"), meta.sparse_index("item")

    # The source rows, as (user, item) ids, with their split and label.
    users, items = tbl["user"].to_pylist(), tbl["item"].to_pylist()
    assign = S.random_split(len(users), 0.1, 0.1, 0)
    label = tbl["rating"].to_numpy() >= 2
    earliest: dict[tuple[str, str], int] = {}
    for u, i, s in zip(users, items, assign, strict=True):
        earliest[(u, i)] = min(earliest.get((u, i), 9), int(s))
    catalogue = {i for i, s in zip(items, assign, strict=True) if s == S.TRAIN}
    known = {n: set(v[1:]) for n, v in vocab.items()}  # ids only in val/test are written as row 0
    written = [
        (u if u in known["user"] else vocab["user"][0], i if i in known["item"] else vocab["item"][0])
        for u, i in zip(users, items, strict=True)
    ]
    source_keys = {(u, i, int(s), bool(y)) for (u, i), s, y in zip(written, assign, label, strict=True)}

    later_items = 0
    for name, code in (("train", S.TRAIN), ("val", S.VAL), ("test", S.TEST)):
        a = read_split_arrays(out, name, meta)
        rows = Counter(
            (vocab["user"][u], vocab["item"][i], code, bool(y))
            for u, i, y in zip(a["sparse"][:, ui], a["sparse"][:, ii], a["label"], strict=True)
        )
        # Negatives are the label-0 rows that are no source row: a source row of the same (user,
        # item, split) would itself forbid that negative.
        negatives = Counter({k: n for k, n in rows.items() if not k[3] and k not in source_keys})
        assert negatives, f"no negatives in {name}"
        for u, i, s, _ in negatives:
            assert i in catalogue, f"negative {i} of {u} has no train row"
            assert earliest.get((u, i), 9) > s, f"negative {i} of {u} in {name} is an interaction"
            later_items += (u, i) in earliest
        per_user = Counter()
        for (u, _, _, _), n in negatives.items():
            per_user[u] += n
        positives = Counter(u for u, s, y in zip(users, assign, label, strict=True) if s == code and y)
        assert per_user == Counter({u: PER_POSITIVE * n for u, n in positives.items()})
        assert meta.splits[name].positives == sum(positives.values())
    assert later_items > 0  # train negatives look only at train: some are the user's val/test items
    notes = [n for n in meta.read_notes if n.startswith("negatives:")]
    assert notes == [
        f"negatives: {PER_POSITIVE * int(label.sum()):,} sampled rows (label 0) for {int(label.sum()):,} positives"
    ]


def test_each_negatives_file_is_opened_once_per_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 chunks x 8 user buckets: every bucket's and chunk's file is written once and read once
    (B + C opens per step, not B x C: reading a bucket's slice from every chunk's file, or a chunk's
    negatives from every bucket's file, would open 64 files per step)."""
    opened: Counter = Counter()

    def counting(fn, name: str):  # noqa: ANN001, ANN202
        def run(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if Path(str(path)).name.startswith("neg"):
                opened[name] += 1
            return fn(path, *args, **kwargs)

        return run

    for owner, name in ((pa, "memory_map"), (pa, "OSFile"), (os, "open"), (np, "fromfile")):
        monkeypatch.setattr(owner, name, counting(getattr(owner, name), name))
    path = tmp_path / "r.parquet"
    _interactions(path, 800, seed=3)
    prepare(_cfg(path, tmp_path / "p", chunk_rows=100), overwrite=False)  # 8 chunks, 8 buckets
    assert sum(opened.values()) <= 2 * (8 + 8), f"negatives files opened {dict(opened)}"
    assert opened["open"] == 8 + 8, f"each bucket's and chunk's file written once: {dict(opened)}"
    assert opened["fromfile"] == 8 + 8, f"each bucket's and chunk's file read once: {dict(opened)}"


_LIMITED = """
import resource, sys
from recsys.data.negative_files import HEADROOM, ensure_open_files
from recsys.errors import UserError
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (HEADROOM + 10, hard))
ensure_open_files(500)  # the soft limit is raised towards the hard one
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 500 + HEADROOM)
resource.setrlimit(resource.RLIMIT_NOFILE, (HEADROOM + 10, HEADROOM + 10))  # a low hard limit
try:
    ensure_open_files(500)
except UserError as e:
    print(e)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX open-file limits")
def test_open_file_limit_is_raised_or_names_chunk_rows() -> None:
    """The soft limit is raised to fit one file per bucket or chunk; a hard limit too low for them
    is one line naming data.chunk_rows."""
    out = subprocess.run(
        [sys.executable, "-c", _LIMITED], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.splitlines()
    assert out[0] == "True"
    assert out[1].startswith("data.chunk_rows: sampling negatives keeps 500 files open at once")
    assert "raise data.chunk_rows" in out[1]


def test_spark_prepare_refuses_negatives_instead_of_dropping_them(tmp_path: Path) -> None:
    pytest.importorskip("pyspark")
    from recsys.data.spark_mds import prepare_dataframe
    from recsys.errors import UserError

    cfg = _cfg(tmp_path / "r.parquet", tmp_path / "p")
    with pytest.raises(UserError, match="data.negatives.per_positive: sampled negatives are added by"):
        prepare_dataframe(None, cfg)  # type: ignore[arg-type]  # refused before the DataFrame is read


# --------------------------------------------------------------------------------------- memory
# Like tests/test_data_prepare_streaming.py's check: prepare in a child process, single-threaded,
# its live numpy/Python peak (tracemalloc), Arrow's pool peak and peak RSS beyond the imports.
_CHILD = """
import json, os, sys, tracemalloc
import pyarrow as pa
import streaming  # the MDS writer's imports (torch …) are not prepare's memory
from recsys.config import config_from_dict
from recsys.data import mds
from recsys.data import prepare as P
from recsys.data.readers import delimited
delimited._CSV_BLOCK = 1 << 14  # Arrow's CSV read-ahead (~35 blocks) full at both sizes
os.cpu_count = lambda: 1
mds.SplitWriter._submit = lambda self, fn, *args: fn(*args)
def rss(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key))
cfg = config_from_dict(json.loads(sys.argv[1]))
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak of prepare alone
    before = rss("VmRSS")
except OSError:  # a kernel or sandbox that refuses: no RSS figure
    before = None
if os.environ.get("TRACE") == "1":
    tracemalloc.start()
meta = P.prepare(cfg, overwrite=True)
print(json.dumps({
    "live_kb": tracemalloc.get_traced_memory()[1] / 1024,
    "arrow_kb": pa.default_memory_pool().max_memory() / 1024,
    "rss_kb": None if before is None else rss("VmHWM") - before,
    "vocab": [f.num_embeddings for f in meta.sparse_features],
    "rows": {k: v.rows for k, v in meta.splits.items()},
}))
"""


def interactions_config(root: Path, users: int, per_user: int, items: int, chunk_rows: int) -> dict:
    """A synthetic_interactions config with 4 negatives per positive (for the memory figures)."""
    return {
        "name": "negmem",
        "data": {
            "source": {
                "kind": "synthetic_interactions", "num_users": users, "num_items": items,
                "interactions_per_user": per_user,
            },
            "raw_dir": str(root / f"raw{per_user}"),
            "prepared_dir": str(root / f"p{per_user}"),
            "split": {"mode": "random"},
            "label": {"mode": "all_positive"},
            "negatives": {"per_positive": 4, "seed": 0},
            "chunk_rows": chunk_rows,
            "shuffle_window": chunk_rows,
            "shard_size_limit": 1 << 18,  # the MDS writer holds up to a shard per split in memory
            "block_size": 8,
        },
        "model": {"kind": "dlrm", "embedding_dim": 8, "dlrm": {"dense_arch_layers": [8]}},
        "train": {"batch_size": 8},
        "eval": {"batch_size": 8},
    }  # fmt: skip


def _child_figures(script: str, config: dict, env: dict | None = None) -> dict:
    """Generate `config`'s raw data (in this process), run `script` on it in a fresh process and
    return its last stdout line, a JSON object."""
    from recsys.data.synth import synthesize

    synthesize(config_from_dict(config), overwrite=True)
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def negatives_peaks(config: dict, trace: bool = True) -> dict:
    """Memory figures of one prepare of `config` (its raw data generated first, in this process)."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "TRACE": "1" if trace else "0"}
    return _child_figures(_CHILD, config, env)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_negatives_memory_does_not_grow_with_rows(tmp_path: Path) -> None:
    """4x the rows (same users, items, chunk): the sampling's memory stays the same."""
    small, big = (
        negatives_peaks(interactions_config(tmp_path, 600, per_user, 500, 4000)) for per_user in (40, 160)
    )
    assert small["rows"]["train"] * 3 < big["rows"]["train"]
    grown = {k: round(big[k] - small[k]) for k in ("live_kb", "arrow_kb", "rss_kb") if small[k] is not None}
    why = f"grew with rows (KiB): {grown}; {small} vs {big}"
    assert grown["live_kb"] < 1024, f"numpy/Python peak {why}"
    assert grown["arrow_kb"] < 1024, f"Arrow's peak {why}"
    if small["rss_kb"] is not None:
        assert big["rss_kb"] < 1.15 * small["rss_kb"] + 24_000, f"peak RSS {why}"


def main(sizes: list[int]) -> None:
    """Print peak RSS beyond the imports of prepare with negatives off and on (per_positive 4) at
    each size of synthetic_interactions (10,000 users, 20,000 items, 131,072-row chunks and shuffle
    window, 8 MiB shards): `PYTHONPATH=.:tests python -m tests.test_negatives_streaming 500000 2000000`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            config = interactions_config(Path(tmp), 10_000, rows // 10_000, 20_000, 131_072)
            config["data"]["shard_size_limit"] = 8 << 20
            for per_positive in (0, 4):
                config["data"]["negatives"]["per_positive"] = per_positive
                r = negatives_peaks(config, trace=False)
                rss = r["rss_kb"] / 1024 if r["rss_kb"] is not None else float("nan")
                print(
                    f"input ~{rows:,} rows, per_positive {per_positive}: {sum(r['rows'].values()):>10,} written, "
                    f"peak RSS beyond imports {rss:7.1f} MiB  Arrow peak {r['arrow_kb'] / 1024:6.1f} MiB",
                    flush=True,
                )


_PHASES = """
import json, os, resource, sys, time
from recsys.data import negative_buckets as NB
from recsys.data import prepare as P
from recsys.config import config_from_dict
took = {"sample_s": 0.0, "sample_cpu_s": 0.0, "pass2_lookup_s": 0.0, "pass2_lookup_cpu_s": 0.0}
def kernel():  # this thread's: pass 2's MDS writer threads run beside the lookups
    return resource.getrusage(resource.RUSAGE_THREAD).ru_stime
def writes():
    return next(int(x.split()[1]) for x in open("/proc/self/io") if x.startswith("syscw"))
def timed(fn, key):
    def run(*args, **kwargs):
        t, c, sys0, w = time.perf_counter(), time.thread_time(), kernel(), writes()
        try:
            return fn(*args, **kwargs)
        finally:
            took[key + "_s"] += time.perf_counter() - t
            took[key + "_cpu_s"] += time.thread_time() - c
            took[key + "_sys_s"] = took.get(key + "_sys_s", 0.0) + kernel() - sys0
            took[key + "_writes"] = took.get(key + "_writes", 0) + writes() - w
    return run
def rss(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key))
def sample(self, *args):
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak from sampling on
    took["rss_before_kb"] = rss("VmRSS")
    return timed(sample_all, "sample")(self, *args)
sample_all = NB.NegativeSampler.sample
NB.NegativeSampler.sample = sample
NB.NegativeSampler._of_chunk = timed(NB.NegativeSampler._of_chunk, "pass2_lookup")
t = time.perf_counter()
P.prepare(config_from_dict(json.loads(sys.argv[1])), overwrite=True)
took["prepare_s"] = time.perf_counter() - t
took["peak_rss_mb"] = (rss("VmHWM") - took["rss_before_kb"]) / 1024
print(json.dumps(took))
"""


def phases(sizes: list[int], chunk_rows: int) -> None:
    """Print the negatives phases' wall and CPU time of the thread that runs them (sampling between the
    passes, pass 2's lookups; pass 2's MDS writer threads run beside the lookups), the write calls
    while sampling and the peak RSS from sampling to prepare's end (beyond the RSS when sampling
    starts) at each size, with small chunks so that there are hundreds of chunks and buckets: `PYTHONPATH=.:tests python -m tests.test_negatives_streaming --phases 16384 2000000 8000000`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            config = interactions_config(Path(tmp), 10_000, rows // 10_000, 20_000, chunk_rows)
            config["data"]["shard_size_limit"] = 8 << 20
            r = _child_figures(_PHASES, config)
            chunks = -(-rows // chunk_rows)
            print(
                f"~{rows:,} rows, chunk_rows {chunk_rows:,} ({chunks} chunks and buckets): sampling "
                f"{r['sample_s']:.1f} s ({r['sample_cpu_s']:.1f} CPU-s, {r['sample_sys_s']:.1f} in the kernel, "
                f"{r['sample_writes']:,} write calls), pass-2 lookups "
                f"{r['pass2_lookup_s']:.1f} s ({r['pass2_lookup_cpu_s']:.1f} CPU-s, {r['pass2_lookup_sys_s']:.1f} in the kernel), prepare {r['prepare_s']:.1f} s, peak RSS from sampling on "
                f"{r['peak_rss_mb']:.0f} MiB beyond its start",
                flush=True,
            )


def appends(chunks: int) -> None:
    """Print the cost of the B x C small appends at 1B rows and data.chunk_rows 262,144 (B = C =
    3,815), from `chunks` synthetic chunks and buckets: `PYTHONPATH=.:tests python -m
    tests.test_negatives_streaming --appends 6`."""
    import tempfile
    import time

    from recsys.data.negative_files import KEY, NEGATIVE, ChunkFiles, KeyFiles, ensure_open_files

    b = c = 3815
    n, rng = 262_144, np.random.default_rng(0)
    ensure_open_files(b)
    with tempfile.TemporaryDirectory() as tmp:
        keys, took = KeyFiles(Path(tmp), b), []
        for i in range(chunks):
            records = np.zeros(n, KEY)
            records["pos"] = np.arange(i * n, (i + 1) * n)
            records["user_lo"], records["user_hi"] = rng.integers(0, 2**63, (2, n), dtype=np.uint64)
            records["item"] = rng.integers(0, 10**6, n)
            bucket = np.sort(rng.integers(0, b, n)).astype(np.int32)
            t = time.perf_counter()
            keys.append(records, bucket)
            took.append(time.perf_counter() - t)
        keys.close()
        step1 = float(np.mean(took[1:]))
        for path in Path(tmp).glob("neg-keys-*"):
            path.unlink()
        files, took = ChunkFiles(Path(tmp), list(range(0, c * n, n))), []
        for _ in range(chunks):
            neg = np.zeros(4 * n, NEGATIVE)
            neg["pos"] = np.sort(rng.integers(0, c * n, 4 * n))
            t = time.perf_counter()
            files.append(neg)
            took.append(time.perf_counter() - t)
        files.close()
        step2 = float(np.mean(took[1:]))
    print(
        f"step 1: {1e3 * step1:.0f} ms per chunk into {b:,} bucket files, x {c:,} chunks = {step1 * c / 60:.1f} min; "
        f"step 2: {1e3 * step2:.0f} ms per bucket (4 negatives a row) into {c:,} chunk files, "
        f"x {b:,} buckets = {step2 * b / 60:.1f} min"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--appends"]:
        appends(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--phases"]:
        phases([int(x) for x in sys.argv[3:]], int(sys.argv[2]))
    else:
        main([int(x) for x in sys.argv[1:]])
