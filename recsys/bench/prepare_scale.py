"""`make bench-scale` / `recsys bench prepare-scale`: rows/s and peak RSS of `recsys data prepare` as
the row count grows (1M, 4M, 16M Criteo-layout rows by default), plus a PNG of the curve.

Prints figures; asserts nothing. For each size a Criteo-layout TSV (3 day files) is generated first
into .bench/scale/ (not timed; heavy-tailed ids, up to millions of distinct values per feature, so
the vocabularies grow the way Criteo's do). Each prepare runs in a child process (`python -m
recsys.bench.prepare_scale --child …`), which reports its own wall time and peak RSS
(getrusage ru_maxrss). Every size runs with the same data.chunk_rows and data.shuffle_window, so
what grows with the rows is the vocabularies: their ids and counts are printed beside the RSS.

"Beyond imports and vocabularies" is the figure the aim is about (RSS flat as rows grow, beyond the
vocabularies): the child resets the kernel's peak-RSS mark (/proc/self/clear_refs) as each phase of
prepare starts (pass 1, fixing the vocabularies, pass 2), reads the phase's peak as it ends, and
subtracts the RSS after imports and the bytes the vocabulary state held in that phase (the id
counters' and tables' own arrays, recsys.data.memory); the figure is the largest of the three phases.
`--cap N` runs a second kind of data, every feature capped at N distinct ids, so the vocabularies
stop growing and RSS itself should stay flat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from recsys.bench.peak_rss import peak_kb, reset_peak, status_kb

BENCH_DIR = Path(".bench/scale")
PLOT = BENCH_DIR / "prepare_scale.png"  # `--record` copies it to docs/benchmarks/results/prepare-scale.png

#: Distinct ids per categorical feature in Criteo's Kaggle day files (as the DLRM reference lists them);
#: the generator caps each feature at these, drawing ids heavy-tailed so the large ones keep growing.
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _hex_ids(values: np.ndarray) -> np.ndarray:
    """uint32 values → 8-character lowercase hex ids as an 'S8' array (Criteo's id format)."""
    v = values.astype(np.uint32)
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    return _HEX[(v[:, None] >> shifts) & np.uint32(0xF)].view("S8").ravel()


def _chunk(rng: np.random.Generator, rows: int, feature_salt: np.ndarray, cap: int | None):  # noqa: ANN202
    """One generated chunk of Criteo-layout rows as a pyarrow Table (label, 13 ints, 26 hex ids)."""
    import pyarrow as pa

    from recsys.data.splits import mix64

    cols: dict[str, pa.Array] = {"label": pa.array((rng.random(rows) < 0.25).astype(np.int64))}
    for i in range(13):
        vals = rng.geometric(0.05, rows).astype(np.int64) - 1
        cols[f"int_{i}"] = pa.array(vals, mask=rng.random(rows) < 0.1)
    for j, card in enumerate(CRITEO_CARDINALITIES):
        card = min(card, cap or card)
        # Heavy tail: rank = card ** u with u skewed to 0, so a few ids are very common and the
        # distinct count keeps growing with the rows up to the cap.
        rank = np.minimum(np.floor(card ** (rng.random(rows) ** 2.5)), card - 1).astype(np.uint64)
        ids = _hex_ids(mix64(int(feature_salt[j]), rank) & np.uint64(0xFFFFFFFF))
        cols[f"cat_{j}"] = pa.array(ids, type=pa.binary(), mask=rng.random(rows) < 0.04).cast(pa.string())
    return pa.table(cols)


def write_criteo_tsv(path: Path, rows: int, seed: int, chunk: int = 500_000, cap: int | None = None) -> None:
    """Write `rows` generated Criteo-layout rows (tab-separated, no header) to `path`, chunk by chunk;
    `cap` bounds every feature's distinct ids (tests that need vocabularies that stop growing)."""
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    salt = np.arange(len(CRITEO_CARDINALITIES)) + 1000  # ids of a feature are the same in every file
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    tmp = path.with_suffix(".tmp")
    with pacsv.CSVWriter(tmp, _chunk(rng, 1, salt, cap).schema, write_options=opts) as w:
        for start in range(0, rows, chunk):
            w.write_table(_chunk(rng, min(chunk, rows - start), salt, cap))
    tmp.rename(path)


def dataset(rows: int, days: int = 3, cap: int | None = None) -> list[Path]:
    """The generated day files of a `rows`-row dataset (written once, reused by later runs); `cap`
    bounds every feature's distinct ids (see write_criteo_tsv)."""
    out = BENCH_DIR / (f"raw_{rows}" if cap is None else f"raw_{rows}_cap{cap}")
    per_day = [rows // days + (1 if d < rows % days else 0) for d in range(days)]
    files = [out / f"day_{d}.tsv" for d in range(days)]
    for d, (f, n) in enumerate(zip(files, per_day, strict=True)):
        if not f.is_file():
            t = time.perf_counter()
            write_criteo_tsv(f, n, seed=rows * 31 + d, cap=cap)
            print(f"generated {f} ({n:,} rows) in {time.perf_counter() - t:.1f}s (not timed)", flush=True)
    return files


def _config(files: list[Path], prepared: Path, chunk_rows: int, shuffle_window: int):  # noqa: ANN202
    from recsys.config import config_from_dict

    return config_from_dict(
        {
            "name": "bench-scale",
            "data": {
                "source": {"kind": "criteo", "paths": [str(f) for f in files]},
                "prepared_dir": str(prepared),
                "split": {"mode": "by_day"},
                "block_size": 1024,
                "chunk_rows": chunk_rows,
                "shuffle_window": shuffle_window,
            },
            "model": {"kind": "dlrm", "embedding_dim": 16, "dlrm": {"dense_arch_layers": [16]}},
            "train": {"batch_size": 1024},
            "eval": {"batch_size": 1024},
        },
        "bench",
    )


def _child(args: argparse.Namespace) -> None:
    """Prepare one dataset in this process; print one JSON line with time, peak RSS and, per phase,
    peak RSS and the vocabulary state's bytes."""
    import streaming  # noqa: F401  (the MDS writer's import: torch etc., not prepare's memory)

    from recsys.data import prepare as P

    files = [Path(f) for f in args.files.split(",")]
    cfg = _config(files, Path(args.prepared), args.chunk_rows, args.shuffle_window)
    phases: dict[str, dict[str, float]] = {}

    def phase_end(phase: str, vocab_bytes: int) -> None:
        phases[phase] = {"peak_rss_mb": status_kb("VmHWM") / 1024, "vocab_mb": vocab_bytes / 2**20}
        reset_peak()

    # Once the mark is reset, the peak is the phases' largest VmHWM. Not getrusage's ru_maxrss: after
    # vfork + exec it keeps the parent's peak, which would hide a child below it.
    per_phase = sys.platform.startswith("linux") and reset_peak()
    base = status_kb("VmRSS") if per_phase else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t, c = time.perf_counter(), time.process_time()
    meta = P.prepare(cfg, overwrite=True, on_phase=phase_end if per_phase else None)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = max(p["peak_rss_mb"] for p in phases.values()) if per_phase else peak_kb() / 1024
    vocab = sum(f.num_embeddings for f in meta.sparse_features)
    print(
        json.dumps(
            {
                "rows": sum(s.rows for s in meta.splits.values()),
                "train_rows": meta.splits["train"].rows,
                "shuffle_window": args.shuffle_window,
                "wall_s": wall,
                "cpu_s": cpu,
                "peak_rss_mb": peak,
                "rss_before_prepare_mb": base / 1024,
                "vocab_rows": vocab,
                "timings": P.LAST_TIMINGS,
                "phases": phases,
            }
        ),
        flush=True,
    )


def beyond_vocabularies(fig: dict) -> tuple[float, str] | None:
    """Peak RSS beyond the imports and the vocabulary state (MB, the largest over the phases) and the
    phase it was in; None when the child could not measure per phase."""
    if not fig.get("phases"):
        return None
    base = fig["rss_before_prepare_mb"]
    beyond = {name: p["peak_rss_mb"] - base - p["vocab_mb"] for name, p in fig["phases"].items()}
    phase = max(beyond, key=beyond.__getitem__)
    return beyond[phase], phase


def run_one(rows: int, chunk_rows: int, shuffle_window: int, cap: int | None = None) -> dict:
    """Generate (once) and prepare a `rows`-row dataset in a child process; returns its figures."""
    import shutil

    files = dataset(rows, cap=cap)
    load_before = os.getloadavg()[0]
    prepared = BENCH_DIR / f"prepared_{rows}"
    cmd = [
        sys.executable, "-m", "recsys.bench.prepare_scale", "--child",
        "--files", ",".join(str(f) for f in files), "--prepared", str(prepared),
        "--chunk-rows", str(chunk_rows), "--shuffle-window", str(shuffle_window),
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    shutil.rmtree(prepared, ignore_errors=True)
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    fig["raw_mb"] = sum(f.stat().st_size for f in files) / 1e6
    fig["load"] = (load_before, os.getloadavg()[0])  # 1-minute load average before and after the child
    return fig


def plot(figures: list[dict], path: Path, capped: list[dict] | None = None) -> None:
    """PNG of peak RSS (total, less the vocabularies, after imports) and rows/s against rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [f["rows"] / 1e6 for f in figures]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(rows, [f["peak_rss_mb"] for f in figures], "o-", label="peak RSS")
    beyond = [beyond_vocabularies(f) for f in figures]
    if all(beyond):
        pairs = zip(figures, beyond, strict=True)
        less = [f["rss_before_prepare_mb"] + x[0] for f, x in pairs]
        a.plot(rows, less, "^-", label="peak RSS less the vocabularies")
    if capped:
        label = f"peak RSS, ids capped at {capped[0]['cap']:,} a feature"
        a.plot([f["rows"] / 1e6 for f in capped], [f["peak_rss_mb"] for f in capped], "v:", label=label)
    a.plot(rows, [f["rss_before_prepare_mb"] for f in figures], "s--", label="RSS after imports")
    a.set(xlabel="rows (millions)", ylabel="MB", title="recsys data prepare: peak RSS", xscale="log")
    a.set_ylim(bottom=0)
    a.legend(fontsize="small")
    b.plot(rows, [f["rows"] / f["wall_s"] / 1e3 for f in figures], "o-", label="rows/s (wall)")
    # Per CPU-second: what the code costs, whatever else the machine runs (wall rows/s is the load's figure).
    b.plot(rows, [f["rows"] / f["cpu_s"] / 1e3 for f in figures], "s--", label="rows per CPU-second")
    b.set(xlabel="rows (millions)", ylabel="thousand rows", title="throughput (1 process)", xscale="log")
    b.set_ylim(bottom=0)
    b.legend()
    for ax in (a, b):
        ax.set_xticks(rows, [f"{r:g}M" for r in rows])
        ax.minorticks_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _print_figures(fig: dict) -> None:
    """The lines of one size: throughput and peak RSS, then the RSS beyond imports and vocabularies."""
    t = fig["timings"]
    print(
        f"{fig['rows']:>12,} rows ({fig['raw_mb']:,.0f} MB TSV): {fig['rows'] / fig['wall_s']:>9,.0f} rows/s "
        f"wall, {fig['rows'] / fig['cpu_s']:,.0f} rows per CPU-second ({fig['cpu_s']:.1f} CPU-s in "
        f"{fig['wall_s']:.1f} s; pass 1 {t['read_cpu']:.1f} in {t['read']:.1f} s, vocab {t['vocab_cpu']:.1f} in "
        f"{t['vocab']:.1f} s, pass 2 {t['write_cpu']:.1f} in {t['write']:.1f} s), peak RSS {fig['peak_rss_mb']:,.0f} MB (after imports "
        f"{fig['rss_before_prepare_mb']:,.0f} MB), vocabularies {fig['vocab_rows']:,} ids; "
        f"load average {fig['load'][0]:.1f} before, {fig['load'][1]:.1f} after",
        flush=True,
    )
    beyond = beyond_vocabularies(fig)
    if beyond is None:
        print(f"{'':>14}beyond imports and vocabularies: not measured (/proc/self/clear_refs refused)")
        return
    per = "; ".join(
        f"{name} {p['peak_rss_mb']:,.0f} MB peak, vocabulary state {p['vocab_mb']:,.0f} MB"
        for name, p in fig["phases"].items()
    )
    note = "" if window_full(fig) else f"; shuffle window not full: {fig['train_rows']:,} train rows"
    print(
        f"{'':>14}beyond imports and vocabularies: {beyond[0]:,.0f} MB (in {beyond[1]}; {per}{note})",
        flush=True,
    )


def window_full(fig: dict) -> bool:
    """Whether the run's train rows filled a shuffle window (by_day: train is the first day file, so a
    smaller run buffers fewer train rows in pass 2, and its RSS is below the bound the larger runs hit)."""
    return fig["train_rows"] >= fig["shuffle_window"]


def _summary(figures: list[dict], what: str) -> str:
    """max/min of peak RSS and of the RSS beyond imports and vocabularies over the sizes of one series
    (and, beyond the vocabularies, over the sizes whose shuffle window filled, when that leaves two)."""
    rss = [f["peak_rss_mb"] for f in figures]
    text = f"{what}: peak RSS max/min {max(rss) / min(rss):.2f}"
    beyond = [beyond_vocabularies(f) for f in figures]
    if all(beyond):
        values = [b[0] for b in beyond]
        text += f", beyond imports and vocabularies max/min {max(values) / min(values):.2f}"
        full = [b[0] for f, b in zip(figures, beyond, strict=True) if window_full(f)]
        if 1 < len(full) < len(figures):
            sizes = ", ".join(f"{f['rows']:,}" for f in figures if window_full(f))
            text += f" ({max(full) / min(full):.2f} over the sizes whose shuffle window fills: {sizes} rows)"
    return text


def bench_prepare_scale(
    sizes: list[int], chunk_rows: int = 262_144, shuffle_window: int = 1_048_576, cap: int | None = None
) -> list[dict]:
    """Run the scale benchmark for each row count and print its figures; with `cap`, a second series
    on data whose features have at most `cap` distinct ids. Returns the figures (both series)."""
    figures, capped = [], []
    for rows in sizes:
        figures.append(run_one(rows, chunk_rows, shuffle_window))
        _print_figures(figures[-1])
    if cap is not None:
        print(f"\nthe same sizes, every feature capped at {cap:,} distinct ids (vocabularies stop growing):")
        for rows in sizes:
            capped.append({**run_one(rows, chunk_rows, shuffle_window, cap), "cap": cap})
            _print_figures(capped[-1])
    png = PLOT
    plot(figures, png, capped)
    series = [_summary(figures, "Criteo cardinalities")]
    if capped:
        series.append(_summary(capped, f"capped at {cap:,}"))
    print(
        f"\nprepare scale: chunk_rows {chunk_rows:,}, shuffle_window {shuffle_window:,}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; {'; '.join(series)}; plot {png}"
    )
    return figures + capped


def parse_sizes(text: str) -> list[int]:
    """'1e6,4e6' → [1000000, 4000000]."""
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark (and of its child processes)."""
    p = argparse.ArgumentParser(
        prog="python -m recsys.bench.prepare_scale", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--rows", "--sizes", default="1e6,4e6,16e6", help="row counts, comma-separated (e.g. 1e6,4e6)"
    )
    p.add_argument("--chunk-rows", type=int, default=262_144)
    p.add_argument("--shuffle-window", type=int, default=1_048_576)
    p.add_argument("--cap", type=int, help="also run the sizes with every feature capped at CAP distinct ids")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
    else:
        bench_prepare_scale(parse_sizes(args.rows), args.chunk_rows, args.shuffle_window, args.cap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
