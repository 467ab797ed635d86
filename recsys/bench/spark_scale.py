"""`recsys bench spark-scale`: the Spark prepare on local[2] with a capped driver, at ≥ 10M rows.

Generates Criteo-layout rows (label, I1..I13, C1..C26 as 8-hex-character ids) as one Parquet file in
row groups of 100,000 rows (never more than --chunk rows in memory), then runs `prepare_on_spark` in a child
process whose JVM starts with --driver-memory (local mode: the driver JVM also runs the tasks). Prints
rows/s of the prepare, the driver JVM's peak RSS (VmHWM from /proc), the Python driver's peak RSS, and
the prepared sizes. The data lives under .bench/ (git-ignored) and is reused by the next run (--fresh
regenerates it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from recsys.bench.peak_rss import peak_kb, status_kb

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
# Id-space sizes per sparse column: Criteo-like spread, a few large spaces (joined by shuffle, beyond
# spark_mds.BROADCAST_VOCAB) and many small ones (broadcast joins).
CARDINALITY = [1_000, 500, 2_000_000, 300_000, 300, 20, 12_000, 600, 3, 90_000, 5_000, 1_500_000, 3_000,
               25, 14_000, 1_000_000, 10, 5_000, 2_000, 4, 1_200_000, 15, 15, 200_000, 80, 40_000]  # fmt: skip


ROW_GROUP = 100_000


def _hex_ids(card: int, seed: int) -> Any:
    """`card` distinct 8-hex-character ids (as Criteo's), in a fixed random order."""
    import pyarrow as pa

    codes = np.random.default_rng(seed).choice(1 << 32, size=card, replace=False).astype(np.uint32)
    return pa.array(np.char.mod("%08x", codes).astype(object), type=pa.string())


def generate(path: Path, rows: int, chunk: int, seed: int = 0) -> None:
    """Write `rows` Criteo-layout rows to one Parquet file, generated `chunk` rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = [_hex_ids(c, seed + 1 + j) for j, c in enumerate(CARDINALITY)]
    schema = pa.schema(
        [("label", pa.int32())] + [(d, pa.int64()) for d in DENSE] + [(c, pa.string()) for c in SPARSE]
    )
    tmp = path.with_suffix(".partial")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            cols: list[Any] = [pa.array((rng.random(n) < 0.25).astype(np.int32))]
            for _ in DENSE:
                v = rng.geometric(0.05, n).astype(np.int64) - 2  # small counts, some negative (as Criteo)
                cols.append(pa.array(v, mask=rng.random(n) < 0.1))
            for j, card in enumerate(CARDINALITY):
                # Skewed popularity: low codes are frequent; 5% missing.
                idx = np.minimum((card * rng.random(n) ** 3).astype(np.int64), card - 1)
                cols.append(vocab[j].take(pa.array(idx, mask=rng.random(n) < 0.05)))
            # Row groups of ROW_GROUP rows: Spark splits a Parquet file at row-group boundaries only, and
            # with local[2] every task runs inside the capped driver JVM.
            writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=ROW_GROUP)
    tmp.rename(path)


def bench_config(parquet: Path, prepared: Path) -> dict[str, Any]:
    """The config of the benchmark's prepare: a `table` source over the Criteo-layout Parquet."""
    return {
        "name": "spark-scale",
        "data": {
            "source": {
                "kind": "table",
                "path": str(parquet),
                "label": "label",
                "dense": DENSE,
                "sparse": SPARSE,
            },
            "prepared_dir": str(prepared),
            "label": {"mode": "as_is"},
            "split": {"mode": "random", "val_fraction": 0.05, "test_fraction": 0.05, "seed": 0},
            "min_count": 2,
            "block_size": 256,
        },
        "model": {"kind": "dlrm", "embedding_dim": 64},
    }


def _jvm_peak_rss(parent: int) -> int:
    """Peak RSS (bytes, VmHWM) of the java processes started by `parent` (the Spark driver JVM)."""
    peak = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent or b"java" not in (d / "cmdline").read_bytes():
                continue
            peak = max(peak, status_kb("VmHWM", d.name) * 1024)
        except (OSError, ValueError, IndexError, StopIteration):
            continue
    return peak


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of `root` and every live descendant, each with its reaped children's
    (the JVM's exited Python workers count through their parent): on a shared machine a steadier
    figure than wall time, which other jobs' load stretches."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based from state
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = sum(int(x) for x in fields[11:15]) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [c for c, p in parent.items() if p == pid]
    return total


def run_prepare(config_path: Path) -> dict[str, Any]:
    """In this (child) process: run the Spark prepare, return wall time and the peak memory figures."""
    from recsys.config import load_config
    from recsys.data.spark_mds import prepare_on_spark
    from recsys.launch.spark import get_spark

    cfg = load_config(str(config_path))
    spark = get_spark(None, master="local[2]")
    spark.sparkContext.setLogLevel("ERROR")
    start = time.perf_counter()
    meta = prepare_on_spark(cfg, spark, overwrite=True)
    wall = time.perf_counter() - start
    # The JVM is still up: its high-water mark covers the whole prepare.
    jvm = _jvm_peak_rss(os.getpid())
    cpu = _tree_cpu_seconds(os.getpid())
    spark.stop()
    return {
        "rows": sum(s.rows for s in meta.splits.values()),
        "seconds": wall,
        "cpu_seconds": cpu,
        "jvm_peak_rss": jvm,
        "python_peak_rss": peak_kb() * 1024,  # VmHWM: ru_maxrss would hold the parent's peak
        "vocab_rows": sum(f.num_embeddings for f in meta.sparse_features),
        "splits": {k: v.rows for k, v in meta.splits.items()},
    }


def bench_spark_scale(
    rows: int,
    chunk: int = 1_000_000,
    driver_memory: str = "1g",
    out: Path = Path(".bench/spark-scale"),
    keep: bool = True,
    shuffle_partitions: int = 16,
) -> dict[str, Any]:
    """Generate (or reuse, with keep) the rows, prepare them in a child process, print the figures."""
    from recsys.config import config_from_dict, dump_config

    out.mkdir(parents=True, exist_ok=True)
    parquet = out / f"criteo-{rows}-rg{ROW_GROUP}.parquet"
    if not (keep and parquet.exists()):
        start = time.perf_counter()
        generate(parquet, rows, chunk)
        print(f"generated {rows:,} rows → {parquet} ({parquet.stat().st_size / 2**20:,.0f} MiB) "
              f"in {time.perf_counter() - start:,.0f} s")  # fmt: skip
    cfg_path = out / "config.yaml"
    cfg_path.write_text(dump_config(config_from_dict(bench_config(parquet, out / "prepared"))))
    env = dict(os.environ)
    # The driver's heap is fixed when its JVM starts: spark-submit arguments, not a session setting.
    # Shuffle partitions: Spark's default 200 turns each of the prepare's ~20 shuffles into 200 tasks,
    # seconds of scheduling for nothing on 2 cores.
    env["PYSPARK_SUBMIT_ARGS"] = (
        f"--driver-memory {driver_memory} --conf spark.sql.shuffle.partitions={shuffle_partitions} "
        "--conf spark.sql.files.maxPartitionBytes=8m pyspark-shell"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "recsys.bench.spark_scale", "--child", str(cfg_path)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "Exception" in ln][:10]
        raise RuntimeError(f"the Spark prepare failed (exit {proc.returncode}):\n" + "\n".join(errors))
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(
        f"spark prepare local[2], --driver-memory {driver_memory}: {res['rows']:,} rows in {res['seconds']:,.0f} s "
        f"= {res['rows'] / res['seconds']:,.0f} rows/s; driver JVM peak RSS {res['jvm_peak_rss'] / mib:,.0f} MiB; "
        f"Python driver peak RSS {res['python_peak_rss'] / mib:,.0f} MiB; splits {res['splits']}; "
        f"{res['vocab_rows']:,} vocabulary rows; {res['cpu_seconds']:,.0f} CPU seconds in all processes "
        f"(with the JVM's start and the Parquet read)"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    """`python -m recsys.bench.spark_scale [--rows N] [--driver-memory 1g] [--fresh]`."""
    p = argparse.ArgumentParser(prog="recsys bench spark-scale", description=__doc__)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows to generate and prepare")
    p.add_argument("--chunk", type=int, default=1_000_000, help="rows generated at a time (one row group)")
    p.add_argument(
        "--driver-memory", default="1g", help="the driver JVM's heap (spark-submit --driver-memory)"
    )
    p.add_argument("--out", type=Path, default=Path(".bench/spark-scale"), help="where data and output go")
    p.add_argument("--fresh", action="store_true", help="regenerate the Parquet file even if it exists")
    p.add_argument("--shuffle-partitions", type=int, default=16, help="spark.sql.shuffle.partitions")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_prepare(args.child)))
        return 0
    bench_spark_scale(
        args.rows, args.chunk, args.driver_memory, args.out, not args.fresh, args.shuffle_partitions
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
