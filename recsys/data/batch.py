"""Rows → TorchRec `Batch` (dense, KeyedJaggedTensor sparse, labels), without mosaicml-streaming: the
loader (recsys.data.loader) builds its batches with it, and so does the ranker's scoring in the served
two-stage model, whose environment has torch and TorchRec but not streaming."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch


def to_batch(
    label: np.ndarray,
    dense: np.ndarray,
    sparse_t: np.ndarray,
    keys: list[str],
    perm: np.ndarray | None = None,
    history: tuple[np.ndarray, np.ndarray] | None = None,
) -> Batch:
    """Build a TorchRec Batch from rows; `sparse_t` is key-major [S, n]. One id per row per key;
    with `history` ([n, L] items, [n] ranks; recsys.data.history) a last, jagged key `history`."""
    import torch
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    if perm is not None:
        # one gather per array, straight into the layouts torch needs (KJT values are key-major)
        # np.take is ~3x faster than fancy indexing here and yields C-contiguous results
        label = np.take(label, perm)
        dense = np.take(dense, perm, axis=0)
        sparse_t = np.take(sparse_t, perm, axis=1)
        if history is not None:
            history = (np.take(history[0], perm, axis=0), np.take(history[1], perm))
    n = len(label)
    values = np.ascontiguousarray(sparse_t).reshape(-1)
    # numpy's memset beats torch.ones here (torch's CPU fill goes through its thread pool)
    lengths = np.ones(n * len(keys), dtype=np.int32)
    if history is not None:
        from recsys.data.history import jagged_history
        from recsys.data.metadata import HISTORY_FEATURE

        h_values, h_lengths = jagged_history(*history)
        keys = [*keys, HISTORY_FEATURE]
        values = np.concatenate([values.astype(np.int64, copy=False), h_values])
        lengths = np.concatenate([lengths, h_lengths])
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32).reshape(n, -1)),
        sparse_features=KeyedJaggedTensor(
            keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
        ),
        labels=torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32)),
    )
