"""DLRM ranking model (TorchRec's `DLRM` with dot interaction, or `DLRM_DCN`) and its train task.

Shapes: B = batch size, D_in = dense features, F = sparse features, D = embedding_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRM_DCN

from recsys.models.two_tower import make_ebc


def build_dlrm(
    sparse: list[tuple[str, int]],
    num_dense: int,
    embedding_dim: int,
    dense_arch_layers: list[int],
    over_arch_layers: list[int],
    interaction: str,
    dcn_num_layers: int = 3,
    dcn_low_rank_dim: int = 512,
    ebc_device: torch.device | str = "meta",
    dense_device: torch.device | str | None = None,
) -> DLRM:
    """DLRM over one table per sparse feature; `forward(dense [B, D_in], kjt) → logits [B, 1]`."""
    if num_dense < 1:
        raise ValueError("DLRM needs at least one dense feature (the data has none)")
    ebc = make_ebc(sparse, embedding_dim, ebc_device)
    dev = torch.device(dense_device) if dense_device is not None else None
    if interaction == "dot":
        return DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense,
            dense_arch_layer_sizes=dense_arch_layers,
            over_arch_layer_sizes=over_arch_layers,
            dense_device=dev,
        )
    if interaction == "dcn":
        return DLRM_DCN(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense,
            dense_arch_layer_sizes=dense_arch_layers,
            over_arch_layer_sizes=over_arch_layers,
            dcn_num_layers=dcn_num_layers,
            dcn_low_rank_dim=dcn_low_rank_dim,
            dense_device=dev,
        )
    raise ValueError(f"model.dlrm.interaction: unknown {interaction!r} (dot or dcn)")


class DLRMTask(nn.Module):
    """Train-task wrapper: forward(batch) → (loss, (loss, logits, labels)) for TrainPipelineSparseDist."""

    def __init__(self, model: DLRM, remapper: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        # Managed-collision features: id hashes → rows before the lookup (recsys.models.tables).
        self.remapper = remapper

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Mean BCE of the batch and (detached loss, [B] logits, [B] labels)."""
        sparse = batch.sparse_features if self.remapper is None else self.remapper(batch.sparse_features)
        logits = self.model(batch.dense_features, sparse).squeeze(-1)
        labels = batch.labels.float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        return loss, (loss.detach(), logits.detach(), labels.detach())
