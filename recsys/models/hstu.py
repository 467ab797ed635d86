"""HSTU-style causal encoder (model.sequential.block: hstu), after Zhai et al. 2024, "Actions Speak Louder
than Words" (meta-recsys/generative-recommenders), written for this project's history interface.

Each block: one projection of the normed input, through SiLU, gives U, V, Q, K; attention is pointwise,
SiLU(QKᵀ/√d + relative position bias) divided by the sequence width (no softmax: weights need not sum to
one, so how much a history says is not normalised away); the attended V is normed, gated by U, projected
and added back. The histories carry no timestamps here, so the relative bias is over positions only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recsys.models.sequence import _recency


class HSTUBlock(nn.Module):
    """One HSTU layer: pointwise SiLU attention with a relative position bias, gated by U."""

    def __init__(
        self, dim: int, width: int, heads: int, dropout: float, device: torch.device | str | None
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim, device=device)
        self.uvqk = nn.Linear(dim, 4 * dim, device=device)
        # bias[h, width - 1 + (j - i)]: one learned scalar per head and relative distance
        self.rel_bias = nn.Parameter(torch.zeros(heads, 2 * width - 1, device=device))
        self.attn_norm = nn.LayerNorm(dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, W, D] → [B, W, D]; position i attends to positions j ≤ i."""
        b, w, d = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).chunk(4, dim=-1)
        q, k, v = (t.view(b, w, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        idx = torch.arange(w, device=x.device)
        rel = idx.unsqueeze(0) - idx.unsqueeze(1) + self.rel_bias.shape[1] // 2  # j - i, shifted to ≥ 0
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + self.rel_bias[:, rel]
        causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # [i, j]: j ≤ i
        attn = self.drop(F.silu(logits) * causal / w)
        h = (attn @ v).transpose(1, 2).reshape(b, w, d)
        return x + self.out(self.drop(self.attn_norm(h) * u))


class HSTUEncoder(nn.Module):
    """HSTU blocks over [BOS, items] with recency embeddings; the user vector is the last item's output."""

    def __init__(
        self, dim: int, length: int, layers: int, heads: int, dropout: float,
        device: torch.device | str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.out_dim = dim
        self.bos = nn.Parameter(torch.zeros(dim, device=device))
        self.recency = nn.Embedding(length + 1, dim, device=device)
        nn.init.normal_(self.recency.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(HSTUBlock(dim, length + 1, heads, dropout, device) for _ in range(layers))
        self.norm_out = nn.LayerNorm(dim, device=device)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        """[B, D] output at the most recent position of [BOS, x] (x [B, L, D], `lengths` valid)."""
        b, width = len(x), x.shape[1] + 1
        h = torch.cat([self.bos.expand(b, 1, -1), x], dim=1)  # item j sits at position j + 1
        h = self.drop(h + self.recency(_recency(lengths + 1, width)))
        # Padding sits after the last item; causality keeps it out of every position that is read.
        for block in self.blocks:
            h = block(h)
        return self.norm_out(h)[torch.arange(b, device=x.device), lengths]
