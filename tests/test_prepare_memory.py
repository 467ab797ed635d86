"""What prepare reports of its vocabulary state (recsys.data.memory), and the prepare-scale bench's figure
"beyond imports and vocabularies" built from it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.data import memory as M
from recsys.data import vocab as V
from recsys.data.hashing import TableMap


def _ids(n: int, seed: int) -> pa.Array:
    """n random 8-character hex ids (Criteo's format: the counters' uint64 key mode)."""
    return pa.array([f"{x:08x}" for x in np.random.default_rng(seed).integers(0, 2**32, n)], pa.string())


def test_counter_bytes_follow_distinct_ids_not_rows() -> None:
    """16 B per distinct id while counting (key + count), whatever the rows; the fixed table 28 B.
    (+ 4 B: the counter's empty string-mode array holds one offset.)"""
    ids = _ids(1000, 0)
    distinct = len(set(ids.to_pylist()))
    counter = V.IdCounter()
    for _ in range(3):  # the same ids three times: more rows, no more state
        counter.add(ids, np.ones(len(ids), bool))
    assert M.counter_bytes(counter) == 16 * distinct + 4
    table = TableMap(counter, 1, None)
    # sorted keys (8) and their rows (8), the vocabulary's ids (8 bytes + a 4-byte offset each, + 1 offset)
    assert M.tables_bytes([counter], [table]) == 28 * distinct + 4 + 4


def test_capped_table_counts_its_own_ids() -> None:
    """A capped table lists its ids beside the counter's vocabulary: both are counted."""
    from recsys.config.model import TableConfig

    counter = V.IdCounter()
    counter.add(_ids(500, 1), np.ones(500, bool))
    table = TableMap(counter, 1, TableConfig(kind="capped", max_rows=101, hashed_rows=20))
    assert M.tables_bytes([counter], [table]) == M.counter_bytes(counter) + table.ids.get_total_buffer_size()


def test_prepare_reports_each_phase_with_its_vocabulary_bytes(tmp_path: Path) -> None:
    """on_phase sees pass 1, the vocabularies and pass 2 in order, with the counters' and the tables' bytes."""
    from recsys.bench.prepare_scale import _config, write_criteo_tsv
    from recsys.data.prepare import prepare

    files = [tmp_path / f"day_{d}.tsv" for d in range(3)]
    for d, f in enumerate(files):
        write_criteo_tsv(f, 3000, seed=d)
    seen: list[tuple[str, int]] = []
    meta = prepare(
        _config(files, tmp_path / "out", 1000, 1000), True, on_phase=lambda p, b: seen.append((p, b))
    )
    assert [p for p, _ in seen] == ["pass 1", "vocabularies", "pass 2"]
    kept = [f.num_embeddings - 1 for f in meta.sparse_features]  # min_count 1: every train id is kept
    assert seen[0][1] == sum(16 * n + 4 for n in kept)
    assert seen[2][1] == sum(28 * n + 8 for n in kept)
    assert seen[0][1] <= seen[1][1] <= seen[0][1] + seen[2][1]  # counters and tables overlap there


def test_beyond_vocabularies_is_the_largest_phase() -> None:
    """Peak RSS less imports and the phase's vocabulary state, the largest over the phases."""
    from recsys.bench.prepare_scale import beyond_vocabularies

    fig = {
        "rss_before_prepare_mb": 800.0,
        "phases": {
            "pass 1": {"peak_rss_mb": 1300.0, "vocab_mb": 200.0},  # 300 beyond
            "vocabularies": {"peak_rss_mb": 1350.0, "vocab_mb": 400.0},  # 150
            "pass 2": {"peak_rss_mb": 1400.0, "vocab_mb": 350.0},  # 250
        },
    }
    assert beyond_vocabularies(fig) == (300.0, "pass 1")
    assert beyond_vocabularies({**fig, "phases": {}}) is None


@pytest.mark.slow  # two child processes that import torch (~10 s each idle, ~25 s at load 12)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bench_prints_the_figure_per_size_and_its_spread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One small size, plain and capped: each child measures every phase; the summary gives both spreads."""
    from recsys.bench import prepare_scale as B

    monkeypatch.setattr(B, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(B, "PLOT", tmp_path / "plot.png")
    figures = B.bench_prepare_scale([6000], chunk_rows=2000, shuffle_window=2000, cap=50)
    out = capsys.readouterr().out
    for fig in figures:
        phases = fig["phases"]
        assert list(phases) == ["pass 1", "vocabularies", "pass 2"]
        assert fig["peak_rss_mb"] == max(p["peak_rss_mb"] for p in phases.values())
        assert all(p["peak_rss_mb"] >= fig["rss_before_prepare_mb"] * 0.9 for p in phases.values())
    assert figures[1]["vocab_rows"] <= 26 * 51  # the cap holds
    assert out.count("beyond imports and vocabularies: ") == 2
    passes = r"pass 1 [\d.]+ in [\d.]+ s, vocab [\d.]+ in [\d.]+ s, pass 2 [\d.]+ in [\d.]+ s\)"
    assert len(re.findall(passes, out)) == 2  # CPU-seconds and wall seconds of each phase
    assert "Criteo cardinalities: peak RSS max/min 1.00, beyond imports and vocabularies max/min 1.00" in out
    assert "capped at 50: peak RSS max/min 1.00, beyond imports and vocabularies max/min 1.00" in out
    assert (tmp_path / "plot.png").is_file()


def test_summary_also_gives_the_spread_over_sizes_whose_window_fills() -> None:
    """A size whose train rows do not fill a shuffle window holds less in pass 2: the summary says so."""
    from recsys.bench.prepare_scale import _summary

    def fig(rows: int, train: int, peak: float) -> dict:
        phase = {"peak_rss_mb": peak, "vocab_mb": 0.0}
        return {"rows": rows, "train_rows": train, "shuffle_window": 100, "peak_rss_mb": peak,
                "rss_before_prepare_mb": 0.0, "phases": {"pass 2": phase}}  # fmt: skip

    text = _summary([fig(150, 50, 500.0), fig(600, 200, 1000.0), fig(2400, 800, 1100.0)], "s")
    assert text == (
        "s: peak RSS max/min 2.20, beyond imports and vocabularies max/min 2.20 "
        "(1.10 over the sizes whose shuffle window fills: 600, 2,400 rows)"
    )
