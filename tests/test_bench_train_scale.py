"""`recsys bench train-scale` at a scaled-down size: the same bench path (scale data written in the
prepared layout, `recsys train` beside the bare loop at 2 ranks column-wise, async checkpoint and a
resume in a fresh process) runs and reports what the full size reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.bench.train_scale import CKPT_EVERY, bench_train_scale


@pytest.mark.slow
@pytest.mark.dist
def test_train_scale_two_ranks_column_wise_with_checkpoint_and_resume(tmp_path: Path) -> None:
    out = bench_train_scale(
        table_rows=50_000, steps=3, reps=1, ranks=(2,), shardings=("column_wise",), root=tmp_path
    )
    (row,) = out["throughput"]
    assert row["sharding"] == "column_wise" and row["ranks"] == 2
    assert row["bare"]["rate"] > 0 and row["full"]["rate"] > 0
    assert all(m > 0 for m in row["full"]["peak_mib"] + row["bare"]["peak_mib"])
    meta = json.loads((tmp_path / "data-26x50000" / "metadata.json").read_text())
    assert [f["num_embeddings"] for f in meta["sparse_features"]] == [50_000] * 26

    (ck,) = out["checkpoint"]
    weights = 26 * 50_000 * 64 * 4
    assert ck["size_gib"] * 2**30 > weights, "tables, optimizer state and dense parts are all saved"
    assert ck["saved_steps"] == [2 * CKPT_EVERY], "keep_last=1 after saves at 5 and 10"
    assert ck["resumed_from"] == 2 * CKPT_EVERY
    assert ck["after_resume_steps"] == [2 * CKPT_EVERY + 3], "the resumed run went on to its end"
    assert ck["blocked_first_s"] > 0 and ck["load_s"] > 0
    assert not any((tmp_path / "checkpoints").rglob("*")), (
        "measured checkpoints are removed (6.3 GiB each at full size)"
    )
