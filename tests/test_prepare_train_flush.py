"""Pass 2 writes the buffered train rows as soon as no train row can follow (pass 1 knows the last one),
not after every val/test chunk: with by_day the shuffle of day 0 is written before days 1 and 2 are mapped."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.bench.prepare_scale import write_criteo_tsv
from recsys.config import config_from_dict
from recsys.data import mds
from recsys.data.prepare import prepare


def test_train_rows_are_written_before_the_val_and_test_days(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of the split writers' writes: every train write comes before the first test write."""
    files = [tmp_path / f"day_{d}.tsv" for d in range(3)]
    for d, f in enumerate(files):
        write_criteo_tsv(f, 3_000, seed=d, cap=50)
    writes: list[str] = []
    write = mds.SplitWriter.write

    def logged(self: mds.SplitWriter, label, dense, sparse) -> None:  # noqa: ANN001
        if len(label):  # every chunk writes each split, most of them empty
            writes.append(Path(self._writer.local).name)
        write(self, label, dense, sparse)

    monkeypatch.setattr(mds.SplitWriter, "write", logged)
    cfg = config_from_dict(
        {
            "name": "t",
            "data": {
                "source": {"kind": "criteo", "paths": [str(f) for f in files]},
                "prepared_dir": str(tmp_path / "out"),
                "split": {"mode": "by_day"},
                "block_size": 64,
                "chunk_rows": 1_000,  # 3 chunks a day
                "shuffle_window": 100_000,  # one window holds all of day 0's train rows
            },
            "model": {"kind": "dlrm", "embedding_dim": 8, "dlrm": {"dense_arch_layers": [8]}},
            "train": {"batch_size": 64},
            "eval": {"batch_size": 64},
        }
    )
    meta = prepare(cfg, overwrite=False)
    assert meta.splits["train"].rows == 3_000
    assert {"train", "val", "test"} <= set(writes)
    last_train = max(i for i, name in enumerate(writes) if name == "train")
    assert last_train < writes.index("test"), f"train written after test rows: {writes}"
