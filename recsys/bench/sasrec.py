"""An independent SASRec reference for `recsys bench quality --protocol loo`: plain PyTorch, none of the
product's model or trainer code.

SASRec (Kang & McAuley, 2018) with the full-softmax cross-entropy over the catalogue that Klenitskiy &
Vasilev (2023) showed to be its strongest variant: item embeddings shared with the output layer, learned
positions, pre-norm causal self-attention blocks, dropout. Trained on each user's train items in time
order (every position predicts the next item); validation scores a user from its train items, test from
its train items followed by its val item. Early stopping on val nDCG@10, the best state kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

PAD = 0  # token 0 pads; item row i is token i + 1


class SASRec(nn.Module):
    """Causal self-attention over an item sequence; the last position's state scores every item."""

    def __init__(
        self, items: int, hidden: int, layers: int, heads: int, max_len: int, dropout: float
    ) -> None:
        super().__init__()
        self.items = nn.Embedding(items + 1, hidden, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=hidden, dropout=dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(
            block, layers, norm=nn.LayerNorm(hidden), enable_nested_tensor=False
        )
        nn.init.normal_(self.items.weight, std=hidden**-0.5)
        with torch.no_grad():
            self.items.weight[PAD].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded tokens → [B, L, hidden] states (position t sees tokens ≤ t only)."""
        length = seqs.shape[1]
        pos = torch.arange(length, device=seqs.device)
        x = self.items(seqs) * self.items.embedding_dim**0.5 + self.positions(pos)
        x = x * (seqs != PAD).unsqueeze(-1)  # pads carry nothing, not even a position
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=seqs.device)
        # Padding is only on the left, before any real token: the causal mask alone keeps real positions
        # from attending to the future; pad positions' outputs are never used.
        return self.blocks(self.drop(x), mask=causal, is_causal=True)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """[..., hidden] states → [..., items] scores (the pad token is not a candidate)."""
        return states @ self.items.weight[1:].T


def left_pad(seqs: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """[len(seqs), length] tokens: each sequence's last `length` item rows as tokens, padded on the left."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for n, s in enumerate(seqs):
        tail = s[-length:] + 1
        if len(tail):
            out[n, length - len(tail) :] = tail
    return torch.from_numpy(out)


def training_windows(seqs: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [W, max_len] of every user: sequences longer than max_len + 1 are cut into
    windows from the end (each window's first target follows the previous window's last input), so
    every train transition is learnt once; targets are PAD where nothing is predicted."""
    ins, outs = [], []
    for s in seqs:
        end = len(s)
        while end >= 2:
            start = max(0, end - max_len - 1)
            ins.append(s[start : end - 1])
            outs.append(s[start + 1 : end])
            end = start + 1
    return left_pad(ins, max_len), left_pad(outs, max_len)


def user_scores(model: SASRec, seqs: Sequence[np.ndarray], max_len: int, batch: int = 256) -> torch.Tensor:
    """[U, items] scores of the next item after each user's sequence (eval mode, no grad)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch):
            tokens = left_pad(seqs[start : start + batch], max_len)
            out.append(model.logits(model(tokens)[:, -1]))
    model.train()
    return torch.cat(out)


def train_sasrec(
    train_seqs: Sequence[np.ndarray],
    test_seqs: Sequence[np.ndarray],
    n_items: int,
    validate: Callable[[torch.Tensor], float],
    hp: dict[str, Any],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train on `train_seqs` with full-softmax cross-entropy; `validate(val scores) → val nDCG@10` after
    every epoch, stop after `hp["patience"]` epochs without a gain, keep the best state.

    Returns (val scores, test scores from `test_seqs`, {"val_ndcg": best, "epoch": its epoch})."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SASRec(n_items, hp["hidden"], hp["layers"], hp.get("heads", 1), hp["max_len"], hp["dropout"])
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], betas=(0.9, 0.98))
    inputs, targets = training_windows(train_seqs, hp["max_len"])
    best: dict[str, Any] = {"val_ndcg": -1.0, "epoch": 0}
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, hp["epochs"] + 1):
        for idx in torch.randperm(len(inputs), generator=gen).split(hp.get("batch_size", 128)):
            y = targets[idx]
            keep = y != PAD
            states = model(inputs[idx])[keep]  # only positions with a next item
            loss = nn.functional.cross_entropy(model.logits(states), y[keep] - 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ndcg = validate(user_scores(model, train_seqs, hp["max_len"]))
        if ndcg > best["val_ndcg"]:
            best, best_state = {"val_ndcg": ndcg, "epoch": epoch}, copy.deepcopy(model.state_dict())
        elif epoch - best["epoch"] >= hp["patience"]:
            break
    model.load_state_dict(best_state)
    val_scores = user_scores(model, train_seqs, hp["max_len"])
    return val_scores, user_scores(model, test_seqs, hp["max_len"]), best
