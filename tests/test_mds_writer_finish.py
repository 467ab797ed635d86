"""SplitWriter.close() finishes an MDS split without streaming's one-second wait on its upload queue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.data.mds import BlockReader, SplitWriter


def test_close_never_sleeps_on_the_upload_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MDSWriter.finish() sleeps 1 s while the last shard's upload is still queued (right after queueing
    it, whenever the upload thread has not had the GIL yet): 0 to 3 s of a prepare. close() drains the
    queue first; the split reads back whole."""
    import streaming.base.format.base.writer as base
    from streaming import MDSWriter

    slept: list[float] = []
    monkeypatch.setattr(base, "sleep", slept.append)  # returns at once: the wait loop still ends
    # Whether finish() sleeps depends on thread timing (an idle test often wins the race), so what is
    # checked is what rules the wait out: finish() starts with no shard left to write and no upload queued.
    at_finish: list[tuple[int, int]] = []
    finish = MDSWriter.finish

    def watched(self: MDSWriter) -> None:
        at_finish.append((len(self.new_samples), self.executor._work_queue.qsize()))
        finish(self)

    monkeypatch.setattr(MDSWriter, "finish", watched)
    for i in range(5):  # the race, lost or won, five times over
        w = SplitWriter(tmp_path / f"s{i}", 4, "zstd:2", 1 << 26)
        sparse = np.arange(30, dtype=np.int64).reshape(10, 3) + i
        w.write(np.ones(10, np.float32), np.zeros((10, 2), np.float32), sparse)
        w.close()
        blocks = list(BlockReader(tmp_path / f"s{i}").iter_blocks())
        assert w.blocks == len(blocks) == 3
        assert np.concatenate([b["sparse"] for b in blocks]).tolist() == sparse.tolist()
    assert at_finish == [(0, 0)] * 5
    assert slept == [], f"MDSWriter.finish() slept {len(slept)} times waiting for its upload queue"
