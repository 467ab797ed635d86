"""The train loader's streaming helper threads finish their walk of the epoch instead of polling
beside training: with streaming's default look-ahead (8 batches) they wake every 7 ms for the whole
epoch, which cost ~3 ms of CPU per step of bench train-scale (recsys.data.loader, predownload)."""

from __future__ import annotations

import time
from pathlib import Path

from recsys.bench.train_scale import write_scale_data
from recsys.config import load_config
from recsys.data.loader import make_train_loader
from recsys.data.metadata import read_metadata

BLOCKS = 40  # one 256-row block per batch: far more than streaming's default look-ahead of 8


def test_helper_threads_walk_the_whole_epoch_after_the_first_batch(tmp_path: Path) -> None:
    prepared = write_scale_data(tmp_path / "data", tables=2, table_rows=100, train_rows=256 * BLOCKS)
    cfg = load_config("dlrm_synth", [f"data.prepared_dir={prepared}", "train.batch_size=256"])
    loader = make_train_loader(cfg, read_metadata(prepared), 1)
    it = iter(loader)
    next(it)
    # streaming's per-epoch state (private: no public view of how far its threads got)
    state = loader.dataset._iterator
    deadline = time.monotonic() + 10
    while (state.prepare_index, state.ready_index) != (state.total, state.total):
        assert time.monotonic() < deadline, (
            f"helper threads stopped at {state.prepare_index}/{state.ready_index} of {state.total} "
            "blocks: they poll until the training loop catches up"
        )
        time.sleep(0.01)
    assert state.total >= BLOCKS
    assert len(list(it)) == BLOCKS - 1  # and the epoch is still all there
