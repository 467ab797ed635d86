"""Prepared MDS splits → TorchRec `Batch` (dense, KeyedJaggedTensor sparse, labels).

Training: StreamingDataset over blocks (pinned num_canonical_nodes and seed, so the order is a
function of the config alone) and a StreamingDataLoader whose batches are whole blocks; rows are then
shuffled within the batch with a seed derived from the blocks' ids, so a resumed run sees exactly the
same batches. Streaming pads every rank's partition to the same length and drop_last trims the tail,
so every rank runs the same number of steps.

Evaluation: an exact, padding-free partition of the blocks over ranks, read without streaming.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# Module-level (not lazy) so the dataset and loader classes pickle into DataLoader workers.
from streaming import Stream, StreamingDataLoader, StreamingDataset

# to_batch lives apart, free of streaming: the two-stage served model scores with it (recsys.retrieval.rank).
from recsys.data.batch import to_batch
from recsys.data.lineage import train_folders
from recsys.data.mds import BlockReader
from recsys.data.metadata import SPLITS, Metadata, read_metadata
from recsys.errors import UserError

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

    from recsys.config import Config


def _split_dir(prepared_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (have: {', '.join(SPLITS)})")
    return Path(prepared_dir) / split


def _concat(blocks: list[dict[str, Any]], num_dense: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label [n], dense [n, D], sparse key-major [S, n]) of consecutive blocks."""
    label = np.concatenate([b["label"] for b in blocks])
    dense = np.concatenate([b["dense"] for b in blocks])[:, :num_dense]
    sparse_t = np.concatenate([b["sparse"].T for b in blocks], axis=1)
    return label, dense, sparse_t


def _history(blocks: list[dict[str, Any]], wanted: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(history [n, L], history_rank [n]) of consecutive blocks when `wanted` (else None)."""
    if not wanted:
        return None
    return np.concatenate([b["history"] for b in blocks]), np.concatenate([b["history_rank"] for b in blocks])


def _collate_blocks(
    samples: list[dict[str, Any]], keys: list[str], num_dense: int, seed: int, history: bool = False
) -> Batch:
    """Concatenate whole blocks and shuffle their rows with a seed fixed by the blocks' ids."""
    label, dense, sparse_t = _concat(samples, num_dense)
    rng = np.random.default_rng([seed, *(int(s["_block"]) for s in samples)])
    perm = rng.permutation(len(label))
    return to_batch(label, dense, sparse_t, keys, perm, _history(samples, history))


class BlockDataset(StreamingDataset):
    """StreamingDataset whose samples also carry their global block id (for the row shuffle seed)."""

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """The block dict plus `_block`, its global sample id."""
        sample = super().get_item(sample_id, retry)
        sample["_block"] = sample_id
        return sample


class BatchLoader(StreamingDataLoader):
    """StreamingDataLoader of TorchRec Batches; state_dict counts dataset samples, i.e. blocks.

    With drop_last every batch holds exactly `batch_size` blocks (a short final block has fewer
    rows but is still one sample), so the count is the constant, not the rows.
    """

    def _get_batch_size(self, batch: Any) -> int:
        return int(self.batch_size)


def _require_process_group(world_size: int) -> None:
    """Under torchrun the process group must exist first: streaming would otherwise create and
    destroy its own twice on the same MASTER_PORT, which hangs the second rendezvous."""
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise UserError(
                "WORLD_SIZE > 1 but no process group: call recsys.distributed.init_distributed() "
                "before make_train_loader()"
            )


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def make_train_loader(
    cfg: Config, meta: Metadata, world_size: int, split: str = "train"
) -> StreamingDataLoader:
    """Shuffled, resumable loader of `split` yielding Batch(dense [B,D], sparse KJT, labels [B]).

    B = cfg.train.batch_size (whole blocks; only a batch holding the split's final short block has
    fewer rows). Streaming reads rank and world from the env torchrun sets (initialize the process
    group first when `world_size` > 1); every rank gets the same number of batches.
    `state_dict()` / `load_state_dict()` resume mid-epoch; iterating again runs the next epoch.
    """
    if cfg.train.batch_size % meta.block_size:
        raise UserError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the prepared block size "
            f"({meta.block_size}, {cfg.data.prepared_dir}/metadata.json); re-prepare or change it"
        )
    blocks_per_batch = cfg.train.batch_size // meta.block_size
    folders = train_folders(cfg, meta) if split == "train" else [(Path(cfg.data.prepared_dir), meta)]
    _require_process_group(world_size)
    from recsys.data.shm import streaming_setup

    # Jobs on one host take turns registering streaming's shared memory (see recsys.data.shm).
    with streaming_setup(_barrier if world_size > 1 else None):
        # Several window folders (data.train_dirs) are one dataset of several streams, every block once.
        where: dict[str, Any] = {"local": str(_split_dir(cfg.data.prepared_dir, split))}
        if len(folders) > 1:
            where = {"streams": [Stream(local=str(_split_dir(p, split))) for p, _ in folders]}
        dataset = BlockDataset(
            **where,
            shuffle=True,
            shuffle_seed=cfg.data.shuffle_seed,
            num_canonical_nodes=cfg.data.num_canonical_nodes,
            batch_size=blocks_per_batch,
            # Every shard is local, so there is nothing to fetch ahead. With a finite look-ahead
            # streaming's two helper threads poll every 7 ms for the whole epoch (~3 ms CPU per step
            # and a woken thread on a core the training kernels use); unbounded, they walk the
            # epoch's sample list once and exit.
            predownload=sys.maxsize,
        )
    import torch

    collate = functools.partial(
        _collate_blocks,
        keys=[f.name for f in meta.sparse_features],
        num_dense=len(meta.dense_features),
        seed=cfg.data.shuffle_seed,
        history=history_wanted(cfg, meta),
    )
    return BatchLoader(
        dataset,
        batch_size=blocks_per_batch,
        collate_fn=collate,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def history_wanted(cfg: Config, meta: Metadata) -> bool:
    """True when cfg's model reads the `history` feature; then the data must have it."""
    from recsys.data.history import model_uses_history

    if not model_uses_history(cfg):
        return False
    if meta.history_length is None:
        raise UserError(
            f"{cfg.data.prepared_dir}: prepared without histories, which model.kind {cfg.model.kind} reads; "
            "set data.history.length and re-run `recsys data prepare --overwrite`"
        )
    return True


def _block_rows(meta: Metadata, split: str) -> np.ndarray:
    """Rows in each block of a split: all full except possibly the last."""
    info = meta.splits[split]
    rows = np.full(info.blocks, meta.block_size, dtype=np.int64)
    if info.blocks:
        rows[-1] = info.rows - (info.blocks - 1) * meta.block_size
    return rows


def eval_partition(meta: Metadata, split: str, world_size: int) -> list[tuple[int, int]]:
    """Contiguous block ranges [start, stop) per rank with rows as even as whole blocks allow."""
    rows = _block_rows(meta, split)
    cum = np.concatenate([[0], np.cumsum(rows)])
    total = int(cum[-1])
    bounds = [int(np.searchsorted(cum, total * r / world_size, side="left")) for r in range(world_size + 1)]
    bounds[-1] = len(rows)
    return [(bounds[r], bounds[r + 1]) for r in range(world_size)]


def iter_eval_batches(
    cfg: Config, meta: Metadata, split: str, rank: int, world_size: int
) -> tuple[int, Iterator[Batch | None]]:
    """Exact evaluation partition: every row of `split` on exactly one rank, in order, no padding.

    Returns (steps, iterator): every rank must run `steps` steps; the iterator yields a Batch of up
    to cfg.eval.batch_size rows, then None on the steps where this rank has no data left.
    """
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    if cfg.eval.batch_size % meta.block_size:
        raise UserError(
            f"eval.batch_size ({cfg.eval.batch_size}) must be a multiple of the prepared block size "
            f"({meta.block_size})"
        )
    per_batch = cfg.eval.batch_size // meta.block_size
    parts = eval_partition(meta, split, world_size)
    steps = max(math.ceil((stop - start) / per_batch) for start, stop in parts)
    start, stop = parts[rank]
    keys = [f.name for f in meta.sparse_features]
    num_dense = len(meta.dense_features)
    split_dir = _split_dir(cfg.data.prepared_dir, split)
    with_history = history_wanted(cfg, meta)

    def gen() -> Iterator[Batch | None]:
        reader = BlockReader(split_dir) if stop > start else None
        done = 0
        for b in range(start, stop, per_batch):
            assert reader is not None
            blocks = list(reader.iter_blocks(b, min(b + per_batch, stop)))
            yield to_batch(*_concat(blocks, num_dense), keys, history=_history(blocks, with_history))
            done += 1
        for _ in range(steps - done):
            yield None

    return steps, gen()


def read_split_arrays(
    prepared_dir: str | Path, split: str, meta: Metadata | None = None
) -> dict[str, np.ndarray]:
    """A whole split in row order: {'label': float32 [n], 'dense': float32 [n,D], 'sparse': int64 [n,S]}.

    Pass the Metadata the caller holds; without it metadata.json is read here (for scripts and tests).
    """
    meta = meta if meta is not None else read_metadata(prepared_dir)
    reader = BlockReader(_split_dir(prepared_dir, split))
    blocks = list(reader.iter_blocks())
    if not blocks:
        return {
            "label": np.zeros(0, np.float32),
            "dense": np.zeros((0, len(meta.dense_features)), np.float32),
            "sparse": np.zeros((0, len(meta.sparse_features)), np.int64),
        }
    cols = ("label", "dense", "sparse") + (("history", "history_rank") if meta.history_length else ())
    out = {k: np.concatenate([b[k] for b in blocks]) for k in cols}
    out["dense"] = out["dense"][:, : len(meta.dense_features)]
    return out


def read_train_arrays(cfg: Config, meta: Metadata) -> dict[str, np.ndarray]:
    """The train splits a run trains on (data.train_dirs, then data.prepared_dir) as one, oldest first."""
    parts = [read_split_arrays(p, "train", m) for p, m in train_folders(cfg, meta)]
    # Every column all folders have (history and history_rank too, for models that read histories).
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}
