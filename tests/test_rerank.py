"""`rerank` on a hand-made candidate table: ranker order per user, ties by retrieval rank, the
candidate cut, fallback lists kept as retrieved, users in their first-seen order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recsys.retrieval.rank import rerank


def _candidates() -> pa.Table:
    return pa.table(
        {
            "user": ["b", "b", "b", "b", "a", "a", "a", "z", "z", "z"],
            "rank": pa.array([1, 2, 3, 4, 1, 2, 3, 1, 2, 3], pa.int32()),
            "item": ["i1", "i2", "i3", "i4", "i1", "i5", "i6", "i1", "i2", "i3"],
            "score": pa.array([9, 8, 7, 6, 5, 4, 3, 30, 20, 10], pa.float32()),
            "fallback": [False] * 7 + [True] * 3,
        }
    )


def test_rerank_orders_by_ranker_within_the_candidate_cut() -> None:
    ranker = np.array([0.1, 0.5, 0.9, 0.99, 0.2, 0.7, 0.7, np.nan, np.nan, np.nan], np.float32)
    out = rerank(_candidates(), ranker, k=2, candidates=3).to_pydict()
    assert out["user"] == ["b", "b", "a", "a", "z", "z"]
    # b: i4 (0.99) is past the 3-candidate cut; a: i5 and i6 tie, the better retrieval rank first.
    assert out["item"] == ["i3", "i2", "i5", "i6", "i1", "i2"]
    assert out["rank"] == [1, 2, 1, 2, 1, 2]
    assert out["retrieval_rank"] == [3, 2, 2, 3, 1, 2]
    np.testing.assert_allclose(out["score"], [0.9, 0.5, 0.7, 0.7, 30, 20])
    assert out["fallback"] == [False] * 4 + [True] * 2
    everything = rerank(_candidates(), ranker, k=10).to_pydict()
    assert everything["item"][:4] == ["i4", "i3", "i2", "i1"] and len(everything["item"]) == 10
