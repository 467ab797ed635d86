"""History encoders: the user tower's view of the `history` feature (recsys.data.history).

The item table lives in a TorchRec EmbeddingCollection whose one table serves two features, the item
id and `history` (feature sharing through the table's feature_names), so the history's items are
looked up in the very table the item tower uses, unpooled, and DMP shards it like any other table.
Each encoder maps the padded history [B, L, D] (oldest first, `lengths` [B] valid) to one vector:

- MeanPooling: the mean of the valid items (zero for an empty history).
- AttentionPooling: a learned query (plus a projection of the user's side features) attends over the
  items with a recency embedding; an empty history gives zero.
- CausalEncoder: SASRec-style causal self-attention blocks over [BOS, items] with recency
  embeddings; the user vector is the output at the most recent position (BOS when empty).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor


def make_item_ec(
    table: str, item_feature: str, history_feature: str, rows: int, dim: int, device: torch.device | str
) -> EmbeddingCollection:
    """One unpooled item table read by the item feature and the history feature (shared rows)."""
    cfg = EmbeddingConfig(
        name=table, embedding_dim=dim, num_embeddings=rows, feature_names=[item_feature, history_feature]
    )
    return EmbeddingCollection(tables=[cfg], device=torch.device(device))


def sum_pool(jt: JaggedTensor, batch: int) -> torch.Tensor:
    """[B, D] sum of each row's embeddings of a JaggedTensor with [N, D] values (zero for empty rows)."""
    values = jt.values()
    rows = torch.repeat_interleave(torch.arange(batch, device=values.device), jt.lengths().long())
    return values.new_zeros(batch, values.shape[1]).index_add_(0, rows, values)


def to_padded(jt: JaggedTensor, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L, D] embeddings left-aligned with zero padding, [B] lengths) of a jagged history."""
    values, lengths = jt.values(), jt.lengths().long().clamp(max=length)
    starts = torch.cumsum(lengths, 0) - lengths
    rows = torch.repeat_interleave(torch.arange(batch, device=values.device), lengths)
    pos = torch.arange(len(rows), device=values.device) - starts[rows]
    out = values.new_zeros(batch, length, values.shape[1])
    out[rows, pos] = values[: len(rows)]
    return out, lengths


def _recency(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] steps back from the most recent item (0) for positions 0..width-1; clamped at 0."""
    pos = torch.arange(width, device=lengths.device).unsqueeze(0)
    return (lengths.unsqueeze(1) - 1 - pos).clamp(min=0)


class MeanPooling(nn.Module):
    """Mean of the history's item embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        """[B, D] mean over the valid positions of x [B, L, D]."""
        return x.sum(1) / lengths.clamp(min=1).unsqueeze(1).to(x.dtype)


class AttentionPooling(nn.Module):
    """Attention of a learned (side-feature-dependent) query over the history, with recency embeddings."""

    def __init__(
        self, dim: int, length: int, side_dim: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.out_dim = dim
        self.query = nn.Parameter(torch.zeros(dim, device=device))
        self.recency = nn.Embedding(length, dim, device=device)
        nn.init.normal_(self.recency.weight, std=0.02)
        self.from_side = nn.Linear(side_dim, dim, device=device) if side_dim else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        """[B, D] attention-weighted sum of x [B, L, D]; zero for an empty history."""
        q = self.query.unsqueeze(0).expand(len(x), -1)
        if self.from_side is not None and side is not None:
            q = q + self.from_side(side)
        keys = x + self.recency(_recency(lengths, x.shape[1]))
        logits = (keys * q.unsqueeze(1)).sum(-1) / math.sqrt(x.shape[-1])  # [B, L]
        valid = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        logits = logits.masked_fill(~valid, float("-inf"))
        # A zero logit for "nothing": an empty history attends only to it and pools to zero.
        logits = torch.cat([logits, logits.new_zeros(len(x), 1)], dim=1)
        w = torch.softmax(logits, dim=1)[:, :-1]
        return (w.unsqueeze(-1) * x).sum(1)


class CausalEncoder(nn.Module):
    """SASRec-style: pre-norm causal Transformer blocks over [BOS, items] with recency embeddings."""

    def __init__(
        self,
        dim: int,
        length: int,
        layers: int,
        heads: int,
        dropout: float,
        ff_mult: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.out_dim = dim
        self.bos = nn.Parameter(torch.zeros(dim, device=device))
        self.recency = nn.Embedding(length + 1, dim, device=device)
        nn.init.normal_(self.recency.weight, std=0.02)
        self.norm_in = nn.LayerNorm(dim, device=device)
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(
            dim, heads, dim * ff_mult, dropout, batch_first=True, norm_first=True, device=device
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(dim, device=device)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        """[B, D] output at the most recent position of [BOS, x] (x [B, L, D], `lengths` valid)."""
        b, width = len(x), x.shape[1] + 1
        tokens = torch.cat([self.bos.expand(b, 1, -1), x], dim=1)  # item j sits at position j + 1
        h = self.drop(self.norm_in(tokens + self.recency(_recency(lengths + 1, width))))
        causal = nn.Transformer.generate_square_subsequent_mask(width, device=x.device)
        # Positions after the last item are padding; causality keeps them out of the positions used.
        h = self.norm_out(self.blocks(h, mask=causal, is_causal=True))
        return h[torch.arange(b, device=x.device), lengths]
