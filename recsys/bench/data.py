"""`make bench-data` / `recsys bench data`: conversion and loading throughput on Criteo-layout rows.

Prints figures; asserts nothing. Synthetic raw TSV files are generated first (not timed). Then:
  conversion  = recsys.data.prepare.prepare() end to end: pyarrow TSV parse + log1p + by-day split
                + vocabulary fit/map of 26 features + MDS write (data.compression) of train/val/test + vocab files
                + metadata (including sha256 of the raw files); prepare's pass 2 alone (map the spilled
                ids to rows + MDS write) is also shown;
  loading     = make_train_loader() over the train split, one process, one full epoch after a warm-up
                epoch (shards already decompressed), batches of `batch_size` rows as TorchRec Batches;
  ceiling     = a plain numpy read (np.fromfile) of the same decompressed shard bytes, and the same
                read plus zstd decompression of the compressed shards.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(".bench/data")


def _config(rows: int, block_size: int, batch_size: int):  # noqa: ANN202
    from recsys.config import config_from_dict

    return config_from_dict(
        {
            "name": "bench-data",
            "data": {
                "source": {"kind": "synthetic_ctr", "rows": rows, "days": 3, "cardinality": 100_000},
                "prepared_dir": str(BENCH_DIR / "prepared"),
                "raw_dir": str(BENCH_DIR / "raw"),
                "split": {"mode": "by_day"},
                "block_size": block_size,
            },
            "model": {"kind": "dlrm", "embedding_dim": 16, "dlrm": {"dense_arch_layers": [16]}},
            "train": {"batch_size": batch_size},
            "eval": {"batch_size": batch_size},
        },
        "bench",
    )


def bench_data(
    rows: int = 1_000_000, repeats: int = 3, block_size: int = 1024, batch_size: int = 8192
) -> dict:
    """Run the data benchmark and print its figures; returns them."""
    from recsys.data import prepare as P
    from recsys.data.loader import make_train_loader
    from recsys.data.metadata import read_metadata
    from recsys.data.synth import synthesize

    cfg = _config(rows, block_size, batch_size)
    raw = BENCH_DIR / "raw"
    if not (raw / "synth.json").is_file() or json.loads((raw / "synth.json").read_text())["rows"] != rows:
        t = time.perf_counter()
        synthesize(cfg, overwrite=True)
        print(f"generated {rows:,} raw rows in {time.perf_counter() - t:.1f}s (not timed)")
    raw_bytes = sum(p.stat().st_size for p in raw.glob("day_*.tsv"))
    import streaming  # noqa: F401  (import cost is not conversion cost)

    conv, conv_cpu, write = [], [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        P.prepare(cfg, overwrite=True)
        conv.append(time.perf_counter() - t)
        conv_cpu.append(time.process_time() - c)  # all threads of this process
        write.append(P.LAST_TIMINGS["write"])
    train_rows = read_metadata(cfg.data.prepared_dir).splits["train"].rows

    loader = make_train_loader(cfg, read_metadata(cfg.data.prepared_dir), world_size=1)
    for _ in loader:  # warm-up epoch: decompresses the shards into the local folder
        pass
    load, load_cpu = [], []
    for _ in range(repeats):
        n, t, c = 0, time.perf_counter(), time.process_time()
        for b in loader:
            n += int(b.labels.shape[0])
        load.append(n / (time.perf_counter() - t))
        load_cpu.append(n / (time.process_time() - c))

    shards = sorted((Path(cfg.data.prepared_dir) / "train").glob("shard.*.mds"))
    zips = sorted((Path(cfg.data.prepared_dir) / "train").glob("shard.*.mds.zstd"))
    numpy_read, zstd_read = [], []
    from streaming.base.compression import decompress

    for _ in range(repeats):
        t = time.perf_counter()
        nbytes = sum(np.fromfile(s, dtype=np.uint8).size for s in shards)
        numpy_read.append(train_rows / (time.perf_counter() - t))
        t = time.perf_counter()
        for z in zips:
            np.frombuffer(decompress("zstd", z.read_bytes()), np.uint8)
        zstd_read.append(train_rows / (time.perf_counter() - t))

    med = statistics.median
    figures = {
        "rows": rows,
        "raw_tsv_mb": round(raw_bytes / 1e6, 1),
        "block_size": block_size,
        "batch_size": batch_size,
        "conversion_rows_per_s": round(rows / med(conv)),
        "conversion_rows_per_cpu_s": round(rows / med(conv_cpu)),
        "mds_write_rows_per_s": round(rows / med(write)),
        "loader_samples_per_s": round(med(load)),
        "loader_samples_per_cpu_s": round(med(load_cpu)),
        "numpy_read_samples_per_s": round(med(numpy_read)),
        "numpy_zstd_read_samples_per_s": round(med(zstd_read)),
        "train_rows": train_rows,
        "shard_mb": round(nbytes / 1e6, 1),
        "load_average": round(os.getloadavg()[0], 1),
        "cores": os.cpu_count(),
    }
    lines = [
        ("conversion: parse+split+vocab+MDS write (prepare())", "conversion_rows_per_s", "rows/s"),
        ("  same, per CPU-second of all its threads", "conversion_rows_per_cpu_s", "rows/cpu-s"),
        ("  pass 2 only: map ids + MDS write (3 splits)", "mds_write_rows_per_s", "rows/s"),
        (f"loader, 1 process (block {block_size}, batch {batch_size})", "loader_samples_per_s", "samples/s"),
        ("  same, per CPU-second", "loader_samples_per_cpu_s", "samples/cpu-s"),
        ("ceiling: numpy read of the decompressed shards", "numpy_read_samples_per_s", "samples/s"),
        ("ceiling: numpy read + zstd decompress", "numpy_zstd_read_samples_per_s", "samples/s"),
    ]
    print(
        f"\ndata benchmark: {rows:,} Criteo-layout rows ({figures['raw_tsv_mb']} MB TSV), medians of {repeats}"
    )
    for label, key, unit in lines:
        print(f"  {label:<56} {figures[key]:>12,} {unit}")
    print(
        f"  (load average {figures['load_average']} on {figures['cores']} cores: wall-clock figures scale with it)"
    )
    print(json.dumps(figures))
    shutil.rmtree(cfg.data.prepared_dir, ignore_errors=True)
    return figures
