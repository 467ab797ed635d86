"""Ordered Spark rows → MDS block datasets, one mds.SplitWriter per partition and split.

The rows of all splits arrive with their split code, their index in the split's order and their block
(index // block_size). One range shuffle on (split, block) puts every block whole in one partition,
in order; a sort by index orders the rows inside. Each task then reads its partition as Arrow batches
(`mapInArrow`) and hands its rows to a SplitWriter (the file prepare's block writer), which writes each
block of block_size rows as one MDS sample under <split>/<partition>/; the driver merges the partitions' index.json files per split in partition
order (streaming's merge_index), so each split's blocks stay in order and only its last is short.

This replaces a groupBy(block) + collect_list of row structs (rows boxed in the JVM, then unboxed
again in pandas) and a second shuffle of the packed blocks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

SPLIT, BLOCK, IDX, LABEL, DENSE, SPARSE = "_split", "_block", "_idx", "_label", "_dense", "_sparse"
RESULT_SCHEMA = "split byte, part int, local string, remote string"


def _part_out(out: tuple[str, str | None], part: int) -> tuple[str, str | None]:
    """(local, remote) folder of one partition's writer: <out>/<part, zero padded>."""
    name = f"{part:05d}"
    return os.path.join(out[0], name), (f"{out[1].rstrip('/')}/{name}" if out[1] else None)


def write_partition(
    batches: Iterator[pa.RecordBatch],
    outs: dict[int, tuple[str, str | None]],
    block_size: int,
    dense_dim: int,
    sparse_dim: int,
    mds_kwargs: dict[str, Any],
    history_length: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """`mapInArrow` body: this partition's rows (sorted by split, then index; blocks whole) → one MDS
    sample per block under outs[split]/<partition> (mds.SplitWriter; `mds_kwargs`: its compression and
    size_limit); yields (split, partition, index.json paths)."""
    import pyarrow as pa
    from pyspark import TaskContext
    from streaming.base.format.index import get_index_basename

    from recsys.data.mds import SplitWriter
    from recsys.data.readers import log1p_dense

    part = TaskContext.get().partitionId()
    written: list[tuple[int, str, str]] = []
    writer: SplitWriter | None = None
    split = -1

    def open_writer(code: int) -> SplitWriter:
        local, remote = _part_out(outs[code], part)
        shutil.rmtree(local, ignore_errors=True)  # a retried task starts over
        index = os.path.join(local, get_index_basename())
        written.append((code, index, f"{remote}/{get_index_basename()}" if remote else ""))
        out = (local, remote) if remote else local
        # keep_local: the driver merges the local index.json files.
        return SplitWriter(out, block_size, history_length=history_length, keep_local=True, **mds_kwargs)

    for batch in batches:
        codes = batch.column(SPLIT).to_numpy()
        label = batch.column(LABEL).to_numpy().astype(np.float32)
        n = len(label)
        raw = batch.column(DENSE).flatten().to_numpy(zero_copy_only=False)
        dense = log1p_dense(raw.astype(np.float64).reshape(n, dense_dim))
        sparse = batch.column(SPARSE).flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        # With histories each row's sparse array ends with its L history values and its rank.
        sparse = sparse.reshape(n, sparse_dim + (0 if history_length is None else history_length + 1))
        # A batch may hold the end of one split and the start of the next: cut it where the code changes.
        cuts = [0, *(np.flatnonzero(codes[1:] != codes[:-1]) + 1).tolist(), n]
        for s, e in zip(cuts[:-1], cuts[1:], strict=True):
            code = int(codes[s])
            if code != split:
                if writer is not None:
                    writer.close()
                split, writer = code, open_writer(code)
            assert writer is not None
            writer.write(label[s:e], dense[s:e], sparse[s:e])
    if writer is not None:
        writer.close()
    yield pa.RecordBatch.from_pylist(
        [{"split": c, "part": part, "local": loc, "remote": rem} for c, loc, rem in written],
        schema=pa.schema(
            [("split", pa.int8()), ("part", pa.int32()), ("local", pa.string()), ("remote", pa.string())]
        ),
    )


def write_blocks(
    rows: DataFrame,
    outs: dict[int, tuple[str, str | None]],
    tasks: int,
    block_size: int,
    dense_dim: int,
    sparse_dim: int,
    mds_kwargs: dict[str, Any],
    history_length: int | None = None,
) -> dict[int, list[tuple[str, str]]]:
    """Write rows (columns _split, _block, _idx, _label, _dense, _sparse; with `history_length`, _sparse
    ends with the history and its rank) as MDS blocks in `tasks`
    range partitions; returns per split code its partitions' index.json files (local, remote) in order."""
    ordered = rows.repartitionByRange(tasks, SPLIT, BLOCK).sortWithinPartitions(SPLIT, IDX)
    body = partial(
        write_partition,
        outs=outs,
        block_size=block_size,
        dense_dim=dense_dim,
        sparse_dim=sparse_dim,
        mds_kwargs=mds_kwargs,
        history_length=history_length,
    )
    found = ordered.select(SPLIT, LABEL, DENSE, SPARSE).mapInArrow(body, RESULT_SCHEMA).collect()
    index: dict[int, list[tuple[str, str]]] = {}
    for r in sorted(found, key=lambda r: (r["split"], r["part"])):
        index.setdefault(int(r["split"]), []).append((r["local"], r["remote"]))
    return index
