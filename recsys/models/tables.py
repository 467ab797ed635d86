"""Managed-collision tables: TorchRec's MCH modules map the id hashes in the data to table rows.

A managed-collision feature's data holds id hashes (recsys.data.hashing; 0 = missing value). Before
the embedding lookup, `IdRemapper` hands each such feature's hashes to a TorchRec
`MCHManagedCollisionModule`, which keeps the table's rows for the ids it has seen most (per its
eviction policy) and maps every other id to its miss row (the table's last row). Row 0 stays the
missing-value row, as in every other table. The remapper's state — the ids holding rows, their
counts/last access, its step counter — is ordinary module buffers, so checkpoints, resume and the
exported model carry it.

Why not TorchRec's sharded `ManagedCollisionEmbeddingBagCollection`: its sharder allows only
row-wise sharding, which TorchRec offers for EmbeddingBagCollections on CUDA only, and its eviction
path calls `fbgemm::reset_weight_momentum`, which has no CPU kernel (both checked with torchrec 1.9.2 /
fbgemm-gpu-cpu 1.9.0). Here the table itself stays an ordinary table (sharded by the planner like any
other, fused optimizer) and the remapper is replicated: with several ranks it profiles the ids of
every rank's batch (an injected all-gather), so every rank's remapper holds the same state. A row
handed to a new id keeps the evicted id's vector and optimizer state (TorchRec's unsharded
module does the same; its sharded one resets them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

if TYPE_CHECKING:
    from recsys.data.metadata import Metadata


def eviction_policy(name: str) -> MCHEvictionPolicy:
    """TorchRec's MCH eviction policy of model.tables.<f>.eviction_policy."""
    if name == "lfu":
        return LFU_EvictionPolicy()
    if name == "lru":
        return LRU_EvictionPolicy()
    return DistanceLFU_EvictionPolicy()


def make_mch(
    max_rows: int, policy: str, interval: int, device: torch.device | str
) -> MCHManagedCollisionModule:
    """An MCH module over rows 1 .. max_rows-1 (row 0 is the missing-value row; the last row is the miss row)."""
    return MCHManagedCollisionModule(
        zch_size=max_rows - 1,
        device=torch.device(device),
        eviction_policy=eviction_policy(policy),
        eviction_interval=interval,
        input_hash_size=(1 << 63) - 1,
        output_global_offset=1,
    )


class IdRemapper(nn.Module):
    """forward(kjt) → the same KJT with each managed-collision feature's id hashes replaced by rows.

    Profiles (learns) only in training mode; `gather`, when set, returns the ids of every rank's
    batch for a feature so that every replica of the remapper learns the same state.
    """

    def __init__(self, mchs: dict[str, MCHManagedCollisionModule]) -> None:
        super().__init__()
        self.mch = nn.ModuleDict(mchs)
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def remap_values(self, feature: str, values: torch.Tensor) -> torch.Tensor:
        """Rows of one feature's id hashes (0 = missing stays row 0)."""
        mch = self.mch[feature]
        present = values != 0
        ids = values[present]
        if self.training:
            seen = self.gather(ids) if self.gather is not None else ids
            mch.profile({feature: JaggedTensor(values=seen, lengths=seen.new_tensor([seen.numel()]))})
        jt = JaggedTensor(values=ids, lengths=ids.new_tensor([ids.numel()]))
        rows = torch.zeros_like(values)
        rows[present] = mch.remap({feature: jt})[feature].values()
        return rows

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The batch's KJT with managed-collision features remapped to rows."""
        parts = kjt.to_dict()
        names: list[str] = kjt.keys()
        values = [
            self.remap_values(k, parts[k].values()) if k in self.mch else parts[k].values() for k in names
        ]
        return KeyedJaggedTensor(
            keys=kjt.keys(), values=torch.cat(values), lengths=kjt.lengths(), stride=kjt.stride()
        )

    @torch.no_grad()
    def rows_of(self, feature: str, hashes: np.ndarray) -> np.ndarray:
        """Rows the current state gives id hashes, without learning (the miss row for ids not held)."""
        mch = self.mch[feature]
        ids = torch.from_numpy(np.asarray(hashes, dtype=np.int64)).to(mch._mch_sorted_raw_ids.device)
        out = mch.remap({feature: JaggedTensor(values=ids, lengths=ids.new_tensor([ids.numel()]))})
        return out[feature].values().cpu().numpy()


def build_remapper(specs: dict[str, tuple[int, str, int]], device: torch.device | str) -> IdRemapper | None:
    """An IdRemapper for feature → (max_rows, eviction policy, eviction interval); None when empty."""
    if not specs:
        return None
    return IdRemapper({f: make_mch(rows, pol, every, device) for f, (rows, pol, every) in specs.items()})


def table_embeddings(task: nn.Module, meta: Metadata, prepared_dir: str | Path, feature: str) -> pa.Table:
    """One feature's embeddings keyed by raw id: columns id, row, shared (no single id owns the row), embedding.

    exact: one line per vocabulary row but row 0. capped: the kept ids, then the hashed rows named
    `<HASHED j>` with shared = true. managed_collision: one line per train id (vocabulary file) with
    the row the remapper gives it now; ids holding no row share the miss row (shared = true).
    """
    from recsys.data.hashing import id_hashes
    from recsys.data.metadata import read_vocab
    from recsys.models.two_tower import table_name

    sf = meta.sparse_features[meta.sparse_index(feature)]
    weights = dict(task.named_parameters())
    key = next(k for k in weights if k.endswith(f"embedding_bags.{table_name(feature)}.weight"))
    emb = weights[key].detach().float().cpu().numpy()
    vocab = read_vocab(prepared_dir, sf)[1:]
    if sf.table == "managed_collision":
        remapper = next(m for m in task.modules() if isinstance(m, IdRemapper))
        rows = remapper.rows_of(feature, id_hashes(vocab))
        shared = rows == sf.num_embeddings - 1
    else:
        rows = np.arange(1, len(vocab) + 1)
        shared = (
            rows >= sf.num_embeddings - sf.hashed_rows if sf.table == "capped" else np.zeros(len(rows), bool)
        )
    vectors = emb[rows]
    return pa.table(
        {
            "id": pa.array(vocab, pa.string()),
            "row": pa.array(rows, pa.int64()),
            "shared": pa.array(shared, pa.bool_()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        }
    )
